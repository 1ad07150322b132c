"""Watching a run: the held-out split, the validation loss, sample grids during training, trackers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from semroute.shared.errors import SemrouteError
from semroute.stage2_train.config import TrainConfig
from semroute.stage2_train.data import PairedCaches
from semroute.stage2_train.train import Trainer, train
from semroute.stage2_train.validation import HEADER_HEIGHT, LABEL_WIDTH, ValidationLoss, holdout_split, sigma_grid


def _cfg(square_caches, tmp_path, name="run", **kw) -> TrainConfig:
    text, latents, _ = square_caches
    base = dict(text_cache=text, latent_cache=latents, out=str(tmp_path / name), preset="tiny", batch_size=8,
                num_workers=0, report_to="none", log_every=1, checkpoint_every=1000, fusion="static", lr=1e-3)
    return TrainConfig(**{**base, **kw})


def _events(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == kind]


def test_holdout_split_depends_on_seed_and_size_only():
    a = holdout_split(96, 16, seed=0)
    assert len(a) == len(set(a)) == 16 and list(a) == sorted(a) and a.max() < 96
    assert list(holdout_split(96, 16, seed=0)) == list(a)
    assert list(holdout_split(96, 16, seed=1)) != list(a)
    assert len(holdout_split(96, 0, seed=0)) == 0


def test_held_out_samples_are_never_trained_on_and_recorded(square_caches, tmp_path):
    cfg = _cfg(square_caches, tmp_path, holdout=16, max_steps=12, log_samples=True, val_samples=0)
    train(cfg, progress=False)
    run = Path(cfg.out)
    held = json.loads((run / "run.json").read_text())["holdout"]["sample_ids"]
    assert len(held) == 16
    trained = {s for line in (run / "logs" / "samples-rank0.jsonl").read_text().splitlines()
               for s in json.loads(line)["sample_ids"]}
    assert len(trained) == 96 - 16 - (96 - 16) % 8 or len(trained) >= 72  # every epoch drops a partial batch
    assert not trained & set(held)
    # a resume that would hold out other samples is refused
    other = _cfg(square_caches, tmp_path, holdout=8, max_steps=14, val_samples=0)
    with pytest.raises(SemrouteError, match="holdout: 16 -> 8"):
        Trainer(other, resume="latest", progress=False)


def test_validation_loss_samples_and_ema_at_fixed_points(square_caches, tmp_path):
    cfg = _cfg(square_caches, tmp_path, holdout=16, max_steps=10, validate_every=5, ema=True, ema_decay=0.9,
               val_samples=3, val_sample_steps=3, checkpoint_every=10)
    train(cfg, progress=False)
    run = Path(cfg.out)
    vals = _events(run, "validation")
    assert [v["step"] for v in vals] == [5, 10]
    for v in vals:
        assert set(v["val_loss_sigma"]) == {f"{s:.4f}" for s in sigma_grid(8)}
        assert v["val_loss"] == pytest.approx(np.mean(list(v["val_loss_sigma"].values())))
        assert v["val_loss_ema"] != v["val_loss"]
        assert (run / v["samples"]).exists()
    # The sheet: a title row, then 3 captions x (truth | current | EMA) at 3x the 32-pixel images.
    from PIL import Image

    sheet = Image.open(run / "samples" / "step-0000010.png")
    assert sheet.height == HEADER_HEIGHT + 3 * 96 and sheet.width == 3 * 96 + LABEL_WIDTH

    # The logged number is the validation loss of the saved weights (fixed noise, all held-out samples).
    assert single_process_validation(run, "step-0000010", 16, cfg.seed) == pytest.approx(vals[-1]["val_loss"], rel=1e-5)


class _OneProcess:
    """What ValidationLoss needs of an Accelerator, on one process."""

    device = torch.device("cpu")

    def autocast(self):
        return torch.autocast("cpu", enabled=False)

    def reduce(self, t, op):
        return t


def single_process_validation(run: Path, checkpoint: str, holdout: int, seed: int) -> float:
    """The mean validation loss of a run's saved weights, recomputed here in one process (twice: the
    noise is fixed, so both must agree exactly)."""
    from semroute.stage2_train.dit import SemrouteDiT

    record = json.loads((run / "run.json").read_text())
    model = SemrouteDiT.from_pretrained(str(run / "checkpoints" / checkpoint / "model")).eval()
    ds = PairedCaches(record["text_cache"], record["latent_cache"], text_layers=list(model.text_layers))
    val = ValidationLoss(ds, holdout_split(len(ds), holdout, seed), n_sigmas=8, batch_size=5)
    once = val.compute(model, _OneProcess())
    assert once == val.compute(model, _OneProcess())
    return sum(once.values()) / len(once)


def test_validation_cost_is_reported(square_caches, tmp_path):
    cfg = _cfg(square_caches, tmp_path, holdout=8, max_steps=4, validate_every=2, val_samples=1, val_sample_steps=2)
    summary = train(cfg, progress=False)
    vals = _events(Path(cfg.out), "validation")
    assert all(v["seconds"] > 0 for v in vals)
    assert vals[-1]["validation_seconds"] == pytest.approx(sum(v["seconds"] for v in vals), abs=0.02)
    assert vals[-1]["validation_seconds"] < summary["train_seconds"]


def test_tensorboard_gets_validation_scalars_and_sample_images(square_caches, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(square_caches, tmp_path, holdout=8, max_steps=4, validate_every=4, val_samples=2,
               val_sample_steps=2, report_to="tensorboard")
    train(cfg, progress=False)
    acc = EventAccumulator(str(next((Path(cfg.out) / "logs" / "tensorboard").rglob("events.out.tfevents.*")).parent),
                           size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "val/loss" in tags["scalars"] and "val/loss_sigma_0.0625" in tags["scalars"]
    assert [e.step for e in acc.Images("samples")] == [4]


def test_wandb_offline(square_caches, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")  # the optional extra: pip install semroute[wandb]
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(square_caches, tmp_path, holdout=8, max_steps=4, validate_every=4, val_samples=1,
               val_sample_steps=2, report_to="wandb")
    train(cfg, progress=False)
    wandb.teardown()  # the run's records are written by wandb's service process: wait for it
    runs = list((Path(cfg.out) / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # Offline runs keep their records in a binary log (synced later by `wandb sync`) and media as files.
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert b"val/loss_sigma_0.0625" in record and b"routing_entropy_mean" in record
    assert [p.name.split("_")[1] for p in (runs[0] / "files" / "media" / "images").glob("samples_*.png")] == ["4"]


def test_report_to_is_checked_and_old_configs_load(tmp_path):
    with pytest.raises(SemrouteError, match="report_to"):
        TrainConfig(report_to="mlflow")
    old = tmp_path / "config.yaml"
    old.write_text("tensorboard: false\nfusion: static\n")
    assert TrainConfig.build(config_file=str(old)).report_to == "none"
