"""The image side that both DiTs (``SemrouteDiT`` and ``DeepFusionDiT``) share: patch embedding, the
optional adaLN timestep embedding, and the output head (final norm, zero-initialised projection)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.normalization import RMSNorm
from torch import nn

from semroute.shared.errors import SemrouteError


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


class ImageSideMixin:
    """Builds and runs the shared image-side modules as attributes of the model itself (``patch_embed``,
    ``time_proj``/``time_embedder`` with adaLN, ``norm_out``, ``out_modulation``, ``proj_out``)."""

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

    def zero_init_outputs(self) -> None:
        """Zero the output projection (the model starts predicting 0) and every adaLN modulation, after the
        generic init of the Linears."""
        for module in filter(None, [self.proj_out, self.out_modulation] + [block.modulation for block in self.blocks]):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

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
