"""``semroute info RUN``: what a training run is, how far it got, and where its routing stands."""

from __future__ import annotations

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
    if last:
        info["last log"] = {"loss": round(last["loss"], 5), "lr": last["lr"],
                            "samples/s": round(last["samples_per_s"], 2),
                            "train time": f"{last['train_seconds']:.0f}s"}
        info["routing (sigma 0.5)"] = {f"block {b}": f"top layer {t}, entropy {e:.3f}"
                                       for b, (t, e) in enumerate(zip(last["routing_top_layer"],
                                                                      last["routing_entropy"]))}
    return info

