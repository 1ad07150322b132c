"""Which settings a resumed run may change, and making the changes it may take effect.

A resume restores the model, optimizer, scheduler and data position from a checkpoint. Settings that
define those (the architecture, the fusion, the data order, the objective) cannot change without making
the checkpoint meaningless or the run different from an uninterrupted one: a resume that changes them
is refused, naming each. Settings of the run's length and bookkeeping, and the step size, may change:
they take effect from the resumed step and are logged. The learning rate needs work to take effect,
because the optimizer and the scheduler carry their own copies of it in the checkpoint.
"""

from __future__ import annotations

from semroute.shared.errors import SemrouteError

MAY_CHANGE = (
    "lr", "fusion_lr_scale", "grad_clip", "max_steps", "max_minutes", "num_workers", "checkpoint_every",
    "keep_checkpoints", "log_every", "tensorboard", "log_samples", "gradient_checkpointing", "expect_text",
    "expect_latent",
    "compile", "text_buckets", "loader", "peak_tflops", "global_batch", "sample_steps", "sample_guidance",
    "allow_new_data", "cache_dir", "cache_size", "storage_options",
    # watching the run (holdout is fixed: it decides what is trained on)
    "report_to", "validate_every", "val_sigmas", "val_samples", "val_sample_steps", "val_guidance",
    "val_guidance_interval",
    # the caches may move (their content is compared), and so may the run folder
    "text_cache", "latent_cache", "out",
)


def compare(before: dict, now: dict) -> dict[str, tuple]:
    """``{key: (before, now)}`` for the settings that differ; raises on one that may not change."""
    changed = {k: (before.get(k), now.get(k)) for k in sorted(set(before) | set(now))
               if k in now and before.get(k) != now.get(k)}
    refused = {k: v for k, v in changed.items() if k not in MAY_CHANGE}
    if refused:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise SemrouteError(f"cannot resume with other settings than the checkpoint was trained with ({listed}); "
                            f"a resume may change only {', '.join(MAY_CHANGE[:-3])}. Start a new --out for the others")
    return changed


def apply_lr(optimizer, scheduler, base_lrs: list[float]) -> None:
    """Make ``base_lrs`` (one per parameter group) the optimizer's and scheduler's base rates at the
    scheduler's current step; a loaded state would otherwise keep the checkpoint's."""
    scheduler.base_lrs = list(base_lrs)
    for group, base, factor in zip(optimizer.param_groups, base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
