"""What watching a run costs: one validation (loss on the held-out samples at the sigma grid, current and
EMA weights, plus the sample grid) against a training step, for the demo's DiT and the `small` preset.

Each setting trains ``--steps`` steps on the demo's caches with one validation at the end, then reads
``metrics.jsonl``: the per-step training time (validation excluded) and the validation's seconds give
the fraction of training time validation takes at a given ``validate_every``:
``seconds per validation / (validate_every x seconds per step)``. Both come from the same process, one
after the other, so a busy machine slows both.

    python bench/bench_validation.py --data demo_out [--steps 30] [--out bench_out/validation]

``--data`` is a demo output folder holding ``captions.text.zarr`` and ``images.latents.zarr`` (run
``semroute demo`` once, or any folder with both caches).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path


def measure(name: str, data: Path, out: Path, steps: int, model: dict, preset: str, holdout: int,
            every: list[int]) -> dict:
    from semroute.stage2_train.config import TrainConfig
    from semroute.demo import DemoConfig
    from semroute.stage2_train.train import Trainer

    demo = DemoConfig()
    run = out / name
    shutil.rmtree(run, ignore_errors=True)
    cfg = TrainConfig(text_cache=str(data / "captions.text.zarr"), latent_cache=str(data / "images.latents.zarr"),
                      out=str(run), fusion="depth", preset=preset, model=model, batch_size=demo.batch_size,
                      lr=demo.lr, shift=demo.shift, max_steps=steps, checkpoint_every=steps, log_every=steps,
                      ema=True, ema_decay=demo.ema_decay, holdout=holdout, validate_every=steps, report_to="none",
                      num_workers=demo.num_workers, val_guidance=demo.guidance)
    t0 = time.perf_counter()
    summary = Trainer(cfg, progress=False).train()
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r.get("event") == "validation"][-1]
    train_s = summary["train_seconds"] - summary["validation_seconds"]
    per_step = train_s / steps
    result = {"setting": name, "preset": preset, "model": model, "steps": steps, "holdout": holdout,
              "val_sigmas": cfg.val_sigmas, "val_samples": cfg.val_samples, "val_sample_steps": cfg.val_sample_steps,
              "seconds_per_step": round(per_step, 4), "seconds_per_validation": val["seconds"],
              "fraction_at": {k: round(val["seconds"] / (k * per_step), 4) for k in every},
              "wall_seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    from semroute.demo import DemoConfig, model_overrides

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("bench_out/validation"))
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    demo = DemoConfig()
    results = [
        measure("demo", args.data, args.out, args.steps, model_overrides(demo), demo.preset, demo.holdout,
                [demo.validate_every, 1000]),
        measure("small", args.data, args.out, args.steps, {}, "small", demo.holdout, [demo.validate_every, 1000]),
    ]
    load = os.getloadavg()
    record = {"results": results, "load_average": load, "cpus": os.cpu_count()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(record, indent=2))
    print(f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
