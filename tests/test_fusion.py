"""Fusion strategies: the math of docs/method.md, initial uniformity, and the layer bookkeeping."""

from __future__ import annotations

import pytest
import torch

from semroute.shared.errors import SemrouteError
from semroute.stage2_train import dit as dit_module
from semroute.stage2_train.dit import SemrouteDiT
from semroute.stage2_train.fusion import (
    FUSIONS,
    build_fusion,
    gather_positions,
    layer_norm_layers,
)

GATED = ["static", "time", "depth", "joint"]
L, BLOCKS = 5, 3


def perturb(module: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> None:
    """Move every parameter off its initial value so that zero-initialised gates are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def make(name: str) -> torch.nn.Module:
    options = {"position": L - 2} if name == "penultimate" else {}
    return build_fusion(name, L, BLOCKS, **options)


def reference_layer_norm(h: torch.Tensor) -> torch.Tensor:
    """LN over D written out, independent of F.layer_norm: (x - mean) / sqrt(var + 1e-5)."""
    h = h.double()
    mean = h.mean(-1, keepdim=True)
    var = ((h - mean) ** 2).mean(-1, keepdim=True)
    return ((h - mean) / torch.sqrt(var + 1e-5)).float()


@pytest.mark.parametrize("name", list(FUSIONS))
def test_weights_are_convex(name):
    fusion = make(name)
    perturb(fusion)
    sigma = torch.tensor([0.0, 0.3, 1.0])
    weights = fusion.weights(sigma if fusion.time_dependent else None)
    expected = ([3] if fusion.time_dependent else []) + ([BLOCKS] if fusion.per_block else []) + [L]
    assert list(weights.shape) == expected
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(expected[:-1]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", GATED)
def test_gated_strategies_start_exactly_uniform_after_model_init(name):
    model = SemrouteDiT.from_preset("tiny", fusion=name)
    n = len(model.text_layers)
    sigma = torch.tensor([0.0, 0.25, 0.5, 1.0])
    weights = model.routing_weights(sigma)
    assert torch.equal(weights, torch.full_like(weights, 1.0 / n))
    # Re-initialising the whole model (its generic Linear init included) keeps the gates at zero.
    perturb(model.router)
    model.initialize_weights()
    assert torch.equal(model.routing_weights(sigma), weights)


def test_time_gate_has_the_paper_parameter_count():
    """Linear(128, 512) + Linear(512, L): 84,516 parameters at L=36 (docs/method.md, fusion table)."""
    gate = build_fusion("time", 36, 24)
    assert sum(p.numel() for p in gate.parameters()) == 84_516
    joint = build_fusion("joint", 36, 24)
    assert sum(p.numel() for p in joint.parameters()) == 24 * 84_516


def test_layer_norm_is_fp32_parameter_free_per_layer_and_token():
    h = torch.randn(2, 3, L, 16).to(torch.bfloat16) * 7 + 3
    out = layer_norm_layers(h)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference_layer_norm(h.float()), rtol=0, atol=1e-5)
    assert torch.equal(layer_norm_layers(torch.zeros(1, 2, L, 16)), torch.zeros(1, 2, L, 16))  # padding stays 0


def test_uniform_is_the_mean_of_layer_normed_layers():
    h = torch.randn(2, 4, L, 16) * 3 + 1
    fused = make("uniform").fuse(layer_norm_layers(h))
    torch.testing.assert_close(fused, reference_layer_norm(h).mean(2), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["static", "time", "depth", "joint"])
def test_fuse_is_the_weighted_sum_of_the_design(name):
    """H_cond = sum_l alpha^(l) LN(H^(l)), checked against an explicit loop over layers."""
    fusion = make(name)
    perturb(fusion, seed=1)
    h_ln = layer_norm_layers(torch.randn(2, 3, L, 8))
    sigma = torch.tensor([0.2, 0.8])
    fused = fusion.fuse(h_ln, sigma)
    weights = fusion.weights(sigma if fusion.time_dependent else None)
    if not fusion.time_dependent:
        weights = weights.expand(2, *weights.shape)  # [B, (blocks,) L]
    if not fusion.per_block:
        weights = weights[:, None]  # [B, 1, L]
    expected = torch.stack([
        torch.stack([sum(weights[b, k, l] * h_ln[b, :, l] for l in range(L)) for b in range(2)])
        for k in range(weights.shape[1])
    ])  # [k, B, T, D]
    torch.testing.assert_close(fused, expected if fusion.per_block else expected[0], rtol=1e-5, atol=1e-6)


def test_penultimate_reads_only_the_second_to_last_layer():
    n = 4  # tiny preset's LLM depth; hidden_states[-2] is index 3
    model = SemrouteDiT.from_preset("tiny", fusion="penultimate", text_layers=list(range(1, n + 1)))
    perturb(model, scale=0.05)
    assert model.routing_weights().tolist() == [0.0, 0.0, 1.0, 0.0]
    latents, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    text = torch.randn(1, 6, n, 32)
    out = model(latents, t, text).sample
    others = text.clone()
    others[:, :, [0, 1, 3]] = torch.randn(1, 6, 3, 32)
    assert torch.equal(model(latents, t, others).sample, out)
    penultimate = text.clone()
    penultimate[:, :, 2] = torch.randn(1, 6, 32)
    assert not torch.allclose(model(latents, t, penultimate).sample, out)


def test_penultimate_defaults_to_reading_just_that_layer():
    model = SemrouteDiT.from_preset("tiny", fusion="penultimate")
    assert model.text_layers == [3]
    with pytest.raises(SemrouteError, match="hidden_states\\[-2\\] = index 3"):
        SemrouteDiT.from_preset("tiny", fusion="penultimate", text_layers=[1, 2, 4])


def _velocity_step(model, sigmas, seed=0, lr=1.0):
    """One SGD step of a flow-matching-style loss on random data at the given noise levels."""
    gen = torch.Generator().manual_seed(seed)
    B = len(sigmas)
    latents = torch.randn(B, 4, 8, 8, generator=gen)
    target = torch.randn(B, 4, 8, 8, generator=gen)
    text = torch.randn(B, 5, len(model.text_layers), 32, generator=gen)
    loss = (model(latents, torch.tensor(sigmas) * 1000, text).sample - target).pow(2).mean()
    optimizer = torch.optim.SGD(model.router.parameters(), lr=lr)
    loss.backward()
    optimizer.step()


def test_depth_blocks_learn_different_mixtures():
    torch.manual_seed(0)
    model = SemrouteDiT.from_preset("tiny", fusion="depth")
    perturb(model, scale=0.05)
    model.router.reset_parameters()  # rows start equal (uniform) ...
    assert torch.equal(model.routing_weights()[0], model.routing_weights()[1])
    _velocity_step(model, [0.3, 0.7])
    weights = model.routing_weights()  # ... and each block's own gradient moves it differently
    assert weights.shape == (2, 4)
    assert (weights[0] - weights[1]).abs().max() > 1e-6


def test_time_weights_depend_on_sigma_and_depth_weights_do_not():
    sigma = torch.tensor([0.05, 0.5, 0.95])
    for name, varies in [("time", True), ("joint", True), ("depth", False), ("static", False)]:
        torch.manual_seed(0)
        model = SemrouteDiT.from_preset("tiny", fusion=name)
        perturb(model, scale=0.05)
        model.router.reset_parameters()
        _velocity_step(model, [0.1, 0.9])
        weights = model.routing_weights(sigma)  # [S, (blocks,) L]
        assert not torch.allclose(weights, torch.full_like(weights, 0.25)), name  # it trained
        differs = (weights[0] - weights[2]).abs().max() > 1e-6
        assert bool(differs) == varies, name


def test_layer_norm_runs_once_per_forward(monkeypatch):
    calls = []

    def counting(hidden, *args, **kwargs):
        calls.append(hidden.shape)
        return layer_norm_layers(hidden, *args, **kwargs)

    monkeypatch.setattr(dit_module, "layer_norm_layers", counting)
    for name in ("depth", "joint"):
        calls.clear()
        model = SemrouteDiT.from_preset("tiny", fusion=name, num_blocks=3)
        model(torch.randn(2, 4, 8, 8), torch.tensor([10.0, 20.0]), torch.randn(2, 5, 4, 32))
        assert len(calls) == 1, name


def test_gather_positions_and_missing_layers_message():
    assert gather_positions([1, 3], [3, 2, 1], num_hidden_layers=4) == [2, 0]
    assert gather_positions([-2], [1, 2, 3, 4], num_hidden_layers=4) == [2]  # -2 -> index 3
    model = SemrouteDiT.from_preset("tiny", fusion="depth")  # reads layers 1..4
    assert model.layer_positions([0, 1, 2, 3, 4]) == [1, 2, 3, 4]
    with pytest.raises(SemrouteError, match=r"stores LLM layers \[1, 2\].*reads \[1, 2, 3, 4\]; missing: \[3, 4\]"):
        model.layer_positions([1, 2])
    with pytest.raises(SemrouteError, match="out of range"):
        gather_positions([5], [1, 2], num_hidden_layers=4)


def test_unknown_fusion_names_the_choices():
    with pytest.raises(SemrouteError, match="penultimate, uniform, static, time, depth, joint"):
        build_fusion("deepest", L, BLOCKS)
