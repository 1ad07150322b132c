"""Stage 2 after a second red-team round: pruning never takes the checkpoint just written (nor leaves half a
checkpoint under a step name), a spent time budget is not stepped past on resume, run files are written
whole, holdout and --set mistakes are named, `info` flags damaged checkpoints, and `sample` draws with the
checkpoint it records even while the run trains on."""

from __future__ import annotations

import json
import resource
import shutil
import signal
from pathlib import Path

import pytest

from semroute.shared.errors import SemrouteError
from semroute.stage2_train import checkpoint_files
from semroute.stage2_train import run_folder as run_folder_module
from semroute.stage2_train.config import TrainConfig
from semroute.stage2_train.run_folder import RunFolder
from semroute.stage2_train.run_info import describe_run
from semroute.stage2_train.train import Trainer, train
from testkit import CHECKOUT_PRELUDE, copy_run, train_config


def _damage(ckpt: Path) -> Path:
    weights = next((ckpt / "model").glob("*.safetensors"))
    with open(weights, "r+b") as fh:
        fh.truncate(100)
    return weights


# -- checkpoints: pruning -----------------------------------------------------------------------------
def test_resuming_past_a_damaged_checkpoint_never_prunes_the_one_just_written(square_caches, run4, tmp_path):
    run = copy_run(run4, tmp_path)
    _damage(run / "checkpoints" / "step-0000004")
    # resume latest passes over the damaged step 4, trains from step 2 and writes step 3, keeping one checkpoint
    summary = train(train_config(square_caches, run, max_steps=3, keep_checkpoints=1), resume="latest", progress=False)
    names = sorted(p.name for p in RunFolder(run).checkpoints())
    assert "step-0000003" in names and "step-0000002" not in names, names
    assert checkpoint_files.problems(run / "checkpoints" / "step-0000003") == []
    assert Path(summary["checkpoint"]).name == "step-0000003"  # not the damaged newer one
    assert RunFolder(run).resolve_resume("latest").name == "step-0000003"


def test_a_kill_while_pruning_leaves_no_half_checkpoint_under_a_step_name(square_caches, run4, tmp_path,
                                                                          monkeypatch):
    run = copy_run(run4, tmp_path)
    real_rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):  # deletes the manifest and the model, then the process dies
        path = Path(path)
        if not path.exists():
            return
        (path / checkpoint_files.MANIFEST).unlink(missing_ok=True)
        real_rmtree(path / "model", ignore_errors=True)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(run_folder_module.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        train(train_config(square_caches, run, max_steps=6, keep_checkpoints=2), resume="latest", progress=False)
    monkeypatch.setattr(run_folder_module.shutil, "rmtree", real_rmtree)
    for ckpt in RunFolder(run).checkpoints():  # every folder named step-* is a whole checkpoint
        assert (ckpt / "model").is_dir() and checkpoint_files.problems(ckpt) == [], ckpt
    train(train_config(square_caches, run, max_steps=8, keep_checkpoints=2), resume="latest", progress=False)
    assert [p.name for p in (run / "checkpoints").iterdir()] and not list((run / "checkpoints").glob(".*"))


# -- resume ---------------------------------------------------------------------------------------------
def test_resuming_a_run_whose_time_budget_is_spent_trains_no_further_step(square_caches, tmp_path, capsys):
    run = tmp_path / "run"
    first = train(train_config(square_caches, run, max_steps=50, max_minutes=1e-6), progress=False)
    assert first["step"] == 1
    again = train(train_config(square_caches, run, max_steps=50, max_minutes=1e-6), resume="latest", progress=False)
    assert again["step"] == 1 and [p.name for p in RunFolder(run).checkpoints()] == ["step-0000001"]
    assert "time budget (max_minutes 1e-06) was spent at step 1" in capsys.readouterr().err


# -- holdout --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("holdout, message", [
    (96, r"holdout 96: the caches join 96 samples .* none would be left to train on"),
    (500, r"holdout 500: the caches join 96 samples"),
    (90, r"6 samples cannot fill one batch of 8 .* lower batch_size or holdout: the caches join 96 samples, of "
         r"which 90 are held out"),
])
def test_a_holdout_that_leaves_too_little_to_train_on_is_named(square_caches, tmp_path, holdout, message):
    out = tmp_path / "run"
    with pytest.raises(SemrouteError, match=message):
        Trainer(train_config(square_caches, out, holdout=holdout), progress=False)
    assert not out.exists()


# -- config -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("item, message", [
    ("model={", r"--set 'model=\{': the value is not valid YAML"),
    ("lr=[1", r"--set 'lr=\[1': the value is not valid YAML"),
    ("out=", r"out is empty"),
])
def test_set_mistakes_are_named(item, message):
    with pytest.raises(SemrouteError, match=message):
        TrainConfig.build(overrides=[item], fusion="static")


@pytest.mark.parametrize("keep", [0, 3])
def test_a_cut_short_run_config_is_named_not_read_as_defaults(run4, tmp_path, keep):
    run = copy_run(run4, tmp_path)
    lines = (run / "config.yaml").read_text().splitlines(keepends=True)
    (run / "config.yaml").write_text("".join(lines[:keep]))  # text_cache, latent_cache, out: no fusion
    with pytest.raises(SemrouteError, match=rf"{run}/config.yaml is damaged \(empty or cut short"):
        describe_run(str(run))


@pytest.fixture
def small_file_limit():
    """Writes past 64 bytes fail (EFBIG, as a full disk fails them) inside the block."""
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.getsignal(signal.SIGXFSZ)

    class Limit:
        def __enter__(self):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (64, limits[1]))

        def __exit__(self, *exc):
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
            signal.signal(signal.SIGXFSZ, handler)

    return Limit()


def test_a_run_config_and_record_that_fail_to_write_leave_the_old_ones_whole(run4, tmp_path, small_file_limit):
    run = copy_run(run4, tmp_path)
    folder = RunFolder(run)
    config_before, record_before = (run / "config.yaml").read_bytes(), (run / "run.json").read_bytes()
    cfg, record = folder.config(), folder.record()
    with small_file_limit:
        with pytest.raises(OSError):
            cfg.save(folder.config_path)
        with pytest.raises(OSError):
            folder.save_record(record)
    assert (run / "config.yaml").read_bytes() == config_before
    assert (run / "run.json").read_bytes() == record_before


# -- info ---------------------------------------------------------------------------------------------
def test_info_flags_a_damaged_checkpoint(run4, tmp_path):
    run = copy_run(run4, tmp_path)
    weights = _damage(run / "checkpoints" / "step-0000004")
    info = describe_run(str(run))
    assert list(info["damaged checkpoints"]) == ["step-0000004"]
    assert f"{weights} has 100 bytes" in info["damaged checkpoints"]["step-0000004"]
    assert "damaged checkpoints" not in describe_run(str(run4))


# -- sample ---------------------------------------------------------------------------------------------
def test_sample_draws_with_the_checkpoint_it_records_while_the_run_trains_on(run4, tmp_path, monkeypatch):
    from semroute.stage2_train import models, sampling

    run = copy_run(run4, tmp_path)
    real_check, real_load = sampling.check_output, models.load_model
    loaded = []

    def training_publishes_meanwhile(out, settings):  # the live run writes step 6 after sample chose step 4
        real_check(out, settings)
        shutil.copytree(run / "checkpoints" / "step-0000004", run / "checkpoints" / "step-0000006",
                        dirs_exist_ok=True)

    def load_model(path, *args, **kwargs):
        loaded.append(Path(path).resolve())
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(sampling, "check_output", training_publishes_meanwhile)
    monkeypatch.setattr(models, "load_model", load_model)
    out = tmp_path / "samples"
    sampling.sample(sampling.SampleConfig(checkpoint=str(run), out=str(out), prompts=["a red square"], steps=1,
                                          progress=False, device="cpu", grid=False))
    recorded = json.loads((out / sampling.RECORD).read_text())["model"]["folder"]
    assert loaded == [Path(recorded)] and Path(recorded).parent.name == "step-0000004"


def test_a_sample_record_that_fails_to_write_leaves_the_old_one_whole(run4, tmp_path, small_file_limit):
    from semroute.stage2_train import sampling

    out = tmp_path / "samples"
    out.mkdir()
    settings = {"prompts": {"count": 1, "sha256": "0" * 64}, "note": "x" * 200}
    sampling.claim_output(out, settings)
    before = (out / sampling.RECORD).read_bytes()
    with small_file_limit, pytest.raises(OSError):
        sampling.claim_output(out, settings)
    assert (out / sampling.RECORD).read_bytes() == before


# -- routing ----------------------------------------------------------------------------------------------
def test_routing_never_writes_into_a_checkpoint_named_as_out(run4, tmp_path):
    from typer.testing import CliRunner

    from semroute.cli import app

    run = copy_run(run4, tmp_path)
    ckpt = run / "checkpoints" / "step-0000004"
    result = CliRunner().invoke(app, ["routing", str(run), "--out", str(ckpt)])
    assert result.exit_code != 0 and "is a checkpoint or an exported pipeline" in str(result.exception)
    assert checkpoint_files.problems(ckpt) == []


def test_a_failure_after_a_checkpoint_is_published_does_not_call_it_unpublished(square_caches, run4, tmp_path,
                                                                                 monkeypatch):
    run = copy_run(run4, tmp_path)
    trainer = Trainer(train_config(square_caches, run, max_steps=6), resume="latest", progress=False)

    real = shutil.copyfile

    def disk_full(src, dst):  # the routing plot's copy into RUN/routing, after the rename
        if Path(dst).parent.name == "routing":
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(run_folder_module.shutil, "copyfile", disk_full)
    with pytest.raises(SemrouteError, match=r"checkpoint step-0000006 was written and published, but what follows "
                                            r"failed: No space left on device .*--resume latest continues from "
                                            r"step-0000006"):
        trainer.train()
    monkeypatch.undo()
    assert RunFolder(run).resolve_resume("latest").name == "step-0000006"


def test_report_never_writes_over_a_run_file(run4, tmp_path):
    from semroute.stage2_train.report import write_report

    run = copy_run(run4, tmp_path)
    before = (run / "run.json").read_bytes()
    for out in (run / "run.json", run / "config.yaml", run):
        with pytest.raises(SemrouteError, match=r"the report is one HTML page; give a file name ending in \.html"):
            write_report([run], out)
    assert (run / "run.json").read_bytes() == before
    assert write_report([run], tmp_path / "r.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "run"]  # no temporary file left


def test_the_demo_counts_its_run_from_the_newest_intact_checkpoint(run4, tmp_path):
    from semroute.demo import _trained

    run = copy_run(run4, tmp_path)
    assert _trained(run)["step"] == 4
    _damage(run / "checkpoints" / "step-0000004")
    assert _trained(run)["step"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["checkpoint", "sample grid"])
def test_a_write_failing_on_the_main_process_stops_every_process(square_caches, tmp_path, failing):
    """Two processes: the main one fails to publish a checkpoint, or to write the validation sample grid (a full
    disk); the other must stop with it, naming the cause, not die at a barrier or the next gradient exchange."""
    import os
    import subprocess
    import sys

    text, latents, _ = square_caches
    script = tmp_path / "two.py"
    patch = ("run_folder.RunFolder.publish = disk_full" if failing == "checkpoint" else
             "validation.SampleGrid.write = disk_full")
    script.write_text(CHECKOUT_PRELUDE + f"""
from semroute.shared.errors import SemrouteError
from semroute.stage2_train import run_folder, validation
from semroute.stage2_train.config import TrainConfig
from semroute.stage2_train.train import train

def disk_full(self, *args, **kwargs):
    raise OSError(28, "No space left on device", "a file")

{patch}
try:
    train(TrainConfig(text_cache={text!r}, latent_cache={latents!r}, out={str(tmp_path / 'run')!r}, fusion="static",
                      preset="tiny", batch_size=8, num_workers=0, report_to="none", max_steps=4, checkpoint_every=2,
                      holdout=8, validate_every=1, val_samples=2, val_sample_steps=1),
          progress=False)
except SemrouteError as err:
    print(f"stopped: {{err}}", file=sys.stderr)
    sys.exit(3)
""")
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode != 0
    # The other process stops with the cause named. (The two processes' lines may interleave, and the launcher
    # stops the main one when the other exits, perhaps before it prints its own message.)
    assert "stopped: rank 0 failed: [Errno 28] No space left on device" in proc.stderr, proc.stderr[-3000:]
    assert "rank 1 failed" not in proc.stderr, proc.stderr[-3000:]  # rank 0 had the error, not rank 1


def test_a_checkpoint_copied_in_from_another_run_is_refused(square_caches, run4, tmp_path):
    other = tmp_path / "other"
    train(train_config(square_caches, other, max_steps=2), progress=False)
    ids = {json.loads((r / "run.json").read_text())["run_id"] for r in (run4, other)}
    assert len(ids) == 2  # each run its own id, kept in every checkpoint's copy of run.json
    shutil.copytree(run4 / "checkpoints" / "step-0000004", other / "checkpoints" / "step-0000004")
    with pytest.raises(SemrouteError, match=rf"cannot resume from .*step-0000004: it is a checkpoint of another run "
                                            rf"\(run id .*; {other} is run .*\), copied in from elsewhere"):
        Trainer(train_config(square_caches, other, max_steps=6), resume="latest", progress=False)
    # a run's own checkpoints resume as before, and keep its id
    shutil.rmtree(other / "checkpoints" / "step-0000004")
    before = json.loads((other / "run.json").read_text())["run_id"]
    train(train_config(square_caches, other, max_steps=4), resume="latest", progress=False)
    assert json.loads((other / "run.json").read_text())["run_id"] == before
    assert json.loads((other / "checkpoints" / "step-0000004" / "run.json").read_text())["run_id"] == before


def test_train_refuses_an_out_that_is_a_cache(square_caches, tmp_path):
    """A run written into a cache folder masked it (`info` called it a run) and the cache's --overwrite then deleted
    the run."""
    text, _, _ = square_caches
    cache = tmp_path / "copy.text.zarr"
    shutil.copytree(text, cache)
    before = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*"))
    with pytest.raises(SemrouteError, match=rf"--out {cache} is a cache \(it has zarr.json\), not a run folder"):
        Trainer(train_config(square_caches, cache, max_steps=1), progress=False)
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*")) == before
