"""Ctrl-C or a scheduler's SIGTERM stops a training run with a checkpoint at a step every process agrees on, exits
128 + the signal's number, and ``--resume latest`` goes on with the losses of an uninterrupted run
(shared/interrupts.py, StopRequest)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from semroute.shared.errors import SemrouteError
from semroute.shared import interrupts
from semroute.shared.interrupts import StopRequest
from testkit import CLI, run_cli, teardown_marks

FAST = ["--preset", "tiny", "--fusion", "static", "--batch-size", "8", "--num-workers", "0", "--no-progress",
        "--set", "report_to=none", "--set", "log_every=1", "--set", "checkpoint_every=1000", "--lr", "1e-3"]


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _wait_for_steps(run: Path, proc: subprocess.Popen, steps: int) -> None:
    metrics, deadline = run / "logs" / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.005)
    raise AssertionError(f"the run did not reach {steps} logged steps (exit {proc.poll()})")


def test_sigterm_stops_with_a_checkpoint_and_the_resume_loses_nothing(square_caches, tmp_path):
    text, latents, _ = square_caches
    common = ["train", "--text-cache", text, "--latent-cache", latents, *FAST]
    ref = tmp_path / "ref"
    run_cli(*common, "--out", str(ref), "--max-steps", "150")

    run = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, str(CLI), *common, "--out", str(run), "--max-steps", "100000"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_steps(run, proc, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    stopped_at = max(_losses(run))
    assert stopped_at < 150, "the run got too far before the signal for this test to mean anything"
    assert f"stopped by SIGTERM at step {stopped_at}: continue with --resume latest" in err
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step-{stopped_at:07d}"]
    assert "Traceback" not in err

    run_cli("train", "--out", str(run), "--resume", "latest", "--max-steps", "150", "--no-progress")
    a, b = _losses(ref), _losses(run)
    assert [b[s] for s in range(1, 151)] == [a[s] for s in range(1, 151)]


def test_ctrl_c_in_two_processes_stops_both_at_one_step_with_one_checkpoint(square_caches, tmp_path):
    """The terminal's SIGINT reaches the launcher, which forwards it to its workers (torchrun starts them in
    sessions of their own); they agree on the next log step, write one checkpoint there and end."""
    text, latents, _ = square_caches
    run = tmp_path / "ddp"
    hook_env, marks = teardown_marks(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
         str(CLI), "train", "--text-cache", text, "--latent-cache", latents, "--out", str(run),
         "--max-steps", "100000", *FAST, "--set", "log_every=50", "--set", "log_samples=true"],
        env={**os.environ, "OMP_NUM_THREADS": "1", **hook_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True)  # its own process group, as a terminal's job
    try:
        _wait_for_steps(run, proc, 1)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    checkpoints = [p.name for p in (run / "checkpoints").iterdir()]
    stopped_at = max(_losses(run))
    assert stopped_at % 50 == 0 and checkpoints == [f"step-{stopped_at:07d}"], (checkpoints, err[-3000:])
    assert err.count(f"stopped by SIGINT at step {stopped_at}: continue with --resume latest") == 1, err[-3000:]
    for rank in (0, 1):  # both processes trained exactly the steps up to it
        steps = [json.loads(line)["step"] for line in (run / "logs" / f"samples-rank{rank}.jsonl").read_text().splitlines()]
        assert steps == list(range(stopped_at))
    assert list(marks.iterdir()) == []  # ended without the interpreter's teardown (shared/processes.py)


def test_a_second_ctrl_c_stops_at_once_but_a_forwarded_copy_or_sigterm_does_not(monkeypatch):
    previous = signal.getsignal(signal.SIGINT)
    with StopRequest(say=False) as request:
        assert request.received is None
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # at once: a launcher's forwarded copy
        os.kill(os.getpid(), signal.SIGTERM)
        assert request.name == "SIGINT"
        monkeypatch.setattr(interrupts, "SAME_REQUEST", 0.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # (the handler runs between bytecodes)
    assert signal.getsignal(signal.SIGINT) is previous


def test_the_demo_marks_no_run_trained_that_a_signal_stopped(tmp_path, monkeypatch):
    import semroute.stage2_train.train as train_mod
    from semroute import demo

    class Stopped:
        def __init__(self, *args, **kwargs):
            pass

        def train(self):
            return {"stopped_by": "SIGINT", "step": 3, "train_seconds": 1.0, "validation_seconds": 0.0}

    monkeypatch.setattr(train_mod, "Trainer", Stopped)
    cfg = demo.DemoConfig(out=str(tmp_path), processes=1, progress=False)
    run_dir = tmp_path / "run-depth"
    data = {"text_cache": tmp_path / "t.zarr", "latent_cache": tmp_path / "l.zarr"}
    with pytest.raises(SemrouteError, match="training stopped by SIGINT at step 3, its checkpoint written; rerun the "
                                            "same command to go on"):
        demo.train_strategy(cfg, data, "depth", run_dir)
    assert not demo.trained_marker(run_dir).exists()
