"""A run folder is safe to use: one trainer at a time, resume only onto what the checkpoint was trained
with (same data, same architecture; lr and length may change and do), damaged checkpoints never picked,
joins that cannot pair the wrong captions, sample outputs never mixed across settings."""

from __future__ import annotations

import importlib.util

import json
import os
import shutil
from pathlib import Path

import pytest

from semroute.shared.errors import FingerprintMismatch, SemrouteError
from semroute.stage1_encode.images import EncodeImagesConfig, encode_images
from semroute.stage1_encode.text import EncodeTextConfig, encode_text
from semroute.stage2_train.checkpoint_files import DamagedCheckpoint
from semroute.stage2_train.config import TrainConfig
from semroute.stage2_train.data import PairedCaches
from semroute.stage2_train.run_lock import RunFolderBusy, RunLock
from semroute.stage2_train.sampling import SampleConfig, sample
from semroute.stage2_train.run_folder import RunFolder
from semroute.stage2_train.train import Trainer, train
from testkit import copy_run, hold_lock, train_config, write_manifest, write_square_images


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


# -- the lock -------------------------------------------------------------------------------------
def test_one_trainer_per_run_folder_and_a_dead_holder_blocks_nothing(square_caches, tmp_path):
    out = tmp_path / "run"
    first = Trainer(train_config(square_caches, out, max_steps=2), progress=False)  # holds the lock until train() ends
    with pytest.raises(RunFolderBusy, match=rf"{out} is in use by another training process \(pid {os.getpid()}"):
        Trainer(train_config(square_caches, out, max_steps=2), progress=False)
    first.train()
    Trainer(train_config(square_caches, out, max_steps=4), resume="latest", progress=False).train()  # released: fine

    # another process holds it: refused with its pid; killed with -9, its lock is gone with it
    holder = hold_lock("from semroute.stage2_train.run_lock import RunLock", f"RunLock({str(out)!r})")
    try:
        with pytest.raises(RunFolderBusy, match=rf"pid {holder.pid}"):
            Trainer(train_config(square_caches, out, max_steps=6), resume="latest", progress=False)
    finally:
        holder.kill()
        holder.wait()
    with RunLock(out):
        pass


# -- resume: what may change, what may not -------------------------------------------------------
def test_resume_applies_a_new_lr_and_logs_it(square_caches, run4, tmp_path, capsys):
    run = copy_run(run4, tmp_path)
    cfg = train_config(square_caches, run, max_steps=6, lr=0.5)
    train(cfg, resume="latest", progress=False)
    rows = _metrics(run)
    lrs = {r["step"]: r["lr"] for r in rows if "loss" in r}
    assert lrs[4] == pytest.approx(1e-3) and lrs[5] == lrs[6] == pytest.approx(0.5)
    event = [r for r in rows if r.get("event") == "resume"][-1]
    assert event["changed"]["lr"] == [1e-3, 0.5] and event["changed"]["max_steps"] == [4, 6]
    assert "with changed settings: lr 0.001 -> 0.5" in capsys.readouterr().err


@pytest.mark.parametrize("change", [dict(fusion="depth"), dict(preset="small"), dict(seed=1), dict(batch_size=4),
                                    dict(model={"num_blocks": 3}), dict(ema=True)])
def test_resume_refuses_settings_the_checkpoint_fixes(square_caches, run4, tmp_path, change):
    run = copy_run(run4, tmp_path)
    key = next(iter(change))
    with pytest.raises(SemrouteError, match=rf"cannot resume with other settings .*{key}: "):
        Trainer(train_config(square_caches, run, max_steps=6, **change), resume="latest", progress=False)


def test_resume_with_another_architecture_is_a_clean_error(square_caches, run4, tmp_path):
    """A checkpoint whose recorded config was lost: the state does not fit the model, and that is said."""
    run = copy_run(run4, tmp_path)
    for ckpt in (run / "checkpoints").iterdir():
        (ckpt / "config.yaml").unlink()
        (ckpt / "complete.json").unlink()
    (run / "config.yaml").unlink()
    with pytest.raises(SemrouteError, match=r"cannot resume from .*step-0000004: its state does not load"):
        Trainer(train_config(square_caches, run, max_steps=6, model={"num_blocks": 3}), resume="latest", progress=False)


def test_resume_compares_cache_content_and_records_absolute_paths(tmp_path, tiny_llama_dir, monkeypatch):
    records = [{**r, "id": f"s{i}"} for i, r in enumerate(write_square_images(tmp_path / "img", 16))]
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    other = write_manifest(tmp_path / "other.jsonl", [  # as many captions, other words
        {**r, "text": [" a purple star"] * len(r["text"]) if isinstance(r["text"], list) else " a purple star"}
        for r in records])
    text, latents = tmp_path / "t.zarr", tmp_path / "l.zarr"
    for data, out in ((manifest, text), (other, tmp_path / "o.zarr")):
        encode_text(EncodeTextConfig(data=str(data), out=str(out), llm=str(tiny_llama_dir), dtype="float32",
                                     device="cpu", progress=False))
    encode_images(EncodeImagesConfig(data=str(manifest), out=str(latents), vae="pixel", resolution=32, workers=0,
                                     device="cpu", progress=False))
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    train(train_config(("t.zarr", "l.zarr"), run, max_steps=2), progress=False)
    record = json.loads((run / "run.json").read_text())
    assert record["text_cache"] == str(text) and record["latent_cache"] == str(latents)
    # the same data moved elsewhere, named by a relative path from another directory: accepted
    moved = tmp_path / "moved" / "t.zarr"
    shutil.copytree(text, moved)
    monkeypatch.chdir(tmp_path / "moved")
    Trainer(train_config(("t.zarr", str(latents)), run, max_steps=4), resume="latest", progress=False).release()
    assert json.loads((run / "run.json").read_text())["text_cache"] == str(moved)
    # other captions encoded by the same LLM: refused
    with pytest.raises(FingerprintMismatch, match=r"text cache .*o.zarr holds other data than the text cache"):
        Trainer(train_config((str(tmp_path / "o.zarr"), str(latents)), run, max_steps=4), resume="latest", progress=False)


# -- damaged checkpoints --------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["delete", "flip", "truncate"])
def test_resume_latest_skips_a_damaged_checkpoint(square_caches, run4, tmp_path, damage, capsys):
    run = copy_run(run4, tmp_path)
    newest = run / "checkpoints" / "step-0000004"
    victim = next(p for p in sorted(newest.rglob("*.safetensors")) if "model" in p.parts)
    if damage == "delete":
        victim.unlink()
    elif damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x10
        victim.write_bytes(bytes(data))
    else:
        victim.write_bytes(victim.read_bytes()[:-7])
    assert RunFolder(run).resolve_resume("latest").name == "step-0000002"
    assert "skipping damaged checkpoint step-0000004" in capsys.readouterr().err
    assert RunFolder(run).model_dir().parent.name == "step-0000002"
    with pytest.raises(DamagedCheckpoint, match=rf"step-0000004 is damaged: {victim}"):
        RunFolder(run).resolve_resume(str(newest))
    with pytest.raises(DamagedCheckpoint):
        RunFolder(run).model_dir(checkpoint=newest)
    shutil.rmtree(run / "checkpoints" / "step-0000002" / "model")
    with pytest.raises(DamagedCheckpoint, match="every checkpoint of .* is damaged"):
        RunFolder(run).resolve_resume("latest")


def test_a_checkpoint_that_failed_to_write_is_named_and_never_published(square_caches, run4, tmp_path,
                                                                         monkeypatch):
    run = copy_run(run4, tmp_path)
    trainer = Trainer(train_config(square_caches, run, max_steps=6), resume="latest", progress=False)
    import semroute.stage2_train.checkpoint_files as cf

    def disk_full(folder, step):
        raise OSError(28, "No space left on device", str(folder / "complete.json"))

    monkeypatch.setattr(cf, "write_manifest", disk_full)
    with pytest.raises(SemrouteError, match=r"writing checkpoint step-0000006 .* failed: No space left on device"
                                            r".*--resume latest continues from step-0000004"):
        trainer.train()
    assert not (run / "checkpoints" / "step-0000006").exists()
    assert RunFolder(run).resolve_resume("latest").name == "step-0000004"


# -- joins ----------------------------------------------------------------------------------------
def test_positional_ids_must_come_from_the_same_data(tmp_path, tiny_llama_dir, capsys):
    records = [{"image": r["image"], "text": r["text"]} for r in write_square_images(tmp_path / "img", 12)]
    a = write_manifest(tmp_path / "a.jsonl", records)
    b = write_manifest(tmp_path / "b.jsonl", records[::-1])
    text = tmp_path / "t.zarr"
    encode_text(EncodeTextConfig(data=str(a), out=str(text), llm=str(tiny_llama_dir), dtype="float32", device="cpu",
                                 progress=False))
    common = dict(vae="pixel", resolution=32, workers=0, device="cpu", progress=False)
    encode_images(EncodeImagesConfig(data=str(a), out=str(tmp_path / "same.zarr"), **common))
    encode_images(EncodeImagesConfig(data=str(b), out=str(tmp_path / "reordered.zarr"), **common))
    assert len(PairedCaches(str(text), str(tmp_path / "same.zarr"), text_layers=None)) == 12
    with pytest.raises(SemrouteError, match=r"joined by record position .* encoded from different data"):
        PairedCaches(str(text), str(tmp_path / "reordered.zarr"), text_layers=None)

    # with ids, partial joins are fine and counted at the start of training
    with_ids = [{**r, "id": f"s{i}"} for i, r in enumerate(records)]
    c = write_manifest(tmp_path / "c.jsonl", with_ids)
    d = write_manifest(tmp_path / "d.jsonl", with_ids[:9][::-1])
    encode_text(EncodeTextConfig(data=str(c), out=str(tmp_path / "tc.zarr"), llm=str(tiny_llama_dir),
                                 dtype="float32", device="cpu", progress=False))
    encode_images(EncodeImagesConfig(data=str(d), out=str(tmp_path / "ld.zarr"), **common))
    capsys.readouterr()
    trainer = Trainer(train_config((str(tmp_path / "tc.zarr"), str(tmp_path / "ld.zarr")), tmp_path / "run", batch_size=4),
                      progress=False)
    trainer.release()
    assert ("data: 9 samples in both caches; left out: 3 caption ids without an image, 0 images without a caption"
            in capsys.readouterr().err)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["text_only_ids"] == 3


# -- sample outputs -------------------------------------------------------------------------------
def test_sample_never_mixes_outputs_of_other_settings(run4, tmp_path):
    out = tmp_path / "s"
    base = dict(checkpoint=str(run4), out=str(out), prompts=["a red square on the left"], steps=2, progress=False,
                device="cpu")
    assert sample(SampleConfig(**base))["images_written"] == 1
    assert sample(SampleConfig(**base))["images_written"] == 0  # resume: same settings, nothing to do
    for change in (dict(seed=1), dict(guidance=2.0), dict(steps=3), dict(checkpoint=str(run4 / "checkpoints" /
                                                                                          "step-0000002"))):
        with pytest.raises(SemrouteError, match=r"holds images made with other settings \((seed|guidance|steps|"
                                                r"model)"):
            sample(SampleConfig(**{**base, **change}))
    # a folder of images that sample did not record
    (tmp_path / "foreign").mkdir()
    shutil.copy(next(out.glob("*.png")), tmp_path / "foreign" / "x.png")
    with pytest.raises(SemrouteError, match="holds images but no sample_run.json"):
        sample(SampleConfig(**{**base, "out": str(tmp_path / "foreign")}))


def test_a_run_that_fails_to_start_leaves_no_empty_folder(square_caches, tmp_path):
    text, latents, _ = square_caches
    new = tmp_path / "runs" / "new"
    with pytest.raises(SemrouteError, match="no cache at"):
        Trainer(TrainConfig(text_cache=str(tmp_path / "missing.text.zarr"), latent_cache=latents, out=str(new),
                            preset="tiny", report_to="none"), progress=False)
    assert not new.exists()  # made by this run, holding nothing but its lock: taken away
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("kept\n")
    with pytest.raises(SemrouteError, match="no cache at"):
        Trainer(TrainConfig(text_cache=text, latent_cache=str(tmp_path / "missing.latents.zarr"), out=str(mine),
                            preset="tiny", report_to="none"), progress=False)
    assert (mine / "notes.txt").read_text() == "kept\n"  # a folder the user made stays, with what it held
    # and a run that does start in a fresh folder keeps it
    ok = Trainer(TrainConfig(text_cache=text, latent_cache=latents, out=str(new), preset="tiny", report_to="none",
                             num_workers=0), progress=False)
    ok.release()
    assert (new / "run.json").exists()



@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_a_tracker_that_is_not_installed_stops_the_run_before_it_writes(square_caches, tmp_path):
    text, latents, _ = square_caches
    new = tmp_path / "runs" / "wandb"
    with pytest.raises(SemrouteError, match=r"^--report-to wandb: the wandb package is not installed"):
        Trainer(TrainConfig(text_cache=text, latent_cache=latents, out=str(new), preset="tiny", report_to="wandb",
                            num_workers=0), progress=False)
    assert not new.exists()

# -- a run is never written over --------------------------------------------------------------------
def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def test_a_new_run_is_never_started_over_an_existing_one(square_caches, run4, tmp_path):
    run = copy_run(run4, tmp_path)
    before = _snapshot(run)
    with pytest.raises(SemrouteError, match=r"already holds a training run \(2 checkpoint\(s\), the newest "
                                            r"step-0000004\): continue it with --resume latest"):
        Trainer(train_config(square_caches, run, max_steps=2), progress=False)
    assert _snapshot(run) == before
    # a run that stopped before its first checkpoint: still refused, and --resume latest starts it again
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(SemrouteError, match=r"already holds a training run \(a run's config and logs, no checkpoint"):
        Trainer(train_config(square_caches, run, max_steps=2), progress=False)
    train(train_config(square_caches, run, max_steps=2), resume="latest", progress=False)
    assert [p.name for p in RunFolder(run).checkpoints()] == ["step-0000002"]


def test_resume_takes_only_the_newest_checkpoint_of_its_own_run(square_caches, run4, tmp_path):
    run = copy_run(run4, tmp_path)
    before = _snapshot(run)
    other = tmp_path / "other"
    with pytest.raises(SemrouteError, match=rf"a checkpoint of another run \({run}\), not of --out {other}; to "
                                            rf"continue that run, pass --out {run}"):
        Trainer(train_config(square_caches, other, max_steps=6), resume=str(run / "checkpoints" / "step-0000004"),
                progress=False)
    assert not other.exists()
    older = run / "checkpoints" / "step-0000002"
    with pytest.raises(SemrouteError, match=r"has newer checkpoints \(step-0000004\), which training on from "
                                            r"step-0000002 would overwrite and prune"):
        Trainer(train_config(square_caches, run, max_steps=6), resume=str(older), progress=False)
    assert _snapshot(run) == before
    # moved aside as the message says, the newer checkpoint survives the run that goes back
    (run / "set-aside").mkdir()
    os.replace(run / "checkpoints" / "step-0000004", run / "set-aside" / "step-0000004")
    train(train_config(square_caches, run, max_steps=4), resume=str(older), progress=False)
    assert _snapshot(run / "set-aside") == {k.removeprefix("checkpoints/"): v for k, v in before.items()
                                            if k.startswith("checkpoints/step-0000004/")}
    assert (run / "checkpoints" / "step-0000004").is_dir()  # trained again from step 2


@pytest.mark.parametrize("caught_by,diverges", [("log", "loss"), ("checkpoint", "loss"), ("log", "grad_norm"),
                                                ("checkpoint", "grad_norm")])
def test_a_diverging_run_stops_before_saving_nan_weights(square_caches, run4, tmp_path, monkeypatch, caught_by,
                                                         diverges):
    import semroute.stage2_train.train as train_mod
    from semroute.stage2_train.train import NonFiniteLoss

    run = copy_run(run4, tmp_path)
    before = _snapshot(run / "checkpoints")
    # NaN from step 5 on; checkpoints every 2 steps, 'keep_checkpoints' 2: saving step 6 would prune step-4
    trainer = Trainer(train_config(square_caches, run, max_steps=10, keep_checkpoints=2,
                           log_every=1 if caught_by == "log" else 7), resume="latest", progress=False)
    real = train_mod.flow_loss

    def diverging(*args, **kwargs):
        loss = real(*args, **kwargs)
        return loss * float("nan") if trainer.state.step >= 4 else loss

    real_clip = trainer.accelerator.clip_grad_norm_

    def diverging_norm(*args, **kwargs):  # the loss stays finite, the gradient norm overflows
        norm = real_clip(*args, **kwargs)
        return norm * float("inf") if trainer.state.step >= 4 else norm

    if diverges == "loss":
        monkeypatch.setattr(train_mod, "flow_loss", diverging)
    else:
        monkeypatch.setattr(trainer.accelerator, "clip_grad_norm_", diverging_norm)
    with pytest.raises(NonFiniteLoss, match=r"stopped at step (5|6): the loss or the gradient norm became NaN/inf "
                                            r".*step-0000004 is the last and is untouched"):
        trainer.train()
    assert trainer.state.step == (5 if caught_by == "log" else 6)
    assert _snapshot(run / "checkpoints") == before
    assert _metrics(run)[-1]["event"] == "stopped"


def test_routing_of_a_checkpoint_is_written_beside_the_run_not_into_the_checkpoint(run4, tmp_path):
    from typer.testing import CliRunner

    from semroute.cli import app
    from semroute.stage2_train import checkpoint_files

    run = copy_run(run4, tmp_path)
    ckpt = run / "checkpoints" / "step-0000002"
    before = _snapshot(ckpt)
    result = CliRunner().invoke(app, ["routing", str(ckpt)])
    assert result.exit_code == 0, result.output
    assert _snapshot(ckpt) == before and checkpoint_files.problems(ckpt) == []
    assert (run / "routing" / "step-0000002.csv").read_text() == (ckpt / "routing.csv").read_text()


def test_a_checkpoint_pruned_while_it_is_read_is_named(run4, tmp_path, monkeypatch):
    from semroute.stage2_train import models

    run = copy_run(run4, tmp_path)
    real = models.model_class

    def pruned_meanwhile(fusion):  # a live run's pruning, between reading config.json and the weights
        klass = real(fusion)

        class Pruned(klass):
            @classmethod
            def from_pretrained(cls, path, **kwargs):
                shutil.rmtree(Path(path).parent)
                return klass.from_pretrained(path, **kwargs)

        Pruned.__name__ = klass.__name__
        return Pruned

    monkeypatch.setattr(models, "model_class", pruned_meanwhile)
    with pytest.raises(SemrouteError, match=r"step-0000004/model was removed while it was being read .* run the "
                                            r"command again"):
        RunFolder(run).load_model()
