"""Attention pieces of the deep-fusion DiT (``deep_fusion.DeepFusionDiT``).

- Rotary embedding in the LLM's "rotate half" layout, with the image positions of the deep-fusion scheme.
- ``LLMTextKV``: one frozen LLM decoder layer's key/value path (input norm, k/v projections, per-head k
  norm, RoPE), reimplemented so that only its few tensors, not the LLM, are needed.
- ``JointAttention`` / ``DeepFusionBlock``: the trained image side, attending jointly to text and image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.normalization import RMSNorm
from torch import nn

from semroute.stage2_train.attention import GQAProjections


# --------------------------------------------------------------------------------------------------
# Rotary embedding in the LLM's "rotate half" layout
# --------------------------------------------------------------------------------------------------


def default_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    """``[head_dim / 2]`` fp32 inverse frequencies of default RoPE, computed as transformers does (bitwise)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``positions``: fp32 ``[..., R]`` (one position per frequency band, R = head_dim / 2) or ``[..., 1]``.

    Returns ``(cos, sin)``, each ``[..., 2R]``: band k rotates channel pair (k, k + R).
    """
    angles = positions * inv_freq  # [..., R]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x``: ``[B, heads, S, hd]``; ``cos``/``sin``: ``[B or 1, S, hd]`` fp32."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# How the image tokens' 2D positions share the R = head_dim / 2 rotary bands (``DeepFusionDiT.image_rope``):
# "interleaved" (ours): the LLM's R frequencies, even bands rotate with the row, odd bands with the column;
# "reference": one set of R/2 frequencies, theta^(-4j/head_dim) = the LLM's even-band ones, used by both
#              axes and laid out as [R/2 row bands | R/2 column bands].
IMAGE_ROPES = ("interleaved", "reference")


def image_inv_freq(inv_freq: torch.Tensor, layout: str) -> torch.Tensor:
    """The ``[R]`` inverse frequencies of the image bands from the LLM's ``[R]`` (see ``IMAGE_ROPES``)."""
    if layout == "reference":
        return inv_freq[0::2].repeat(2)  # [R/2 row | R/2 column], same frequencies on both axes
    return inv_freq


def image_positions(lengths: torch.Tensor, height: int, width: int, num_bands: int,
                    layout: str = "interleaved") -> torch.Tensor:
    """fp32 ``[B, h*w, R]`` positions of row-major image tokens: band k uses ``len_b + row`` or ``len_b + col``,
    for k even/odd (``interleaved``) or k in the first/second half (``reference``)."""
    device = lengths.device
    rows = torch.arange(height, device=device).repeat_interleave(width)  # [N]
    cols = torch.arange(width, device=device).repeat(height)  # [N]
    bands = torch.arange(num_bands, device=device)
    row_band = bands < num_bands // 2 if layout == "reference" else bands % 2 == 0  # [R]
    grid = torch.where(row_band, rows[:, None], cols[:, None])  # [N, R]
    return (lengths[:, None, None] + grid[None]).float()


# --------------------------------------------------------------------------------------------------
# The frozen text side: one LLM decoder layer's key/value path
# --------------------------------------------------------------------------------------------------


class LLMRMSNorm(nn.Module):
    """The LLM's RMSNorm with its rounding: normalise in fp32, cast back, then scale (Llama/Qwen layout)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LLMKeyValue(nn.Module):
    """The key/value projections of an LLM attention module (``k_norm``: Qwen3's per-head norm, else None)."""

    def __init__(self, dim: int, num_kv_heads: int, head_dim: int, eps: float, qk_norm: bool, bias: bool):
        super().__init__()
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias)
        self.k_norm = LLMRMSNorm(head_dim, eps) if qk_norm else None


class LLMTextKV(nn.Module):
    """One frozen LLM decoder layer's text keys/values from its input hidden state.

    Submodule names follow the LLM's state dict (``input_layernorm``, ``self_attn.k_proj``, ...), so the
    weights of decoder layer k load by renaming ``<prefix>layers.k.`` to ``llm_layers.i.``.
    """

    def __init__(self, dim: int, num_kv_heads: int, head_dim: int, eps: float, qk_norm: bool, bias: bool):
        super().__init__()
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.input_layernorm = LLMRMSNorm(dim, eps)
        self.self_attn = LLMKeyValue(dim, num_kv_heads, head_dim, eps, qk_norm, bias)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden``: ``[B, T, D_llm]`` decoder-layer input; ``cos``/``sin``: ``[1, T, hd]``. Returns K, V ``[B, nkv, T, hd]``."""
        B, T, _ = hidden.shape
        h = self.input_layernorm(hidden)
        key = self.self_attn.k_proj(h).view(B, T, self.num_kv_heads, self.head_dim)
        if self.self_attn.k_norm is not None:
            key = self.self_attn.k_norm(key)
        value = self.self_attn.v_proj(h).view(B, T, self.num_kv_heads, self.head_dim)
        return apply_rope(key.transpose(1, 2), cos, sin), value.transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# The trained image side
# --------------------------------------------------------------------------------------------------


class JointAttention(GQAProjections):
    """Image queries attend to ``[text keys of the paired LLM layer; image keys]``, GQA in the LLM's head layout."""

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], text_key: torch.Tensor,
                text_value: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, N, dim]``; ``rope``: ``[B, N, hd]`` each; text K/V ``[B, nkv, T, hd]``;
        ``attn_mask``: bool ``[B, 1, 1, T + N]``. Returns ``[B, N, dim]``."""
        B, N, _ = x.shape
        q = self.norm_q(self.to_q(x).view(B, N, self.num_heads, self.head_dim)).transpose(1, 2)  # [B, nh, N, hd]
        k = self.norm_k(self.to_k(x).view(B, N, self.num_kv_heads, self.head_dim)).transpose(1, 2)  # [B, nkv, N, hd]
        v = self.to_v(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        key = torch.cat([text_key.to(k.dtype), k], dim=2)  # [B, nkv, T + N, hd]
        value = torch.cat([text_value.to(v.dtype), v], dim=2)
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=attn_mask, enable_gqa=self.num_heads != self.num_kv_heads)
        return self.to_out(out.transpose(1, 2).reshape(B, N, -1))


class DeepFusionBlock(nn.Module):
    """``x += JointAttn(RMSNorm(x), text K/V)``; ``x += SwiGLU(RMSNorm(x))``; optional adaLN-Zero as ``DiTBlock``."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, mlp_hidden_size: int,
                 eps: float = 1e-6, adaln: bool = False):
        super().__init__()
        self.norm1 = RMSNorm(dim, eps=eps, elementwise_affine=not adaln)
        self.attn = JointAttention(dim, num_heads, num_kv_heads, head_dim, eps)
        self.norm2 = RMSNorm(dim, eps=eps, elementwise_affine=not adaln)
        self.mlp = FeedForward(dim, inner_dim=mlp_hidden_size, activation_fn="swiglu", bias=False)
        self.modulation = nn.Linear(dim, 6 * dim) if adaln else None

    def forward(self, x, rope, text_key, text_value, attn_mask, temb=None):
        """``x``: ``[B, N, dim]``; see ``JointAttention``; ``temb``: ``[B, dim]`` (adaLN only). Returns ``[B, N, dim]``."""
        if self.modulation is None:
            x = x + self.attn(self.norm1(x), rope, text_key, text_value, attn_mask)
            return x + self.mlp(self.norm2(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(temb)[:, None].chunk(6, dim=-1)  # [B, 1, dim] each
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1, rope, text_key, text_value, attn_mask)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)
