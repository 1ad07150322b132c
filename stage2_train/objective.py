"""Rectified flow, as the reference trains it (docs/method.md).

sigma ~ logit-normal(mean, std), then the scheduler shift s: sigma' = s*sigma / (1 + (s-1)*sigma), the
same map diffusers' ``FlowMatchEulerDiscreteScheduler(shift=s)`` applies at sampling time.
x_t = (1 - sigma) x_0 + sigma eps, target eps - x_0, plain MSE; the model receives t = 1000 sigma.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_density_for_timestep_sampling


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigma(batch: int, *, shift: float, mean: float = 0.0, std: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``[batch]`` noise levels in (0, 1), on the generator's device."""
    device = generator.device if generator is not None else "cpu"
    u = compute_density_for_timestep_sampling("logit_normal", batch, logit_mean=mean, logit_std=std,
                                              device=device, generator=generator)
    return shift_sigma(u, shift)


def noisy_input(x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_t`` and the velocity target ``eps - x_0`` for ``x0`` ``[B, C, H, W]`` and ``sigma`` ``[B]``."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * eps, eps - x0


def flow_loss(model, x0: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, *, shift: float,
              mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """One rectified-flow loss on a batch; all randomness from ``generator``.

    Give a generator on ``x0``'s device: drawing the noise there avoids a host-to-device copy, which
    would make the host wait for the previous step's kernels every step.
    """
    sigma = sample_sigma(x0.shape[0], shift=shift, mean=mean, std=std, generator=generator)
    device = generator.device if generator is not None else torch.device("cpu")
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32, device=device).to(x0.device, x0.dtype)
    sigma = sigma.to(x0.device)
    xt, target = noisy_input(x0, sigma, eps)
    pred = model(xt, sigma * 1000.0, text, text_mask, return_dict=False)[0]
    return F.mse_loss(pred.float(), target.float())
