"""The DiT: shapes, padding invariance, save/load, per-prompt text reuse, presets."""

from __future__ import annotations

import pytest
import torch

from semroute.shared.errors import SemrouteError
from semroute.stage2_train.dit import SemrouteDiT
from semroute.stage2_train.fusion import FUSIONS
from semroute.stage2_train.presets import PRESETS

ALL = list(FUSIONS)


def perturb(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Move every parameter off its init: zero-initialised outputs and gates would hide most bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def tiny(fusion: str = "depth", **overrides) -> SemrouteDiT:
    torch.manual_seed(0)
    model = SemrouteDiT.from_preset("tiny", fusion=fusion, **overrides).eval()
    perturb(model)
    return model


def text_batch(model: SemrouteDiT, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded random features ``[B, max_len, L, D]`` (zeros in padding, as a loader pads) and the mask."""
    gen = torch.Generator().manual_seed(seed)
    T, L, D = max(lengths), len(model.text_layers), model.config.text_dim
    features = torch.zeros(len(lengths), T, L, D)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        features[i, :n] = torch.randn(n, L, D, generator=gen)
        mask[i, :n] = True
    return features, mask


def test_fresh_model_predicts_zero():
    model = SemrouteDiT.from_preset("tiny")
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 999.0]), torch.randn(2, 3, 4, 32)).sample
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("fusion", ALL)
@pytest.mark.parametrize("size", [(16, 24), (24, 16), (2, 6)])
def test_any_latent_size_divisible_by_the_patch(fusion, size):
    model = tiny(fusion)
    latents = torch.randn(2, 4, *size)
    features, mask = text_batch(model, [3, 5])
    out = model(latents, torch.tensor([100.0, 700.0]), features, mask).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()


def test_latent_size_not_divisible_by_the_patch_is_refused():
    model = tiny()
    with pytest.raises(SemrouteError, match="multiples of the patch size 2, got 16x15"):
        model(torch.randn(1, 4, 16, 15), torch.tensor([1.0]), torch.randn(1, 3, 4, 32))


def test_text_of_the_wrong_shape_is_refused():
    model = tiny()
    with pytest.raises(SemrouteError, match=r"\[batch, tokens, 4 layers, 32\].*got \[1, 3, 2, 32\]"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 3, 2, 32))


@pytest.mark.parametrize("fusion", ALL)
def test_padding_invariance(fusion):
    """A caption's output must not change when a longer caption joins its batch (fp32, tight tolerance)."""
    model = tiny(fusion)
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 12, generator=gen)
    t = torch.tensor([250.0, 800.0])
    features, mask = text_batch(model, [3, 9])
    alone = model(latents[:1], t[:1], features[:1, :3], mask[:1, :3]).sample
    batched = model(latents, t, features, mask).sample
    torch.testing.assert_close(batched[:1], alone, rtol=0, atol=1e-5)
    # Garbage in the padded positions (not zeros) must not leak either.
    features[0, 3:] = torch.randn(6, *features.shape[2:], generator=gen) * 100
    torch.testing.assert_close(model(latents, t, features, mask).sample[:1], alone, rtol=0, atol=1e-5)


def test_a_caption_without_tokens_gives_no_nan():
    model = tiny("depth")
    features, mask = text_batch(model, [4, 2])
    mask[1] = False
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([10.0, 20.0]), features, mask).sample
    assert torch.isfinite(out).all()


def test_bf16_text_is_normalised_in_fp32():
    model = tiny("depth")
    features, mask = text_batch(model, [4, 2])
    features = features.to(torch.bfloat16)
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 20.0])
    out = model(latents, t, features, mask).sample
    assert out.dtype == torch.float32
    assert torch.equal(out, model(latents, t, features.float(), mask).sample)


@pytest.mark.parametrize("fusion", ALL)
def test_prepared_text_reused_across_steps_equals_recomputing(fusion):
    model = tiny(fusion)
    features, mask = text_batch(model, [3, 6])
    latents = torch.randn(2, 4, 8, 8)
    context = model.prepare_text(features, mask)
    # Sigma-free strategies carry the projected keys/values; sigma-dependent ones the LN'd features.
    assert (context.kv is None) == FUSIONS[fusion].time_dependent
    assert (context.hidden_ln is None) != FUSIONS[fusion].time_dependent
    for t in (999.0, 500.0, 1.0):  # three sampling steps with one context
        timestep = torch.full((2,), t)
        reused = model(latents, timestep, text_context=context).sample
        recomputed = model(latents, timestep, features, mask).sample
        assert torch.equal(reused, recomputed)


@pytest.mark.parametrize("fusion", ALL)
def test_save_pretrained_from_pretrained_round_trip(fusion, tmp_path):
    model = tiny(fusion, adaln=fusion == "joint")  # cover the adaLN option once
    model.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors")) and (tmp_path / "config.json").exists()
    loaded = SemrouteDiT.from_pretrained(tmp_path).eval()
    assert loaded.config.fusion == fusion and loaded.text_layers == model.text_layers
    features, mask = text_batch(model, [3, 6])
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([300.0, 600.0])
    assert torch.equal(loaded(latents, t, features, mask).sample, model(latents, t, features, mask).sample)
    assert torch.equal(loaded.routing_weights([0.2, 0.9]), model.routing_weights([0.2, 0.9]))


def test_adaln_option_makes_the_output_depend_on_the_timestep():
    features, mask = text_batch(tiny(), [3])
    latents = torch.randn(1, 4, 8, 8)
    for adaln in (False, True):
        model = tiny("depth", adaln=adaln)
        a = model(latents, torch.tensor([100.0]), features, mask).sample
        b = model(latents, torch.tensor([900.0]), features, mask).sample
        assert torch.equal(a, b) != adaln  # the reference has no timestep input at all


def test_gradient_checkpointing_gives_the_same_gradients():
    features, mask = text_batch(tiny(), [3, 5])
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([100.0, 900.0])
    grads = []
    for checkpointing in (False, True):
        model = tiny("joint").train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(latents, t, features, mask).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_routing_summary_for_logs():
    model = tiny("depth")
    summary = model.routing_summary()
    assert len(summary["entropy"]) == len(summary["top_layer"]) == model.config.num_blocks
    assert all(layer in model.text_layers for layer in summary["top_layer"])
    with pytest.raises(ValueError, match="pass `sigma`"):
        tiny("time").routing_weights()


def expected_parameter_count(config) -> int:
    """The parameters of SemrouteDiT written out from its config (adaln=False)."""
    d, p = config.hidden_size, config.patch_size
    q_dim, kv_dim = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    patch_dim = config.in_channels * p * p
    L = len(config.text_layers)
    attention = d * q_dim + 2 * d * kv_dim + q_dim * d + 2 * config.head_dim  # q, k, v, out, QK-norm
    block = 2 * attention + 3 * d * config.mlp_hidden_size + 2 * d  # self + cross, SwiGLU, two RMSNorms
    gate = config.gate_embed_dim * config.gate_hidden_dim + config.gate_hidden_dim + config.gate_hidden_dim * L + L
    fusion = {
        "penultimate": 0, "uniform": 0, "static": L, "depth": config.num_blocks * L,
        "time": gate, "joint": config.num_blocks * gate,
    }[config.fusion]
    return (
        patch_dim * d + d  # patch embedding
        + config.text_dim + config.text_dim * d + d  # context embedder: RMSNorm + Linear
        + config.num_blocks * block
        + d + d * patch_dim + patch_dim  # final norm, output projection
        + fusion
    )


@pytest.mark.parametrize("fusion", ALL)
def test_paper_preset_parameter_count(fusion):
    with torch.device("meta"):  # 2B parameters cost nothing here
        model = SemrouteDiT.from_preset("paper", fusion=fusion)
    config = model.config
    assert (config.num_blocks, config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
            config.mlp_hidden_size, config.text_dim, config.in_channels) == (24, 2048, 32, 8, 128, 8192, 2560, 16)
    assert len(model.text_layers) == (1 if fusion == "penultimate" else 36)
    total = sum(p.numel() for p in model.parameters())
    print(f"paper preset, {fusion}: {total:,} parameters")
    assert total == expected_parameter_count(config)


def test_presets_build():
    assert set(PRESETS) == {"tiny", "small", "base", "paper"}
    for name in ("base", "small"):
        with torch.device("meta"):
            model = SemrouteDiT.from_preset(name, text_dim=64, llm_num_layers=8)  # text side overridable
        assert model.config.text_dim == 64 and model.text_layers == list(range(1, 9))
    assert SemrouteDiT.from_preset("tiny", text_layers="last:2").config.text_layers == [3, 4]  # cache spec strings
    with pytest.raises(SemrouteError, match="tiny, small, base, paper"):
        SemrouteDiT.from_preset("huge")
