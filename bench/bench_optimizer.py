"""AdamW on the CPU: torch's default (a loop over the tensors), ``foreach`` and ``fused``, side by side.

The trainer runs AdamW fused on CPUs and GPUs (stage2_train/train.py, ``FUSED_ADAMW_DEVICES``). This times one
optimizer step of each kind on the parameters of real DiTs (the demo's 4-block width-128 DiT and the ``small``
preset, both with ``depth`` routing over SmolLM2's hidden states as the preset has them), the trainer's two
parameter groups, the same gradients for all three; the kinds alternate over ``--rounds`` and each keeps its median. Next
to it, one forward+backward of the same DiT at ``--batch-size`` (random latents and text, 32x32 pixel-codec
latents, 24 text tokens), to put the optimizer in proportion to the step. Last, how far the fused kind's weights
drift from the default's after ``--drift-steps`` steps on the same gradients (float rounding, not a
different algorithm).

    python bench/bench_optimizer.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

if "semroute" not in sys.modules:  # run from a checkout without installing
    REPO = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("semroute", REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["semroute"] = module
    spec.loader.exec_module(module)

KINDS = {"default (loop)": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
# The demo's DiT (demo.py, DemoConfig / model_overrides at its defaults).
DEMO = dict(preset="small", num_blocks=4, hidden_size=128, num_heads=2, num_kv_heads=1, head_dim=64,
            mlp_hidden_size=384, adaln=True, proj_out_std=0.02)


def build(name: str):
    from semroute.stage2_train.dit import SemrouteDiT

    spec = dict(DEMO) if name == "demo" else {"preset": name}
    preset = spec.pop("preset")
    torch.manual_seed(0)
    return SemrouteDiT.from_preset(preset, fusion="depth", **spec)


def groups(model) -> list[dict]:
    """The trainer's groups: the routing gates apart (lr x10 as the demo has them)."""
    router = {id(p) for p in model.router.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if id(p) not in router], "weight_decay": 1e-4},
            {"params": [p for p in trainable if id(p) in router], "lr": 2e-2, "weight_decay": 1e-4}]


def with_grads(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3


def optimizer_ms(model, kind: dict, steps: int) -> float:
    with_grads(model, seed=1)  # (a deep copy has none)
    opt = torch.optim.AdamW(groups(model), lr=2e-3, **kind)
    for _ in range(2):
        opt.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t0) / steps * 1e3


def forward_backward_ms(model, batch: int, steps: int) -> float:
    from semroute.stage2_train.objective import flow_loss

    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, model.config.in_channels, 16, 16, generator=gen)
    text = torch.randn(batch, 24, len(model.text_layers), model.config.text_dim, generator=gen)
    mask = torch.ones(batch, 24, dtype=torch.bool)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = flow_loss(model, latents, text, mask, shift=1.0, generator=torch.Generator().manual_seed(i))
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def drift(model, steps: int) -> tuple[float, float]:
    """Largest absolute and relative weight difference, fused against the default, after ``steps`` steps."""
    a, b = model, copy.deepcopy(model)
    opt_a = torch.optim.AdamW(groups(a), lr=2e-3)
    opt_b = torch.optim.AdamW(groups(b), lr=2e-3, fused=True)
    for i in range(steps):
        for m, opt in ((a, opt_a), (b, opt_b)):
            with_grads(m, seed=100 + i)
            opt.step()
    worst_abs = worst_rel = 0.0
    for pa, pb in zip(a.parameters(), b.parameters()):
        diff = (pa - pb).abs().max().item()
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / max(pa.abs().max().item(), 1e-12))
    return worst_abs, worst_rel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo,small", help="demo and/or presets (small, base, ...)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps timed per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--drift-steps", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    rows = []
    for name in args.models.split(","):
        model = build(name)
        tensors = sum(1 for p in model.parameters() if p.requires_grad)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        step_ms = forward_backward_ms(model, args.batch_size, steps=3)
        times: dict[str, list[float]] = {k: [] for k in KINDS}
        for _ in range(args.rounds):
            for kind, kw in KINDS.items():
                times[kind].append(optimizer_ms(copy.deepcopy(model), kw, args.steps))
        ms = {k: statistics.median(v) for k, v in times.items()}
        worst_abs, worst_rel = drift(model, args.drift_steps)
        row = {"model": name, "tensors": tensors, "params": params, "forward_backward_ms": step_ms,
               "optimizer_ms": ms, "default_over_fused": ms["default (loop)"] / ms["fused"],
               "saved_share_of_step": (ms["default (loop)"] - ms["fused"]) / (step_ms + ms["default (loop)"]),
               "drift_abs": worst_abs, "drift_rel": worst_rel}
        rows.append(row)
        print(f"{name}: {tensors} tensors, {params / 1e6:.2f}M params; fwd+bwd at batch {args.batch_size} "
              f"{step_ms:.1f} ms; AdamW ms/step " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items())
              + f"; default/fused {row['default_over_fused']:.2f}x, {row['saved_share_of_step']:.1%} of the step; "
              f"drift after {args.drift_steps} steps: {worst_abs:.2e} abs, {worst_rel:.2e} rel", flush=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
