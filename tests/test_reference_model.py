"""The model keys that reproduce the reference (docs/method.md, "Exact reproduction"): context embedder,
2D RoPE of both DiTs, the time gates' sigma embedding and init; checked against direct formulas."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

from semroute.stage2_train import dit as dit_module
from semroute.stage2_train.deep_attention import apply_rope
from semroute.stage2_train.deep_fusion import DeepFusionDiT
from semroute.stage2_train.dit import SemrouteDiT
from semroute.stage2_train.fusion import FUSIONS, build_fusion, sigma_embedding

REFERENCE_KEYS = dict(context_embedder_type="reference", gate_sigma_scale=1.0, gate_init="reference")


# --------------------------------------------------------------------------------------------------
# Parameter counts at the paper preset, from the architecture
# --------------------------------------------------------------------------------------------------


def dit_parameter_count(config) -> int:
    """SemrouteDiT's parameters written out from its config (adaln=False), for both context embedders."""
    d, p, D = config.hidden_size, config.patch_size, config.text_dim
    q_dim, kv_dim = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    context = D if config.context_embedder_type == "reference" else d  # width the text K/V are projected from
    patch_dim = config.in_channels * p * p
    L = len(config.text_layers)
    qk_norm = 2 * config.head_dim
    self_attn = d * q_dim + 2 * d * kv_dim + q_dim * d + qk_norm
    cross_attn = d * q_dim + 2 * context * kv_dim + q_dim * d + qk_norm
    block = self_attn + cross_attn + 3 * d * config.mlp_hidden_size + 2 * d  # SwiGLU, two RMSNorms
    gate = config.gate_embed_dim * config.gate_hidden_dim + config.gate_hidden_dim + config.gate_hidden_dim * L + L
    fusion = {"penultimate": 0, "uniform": 0, "static": L, "depth": config.num_blocks * L,
              "time": gate, "joint": config.num_blocks * gate}[config.fusion]
    return (patch_dim * d + d  # patch embedding
            + D + D * context + context  # context embedder: RMSNorm + Linear
            + config.num_blocks * block
            + d + d * patch_dim + patch_dim  # final norm, output projection
            + fusion)


def deep_parameter_count(config) -> tuple[int, int]:
    """DeepFusionDiT's (trainable, frozen) parameters written out from its config (adaln=False, Qwen3 k_norm, no bias)."""
    d, p, D, hd = config.hidden_size, config.patch_size, config.text_dim, config.llm_head_dim
    q_dim, kv_dim = config.llm_num_heads * hd, config.llm_num_kv_heads * hd
    patch_dim = config.in_channels * p * p
    block = d * q_dim + 2 * d * kv_dim + q_dim * d + 2 * hd + 3 * d * config.mlp_hidden_size + 2 * d
    trainable = patch_dim * d + d + config.num_blocks * block + d + d * patch_dim + patch_dim
    frozen = config.num_blocks * (D + 2 * D * kv_dim + hd)  # input_layernorm, k_proj, v_proj, k_norm
    return trainable, frozen


@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("keys", ["ours", "reference"])
def test_paper_preset_parameter_count(fusion, keys):
    with torch.device("meta"):  # 2.2B parameters cost nothing here
        model = SemrouteDiT.from_preset("paper", fusion=fusion, **(REFERENCE_KEYS if keys == "reference" else {}))
    total = sum(p.numel() for p in model.parameters())
    print(f"paper preset, {fusion}, {keys} keys: {total:,} parameters")
    assert total == dit_parameter_count(model.config)
    if keys == "reference":  # the reference's text path: RMSNorm(2560) -> Linear(2560, 2560), K/V from 2560
        assert model.context_embedder[1].weight.shape == (2560, 2560)
        assert model.blocks[0].cross_attn.to_k.weight.shape == (8 * 128, 2560)


def test_reference_text_path_is_26_5m_parameters_larger_at_the_paper_size():
    """The difference is (D*D + D - D*d - d) + blocks * 2 * (D - d) * kv_dim = 26,477,056 at D=2560, d=2048."""
    with torch.device("meta"):
        ours = SemrouteDiT.from_preset("paper", fusion="depth")
        reference = SemrouteDiT.from_preset("paper", fusion="depth", context_embedder_type="reference")
    D, d, kv = 2560, 2048, 8 * 128
    difference = (D * D + D - D * d - d) + 24 * 2 * (D - d) * kv
    assert sum(p.numel() for p in reference.parameters()) - sum(p.numel() for p in ours.parameters()) == difference


def test_deep_paper_preset_parameter_count():
    with torch.device("meta"):
        model = DeepFusionDiT.from_preset("paper", image_rope="reference")
    trainable = sum(p.numel() for p in model.trainable_parameters())
    frozen = sum(p.numel() for n, p in model.named_parameters() if n.startswith("llm_layers."))
    print(f"paper preset, deep: {trainable:,} trainable + {frozen:,} frozen LLM parameters")
    assert (trainable, frozen) == deep_parameter_count(model.config)


# --------------------------------------------------------------------------------------------------
# 1. The context embedder
# --------------------------------------------------------------------------------------------------


def test_reference_context_embedder_shape_and_init():
    torch.manual_seed(0)
    model = SemrouteDiT.from_preset("small", fusion="depth", context_embedder_type="reference")
    D, kv = model.config.text_dim, model.config.num_kv_heads * model.config.head_dim
    norm, linear = model.context_embedder
    assert norm.weight.shape == (D,) and linear.weight.shape == (D, D) and linear.bias.shape == (D,)
    assert abs(linear.weight.std().item() - 0.02) < 0.02 * 0.02  # N(0, 0.02): 331,776 draws
    assert abs(linear.weight.mean().item()) < 1e-3 and torch.equal(linear.bias, torch.zeros(D))
    for block in model.blocks:
        assert block.cross_attn.to_k.weight.shape == block.cross_attn.to_v.weight.shape == (kv, D)
        assert block.cross_attn.to_q.weight.shape[1] == model.config.hidden_size  # queries stay image-side
    # Ours: Linear(D, hidden) with xavier-uniform weights (std sqrt(2 / (fan_in + fan_out))), K/V from hidden.
    ours = SemrouteDiT.from_preset("small", fusion="depth")
    weight = ours.context_embedder[1].weight
    assert weight.shape == (ours.config.hidden_size, D)
    assert abs(weight.std().item() / math.sqrt(2 / sum(weight.shape)) - 1) < 0.02
    assert ours.blocks[0].cross_attn.to_k.weight.shape == (kv, ours.config.hidden_size)


@pytest.mark.parametrize("fusion", ["static", "joint"])
def test_reference_keys_survive_save_and_load(fusion, tmp_path):
    torch.manual_seed(0)
    model = SemrouteDiT.from_preset("tiny", fusion=fusion, rope_theta=1e5, **REFERENCE_KEYS).eval()
    model.save_pretrained(tmp_path)
    loaded = SemrouteDiT.from_pretrained(tmp_path).eval()
    for key, value in {**REFERENCE_KEYS, "rope_theta": 1e5}.items():
        assert loaded.config[key] == value
    features = torch.randn(2, 3, len(model.text_layers), model.config.text_dim)
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([300.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(latents, t, features).sample, model(latents, t, features).sample, rtol=0, atol=0)


def test_deep_image_rope_key_survives_save_and_load(tmp_path):
    model = DeepFusionDiT.from_preset("tiny", image_rope="reference")
    model.save_pretrained(tmp_path)
    assert DeepFusionDiT.from_pretrained(tmp_path).config.image_rope == "reference"


# --------------------------------------------------------------------------------------------------
# 2. / 4. 2D RoPE of the image tokens
# --------------------------------------------------------------------------------------------------


def grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(h).repeat_interleave(w).double(), torch.arange(w).repeat(h).double()  # rows, cols [N]


def scores_depend_only_on_offsets(scores: torch.Tensor, h: int, w: int) -> bool:
    """``scores[i, j]`` over a row-major h x w grid equals every other entry with the same (row, col) offset."""
    rows, cols = grid(h, w)
    by_offset: dict[tuple[int, int], list[float]] = {}
    for i in range(h * w):
        for j in range(h * w):
            by_offset.setdefault((int(rows[i] - rows[j]), int(cols[i] - cols[j])), []).append(scores[i, j].item())
    spread = max(max(v) - min(v) for v in by_offset.values())
    distinct = len({round(v[0], 3) for v in by_offset.values()})
    return spread < 1e-4 and distinct > len(by_offset) // 2  # constant per offset, and not constant overall


@pytest.mark.parametrize("fusion,theta", [("depth", 1e5), ("uniform", 1e4)])
def test_dit_rope_is_the_direct_2d_formula_at_the_configured_theta(fusion, theta, monkeypatch):
    h, w, hd = 3, 5, 16
    model = SemrouteDiT.from_preset("tiny", fusion=fusion, rope_theta=theta).eval()
    seen = []
    original = dit_module.rope_2d
    monkeypatch.setattr(dit_module, "rope_2d", lambda *a, **k: seen.append(original(*a, **k)) or seen[-1])
    with torch.no_grad():
        model(torch.randn(1, 4, 2 * h, 2 * w), torch.tensor([500.0]), torch.randn(1, 2, 4, 32))
    cos, sin = seen[0]
    # Direct: channel pair (2k, 2k+1); pairs k < hd/4 rotate with the row, the rest with the column, both at
    # frequency theta^(-4k'/hd) for k' = k mod hd/4.
    rows, cols = grid(h, w)
    quarter = hd // 4
    freq = theta ** (-4.0 * torch.arange(quarter, dtype=torch.float64) / hd)
    angles = torch.cat([rows[:, None] * freq, cols[:, None] * freq], dim=1)  # [N, hd/2]
    expected = angles.repeat_interleave(2, dim=1)  # interleaved pairs
    torch.testing.assert_close(cos.double(), expected.cos(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin.double(), expected.sin(), rtol=0, atol=1e-6)
    # A query/key pair with the same content everywhere: the score depends only on the 2D offset.
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(hd, generator=gen, dtype=torch.float64), torch.randn(hd, generator=gen, dtype=torch.float64)
    rope = (cos.double(), sin.double())
    q_rot = apply_rotary_emb(q.expand(1, 1, h * w, hd), rope, use_real=True, use_real_unbind_dim=-1)[0, 0]
    k_rot = apply_rotary_emb(k.expand(1, 1, h * w, hd), rope, use_real=True, use_real_unbind_dim=-1)[0, 0]
    assert scores_depend_only_on_offsets(q_rot @ k_rot.T, h, w)


@pytest.mark.parametrize("layout", ["reference", "interleaved"])
def test_deep_image_rope_is_the_direct_formula(layout):
    h, w = 3, 4
    model = DeepFusionDiT.from_preset("tiny", image_rope=layout, llm_rope_theta=1e4)
    hd, theta = model.config.llm_head_dim, model.config.llm_rope_theta
    R = hd // 2
    lengths = torch.tensor([5, 2])  # real text tokens of two prompts
    cos, sin = model.image_rope_tables(lengths, h, w)  # [B, N, hd]
    rows, cols = grid(h, w)
    if layout == "reference":  # one set theta^(-4j/hd), j < R/2, as [row bands | column bands]
        freq = theta ** (-4.0 * torch.arange(R // 2, dtype=torch.float64) / hd)
        angles = torch.cat([(lengths[:, None, None] + rows[None, :, None]) * freq,
                            (lengths[:, None, None] + cols[None, :, None]) * freq], dim=-1)  # [B, N, R]
    else:  # the LLM's theta^(-2k/hd), k < R: rows on even bands, columns on odd ones
        freq = theta ** (-2.0 * torch.arange(R, dtype=torch.float64) / hd)
        position = torch.where(torch.arange(R) % 2 == 0, rows[:, None], cols[:, None])  # [N, R]
        angles = (lengths[:, None, None] + position[None]) * freq
    expected = torch.cat([angles, angles], dim=-1)  # rotate-half layout: band k turns channels (k, k + R)
    torch.testing.assert_close(cos.double(), expected.cos(), rtol=0, atol=1e-5)
    torch.testing.assert_close(sin.double(), expected.sin(), rtol=0, atol=1e-5)
    # Image-image scores depend only on the 2D offset (not on the prompt length before the image).
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(hd, generator=gen), torch.randn(hd, generator=gen)
    for b in range(2):
        q_rot = apply_rope(q.expand(1, 1, h * w, hd), cos[b:b + 1], sin[b:b + 1])[0, 0].double()
        k_rot = apply_rope(k.expand(1, 1, h * w, hd), cos[b:b + 1], sin[b:b + 1])[0, 0].double()
        assert scores_depend_only_on_offsets(q_rot @ k_rot.T, h, w)


# --------------------------------------------------------------------------------------------------
# 3. The time gates: sigma embedding and init
# --------------------------------------------------------------------------------------------------


def direct_sigma_embedding(sigma: torch.Tensor, dim: int, scale: float) -> torch.Tensor:
    """[cos(scale * sigma * 10000^(-k / half)) for k < half, then the sins]."""
    half = dim // 2
    angles = scale * sigma.double()[:, None] * 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


@pytest.mark.parametrize("scale", [1.0, 1000.0])
@pytest.mark.parametrize("fusion", ["time", "joint"])
def test_gate_embeds_sigma_at_the_configured_scale(fusion, scale):
    sigma = torch.tensor([0.0, 0.137, 0.5, 0.93, 1.0])
    torch.testing.assert_close(sigma_embedding(sigma, 16, scale).double(), direct_sigma_embedding(sigma, 16, scale),
                               rtol=0, atol=1e-4 if scale == 1000.0 else 1e-6)  # fp32 angles up to 1000 rad
    torch.manual_seed(0)
    model = SemrouteDiT.from_preset("tiny", fusion=fusion, gate_sigma_scale=scale, gate_init="reference")
    gate = model.router.gate
    phi = direct_sigma_embedding(sigma, model.config.gate_embed_dim, scale)  # [S, E]
    hidden = torch.nn.functional.silu(torch.einsum("se,nhe->snh", phi, gate.w1.double()) + gate.b1.double())
    logits = torch.einsum("snh,nlh->snl", hidden, gate.w2.double()) + gate.b2.double()  # [S, n, L]
    got = model.router.logits(sigma).double()
    torch.testing.assert_close(got, logits[:, 0] if fusion == "time" else logits, rtol=0, atol=2e-4)


def test_reference_gate_init_is_xavier_with_zero_bias_and_starts_non_uniform():
    torch.manual_seed(0)
    gate = build_fusion("joint", 36, 24, sigma_scale=1.0, init="reference").gate  # the paper's gate sizes
    for weight, fan_in, fan_out in ((gate.w1, 128, 512), (gate.w2, 512, 36)):
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert weight.abs().max().item() <= bound
        assert abs(weight.std().item() / (bound / math.sqrt(3)) - 1) < 0.02  # U(-b, b) has std b / sqrt(3)
    assert torch.equal(gate.b1, torch.zeros_like(gate.b1)) and torch.equal(gate.b2, torch.zeros_like(gate.b2))

    model = SemrouteDiT.from_preset("tiny", fusion="joint", gate_sigma_scale=1.0, gate_init="reference")
    model.initialize_weights()  # the model's own re-init keeps the reference start
    weights = model.routing_weights(torch.tensor([0.5]))[0]  # [blocks, L]
    assert (weights.max(-1).values / weights.min(-1).values > 1.05).all()  # every block's mixture non-uniform
    assert not torch.allclose(weights[0], weights[1])  # and the blocks differ
    # Ours stays exactly uniform at any sigma.
    ours = SemrouteDiT.from_preset("tiny", fusion="joint").routing_weights(torch.tensor([0.5]))
    assert torch.equal(ours, torch.full_like(ours, 1.0 / len(model.text_layers)))


def test_unknown_option_names_are_refused():
    from semroute.shared.errors import SemrouteError

    with pytest.raises(SemrouteError, match="hidden, reference"):
        SemrouteDiT.from_preset("tiny", context_embedder_type="wide")
    with pytest.raises(SemrouteError, match="uniform, reference"):
        SemrouteDiT.from_preset("tiny", fusion="time", gate_init="zero")
    with pytest.raises(SemrouteError, match="interleaved, reference"):
        DeepFusionDiT.from_preset("tiny", image_rope="split")
