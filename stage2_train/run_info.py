"""``semroute info RUN``: what a training run is, how far it got, and where its routing stands."""

from __future__ import annotations

from semroute.stage2_train import checkpoint_files
from semroute.stage2_train.run_folder import RunFolder


def describe_run(path: str) -> dict:
    run = RunFolder(path)
    cfg = run.config()
    record = run.record(required=False)
    checkpoints = run.checkpoints()
    last = {}
    for row in run.metrics():
        if "loss" in row:
            last = row
    info = {
        "kind": "training run",
        "path": path,
        "fusion": cfg.fusion,
        "preset": cfg.preset,
        "text cache": record.get("text_cache", cfg.text_cache),
        "latent cache": record.get("latent_cache", cfg.latent_cache),
        "LLM": (record.get("text_fingerprint") or {}).get("llm_ref"),
        "processes": record.get("world_size"),
        "steps done": last.get("step", 0),
        "max steps": cfg.max_steps,
        "checkpoints": ", ".join(p.name for p in checkpoints) or "none",
    }
    # Sizes against each complete.json (no checksums: seconds per gigabyte); `--resume latest` passes these over.
    damaged = {p.name: "; ".join(bad[:2]) for p in checkpoints if (bad := checkpoint_files.problems(p, crc=False))}
    if damaged:
        info["damaged checkpoints"] = damaged
    if last:  # (a row has its loss and step: RunFolder.metrics leaves out others; the rest may be missing)
        info["last log"] = {"loss": round(last["loss"], 5), "lr": last.get("lr"),
                            "samples/s": _rounded(last.get("samples_per_s"), 2),
                            "train time": f"{_rounded(last.get('train_seconds'), 0)}s"}
        tops, entropies = last.get("routing_top_layer"), last.get("routing_entropy")
        if isinstance(tops, list) and isinstance(entropies, list):
            info["routing (sigma 0.5)"] = {f"block {b}": f"top layer {t}, entropy {_rounded(e, 3)}"
                                           for b, (t, e) in enumerate(zip(tops, entropies))}
    return info


def _rounded(value, digits: int):
    """``value`` rounded, or as it is when it is not a number (a hand-edited log)."""
    return round(value, digits) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
