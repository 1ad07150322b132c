"""Training from the caches: the loss falls, resume is exact, processes split the data, bad caches are refused."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from semroute.shared.errors import FingerprintMismatch, SemrouteError
from semroute.stage1_encode.text import EncodeTextConfig, encode_text
from semroute.stage2_train.config import (
    CONFIG_DIR,
    FUSION_CONFIGS,
    TrainConfig,
    config_names,
    field_help,
    load_yaml,
    resolve_config,
)
from semroute.stage2_train.data import EpochBatches, PairedCaches
from semroute.stage2_train.train import Trainer, train
from testkit import CLI, run_cli, teardown_marks

FAST = ["--preset", "tiny", "--batch-size", "8", "--num-workers", "0", "--no-progress", "--set", "report_to=none"]


def _cfg(square_caches, tmp_path, **kw) -> TrainConfig:
    text, latents, _ = square_caches
    base = dict(text_cache=text, latent_cache=latents, out=str(tmp_path / "run"), preset="tiny", batch_size=8,
                num_workers=0, report_to="none", log_every=1, checkpoint_every=1000)
    return TrainConfig(**{**base, **kw})


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "logs" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row["loss"]  # a resumed run re-logs steps: keep the latest
    return out


def test_loss_falls_clearly_on_the_tiny_preset(square_caches, tmp_path):
    cfg = _cfg(square_caches, tmp_path, fusion="depth", max_steps=200, lr=1e-3, seed=0)
    summary = train(cfg, progress=False)
    losses = _losses(Path(cfg.out))
    first = np.mean([losses[s] for s in range(1, 11)])
    last = np.mean([losses[s] for s in range(191, 201)])
    assert summary["step"] == 200
    assert last < 0.5 * first, (first, last)
    run = Path(cfg.out)
    assert (run / "config.yaml").exists() and (run / "routing" / "latest.png").exists()
    assert (run / "checkpoints" / "step-0000200" / "model" / "config.json").exists()
    # the depth gates have moved away from uniform, differently per block
    rows = [r for r in (run / "routing" / "latest.csv").read_text().splitlines()[1:]]
    weights = np.array([float(r.split(",")[-1]) for r in rows]).reshape(2, 4)
    assert np.allclose(weights.sum(1), 1) and not np.allclose(weights, 0.25)


def test_resume_after_kill_9_continues_with_the_same_losses(square_caches, tmp_path):
    text, latents, _ = square_caches
    common = ["train", "--text-cache", text, "--latent-cache", latents, "--fusion", "static", *FAST,
              "--set", "log_every=1", "--set", "checkpoint_every=20", "--lr", "1e-3"]
    ref = tmp_path / "ref"
    run_cli(*common, "--out", str(ref), "--max-steps", "30")

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(CLI), *common, "--out", str(run), "--max-steps", "100000"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = run / "checkpoints" / "step-0000020"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not ckpt.exists():
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "no checkpoint was written before the kill"
    killed_at = max(_losses(run))
    assert killed_at < 30, "the run got too far before the kill for this test to mean anything"

    run_cli("train", "--out", str(run), "--resume", "latest", "--max-steps", "30", "--no-progress")
    a, b = _losses(ref), _losses(run)
    assert [b[s] for s in range(21, 31)] == [a[s] for s in range(21, 31)]
    assert [b[s] for s in range(1, 21)] == [a[s] for s in range(1, 21)]


def test_two_processes_see_disjoint_samples_and_share_one_step_count(square_caches, tmp_path):
    text, latents, _ = square_caches
    run = tmp_path / "ddp"
    hook_env, marks = teardown_marks(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(CLI),
         "train", "--text-cache", text, "--latent-cache", latents, "--fusion", "depth", "--out", str(run),
         "--max-steps", "8", *FAST, "--set", "log_samples=true", "--set", "log_every=1", "--set", "holdout=12",
         "--set", "val_samples=1", "--set", "val_sample_steps=2"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", **hook_env},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    assert "checkpoint: " in proc.stdout
    # Neither process freed its trainer (and so its DDP model and process group) nor went through the
    # interpreter's teardown: freeing them can hang for good (shared/processes.py end_process).
    assert list(marks.iterdir()) == []
    logs = [[json.loads(l) for l in (run / "logs" / f"samples-rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)]
    assert [e["step"] for e in logs[0]] == [e["step"] for e in logs[1]] == list(range(8))
    for epoch in {e["epoch"] for e in logs[0]}:
        seen = [{s for e in log if e["epoch"] == epoch for s in e["sample_ids"]} for log in logs]
        assert seen[0] and seen[1] and not (seen[0] & seen[1])
    assert sorted(_losses(run)) == list(range(1, 9))
    # Held-out samples: trained on by neither process; their validation loss, split over the two
    # processes, equals one process's computation on the saved weights.
    held = json.loads((run / "run.json").read_text())["holdout"]["sample_ids"]
    assert len(held) == 12 and not {s for log in logs for e in log for s in e["sample_ids"]} & set(held)
    from test_watch import single_process_validation

    logged = [json.loads(l) for l in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if r.get("event") == "validation"]
    assert [r["step"] for r in logged] == [8] and (run / logged[0]["samples"]).exists()
    assert single_process_validation(run, "step-0000008", 12, seed=0) == pytest.approx(logged[0]["val_loss"], rel=1e-5)


def test_caption_dropout_uses_the_stored_null_caption(square_caches):
    text, latents, _ = square_caches
    ds = PairedCaches(text, latents, text_layers=None, caption_dropout=0.5, seed=3)
    null = ds.text.null()
    items = [ds[(i, 0)] for i in range(len(ds))]
    dropped = [it for it in items if it["caption"] == -1]
    kept = [it for it in items if it["caption"] != -1]
    assert 25 < len(dropped) < 71  # 96 draws at p = 0.5
    assert all(torch.equal(it["text"], null) for it in dropped)
    assert all(torch.equal(it["text"], ds.text.caption(it["caption"])) for it in kept)
    # captions picked belong to the item's own sample id
    ids = ds.text.index.column("sample_id").to_pylist()
    assert all(ids[it["caption"]] == it["sample_id"] for it in kept)
    no_drop = PairedCaches(text, latents, text_layers=None, caption_dropout=0.0, seed=3)
    assert all(no_drop[(i, 0)]["caption"] >= 0 for i in range(len(no_drop)))
    # the same (sample, epoch) always gives the same draw, whichever process or worker asks
    a, b = ds[(5, 1)], ds[(5, 1)]
    assert torch.equal(a["latent"], b["latent"]) and a["caption"] == b["caption"]


def test_caches_are_opened_and_joined_once_and_the_model_reads_only_its_layers(square_caches, tmp_path,
                                                                              monkeypatch):
    import semroute.stage2_train.data as data

    joins = []
    check = data.check_id_sources
    monkeypatch.setattr(data, "check_id_sources", lambda *a: joins.append(a) or check(*a))
    trainer = Trainer(_cfg(square_caches, tmp_path, fusion="penultimate", holdout=8, val_samples=2), progress=False)
    try:
        assert len(joins) == 1  # one PairedCaches: the model is sized from it, then it narrows its text reader
        stored = trainer.dataset.text.stored_layers
        assert trainer.dataset.text.layers == list(trainer.model.text_layers) == [stored[-2]]
        assert trainer.dataset.null.shape[1] == 1 and trainer.dataset.text.caption(0).shape[1] == 1
        # the sample grid's null caption covers every stored layer (the pipeline picks the model's from it)
        assert trainer.samples_grid.null.shape[1] == len(stored) > 1
    finally:
        trainer.release()


def test_adamw_runs_fused_on_the_cpu(square_caches, tmp_path):
    """torch's CPU default loops over the tensors; the fused kernel is 4-7x faster (bench/RESULTS.md)."""
    trainer = Trainer(_cfg(square_caches, tmp_path), progress=False)
    try:
        assert [group["fused"] for group in trainer.optimizer.param_groups] == [True] * len(trainer.optimizer.param_groups)
    finally:
        trainer.release()


def test_refuses_a_cache_with_fewer_layers_or_another_llm(square_caches, tmp_path, tiny_llama_dir, tiny_qwen_dir):
    text, latents, manifest = square_caches
    few = tmp_path / "few.text.zarr"
    encode_text(EncodeTextConfig(data=str(manifest), out=str(few), llm=str(tiny_llama_dir), layers="last:2",
                                 progress=False, dtype="float32"))
    with pytest.raises(SemrouteError, match=r"missing.*\[1, 2\]|\[1, 2\].*missing"):
        Trainer(_cfg(square_caches, tmp_path, text_cache=str(few), text_layers="all"), progress=False)
    with pytest.raises(FingerprintMismatch, match="llm_weights_sha256: cache has"):
        Trainer(_cfg(square_caches, tmp_path, expect_text={"llm_weights_sha256": "0" * 64}), progress=False)
    # a run started on one LLM's cache refuses to resume on another LLM's
    cfg = _cfg(square_caches, tmp_path, max_steps=2, checkpoint_every=2)
    train(cfg, progress=False)
    other = tmp_path / "qwen.text.zarr"
    encode_text(EncodeTextConfig(data=str(manifest), out=str(other), llm=str(tiny_qwen_dir), progress=False,
                                 dtype="float32"))
    with pytest.raises(FingerprintMismatch, match="llm_weights_sha256"):
        Trainer(_cfg(square_caches, tmp_path, text_cache=str(other), max_steps=4), resume="latest", progress=False)


def test_configs_and_overrides(tmp_path):
    for fusion, name in FUSION_CONFIGS.items():
        cfg = TrainConfig.build(fusion=fusion)
        assert cfg.fusion == fusion and (CONFIG_DIR / name).exists()
        assert cfg.lr == 1e-4 and cfg.weight_decay == 1e-4 and cfg.caption_dropout == 0.1 and cfg.shift == 3.0
    cfg = TrainConfig.build(config_file=str(CONFIG_DIR / "joint.yaml"), lr=3e-4,
                            overrides=["ema=true", "model.adaln=true", "betas=[0.9, 0.95]"])
    assert (cfg.fusion, cfg.lr, cfg.ema, cfg.model, cfg.betas) == ("joint", 3e-4, True, {"adaln": True}, [0.9, 0.95])
    with pytest.raises(SemrouteError, match="unknown config key"):
        TrainConfig.build(overrides=["learning_rate=1"])
    with pytest.raises(SemrouteError, match="fusion 'wide' is unknown"):
        TrainConfig.build(fusion="wide")
    cfg.save(tmp_path / "c.yaml")
    assert TrainConfig.build(config_file=str(tmp_path / "c.yaml")) == cfg


def test_config_files_hold_only_what_differs_and_load_by_name():
    """configs/*.yaml state only the strategy (the defaults live in TrainConfig alone); --config takes a name.
    configs/paper/ pins the reference's whole recipe on purpose and is not checked here."""
    defaults = TrainConfig()
    for path in CONFIG_DIR.glob("*.yaml"):
        restated = {k: v for k, v in load_yaml(path).items() if k != "fusion" and getattr(defaults, k) == v}
        assert not restated, f"{path.name} restates defaults {restated}"
    assert TrainConfig.build(config_file="time-wise").fusion == "time"
    assert resolve_config("paper/joint") == CONFIG_DIR / "paper" / "joint.yaml"
    assert "paper/depth-wise" in config_names() and "joint" in config_names()
    with pytest.raises(SemrouteError, match="not a config name"):
        TrainConfig.build(config_file="wide")
    assert field_help("batch_size") == "Samples per process per micro-step."
    assert field_help("num_workers").endswith("when needed.")  # later paragraphs are notes, not help


def test_train_options_take_type_help_and_default_from_the_config_fields(monkeypatch):
    """Each train option that sets a TrainConfig field parses to the field's type, shows the field's docstring
    and default, and reaches TrainConfig.build typed (None: not given)."""
    import typer
    from typer.testing import CliRunner

    from semroute.cli import app

    params = {p.name: p for p in typer.main.get_command(app).commands["train"].params}
    fields = {name.rstrip("_"): p for name, p in params.items() if name.rstrip("_") in TrainConfig.keys()}
    assert {"text_cache", "lr", "batch_size", "holdout", "report_to", "num_workers", "compile"} <= set(fields)
    for name, p in fields.items():
        if name == "storage_options":  # JSON text, parsed to the field's dict by the command
            continue
        assert p.help.startswith(field_help(name)) and field_help(name), name
        assert (p.bare_type(), name) == (TrainConfig.option_type(name).__name__, name)
    assert params["batch_size"].help == "Samples per process per micro-step. (default: 32)"
    seen = {}

    def build(**kw):
        seen.update(kw)
        raise SemrouteError("stop here")

    monkeypatch.setattr(TrainConfig, "build", build)
    result = CliRunner().invoke(app, ["train", "--lr", "1e-3", "--holdout", "4", "--no-compile", "--allow-new-data",
                                      "--set", "ema=true"])
    assert isinstance(result.exception, SemrouteError)
    flags = seen.pop("flags")
    assert (flags["lr"], flags["holdout"], flags["batch_size"]) == ("--lr", "--holdout", "--batch-size")
    given = {k: v for k, v in seen.items() if v is not None}
    assert given == {"lr": 1e-3, "holdout": 4, "compile": False, "allow_new_data": True, "overrides": ["ema=true"]}
    assert type(given["lr"]) is float and type(given["holdout"]) is int


def test_epoch_batches_are_disjoint_deterministic_and_resumable():
    buckets = np.array([0] * 50 + [1] * 30)
    lengths = np.arange(80) % 17 + 1
    plans = [EpochBatches(buckets, lengths, 8, seed=1, rank=r, world_size=2) for r in (0, 1)]
    assert plans[0].n_batches == 9 and plans[0].per_epoch() == 4  # (6 + 3) full batches, 4 steps of 2
    e0 = plans[0].epoch(0)
    assert len(set(np.concatenate(e0))) == 72 and all(len(set(buckets[batch])) == 1 for batch in e0)
    # Two processes take the one global sequence in turns, across epoch ends too (9 batches per epoch).
    ranks = [list(itertools.islice(p.iterate(), 6)) for p in plans]
    single = list(itertools.islice(EpochBatches(buckets, lengths, 8, seed=1).iterate(), 12))
    assert [(e, k, s.tolist()) for e, k, s in (ranks[g % 2][g // 2] for g in range(12))] == \
           [(e, k, s.tolist()) for e, k, s in single]
    assert plans[1].after(*ranks[1][4][:2]) == plans[0].after(*ranks[0][4][:2]) == (1, 1)
    assert [x.tolist() for x in plans[0].epoch(3)] == [x.tolist() for x in plans[0].epoch(3)]
    assert [x.tolist() for x in plans[0].epoch(3)] != [x.tolist() for x in plans[0].epoch(4)]
    it = plans[0].iterate()
    stream = [next(it) for _ in range(10)]
    resumed = plans[0].iterate(*stream[6][:2])
    assert [(e, k, s.tolist()) for e, k, s in (next(resumed) for _ in range(4))] == \
           [(e, k, s.tolist()) for e, k, s in stream[6:]]
    sorted_plan = EpochBatches(buckets, lengths, 8, seed=1, length_batching=True)
    def padding(plan):
        return sum(len(bt) * lengths[bt].max() - lengths[bt].sum() for bt in plan.epoch(0))
    assert padding(sorted_plan) < 0.5 * padding(EpochBatches(buckets, lengths, 8, seed=1))


def test_shard_local_order_draws_each_batch_from_a_window_of_shards():
    blocks = np.repeat(np.arange(10), 12)  # 10 shards of 12 samples
    n = len(blocks)
    buckets, lengths, samples = np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64), np.arange(n) + 1000

    def plan(window, **kw):
        return EpochBatches(kw.pop("buckets", buckets), lengths, 8, seed=3, samples=samples, blocks=blocks,
                            window=window, **kw)

    def flat(p, epoch=0):
        return np.concatenate(p.epoch(epoch)) - 1000

    one = flat(plan(1))
    assert sorted(one.tolist()) == list(range(n))  # 15 full batches, every sample once
    # window 1: one shard after another, each shard's samples together and shuffled among themselves
    assert 1 + np.count_nonzero(np.diff(blocks[one])) == 10
    assert all(len(set(blocks[b - 1000])) <= 2 for b in plan(1).epoch(0))
    assert any(np.any(np.diff(one[blocks[one] == s]) < 0) for s in range(10))
    shard_order = [list(dict.fromkeys(blocks[flat(plan(1), e)])) for e in (0, 1)]
    assert shard_order[0] != shard_order[1] and sorted(shard_order[0]) == list(range(10))
    # window 3: three shards' samples mixed over each stretch of 36
    three = flat(plan(3))
    assert [len(set(blocks[three[i: i + 36]])) for i in (0, 36, 72)] == [3, 3, 3]
    assert len(set(blocks[three[:12]])) > 1
    # against the full shuffle, which mixes nearly every shard into every batch
    full = EpochBatches(buckets, lengths, 8, seed=3, samples=samples).epoch(0)
    assert np.mean([len(set(blocks[b - 1000])) for b in full]) > 4
    # one global sequence whatever the number of processes (elastic resume), across an epoch end
    ranks = [list(itertools.islice(plan(2, rank=r, world_size=2).iterate(), 10)) for r in (0, 1)]
    single = list(itertools.islice(plan(2).iterate(), 20))
    assert [(e, k, s.tolist()) for e, k, s in (ranks[g % 2][g // 2] for g in range(20))] == \
           [(e, k, s.tolist()) for e, k, s in single]
    # two latent buckets: batches never mix them and still come from a window of shards
    two = plan(1, buckets=np.arange(n) % 2)
    assert all(len(set((b - 1000) % 2)) == 1 and len(set(blocks[b - 1000])) <= 3 for b in two.epoch(0))
    # length batching sorts within each window: batches stay shard-local and carry less padding (windows of
    # eight whole batches here, so that a batch of a window never takes samples of the next)
    even = np.repeat(np.arange(8), 16)
    varied = np.random.default_rng(0).integers(1, 60, len(even))

    def padding(p):
        return sum(len(bt) * varied[bt].max() - varied[bt].sum() for bt in p.epoch(0))

    def shard_plan(**kw):
        return EpochBatches(np.zeros(len(even), dtype=np.int64), varied, 8, seed=3, blocks=even, window=4, **kw)

    assert padding(shard_plan(length_batching=True)) < 0.5 * padding(shard_plan())
    flat_sorted = np.concatenate(shard_plan(length_batching=True).epoch(0))
    assert sorted(flat_sorted.tolist()) == list(range(len(even)))
    assert [len(set(even[flat_sorted[i: i + 64]])) for i in (0, 64)] == [4, 4]
    with pytest.raises(ValueError, match="shard ids"):
        EpochBatches(buckets, lengths, 8, seed=0, blocks=blocks[:5])


def test_training_with_shuffle_shards_reads_shard_local_batches(square_caches, tmp_path, tiny_llama_dir):
    _, latents, manifest = square_caches
    text = tmp_path / "small-shards.text.zarr"
    encode_text(EncodeTextConfig(data=str(manifest), out=str(text), llm=str(tiny_llama_dir), dtype="float32",
                                 device="cpu", progress=False, shard_mb=0.05, chunk_kb=8))
    ds = PairedCaches(str(text), latents, text_layers=None)
    shards = ds.text_shards()
    layout = ds.text._arrays()["features"].meta.layout
    first_rows = ds.text.offsets[ds.caption_idx[ds.caption_ptr[:-1]]]
    assert all(layout.shard_rows(s)[0] <= r < layout.shard_rows(s)[1] for s, r in zip(shards, first_rows))
    assert len(set(shards.tolist())) >= 6
    run = tmp_path / "run"
    train(TrainConfig(text_cache=str(text), latent_cache=latents, fusion="static", preset="tiny", batch_size=8,
                      num_workers=0, report_to="none", log_samples=True, max_steps=4, out=str(run),
                      shuffle="shards", shuffle_window=1), progress=False)
    plan = EpochBatches(ds.bucket_ids(), ds.text_lengths(), 8, seed=0, blocks=shards, window=1)
    expected = [[ds.latents.sample_ids[int(ds.latent_pos[s])] for s in b] for b in plan.epoch(0)[:4]]
    logged = [json.loads(line)["sample_ids"] for line in (run / "logs" / "samples-rank0.jsonl").read_text().splitlines()]
    assert logged == expected
    shard_of = {ds.latents.sample_ids[int(p)]: s for p, s in zip(ds.latent_pos, shards)}
    assert all(len({shard_of[i] for i in batch}) <= 2 for batch in logged)
    with pytest.raises(SemrouteError, match="shuffle 'rows'"):
        TrainConfig(shuffle="rows")


@pytest.mark.parametrize("fusion", ["time", "joint"])
def test_time_dependent_routing_plot_and_csv_cover_sigma(square_caches, tmp_path, fusion):
    cfg = _cfg(square_caches, tmp_path, fusion=fusion, max_steps=3, checkpoint_every=3, ema=True, ema_decay=0.5)
    train(cfg, progress=False)
    run = Path(cfg.out)
    rows = (run / "routing" / "latest.csv").read_text().splitlines()[1:]
    assert len({r.split(",")[1] for r in rows}) == 21 and len(rows) == 21 * 2 * 4
    assert (run / "routing" / "step-0000003.png").stat().st_size > 1000
    ckpt = run / "checkpoints" / "step-0000003"
    assert (ckpt / "model_ema" / "config.json").exists()
