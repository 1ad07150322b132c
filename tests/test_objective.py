"""stage2_train/objective.py against the reference's formulas, written out here independently (docs/method.md):
sigma = shift(sigmoid(n)), n ~ N(mean, std); x_t = (1 - sigma) x_0 + sigma eps; target eps - x_0; plain MSE; the
model sees t = 1000 sigma; the shift is the one FlowMatchEulerDiscreteScheduler applies when sampling."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from semroute.stage2_train.objective import flow_loss, noisy_input, sample_sigma, shift_sigma


def test_shift_is_the_sampling_schedulers_own():
    sigma = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    assert torch.allclose(shift_sigma(sigma, 3.0), 3 * sigma / (1 + 2 * sigma))
    assert torch.equal(shift_sigma(sigma, 1.0), sigma)
    # Sampling: the scheduler's sigmas are this shift of an evenly spaced grid (its inverse maps them back to one).
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    shifted = sched.sigmas[:-1].double()
    grid = shifted / (3.0 - 2.0 * shifted)
    assert torch.allclose(shift_sigma(grid, 3.0), shifted)
    steps = grid[:-1] - grid[1:]
    assert torch.allclose(steps, steps.mean().expand_as(steps), atol=1e-6)
    assert not torch.allclose((shifted[:-1] - shifted[1:]), (shifted[:-1] - shifted[1:]).mean(), atol=1e-3)


def test_sigma_is_a_shifted_logit_normal_draw():
    mean, std, shift = 0.3, 0.7, 3.0
    got = sample_sigma(4096, shift=shift, mean=mean, std=std, generator=torch.Generator().manual_seed(5))
    normal = torch.randn(4096, generator=torch.Generator().manual_seed(5)) * std + mean
    assert torch.allclose(got, shift_sigma(torch.sigmoid(normal), shift), atol=1e-6)
    assert 0 < got.min() and got.max() < 1


def test_noisy_input_target_and_loss_with_t_1000_sigma():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 2, 2, generator=g)
    eps = torch.randn(3, 4, 2, 2, generator=g)
    sigma = torch.tensor([0.0, 0.25, 1.0])
    xt, target = noisy_input(x0, sigma, eps)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], eps[2])
    assert torch.allclose(xt[1], 0.75 * x0[1] + 0.25 * eps[1]) and torch.equal(target, eps - x0)

    seen = {}

    def model(x, t, text, mask, return_dict):  # predicts zero: the loss is the target's mean square
        seen.update(x=x, t=t)
        return (torch.zeros_like(x),)

    loss = flow_loss(model, x0, torch.zeros(3, 1, 8), torch.ones(3, 1, dtype=torch.bool), shift=3.0,
                     generator=torch.Generator().manual_seed(9))
    ref = torch.Generator().manual_seed(9)  # the same draws in the same order: sigmas, then the noise
    sigma = shift_sigma(torch.sigmoid(torch.randn(3, generator=ref)), 3.0)
    eps = torch.randn(x0.shape, generator=ref)
    assert torch.allclose(seen["t"], 1000 * sigma)
    s = sigma.view(-1, 1, 1, 1)
    assert torch.allclose(seen["x"], (1 - s) * x0 + s * eps, atol=1e-6)
    assert torch.allclose(loss, ((eps - x0) ** 2).mean(), atol=1e-6)
