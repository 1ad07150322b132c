"""Attention pieces of the DiT: 2D rotary embedding, self-attention over image tokens, cross-attention to text.

Both attentions use grouped-query attention (``num_heads`` query heads share ``num_kv_heads`` key/value
heads) with RMS QK-norm and run through ``torch.nn.functional.scaled_dot_product_attention``. They are
small modules of our own rather than diffusers' ``Attention`` + processor because the cross-attention
must expose its key/value projection separately: the text keys/values are computed once per prompt
and reused across sampling steps (``CrossAttention.project_text``), which the processor interface has
no place for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed
from diffusers.models.normalization import RMSNorm
from torch import nn


def rope_2d(height: int, width: int, head_dim: int, theta: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for a ``height x width`` grid of tokens in row-major order.

    The first half of each head's channels rotates with the row index, the second half with the column
    index, so attention between two image tokens depends on their 2D offset only; any aspect ratio works.

    Returns:
        ``(cos, sin)``, each ``[height * width, head_dim]`` fp32, in the interleaved-pairs layout that
        ``diffusers.models.embeddings.apply_rotary_emb(..., use_real_unbind_dim=-1)`` expects.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE splits each head in two rotary halves of channel pairs; head_dim must be divisible by 4, not {head_dim}")
    rows = torch.arange(height, device=device, dtype=torch.float32).repeat_interleave(width)  # [N]
    cols = torch.arange(width, device=device, dtype=torch.float32).repeat(height)  # [N]
    cos_r, sin_r = get_1d_rotary_pos_embed(head_dim // 2, rows, theta=theta, use_real=True, repeat_interleave_real=True)
    cos_c, sin_c = get_1d_rotary_pos_embed(head_dim // 2, cols, theta=theta, use_real=True, repeat_interleave_real=True)
    return torch.cat([cos_r, cos_c], dim=-1), torch.cat([sin_r, sin_c], dim=-1)  # [N, head_dim] each


class GQAProjections(nn.Module):
    """Query/key/value/output projections and RMS QK-norms of a grouped-query attention: ``num_heads``
    query heads share ``num_kv_heads`` key/value heads of ``head_dim``. The attention modules differ
    only in what they attend to. ``kv_dim``: width of what the keys/values are projected from (default
    ``dim``; the cross-attention of ``context_embedder="reference"`` projects them from the LLM's width)."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, eps: float = 1e-6,
                 kv_dim: int | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads}) for grouped-query attention")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.to_q = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.to_k = nn.Linear(kv_dim or dim, num_kv_heads * head_dim, bias=False)
        self.to_v = nn.Linear(kv_dim or dim, num_kv_heads * head_dim, bias=False)
        self.norm_q = RMSNorm(head_dim, eps=eps)
        self.norm_k = RMSNorm(head_dim, eps=eps)
        self.to_out = nn.Linear(num_heads * head_dim, dim, bias=False)


class SelfAttention(GQAProjections):
    """GQA self-attention over image tokens with RMS QK-norm and 2D RoPE."""

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``x``: ``[B, N, dim]`` image tokens; ``rope``: ``(cos, sin)`` each ``[N, head_dim]``. Returns ``[B, N, dim]``."""
        B, N, _ = x.shape
        q = self.to_q(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # [B, nh, N, hd]
        k = self.to_k(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, nkv, N, hd]
        v = self.to_v(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, nkv, N, hd]
        q = apply_rotary_emb(self.norm_q(q), rope, use_real=True, use_real_unbind_dim=-1)
        k = apply_rotary_emb(self.norm_k(k), rope, use_real=True, use_real_unbind_dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.num_heads != self.num_kv_heads)  # [B, nh, N, hd]
        return self.to_out(out.transpose(1, 2).reshape(B, N, -1))


class CrossAttention(GQAProjections):
    """GQA cross-attention from image tokens to the (already embedded) text condition, padding masked.

    ``project_text`` and ``forward`` are separate so that a caller can compute the text keys/values once
    and reuse them for every denoising step when the text condition does not depend on t.
    """

    def project_text(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``context``: ``[B, T, kv_dim]`` embedded text. Returns keys and values, each ``[B, nkv, T, hd]``."""
        B, T, _ = context.shape
        k = self.to_k(context).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.to_v(context).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return self.norm_k(k), v

    def forward(self, x: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """Attend from ``x`` ``[B, N, dim]`` to text ``key``/``value`` ``[B, nkv, T, hd]``.

        ``attn_mask``: bool ``[B, 1, 1, T]``, True where a key may be attended (real tokens). Returns ``[B, N, dim]``.
        """
        B, N, _ = x.shape
        q = self.norm_q(self.to_q(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2))  # [B, nh, N, hd]
        gqa = self.num_heads != self.num_kv_heads
        if gqa and key.is_cuda:
            # With a mask, CUDA's flash kernel is out and, in some torch versions, so is the memory-efficient
            # one for grouped heads, which leaves the unfused math path; with the text's few keys/values
            # repeated per query head ([B, nh, T, hd]) the memory-efficient kernel takes the mask.
            # bench/device_check.sh shows which kernel runs.
            rep = self.num_heads // self.num_kv_heads
            key, value, gqa = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1), False
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=attn_mask, enable_gqa=gqa)  # [B, nh, N, hd]
        return self.to_out(out.transpose(1, 2).reshape(B, N, -1))


def sdpa_backends(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                  enable_gqa: bool = False) -> dict[str, bool]:
    """Which SDPA backends accept these inputs on their device: ``{name: True/False}`` (each tried alone)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, enable_gqa=enable_gqa)
            out[backend.name] = True
        except RuntimeError:
            out[backend.name] = False
    return out
