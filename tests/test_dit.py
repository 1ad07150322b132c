"""The routing DiT beyond the contract both DiTs keep (tests/test_dit_contract.py): latent sizes, empty and
bf16 captions, what the prepared text holds, adaLN, routing summaries, presets."""

from __future__ import annotations

import pytest
import torch

from semroute.shared.errors import SemrouteError
from semroute.stage2_train.dit import SemrouteDiT
from semroute.stage2_train.fusion import FUSIONS
from semroute.stage2_train.presets import PRESETS
from testkit import perturb, text_batch

ALL = list(FUSIONS)


def tiny(fusion: str = "depth", **overrides) -> SemrouteDiT:
    torch.manual_seed(0)
    model = SemrouteDiT.from_preset("tiny", fusion=fusion, **overrides).eval()
    perturb(model)
    return model


@pytest.mark.parametrize("fusion", ALL)
@pytest.mark.parametrize("size", [(16, 24), (24, 16), (2, 6)])
def test_any_latent_size_divisible_by_the_patch(fusion, size):
    model = tiny(fusion)
    latents = torch.randn(2, 4, *size)
    features, mask = text_batch(model, [3, 5])
    out = model(latents, torch.tensor([100.0, 700.0]), features, mask).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()


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
def test_prepared_text_holds_keys_values_only_for_sigma_free_gates(fusion):
    """Sigma-free strategies carry the projected keys/values; sigma-dependent ones the LN'd features (that
    reuse equals recomputing is the contract, tests/test_dit_contract.py)."""
    model = tiny(fusion)
    context = model.prepare_text(*text_batch(model, [3, 6]))
    assert (context.kv is None) == FUSIONS[fusion].time_dependent
    assert (context.hidden_ln is None) != FUSIONS[fusion].time_dependent


def test_adaln_option_makes_the_output_depend_on_the_timestep():
    features, mask = text_batch(tiny(), [3])
    latents = torch.randn(1, 4, 8, 8)
    for adaln in (False, True):
        model = tiny("depth", adaln=adaln)
        a = model(latents, torch.tensor([100.0]), features, mask).sample
        b = model(latents, torch.tensor([900.0]), features, mask).sample
        assert torch.equal(a, b) != adaln  # the reference has no timestep input at all


def test_proj_out_std_replaces_the_zero_init_of_the_output_projection(tmp_path):
    torch.manual_seed(0)
    reference = SemrouteDiT.from_preset("tiny", fusion="depth")
    assert not reference.proj_out.weight.any()  # the reference: the model starts predicting 0
    torch.manual_seed(0)
    model = SemrouteDiT.from_preset("tiny", fusion="depth", proj_out_std=0.02)
    std = model.proj_out.weight.std().item()
    assert 0.015 < std < 0.025 and not model.proj_out.bias.any()
    features, mask = text_batch(model, [3])
    assert model(torch.randn(1, 4, 8, 8), torch.tensor([500.0]), features, mask).sample.abs().sum() > 0
    model.save_pretrained(tmp_path)  # the option is part of the saved config
    assert SemrouteDiT.from_pretrained(tmp_path).config.proj_out_std == 0.02


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
