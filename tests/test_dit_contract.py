"""The contract of a semroute DiT (``dit_base.DiTBase``), one suite run over both models, as diffusers'
``ModelTesterMixin`` does for its models: a fresh model predicts zero, a caption's output does not depend on
its batch-mates or its padding, prepared text reused across sampling steps equals recomputing it,
save/load round-trips, gradient checkpointing gives the same gradients, wrong text shapes are refused,
routing rows are distributions over ``text_layers``. Model-specific behaviour stays in test_dit.py and
test_deep_fusion.py."""

from __future__ import annotations

import pytest
import torch

from semroute.shared.errors import SemrouteError
from semroute.stage2_train.deep_fusion import DeepFusionDiT
from semroute.stage2_train.dit import SemrouteDiT
from semroute.stage2_train.fusion import FUSIONS
from testkit import perturb, text_batch


class DiTContract:
    """Subclasses set ``model_class`` and ``variant`` (extra config of the model under test)."""

    model_class: type
    variant: dict = {}

    def make(self, perturbed: bool = True, **overrides):
        torch.manual_seed(0)
        model = self.model_class.from_preset("tiny", **{**self.variant, **overrides}).eval()
        if perturbed:
            perturb(model)
        return model

    @pytest.mark.parametrize("adaln", [False, True])
    def test_fresh_model_predicts_zero(self, adaln):
        model = self.make(perturbed=False, adaln=adaln)
        features, mask = text_batch(model, [3, 5])
        out = model(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 999.0]), features, mask).sample
        assert torch.equal(out, torch.zeros_like(out))

    def test_output_does_not_depend_on_batch_mates_or_padding(self):
        """A caption's output must not change when a longer caption joins its batch, nor with garbage in its
        padded positions (fp32, tight tolerance); its text does matter."""
        model = self.make()
        gen = torch.Generator().manual_seed(1)
        latents, t = torch.randn(2, 4, 8, 12, generator=gen), torch.tensor([250.0, 800.0])
        features, mask = text_batch(model, [3, 9])
        alone = model(latents[:1], t[:1], features[:1, :3], mask[:1, :3]).sample
        torch.testing.assert_close(model(latents, t, features, mask).sample[:1], alone, rtol=0, atol=1e-5)
        features[0, 3:] = 100 * torch.randn(6, *features.shape[2:], generator=gen)
        torch.testing.assert_close(model(latents, t, features, mask).sample[:1], alone, rtol=0, atol=1e-5)
        other, _ = text_batch(model, [3, 9], seed=5)
        assert not torch.allclose(model(latents, t, other, mask).sample[:1], alone, atol=1e-3)

    def test_prepared_text_reused_across_steps_equals_recomputing(self):
        model = self.make(adaln=True)  # with adaLN the timestep matters for every model, so the steps differ
        features, mask = text_batch(model, [3, 6])
        latents = torch.randn(2, 4, 8, 8)
        context = model.prepare_text(features, mask)
        outputs = []
        for t in (999.0, 500.0, 1.0):  # three sampling steps with one context
            timestep = torch.full((2,), t)
            reused = model(latents, timestep, text_context=context).sample
            assert torch.equal(reused, model(latents, timestep, features, mask).sample)
            outputs.append(reused)
        assert not torch.equal(outputs[0], outputs[1])

    @pytest.mark.parametrize("adaln", [False, True])
    def test_save_pretrained_from_pretrained_round_trip(self, adaln, tmp_path):
        model = self.make(adaln=adaln)
        model.save_pretrained(tmp_path)
        assert list(tmp_path.glob("*.safetensors")) and (tmp_path / "config.json").exists()
        loaded = self.model_class.from_pretrained(tmp_path).eval()
        public = lambda config: {k: v for k, v in dict(config).items() if not k.startswith("_")}  # noqa: E731
        assert public(loaded.config) == public(model.config) and loaded.text_layers == model.text_layers
        features, mask = text_batch(model, [3, 6])
        latents, t = torch.randn(2, 4, 8, 8), torch.tensor([300.0, 600.0])
        assert torch.equal(loaded(latents, t, features, mask).sample, model(latents, t, features, mask).sample)

    def test_gradient_checkpointing_gives_the_same_gradients(self):
        model = self.make().train()
        features, mask = text_batch(model, [3, 5])
        latents, t = torch.randn(2, 4, 8, 8), torch.tensor([100.0, 900.0])

        def grads():
            model.zero_grad()
            model(latents, t, features, mask).sample.square().mean().backward()
            return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        plain = grads()
        model.enable_gradient_checkpointing()
        checkpointed = grads()
        assert plain.keys() == checkpointed.keys() and plain
        for name in plain:
            torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)

    def test_text_of_the_wrong_shape_is_refused(self):
        model = self.make()
        L, D = len(model.text_layers), model.config.text_dim
        with pytest.raises(SemrouteError, match=rf"\[batch, tokens, {L} layers, {D}\].*got \[1, 3, {L + 1}, {D}\]"):
            model(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 3, L + 1, D))
        with pytest.raises(SemrouteError, match=r"text_mask must be \[batch, tokens\]"):
            model.prepare_text(torch.randn(2, 3, L, D), torch.ones(2, 4, dtype=torch.bool))
        with pytest.raises(SemrouteError, match="multiples of the patch size 2, got 16x15"):
            model(torch.randn(1, 4, 16, 15), torch.tensor([1.0]), torch.randn(1, 3, L, D))

    def test_routing_rows_are_distributions_over_the_text_layers(self):
        model = self.make()
        weights = model.routing_weights([0.2, 0.7])  # [S, (blocks,) L]
        assert weights.shape[0] == 2 and weights.shape[-1] == len(model.text_layers)
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
        summary = model.routing_summary(0.5)
        assert len(summary["weights"]) == len(summary["entropy"]) == model.config.num_blocks
        assert set(summary["top_layer"]) <= set(model.text_layers)
        assert all(e >= 0 for e in summary["entropy"])


@pytest.mark.parametrize("fusion", list(FUSIONS))
class TestSemrouteDiT(DiTContract):
    model_class = SemrouteDiT

    @pytest.fixture(autouse=True)
    def _fusion(self, fusion):
        self.variant = {"fusion": fusion}


class TestDeepFusionDiT(DiTContract):
    model_class = DeepFusionDiT
