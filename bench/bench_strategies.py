"""Strategy comparison in the spirit of the reference study's Table 1, on the demo's shapes data.

Every strategy is trained on the same caches (encoded once), with the same seed, preset, batch size and
time budget, then samples the same held-out prompts with the same seeds, scored per GenEval tag by the
built-in shape checker. Also times sampling with the per-prompt text keys/values reused across steps
against recomputing them at every step.

    python bench/bench_strategies.py --steps 300 [--out bench_out/strategies] [--strategies depth,static]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

STRATEGIES = ["penultimate", "uniform", "static", "time", "depth", "joint", "deep"]


def time_reuse(run_dir: Path, llm, prompts: list[str], steps: int, repeats: int = 3) -> dict:
    """Seconds per image with text K/V reused across steps vs recomputed every step (same images)."""
    from semroute.stage2_train.pipeline import SemroutePipeline

    pipe = SemroutePipeline.from_run(run_dir, llm=llm, device="auto")
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    pipe.set_progress_bar_config(disable=True)
    out = {}
    for reuse in (True, False, True, False):  # interleaved, best of repeats
        best = float("inf")
        for _ in range(repeats):
            gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
            t0 = time.perf_counter()
            pipe(prompts, num_inference_steps=steps, guidance_scale=6.0, generator=gens, reuse_text=reuse)
            sync()
            best = min(best, time.perf_counter() - t0)
        key = "reuse" if reuse else "recompute"
        out[key] = min(out.get(key, float("inf")), best / len(prompts))
    out["recompute_over_reuse"] = out["recompute"] / out["reuse"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out/strategies")
    parser.add_argument("--steps", type=int, default=300, help="training budget per strategy, in optimizer steps "
                        "(steps, not minutes: a time budget would depend on the machine's other load)")
    parser.add_argument("--minutes", type=float, default=60.0, help="safety cap on training time per strategy")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--images", type=int, default=1800)
    parser.add_argument("--heldout", type=int, default=60)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of each training run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from semroute.stage2_train import shape_checker
    from semroute.demo import DemoConfig, evaluate, prepare_data, train_strategy

    cfg = DemoConfig(out=args.out, images=args.images, heldout=args.heldout, samples_per_prompt=args.samples_per_prompt,
                     preset=args.preset, train_minutes=args.minutes, max_steps=args.steps, seed=args.seed,
                     batch_size=args.batch_size, num_workers=args.workers, progress=False)
    if torch.cuda.is_available():
        machine = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    else:
        machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"
    result = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "budget_steps": args.steps,
              "budget_minutes_cap": args.minutes, "batch_size": cfg.batch_size, "preset": args.preset,
              "images": args.images, "heldout_prompts": args.heldout, "samples_per_prompt": args.samples_per_prompt,
              "strategies": {}, "sampling_seconds_per_image_depth": None}
    result_file = Path(args.out, "strategies.json")
    data = prepare_data(cfg)
    rows = result["strategies"]
    for fusion in args.strategies.split(","):
        run_dir = Path(args.out) / f"run-{fusion}"
        trained = train_strategy(replace(cfg, fusion=fusion), data, fusion, run_dir)
        report = evaluate(cfg, data, run_dir, Path(args.out) / f"eval-{fusion}")
        losses = [json.loads(l) for l in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in losses if "loss" in r]
        rows[fusion] = {"steps": trained["step"], "train_seconds": round(trained["train_seconds"], 1),
                        "final_loss_window": round(losses[-1], 4) if losses else None,
                        "per_tag": report["samples"]["per_tag"], "overall": report["samples"]["overall"]}
        print(fusion, json.dumps(rows[fusion]), flush=True)
        print(shape_checker.format_summary(report["samples"]), flush=True)
        result_file.write_text(json.dumps(result, indent=2))  # after each strategy: a cut-off run keeps its rows
    if "depth" in rows:
        prompts = [json.loads(l)["prompt"] for l in Path(data["prompts"]).read_text().splitlines()[:8]]
        result["sampling_seconds_per_image_depth"] = time_reuse(Path(args.out) / "run-depth", data["llm"], prompts,
                                                                steps=25)
    result_file.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
