"""``semroute info RUN``: what a training run is, how far it got, and where its routing stands."""

from __future__ import annotations

import json
from pathlib import Path

from semroute.shared.inspect import DESCRIBERS


def describe_run(path: str, _attrs: dict) -> dict:
    import yaml

    run = Path(path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    record = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
    from semroute.stage2_train.train import list_checkpoints

    checkpoints = list_checkpoints(run)
    last = {}
    metrics = run / "logs" / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if "loss" in row:
                last = row
    info = {
        "kind": "training run",
        "path": path,
        "fusion": cfg["fusion"],
        "preset": cfg["preset"],
        "text cache": record.get("text_cache", cfg.get("text_cache")),
        "latent cache": record.get("latent_cache", cfg.get("latent_cache")),
        "LLM": (record.get("text_fingerprint") or {}).get("llm_ref"),
        "processes": record.get("world_size"),
        "steps done": last.get("step", 0),
        "max steps": cfg["max_steps"],
        "checkpoints": ", ".join(p.name for p in checkpoints) or "none",
    }
    if last:
        info["last log"] = {"loss": round(last["loss"], 5), "lr": last["lr"],
                            "samples/s": round(last["samples_per_s"], 2),
                            "train time": f"{last['train_seconds']:.0f}s"}
        info["routing (sigma 0.5)"] = {f"block {b}": f"top layer {t}, entropy {e:.3f}"
                                       for b, (t, e) in enumerate(zip(last["routing_top_layer"],
                                                                      last["routing_entropy"]))}
    return info


DESCRIBERS["run"] = describe_run
