"""The DiT of the reference study with its text-fusion gates (docs/method.md), as a diffusers model.

    latents [B, C, H, W] --patchify(2)--> image tokens [B, N, hidden]
    text [B, T, L, D_llm] --LN per layer (once)--> fusion --context_embedder--> per-block K/V
        (context_embedder_type="hidden": Linear(D_llm, hidden), K/V from hidden;
         context_embedder_type="reference": Linear(D_llm, D_llm), K/V from D_llm, as the reference)
    24 x DiTBlock: x += SelfAttn(RMSNorm(x)); x += CrossAttn(x, text); x += SwiGLU(RMSNorm(x))
    final RMSNorm --zero-init Linear--> unpatchify --> velocity [B, C, H, W]

``SemrouteDiT.prepare_text`` turns cached text features into a ``TextContext``; for strategies whose
weights do not depend on the noise level it already holds every block's text keys/values, so a sampler
pays for the fusion, the context embedder and the K/V projections once per prompt, not once per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.normalization import RMSNorm
from torch import nn

from semroute.shared.errors import SemrouteError
from semroute.shared.layers import parse_layers
from semroute.stage2_train.attention import CrossAttention, SelfAttention, rope_2d
from semroute.stage2_train.dit_base import DiTBase
from semroute.stage2_train.fusion import (
    FUSIONS,
    SIGMA_EMBED_SCALE,
    build_fusion,
    default_text_layers,
    gather_positions,
    layer_norm_layers,
    resolve_layer_indices,
)

# Text path of the cross-attention: what the context embedder maps the fused LLM features to (the config
# key is `context_embedder_type`: a key named like the `context_embedder` module would shadow it).
CONTEXT_EMBEDDERS = ("hidden", "reference")


@dataclass
class TextContext:
    """A batch of text conditions ready for the DiT; build with ``SemrouteDiT.prepare_text``.

    Attributes:
        mask: ``[B, T]`` bool, True for real tokens.
        attn_mask: ``[B, 1, 1, T]`` bool key mask for cross-attention. A row with no real token attends
            to all (zeroed) values instead, which gives a zero output rather than NaN.
        hidden_ln: ``[B, T, L, D_llm]`` fp32 layer-normed features; kept only when the fusion weights
            depend on sigma (``time``/``joint``), so the mixture can be redone at each call.
        kv: per DiT block ``(key, value)``, each ``[B, num_kv_heads, T, head_dim]``; present only when
            the fusion weights do not depend on sigma.
    """

    mask: torch.Tensor
    attn_mask: torch.Tensor
    hidden_ln: torch.Tensor | None = None
    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None


class DiTBlock(nn.Module):
    """Self-attention over image tokens, cross-attention to text, SwiGLU MLP (pre-norm residuals).

    With ``adaln`` the two pre-norms lose their affine weights and are modulated by the timestep
    embedding instead (shift, scale and a zero-initialised residual gate each, as in DiT's adaLN-Zero).
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, mlp_hidden_size: int,
                 eps: float = 1e-6, adaln: bool = False, context_dim: int | None = None):
        super().__init__()
        self.norm1 = RMSNorm(dim, eps=eps, elementwise_affine=not adaln)
        self.attn = SelfAttention(dim, num_heads, num_kv_heads, head_dim, eps)
        self.cross_attn = CrossAttention(dim, num_heads, num_kv_heads, head_dim, eps, kv_dim=context_dim)
        self.norm2 = RMSNorm(dim, eps=eps, elementwise_affine=not adaln)
        self.mlp = FeedForward(dim, inner_dim=mlp_hidden_size, activation_fn="swiglu", bias=False)
        self.modulation = nn.Linear(dim, 6 * dim) if adaln else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], text_key: torch.Tensor,
                text_value: torch.Tensor, text_attn_mask: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``[B, N, dim]``; text K/V ``[B, nkv, T, hd]``; ``temb``: ``[B, dim]`` (adaLN only). Returns ``[B, N, dim]``."""
        if self.modulation is not None:
            shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(temb)[:, None].chunk(6, dim=-1)  # [B, 1, dim] each
        # 1. Self-attention
        h = self.norm1(x)
        if self.modulation is not None:
            h = h * (1 + scale1) + shift1
        h = self.attn(h, rope)
        x = x + (gate1 * h if self.modulation is not None else h)
        # 2. Cross-attention; the query comes from the un-normalised residual, as in the reference.
        x = x + self.cross_attn(x, text_key, text_value, text_attn_mask)
        # 3. SwiGLU MLP
        h = self.norm2(x)
        if self.modulation is not None:
            h = h * (1 + scale2) + shift2
        h = self.mlp(h)
        return x + (gate2 * h if self.modulation is not None else h)


class SemrouteDiT(DiTBase):
    """DiT conditioned on many LLM layers fused by a routing strategy (``fusion``, see ``fusion.FUSIONS``).

    Args:
        in_channels: latent channels (16 FLUX VAE, 4 SD VAE, 3*p*p pixel codec); also the output channels.
        patch_size: side of the square patches that become tokens; H and W must be multiples of it.
        num_blocks, hidden_size: DiT depth and width.
        num_heads, num_kv_heads, head_dim: grouped-query attention shape (query heads share KV heads).
        mlp_hidden_size: SwiGLU inner width.
        text_dim: the LLM's hidden size D_llm.
        llm_num_layers: the LLM's ``num_hidden_layers`` N (its ``hidden_states`` has N + 1 entries).
        text_layers: transformers ``hidden_states`` indices the model reads, in the order the text input's
            layer axis carries them, or a spec string as ``encode-text --layers`` takes (``all``, ``last:K``,
            ...). Default: ``fusion.default_text_layers`` (every decoder layer ``1..N``; for ``penultimate``
            just ``[N-1]`` = ``hidden_states[-2]``). Negative indices are resolved against N; the config stores the list.
        fusion: one of ``penultimate, uniform, static, time, depth, joint``.
        gate_embed_dim, gate_hidden_dim: sizes of the sigma gates of ``time``/``joint`` (128 and 512 as the paper).
        gate_sigma_scale: the gates embed ``gate_sigma_scale * sigma``: 1000 (ours, the t the model receives)
            or 1 (the reference: sigma itself).
        gate_init: ``uniform`` (ours: the gates' last layer zero, exactly uniform start) or ``reference``
            (xavier everywhere, zero biases: the reference's generic init overwrites its zero-init).
        context_embedder_type: ``hidden`` (ours: ``RMSNorm(D_llm) -> Linear(D_llm, hidden)``, xavier, each block's
            text K/V projected from ``hidden``) or ``reference`` (``RMSNorm(D_llm) -> Linear(D_llm, D_llm)``
            with N(0, 0.02) weights and zero bias, K/V projected from ``D_llm``; 26.5M parameters more at the
            paper size).
        rope_theta: base of the image tokens' 2D RoPE (reference: 1e5 gated strategies, 1e4 penultimate/uniform).
        norm_eps: eps of the RMSNorms.
        adaln: add adaLN-Zero timestep conditioning (the reference has no timestep input at all).
        proj_out_std: the output projection's init: 0 zero-initialises it (the reference: the model starts
            predicting 0), > 0 draws N(0, std). A zero projection passes no gradient into the blocks until it
            has grown, which costs a short run ~100 steps of plateau (bench/RESULTS.md, the demo recipe).

    Attributes:
        router: the ``fusion.Fusion`` module (not named ``fusion``: that is the config key of its name).
        text_layers: the resolved layer list.
    """

    _no_split_modules = ["DiTBlock"]
    # The routing logits are tiny; keep them (and their softmax) in fp32 when loading in bf16.
    _keep_in_fp32_modules = ["router"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        patch_size: int = 2,
        num_blocks: int = 24,
        hidden_size: int = 2048,
        num_heads: int = 32,
        num_kv_heads: int = 8,
        head_dim: int = 128,
        mlp_hidden_size: int = 8192,
        text_dim: int = 2560,
        llm_num_layers: int = 36,
        text_layers: list[int] | str | None = None,
        fusion: str = "depth",
        gate_embed_dim: int = 128,
        gate_hidden_dim: int = 512,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-6,
        adaln: bool = False,
        gate_sigma_scale: float = SIGMA_EMBED_SCALE,
        gate_init: str = "uniform",
        context_embedder_type: str = "hidden",
        proj_out_std: float = 0.0,
    ):
        super().__init__()
        if fusion not in FUSIONS:
            raise SemrouteError(f"Unknown fusion {fusion!r}. Choose one of: {', '.join(FUSIONS)}.")
        if not proj_out_std >= 0:  # also refuses NaN
            raise SemrouteError(f"proj_out_std must be >= 0 (0: zero-init as the reference), got {proj_out_std}")
        if context_embedder_type not in CONTEXT_EMBEDDERS:
            raise SemrouteError(f"context_embedder_type {context_embedder_type!r} is unknown; choose one of {', '.join(CONTEXT_EMBEDDERS)}")
        penultimate = llm_num_layers - 1  # hidden_states[-2] in transformers' numbering
        if text_layers is None:  # the rule training uses for a cache of every layer
            text_layers = default_text_layers(fusion, llm_num_layers)
        elif isinstance(text_layers, str):
            text_layers = parse_layers(text_layers, llm_num_layers)
        self.text_layers = resolve_layer_indices(text_layers, llm_num_layers)
        self.register_to_config(text_layers=self.text_layers)  # save resolved, non-negative indices

        # 1. Text side: the fusion strategy, then one context embedder shared by all blocks.
        options = {}
        if fusion == "penultimate":
            if penultimate not in self.text_layers:
                raise SemrouteError(
                    f"The penultimate fusion reads hidden_states[-2] = index {penultimate} of a {llm_num_layers}-layer LLM, "
                    f"but text_layers is {self.text_layers}; add {penultimate} or leave text_layers unset."
                )
            options["position"] = self.text_layers.index(penultimate)
        elif FUSIONS[fusion].time_dependent:
            options.update(embed_dim=gate_embed_dim, hidden_dim=gate_hidden_dim, sigma_scale=gate_sigma_scale, init=gate_init)
        self.router = build_fusion(fusion, len(self.text_layers), num_blocks, **options)
        context_dim = text_dim if context_embedder_type == "reference" else hidden_size  # width of the embedded text
        self.context_embedder = nn.Sequential(RMSNorm(text_dim, eps=norm_eps), nn.Linear(text_dim, context_dim))

        # 2. Image side: patch embedding, optional adaLN timestep embedding, output head; the blocks.
        self.build_dit(in_channels, patch_size, hidden_size, norm_eps, adaln, num_blocks, lambda: DiTBlock(
            hidden_size, num_heads, num_kv_heads, head_dim, mlp_hidden_size, norm_eps, adaln, context_dim))

    # ----------------------------------------------------------------------------------------------
    # Construction helpers
    # ----------------------------------------------------------------------------------------------

    def initialize_weights(self) -> None:
        """Xavier-uniform Linear weights, zero biases; then the inits that must win over it.

        Zero: the output projection (the model starts predicting 0), the adaLN modulations, and every
        routing logit (the time gates' last layer included unless ``gate_init="reference"``) so that all
        gated strategies start uniform. With ``context_embedder_type="reference"`` its Linear gets N(0, 0.02).
        Call this, not a generic ``model.apply(init)``, to re-initialise.
        """
        self.init_linears()
        if self.config.context_embedder_type == "reference":
            nn.init.normal_(self.context_embedder[1].weight, std=0.02)
        self.zero_init_outputs()
        self.router.reset_parameters()

    def layer_positions(self, stored_layers: Sequence[int]) -> list[int]:
        """Positions to gather from a text cache that stores ``stored_layers`` (hidden_states indices).

        ``features[..., positions, :]`` is then the model's ``text_layers`` in order. Raises a
        ``SemrouteError`` naming the missing layers when the cache lacks some of them.
        """
        return gather_positions(self.text_layers, stored_layers, self.config.llm_num_layers)

    # ----------------------------------------------------------------------------------------------
    # Text side
    # ----------------------------------------------------------------------------------------------

    def prepare_text(self, text_features: torch.Tensor, text_mask: torch.Tensor | None = None) -> TextContext:
        """Layer-norm the text once and, when the fusion ignores sigma, project every block's keys/values.

        Args:
            text_features: ``[B, T, L, D_llm]`` padded cached hidden states of ``text_layers`` (any float dtype).
            text_mask: ``[B, T]`` bool, True for real tokens; default all True.
        Returns:
            A ``TextContext`` to pass as ``forward(..., text_context=...)``, reusable across sampling steps.
        """
        mask = self.check_text(text_features, text_mask)
        # A row without any real token attends to all positions, whose values are zeroed below -> output 0.
        attn_mask = (mask | ~mask.any(dim=1, keepdim=True))[:, None, None, :]  # [B, 1, 1, T]
        hidden_ln = layer_norm_layers(text_features)  # [B, T, L, D] fp32, once per forward
        context = TextContext(mask=mask, attn_mask=attn_mask, hidden_ln=hidden_ln)
        if not self.router.time_dependent:
            context.kv = self._text_kv(hidden_ln, mask, sigma=None)
            context.hidden_ln = None  # not needed again; free it
        return context

    def _text_kv(self, hidden_ln: torch.Tensor, mask: torch.Tensor, sigma: torch.Tensor | None):
        """Fuse, embed and project the text for every block: a tuple of ``(key, value)`` ``[B, nkv, T, hd]``."""
        fused = self.router.fuse(hidden_ln, sigma)  # [B, T, D] or [blocks, B, T, D]
        embedder_dtype = self.context_embedder[1].weight.dtype
        context = self.context_embedder(fused.to(embedder_dtype))  # [(blocks,) B, T, hidden]
        padding = ~mask[:, None, :, None]  # [B, 1, T, 1]
        kv = []
        for index, block in enumerate(self.blocks):
            key, value = block.cross_attn.project_text(context[index] if self.router.per_block else context)
            kv.append((key, value.masked_fill(padding, 0.0)))
        return tuple(kv)

    # ----------------------------------------------------------------------------------------------
    # Forward (the skeleton is DiTBase.forward) and routing
    # ----------------------------------------------------------------------------------------------

    def block_inputs(self, text_context: TextContext, timestep: torch.Tensor, h: int, w: int, device) -> tuple:
        """2D RoPE of the image grid, every block's text keys/values (recomputed at this sigma only for
        sigma-dependent gates), the text key mask."""
        kv = text_context.kv
        if kv is None:
            kv = self._text_kv(text_context.hidden_ln, text_context.mask, sigma=timestep / 1000.0)
        rope = rope_2d(h, w, self.config.head_dim, self.config.rope_theta, device=device)
        return rope, kv, text_context.attn_mask

    @property
    def routing_depends_on_sigma(self) -> bool:
        return self.router.time_dependent

    def layer_weights(self, sigma: torch.Tensor | None) -> torch.Tensor:
        """The router's weights: ``[L]`` for penultimate (one-hot)/uniform/static, ``[blocks, L]`` for depth;
        ``[S, L]`` time and ``[S, blocks, L]`` joint at S sigmas."""
        return self.router.weights(sigma)
