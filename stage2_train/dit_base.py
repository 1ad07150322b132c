"""What both DiTs (``SemrouteDiT`` in dit.py, ``DeepFusionDiT`` in deep_fusion.py) share: the contract of a
semroute DiT as :class:`DiTBase`, which each fills with only its text side and its block type.

    DiTBase
      from_preset(name, **overrides)      a named size of presets.PRESETS (``preset_fields`` adapts it)
      build_dit(..., make_block)          the image side and the blocks, then initialize_weights()
      check_text(features, mask)          ``[B, T, L, D_llm]`` and ``[B, T]`` checked, the mask made
      forward(latents, t, text | text_context)
          prepare_text -> block_inputs -> patchify -> run_blocks (gradient checkpointing) -> output_head
      routing_weights(sigma), routing_summary(sigma)      over ``text_layers``, for logs and plots

    a subclass provides: __init__ (its config), prepare_text, block_inputs, layer_positions,
                         layer_weights (+ routing_depends_on_sigma), initialize_weights

The image side is shared as it is: patch embedding, the optional adaLN timestep embedding, and the output
head (final norm, zero-initialised projection).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import RMSNorm
from torch import nn

from semroute.shared.errors import SemrouteError
from semroute.stage2_train.presets import PRESETS


def patchify(latents: torch.Tensor, p: int) -> tuple[torch.Tensor, int, int]:
    """``[B, C, H, W]`` -> ``[B, h*w, C*p*p]`` tokens in row-major patch order, and ``(h, w)``."""
    B, C, H, W = latents.shape
    if H % p or W % p:
        raise SemrouteError(f"latent height and width must be multiples of the patch size {p}, got {H}x{W}")
    h, w = H // p, W // p
    tokens = latents.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)
    return tokens, h, w


def unpatchify(x: torch.Tensor, channels: int, h: int, w: int, p: int) -> torch.Tensor:
    """The inverse of :func:`patchify`: ``[B, h*w, C*p*p]`` -> ``[B, C, h*p, w*p]``."""
    B = x.shape[0]
    return x.reshape(B, h, w, channels, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, channels, h * p, w * p)


class DiTBase(ModelMixin, ConfigMixin):
    """The shared contract of the semroute DiTs (see the module docstring); not a model by itself.

    The image-side modules are attributes of the model (``patch_embed``, ``time_proj``/``time_embedder``
    with adaLN, ``norm_out``, ``out_modulation``, ``proj_out``), as are ``blocks`` and ``text_layers``.
    """

    _supports_gradient_checkpointing = True
    text_layers: list[int]

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides):
        """Build a named size from ``presets.PRESETS`` (``tiny``, ``small``, ``base``, ``paper``), any field overridden."""
        if name not in PRESETS:
            raise SemrouteError(f"Unknown DiT preset {name!r}. Choose one of: {', '.join(PRESETS)}.")
        return cls(**{**cls.preset_fields(dict(PRESETS[name])), **overrides})

    @classmethod
    def preset_fields(cls, preset: dict) -> dict:
        """A preset's fields as this class's config keys (the identity here)."""
        return preset

    def build_dit(self, in_channels: int, patch_size: int, hidden_size: int, norm_eps: float, adaln: bool,
                  num_blocks: int, make_block: Callable[[], nn.Module]) -> None:
        """The constructor's tail: the image side, ``num_blocks`` blocks from ``make_block``, initial weights."""
        self.build_image_side(in_channels, patch_size, hidden_size, norm_eps, adaln)
        self.blocks = nn.ModuleList(make_block() for _ in range(num_blocks))
        self.gradient_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self) -> None:
        raise NotImplementedError

    # -- text ------------------------------------------------------------------------------------
    def check_text(self, text_features: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        """Refuse text that is not ``[B, T, len(text_layers), text_dim]`` or a mask that is not ``[B, T]``;
        returns the bool mask (all True when none is given)."""
        L, D = len(self.text_layers), self.config.text_dim
        if text_features.ndim != 4 or text_features.shape[2:] != (L, D):
            raise SemrouteError(
                f"text_features must be [batch, tokens, {L} layers, {D}] for this model (layers {self.text_layers}), "
                f"got {list(text_features.shape)}; gather the cache with `model.layer_positions(...)`."
            )
        B, T = text_features.shape[:2]
        mask = (torch.ones(B, T, dtype=torch.bool, device=text_features.device) if text_mask is None
                else text_mask.bool())
        if mask.shape != (B, T):
            raise SemrouteError(f"text_mask must be [batch, tokens] = {[B, T]}, got {list(mask.shape)}")
        return mask

    def prepare_text(self, text_features: torch.Tensor, text_mask: torch.Tensor | None = None):
        """The text condition for ``forward(..., text_context=...)``, reusable across sampling steps."""
        raise NotImplementedError

    def layer_positions(self, stored_layers: Sequence[int]) -> list[int]:
        """Positions to gather from a text cache that stores ``stored_layers`` to get ``text_layers``."""
        raise NotImplementedError

    # -- forward ---------------------------------------------------------------------------------
    def block_inputs(self, text_context, timestep: torch.Tensor, h: int, w: int, device) -> tuple:
        """What every block needs besides the image tokens: ``(rope, per-block (key, value), attn_mask)``."""
        raise NotImplementedError

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | float,
        text_features: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        *,
        text_context=None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict the flow velocity ``eps - x0``.

        Args:
            latents: ``[B, C, H, W]`` noisy latents; H and W multiples of ``patch_size``.
            timestep: ``[B]`` (or a scalar) ``1000 * sigma``, sigma in [0, 1].
            text_features, text_mask: as in ``prepare_text``; or pass ``text_context`` from it instead.
        Returns:
            ``Transformer2DModelOutput(sample=[B, C, H, W])``, or ``(sample,)`` when ``return_dict=False``.
        """
        B, C = latents.shape[:2]
        if text_context is None:
            if text_features is None:
                raise ValueError("pass either `text_features` (with `text_mask`) or `text_context`")
            text_context = self.prepare_text(text_features, text_mask)
        timestep = torch.as_tensor(timestep, device=latents.device, dtype=torch.float32).reshape(-1).expand(B)

        # 1. Patchify: [B, C, H, W] -> [B, N, hidden] image tokens (row-major patches); the blocks' text side.
        x, h, w = self.embed_patches(latents)
        rope, kv, attn_mask = self.block_inputs(text_context, timestep, h, w, latents.device)
        temb = self.timestep_embedding(timestep, B, x)  # [B, hidden] with adaLN, else None
        # 2. Blocks, block i with its text keys/values.
        x = self.run_blocks(x, rope, kv, attn_mask, temb)
        # 3. Final norm, zero-initialised projection, unpatchify back to [B, C, H, W].
        sample = self.output_head(x, temb, C, h, w)
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

    def run_blocks(self, x: torch.Tensor, rope, kv, attn_mask: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        """``x`` through every block (recomputed in the backward pass under gradient checkpointing)."""
        for block, (key, value) in zip(self.blocks, kv):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, rope, key, value, attn_mask, temb)
            else:
                x = block(x, rope, key, value, attn_mask, temb)
        return x

    # -- routing ---------------------------------------------------------------------------------
    routing_depends_on_sigma: bool = False

    def layer_weights(self, sigma: torch.Tensor | None) -> torch.Tensor:
        """Weights over ``text_layers``: ``[L]`` or ``[blocks, L]``, with a leading ``[S]`` for S sigmas."""
        raise NotImplementedError

    def routing_weights(self, sigma: torch.Tensor | float | Sequence[float] | None = None) -> torch.Tensor:
        """Current routing weights over ``text_layers`` (fp32, rows sum to 1).

        Without ``sigma``: ``[L]`` or ``[blocks, L]`` (sigma-dependent routing needs ``sigma``). With ``S``
        sigmas in [0, 1]: a leading ``[S]`` axis (repeated for routing that ignores sigma).
        """
        if sigma is None:
            return self.layer_weights(None)
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
        if self.routing_depends_on_sigma:
            return self.layer_weights(sigma)
        weights = self.layer_weights(None)
        return weights.expand(len(sigma), *weights.shape)

    @torch.no_grad()
    def routing_summary(self, sigma: float = 0.5) -> dict[str, list]:
        """Per-block routing for logs: ``weights`` ``[blocks][L]``, ``entropy`` (nats; max ln L) and
        ``top_layer`` (a hidden_states index) per block. Shared routing repeats one row for every block."""
        weights = self.routing_weights([sigma])[0]  # [L] or [blocks, L]
        weights = weights.expand(self.config.num_blocks, -1) if weights.ndim == 1 else weights
        entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1) + 0.0  # + 0.0: no -0.0 for one-hot rows
        top = [self.text_layers[i] for i in weights.argmax(-1).tolist()]
        return {"weights": weights.tolist(), "entropy": entropy.tolist(), "top_layer": top}

    # -- the image side --------------------------------------------------------------------------
    def build_image_side(self, in_channels: int, patch_size: int, hidden_size: int, norm_eps: float,
                         adaln: bool) -> None:
        patch_dim = in_channels * patch_size * patch_size
        self.patch_embed = nn.Linear(patch_dim, hidden_size)
        if adaln:
            self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.time_embedder = TimestepEmbedding(256, hidden_size)
        self.norm_out = RMSNorm(hidden_size, eps=norm_eps, elementwise_affine=not adaln)
        self.out_modulation = nn.Linear(hidden_size, 2 * hidden_size) if adaln else None
        self.proj_out = nn.Linear(hidden_size, patch_dim)

    def init_linears(self, stand_ins: str | None = None) -> None:
        """The generic init both DiTs start from: Xavier-uniform weights and zero biases for every Linear.
        Linears whose names start with ``stand_ins`` (frozen weights loaded later) get transformers' init,
        normal(0.02), instead."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if stand_ins is not None and name.startswith(stand_ins):
                    nn.init.normal_(module.weight, std=0.02)
                else:
                    nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def zero_init_outputs(self) -> None:
        """Zero the output projection (the model starts predicting 0; or N(0, ``proj_out_std``) where the
        model has that option and it is > 0) and every adaLN modulation, after the generic init of the Linears."""
        for module in filter(None, [self.proj_out, self.out_modulation] + [block.modulation for block in self.blocks]):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
        std = getattr(self.config, "proj_out_std", 0.0)  # SemrouteDiT's option; DeepFusionDiT has none
        if std:
            nn.init.normal_(self.proj_out.weight, std=std)

    def embed_patches(self, latents: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """``[B, C, H, W]`` -> ``[B, N, hidden]`` image tokens and the patch grid ``(h, w)``."""
        tokens, h, w = patchify(latents, self.config.patch_size)
        return self.patch_embed(tokens), h, w

    def timestep_embedding(self, timestep, batch: int, like: torch.Tensor) -> torch.Tensor | None:
        """adaLN's ``[B, hidden]`` conditioning from ``t = 1000 sigma``; None without adaLN."""
        if not self.config.adaln:
            return None
        timestep = torch.as_tensor(timestep, device=like.device, dtype=torch.float32).reshape(-1).expand(batch)
        return F.silu(self.time_embedder(self.time_proj(timestep).to(like.dtype)))

    def output_head(self, x: torch.Tensor, temb: torch.Tensor | None, channels: int, h: int, w: int) -> torch.Tensor:
        """Final norm (modulated with adaLN), zero-initialised projection, unpatchify to ``[B, C, H, W]``."""
        x = self.norm_out(x)
        if self.out_modulation is not None:
            shift, scale = self.out_modulation(temb)[:, None].chunk(2, dim=-1)
            x = x * (1 + scale) + shift
        return unpatchify(self.proj_out(x), channels, h, w, self.config.patch_size)
