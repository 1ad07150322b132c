"""Elastic resume: the data position is global, so a run stopped on 2 processes resumes on 1 (and the
reverse) and trains on exactly the continuation of one global sequence of batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from semroute.stage2_train.data import EpochBatches, PairedCaches
from testkit import CLI

BATCH = 16  # 96 samples: 6 batches per epoch, so the runs below cross an epoch end


def _train(run: Path, text: str, latents: str, processes: int, max_steps: int, resume: bool = False) -> None:
    args = ["train", "--text-cache", text, "--latent-cache", latents, "--fusion", "static", "--preset", "tiny",
            "--batch-size", str(BATCH), "--num-workers", "0", "--no-progress", "--set", "tensorboard=false",
            "--set", "log_samples=true", "--max-steps", str(max_steps), "--out", str(run),
            *(["--resume", "latest"] if resume else [])]
    if processes == 1:  # in this process (saves an interpreter start)
        from semroute.stage2_train.config import TrainConfig
        from semroute.stage2_train.train import train

        train(TrainConfig(text_cache=text, latent_cache=latents, fusion="static", preset="tiny", batch_size=BATCH,
                          num_workers=0, tensorboard=False, log_samples=True, max_steps=max_steps, out=str(run)),
              resume="latest" if resume else None, progress=False)
        return
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(CLI), *args],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _positions(run: Path, per_epoch: int) -> list[tuple[int, list[str]]]:
    """Every batch trained on, as (global position, sample ids), in position order."""
    out = []
    for log in sorted((run / "logs").glob("samples-rank*.jsonl")):
        for line in log.read_text().splitlines():
            row = json.loads(line)
            out.append((row["epoch"] * per_epoch + row["index"], row["sample_ids"]))
    return sorted(out)


@pytest.mark.slow
def test_resume_on_another_number_of_processes_continues_the_global_sequence(square_caches, tmp_path):
    text, latents, _ = square_caches
    ds = PairedCaches(text, latents, text_layers=None)
    plan = EpochBatches(ds.bucket_ids(), ds.text_lengths(), BATCH, seed=0)
    n = plan.n_batches
    ids = ds.latents.sample_ids
    expected = [[ids[int(ds.latent_pos[s])] for s in samples] for _, _, samples in
                (next(it) for it in [plan.iterate()] for _ in range(10))]

    # 2 processes for 3 steps (batches 0-5), then 1 process for 4 more (6-9).
    a = tmp_path / "two-then-one"
    _train(a, text, latents, 2, 3)
    _train(a, text, latents, 1, 7, resume=True)
    # 1 process for 3 steps (batches 0-2), then 2 processes for 3 more (3-8).
    b = tmp_path / "one-then-two"
    _train(b, text, latents, 1, 3)
    _train(b, text, latents, 2, 6, resume=True)

    for run, total in ((a, 10), (b, 9)):
        got = _positions(run, n)
        assert [p for p, _ in got] == list(range(total)), f"{run.name}: a batch skipped or repeated"
        assert [s for _, s in got] == expected[:total], f"{run.name}: not the single-process sequence"
