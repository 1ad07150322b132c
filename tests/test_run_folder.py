"""The run folder: checkpoint listing and resolution, model folders, and the model registry's loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from semroute.shared.errors import SemrouteError
from semroute.stage2_train.deep_fusion import DeepFusionDiT
from semroute.stage2_train.dit import SemrouteDiT
from semroute.stage2_train.fusion import FUSIONS
from semroute.stage2_train.models import MODELS, model_class
from semroute.stage2_train.run_folder import CHECKPOINT, RUN, RunFolder, open_model, resolve_model_source


def _fake_run(tmp_path: Path, steps: list[int], model=None, ema: bool = False) -> RunFolder:
    run = RunFolder(tmp_path / "run")
    run.create()
    run.config_path.write_text("fusion: depth\nshift: 3.0\n")
    run.record_path.write_text(json.dumps({"text_cache": "t", "latent_cache": "l"}))
    for step in steps:
        tmp = run.stage(step)
        (tmp / "train_state.json").write_text(json.dumps({"step": step}))
        if model is not None:
            model.save_pretrained(tmp / "model")
            if ema:
                model.save_pretrained(tmp / "model_ema")
        run.publish(tmp, step, keep=2)
    return run


def test_registry_covers_every_fusion_and_deep():
    assert set(MODELS) == {*FUSIONS, "deep"}
    assert model_class("deep") is DeepFusionDiT and all(model_class(f) is SemrouteDiT for f in FUSIONS)
    with pytest.raises(SemrouteError, match="unknown"):
        model_class("nope")


def test_checkpoints_newest_last_pruned_and_staging_ignored(tmp_path):
    run = _fake_run(tmp_path, [5, 10, 20])
    assert [p.name for p in run.checkpoints()] == ["step-0000010", "step-0000020"]  # keep=2 dropped step 5
    run.stage(30)  # a half-written checkpoint (a crash): invisible to resume
    assert run.resolve_resume("latest") == run.checkpoints_dir / "step-0000020"
    assert run.resolve_resume(None) is None
    assert RunFolder.train_state(run.latest_checkpoint()) == {"step": 20}
    assert [r["step"] for r in run.metrics() if r.get("event") == "checkpoint"] == [5, 10, 20]
    with pytest.raises(SemrouteError, match="not a checkpoint folder"):
        run.resolve_resume(str(tmp_path))
    source = resolve_model_source(run.path)
    assert source.kind == RUN and source.run.path == run.path and source.checkpoint is None
    source = resolve_model_source(run.checkpoints_dir / "step-0000010")
    assert source.kind == CHECKPOINT and source.run.path == run.path and source.checkpoint.name == "step-0000010"
    assert resolve_model_source(tmp_path) is None
    cfg = run.config()  # a config.yaml of few keys (an older version's) gets today's defaults for the rest
    assert cfg.fusion == "depth" and cfg.shift == 3.0 and cfg.max_steps == type(cfg)().max_steps


def test_model_dir_and_load_model_pick_the_class_by_fusion(tmp_path):
    torch.manual_seed(0)
    model = DeepFusionDiT.from_preset("tiny").eval()
    run = _fake_run(tmp_path, [3], model=model)
    loaded = run.load_model()
    assert type(loaded) is DeepFusionDiT
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(SemrouteError, match="model_ema"):
        run.model_dir(ema=True)
    loaded, label = open_model(run.checkpoints_dir / "step-0000003")
    assert type(loaded) is DeepFusionDiT and label == "step-0000003"


def test_a_run_without_checkpoints_says_so(tmp_path):
    run = _fake_run(tmp_path, [])
    with pytest.raises(SemrouteError, match="no checkpoint yet"):
        run.load_model()
    with pytest.raises(SemrouteError, match="not a run folder"):
        open_model(tmp_path)
