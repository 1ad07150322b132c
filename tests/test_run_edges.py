"""Edges of a run folder found by the CLI fault sweep: a resume below the checkpoint's step, a checkpoint of
another run given with a run, weights cut short where no complete.json can tell, a complete.json standing alone
for a checkpoint, and an autoencoder whose config states no downsampling factor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from semroute.shared.errors import SemrouteError
from semroute.stage2_train import checkpoint_files
from semroute.stage2_train.checkpoint_files import DamagedCheckpoint
from semroute.stage2_train.pipeline import SemroutePipeline, _vae_from_fingerprint, export_pipeline
from semroute.stage2_train.run_folder import (RunFolder, is_checkpoint, open_model, refuse_output_inside_model,
                                              resolve_model_source)
from semroute.stage2_train.train import Trainer
from testkit import copy_run, train_config, write_manifest, write_square_images


def _snapshot(folder: Path) -> dict:
    """Every file's bytes but the lock's (which each trainer takes and gives back)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def _cut_short(file: Path) -> Path:
    with open(file, "r+b") as fh:
        fh.truncate(300)
    return file


# -- 1. a resume whose max_steps lies below the checkpoint's step ---------------------------------------------
def test_a_resume_below_the_checkpoints_step_is_refused_and_changes_nothing(square_caches, run4, tmp_path):
    run = copy_run(run4, tmp_path)
    config, before = (run / "config.yaml").read_bytes(), _snapshot(run)
    with pytest.raises(SemrouteError, match=r"--resume latest: step-0000004 is at step 4, past max_steps 2, so "
                                            r"nothing would be trained .*--max-steps above 4.*or start a new --out"):
        Trainer(train_config(square_caches, run, max_steps=2), resume="latest", progress=False)
    assert (run / "config.yaml").read_bytes() == config  # max_steps 4 still: not rewritten as 2
    assert _snapshot(run) == before


def test_a_resume_at_the_checkpoints_step_says_there_is_nothing_to_train(square_caches, run4, tmp_path, capsys):
    """The same command run again after the run finished (a job retried) trains nothing, exits, and says why."""
    run = copy_run(run4, tmp_path)
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    summary = Trainer(train_config(square_caches, run, max_steps=4), resume="latest", progress=False).train()
    assert summary["step"] == 4 and summary["checkpoint"] == str(run / "checkpoints" / "step-0000004")
    assert ("the run is at step 4, its max_steps 4: nothing to train; resume with a larger --max-steps to go on"
            in capsys.readouterr().err)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints


def test_resume_latest_without_a_checkpoint_says_it_starts_a_new_run(square_caches, run4, tmp_path, capsys):
    """The same command starts a job and restarts it after a preemption, so no checkpoint is no error; but a
    mistyped --out must not begin a new run without a word."""
    trainer = Trainer(train_config(square_caches, tmp_path / "new"), resume="latest", progress=False)
    trainer.release()
    assert f"--resume latest: {tmp_path / 'new'} has no checkpoint yet; starting a new run" in capsys.readouterr().err
    trainer = Trainer(train_config(square_caches, copy_run(run4, tmp_path / "copy")), resume="latest", progress=False)
    trainer.release()
    assert "starting a new run" not in capsys.readouterr().err

# -- 2. a checkpoint of another run given with a run ------------------------------------------------------------
def test_a_checkpoint_of_another_run_is_refused_with_both_named(run4, tmp_path):
    mine, other = tmp_path / "mine", tmp_path / "other"
    shutil.copytree(run4, mine)
    shutil.copytree(run4, other)
    theirs = other / "checkpoints" / "step-0000002"
    out = tmp_path / "pipe"
    with pytest.raises(SemrouteError, match=rf"{theirs} is a checkpoint of {other}, not of the run given \({mine}\)"):
        export_pipeline(mine, out, checkpoint=theirs)
    with pytest.raises(SemrouteError, match=rf"{mine / 'checkpoints' / 'step-0000002'} is a checkpoint, and "
                                            rf"--checkpoint {mine / 'checkpoints' / 'step-0000004'} another"):
        export_pipeline(mine / "checkpoints" / "step-0000002", out, checkpoint=mine / "checkpoints" / "step-0000004")
    assert not out.exists() and not list(tmp_path.glob(".pipe*"))
    # one of the run's own, also one set aside beside checkpoints/ (as resolve_resume's message suggests)
    assert RunFolder(mine).model_dir(checkpoint=mine / "checkpoints" / "step-0000002").parent.name == "step-0000002"
    (mine / "set-aside").mkdir()
    shutil.move(mine / "checkpoints" / "step-0000004", mine / "set-aside" / "step-0000004")
    assert RunFolder(mine).model_dir(checkpoint=mine / "set-aside" / "step-0000004").parent.name == "step-0000004"


# -- 3. weights cut short where no complete.json can tell -------------------------------------------------------
def test_a_checkpoint_without_complete_json_and_weights_cut_short_is_named(run4, tmp_path, capsys):
    run = copy_run(run4, tmp_path)
    ckpt = run / "checkpoints" / "step-0000004"
    (ckpt / checkpoint_files.MANIFEST).unlink()
    weights = _cut_short(ckpt / "model" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(DamagedCheckpoint, match=rf"checkpoint {ckpt} is damaged: {weights} is damaged or cut short"):
        RunFolder(run).model_dir(checkpoint=ckpt)  # sample / export / routing of that checkpoint
    # the run's newest intact one is taken instead, the damaged one named
    assert RunFolder(run).model_dir().parent.name == "step-0000002"
    assert f"skipping damaged checkpoint step-0000004: {weights} is damaged or cut short" in capsys.readouterr().err
    assert RunFolder(run).resolve_resume("latest").name == "step-0000002"


def test_an_export_without_complete_json_and_weights_cut_short_is_named(exported, tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(exported, pipe)
    (pipe / checkpoint_files.MANIFEST).unlink()
    weights = _cut_short(pipe / "transformer" / "diffusion_pytorch_model.safetensors")
    named = rf"exported pipeline {pipe} is damaged: {weights} is damaged or cut short .*export it again"
    with pytest.raises(SemrouteError, match=named):
        SemroutePipeline.from_pretrained(pipe, device="cpu")  # sample -c PIPE
    with pytest.raises(SemrouteError, match=named):
        open_model(pipe)  # routing PIPE


# -- 4. a complete.json alone is not a checkpoint ---------------------------------------------------------------
def test_a_folder_holding_only_complete_json_is_no_checkpoint(run4, tmp_path, capsys):
    run = copy_run(run4, tmp_path)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(run / "checkpoints" / "step-0000004" / checkpoint_files.MANIFEST, alone)
    assert not is_checkpoint(alone)
    with pytest.raises(DamagedCheckpoint, match=rf"{alone} is damaged: it has a complete.json, but not what makes a "
                                                r"checkpoint \(model/ or train_state.json\).*config.yaml is missing"):
        resolve_model_source(alone)  # sample, export, routing, info
    with pytest.raises(DamagedCheckpoint, match=rf"{alone} is damaged"):
        RunFolder(run).resolve_resume(str(alone))
    with pytest.raises(SemrouteError, match="inside a checkpoint"):  # still never written into
        refuse_output_inside_model(alone / "x", "-o")
    # in the run, one that lost everything but its list (and its copies of the run's files) is passed over
    shell = run / "checkpoints" / "step-0000006"
    shell.mkdir()
    (shell / checkpoint_files.MANIFEST).write_text(json.dumps({"step": 6, "files": {}}))
    shutil.copy(run / "config.yaml", shell)
    assert not RunFolder.is_run(shell)
    assert RunFolder(run).resolve_resume("latest").name == "step-0000004"
    assert RunFolder(run).model_dir().parent.name == "step-0000004"
    assert f"skipping damaged checkpoint step-0000006: {shell} holds neither model/ nor train_state.json" in \
        capsys.readouterr().err
    with pytest.raises(DamagedCheckpoint, match=rf"{shell} is damaged"):
        RunFolder(run).resolve_resume(str(shell))
    with pytest.raises(DamagedCheckpoint, match=rf"{shell} is damaged"):
        RunFolder(run).model_dir(checkpoint=shell)


# -- 6. an autoencoder whose config states no downsampling factor -----------------------------------------------
def _tiny_kvae(folder: Path) -> Path:
    """A random diffusers AutoencoderKLKVAE (downsampling 2): its config states the factor only as ch_mult, which
    shared.vae.downsample_factor does not read, so encode-images measures it."""
    from diffusers import AutoencoderKLKVAE

    torch.manual_seed(0)
    AutoencoderKLKVAE(channels=32, num_enc_blocks=1, num_dec_blocks=1, z_channels=4, ch_mult=(1, 1),
                      sample_size=16).save_pretrained(folder)
    return folder


def test_a_measured_downsampling_factor_reaches_sampling_and_the_export(run4, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from semroute.shared.latent_store import LatentCacheReader
    from semroute.shared.vae import downsample_factor
    from semroute.stage1_encode.images import EncodeImagesConfig, encode_images

    vae_dir = _tiny_kvae(tmp_path / "kvae")
    manifest = write_manifest(tmp_path / "m.jsonl", write_square_images(tmp_path / "img", 2, size=16))
    encode_images(EncodeImagesConfig(data=str(manifest), out=str(tmp_path / "l.zarr"), vae=str(vae_dir), resolution=16,
                                     device="cpu", workers=0, progress=False))
    fingerprint = LatentCacheReader(tmp_path / "l.zarr").fingerprint
    assert fingerprint["downsample"] == 2
    vae, size = _vae_from_fingerprint(fingerprint)  # as from_run and the training sample grid load it
    assert downsample_factor(vae) == 0  # (what made the pipeline refuse)
    pipe = SemroutePipeline(None, vae, FlowMatchEulerDiscreteScheduler())
    pipe.default_size = size
    assert pipe.vae_downsample == 2 and pipe.image_size() == (16, 16)
    # an export keeps it
    full = SemroutePipeline.from_run(run4, device="cpu")
    full.register_modules(vae=vae)
    full.save_pretrained(tmp_path / "exp")
    assert SemroutePipeline.from_pretrained(tmp_path / "exp", device="cpu").vae_downsample == 2
