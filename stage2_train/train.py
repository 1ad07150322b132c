"""``semroute train``: the DiT and its routing gates, trained from the text and latent caches only.

What it writes, and where, is owned by :class:`~semroute.stage2_train.run_folder.RunFolder`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from semroute.shared.distributed import process_info
from semroute.shared.errors import FingerprintMismatch, SemrouteError, first_line
from semroute.shared.fingerprint import require_match
from semroute.shared.interrupts import StopRequest
from semroute.shared.remote import STATS as remote_stats
from semroute.stage2_train import ranks, resume_settings, routing
from semroute.stage2_train.config import TrainConfig
from semroute.stage2_train.data import BatchLoader, EpochBatches, PairedCaches, mix_seed
from semroute.stage2_train.feed import DeviceFeed
from semroute.stage2_train.models import build_model
from semroute.stage2_train.objective import flow_loss
from semroute.stage2_train.perf import compile_blocks, dit_train_flops, peak_flops
from semroute.stage2_train.run_folder import (EMA_MODEL_DIR, MODEL_DIR, RUN_RECORD, TRAIN_STATE, RunFolder,
                                              checkpoint_name, refuse_url_output)
from semroute.stage2_train.run_lock import RunLock
from semroute.stage2_train.validation import SampleGrid, ValidationLoss, holdout_split

# Devices whose AdamW runs fused (torch has the fused kernel for both).
FUSED_ADAMW_DEVICES = ("cuda", "cpu")
TIME = "time"  # TimeBudget.check: the budget is spent


@dataclass
class TrainState:
    """What, besides weights and optimizer, a resume needs: where the data stream stands."""

    step: int = 0
    epoch: int = 0
    index: int = 0  # next batch of the epoch, counted over all processes (EpochBatches: elastic resume)
    samples: int = 0
    train_seconds: float = 0.0
    validation_seconds: float = 0.0  # part of train_seconds spent validating and sampling

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


# ---------------------------------------------------------------------------------------------
# Caches
# ---------------------------------------------------------------------------------------------
def cache_content_id(location: str, attrs: dict) -> str:
    """What a cache holds, as one sha256: its index (one row per caption or image: ids, texts' sha256,
    token counts, source paths, crops) and its fingerprint (the model and settings that encoded it). Two
    caches with equal ids hold the same data; a cache moved or copied keeps its id."""
    import hashlib

    from semroute.shared.integrity import INDEX
    from semroute.shared.store import store_file

    digest = hashlib.sha256(json.dumps(attrs.get("fingerprint"), sort_keys=True, default=str).encode())
    with store_file(location, INDEX) as fh:
        while block := fh.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def absolute_location(location: str) -> str:
    """Local paths made absolute (a run resumed or sampled from another directory finds the same cache)."""
    from semroute.shared.remote import is_url

    return location if not location or is_url(location) else str(Path(location).expanduser().resolve())


def check_caches(cfg: TrainConfig, dataset: PairedCaches, run: RunFolder, resuming: Path | None) -> dict:
    """Refuse caches that do not fit: expected fingerprint entries, and on resume the caches the run
    started with (same content, wherever they now are). Returns the record saved as run.json."""
    text_fp, latent_fp = dataset.text.fingerprint, dataset.latents.fingerprint
    for name, fp, want, where in (("expect_text", text_fp, cfg.expect_text, cfg.text_cache),
                                  ("expect_latent", latent_fp, cfg.expect_latent, cfg.latent_cache)):
        try:
            require_match(fp, dict(want), sorted(want), f"{name.removeprefix('expect_')} cache {where}")
        except FingerprintMismatch as err:
            raise FingerprintMismatch(f"{err}\n(the run's {name}; a config from configs/paper/ expects the "
                                      f"reference's caches: encode them as its header says, or --set {name}={{}} to "
                                      "train on these anyway)") from None
    record = {"text_cache": cfg.text_cache, "latent_cache": cfg.latent_cache, "text_fingerprint": text_fp,
              "latent_fingerprint": latent_fp, "text_layers_stored": dataset.text.stored_layers,
              "text_captions": dataset.text.n_captions, "latent_samples": len(dataset.latents),
              "text_content_sha256": cache_content_id(cfg.text_cache, dataset.text.attrs),
              "latent_content_sha256": cache_content_id(cfg.latent_cache, dataset.latents.attrs),
              "joined_samples": len(dataset), "text_only_ids": dataset.n_text_only,
              "image_only_ids": dataset.n_image_only}
    before = run.record(required=False, checkpoint=resuming or None) if resuming else {}
    grown = [f"{name}: {before[key]} -> {now}" for name, key, now in
             (("text cache captions", "text_captions", dataset.text.n_captions),
              ("latent cache images", "latent_samples", len(dataset.latents))) if key in before and before[key] != now]
    if grown and not cfg.allow_new_data:
        raise SemrouteError(f"the caches changed size since this run started ({'; '.join(grown)}): data was appended. "
                            "Pass --allow-new-data to go on training over all of it (the sample order of the current "
                            "epoch changes), or resume with the caches as they were.")
    held = [dataset.latents.sample_ids[dataset.latent_pos[i]] for i in holdout_split(len(dataset), cfg.holdout, cfg.seed)]
    if grown and before.get("holdout"):
        held = before["holdout"]["sample_ids"]  # grown caches (--allow-new-data) keep the run's validation set
    record["holdout"] = {"seed": cfg.seed, "sample_ids": held}
    # A run's id, kept over resumes: a checkpoint copied in from another run (same caches and settings, so
    # every check above passes) would otherwise continue under this run's name, its logs and data position mixed.
    try:
        own = run.record(required=False).get("run_id") if resuming else None
    except SemrouteError:  # the run's run.json damaged: this resume rewrites it from the checkpoint's copy
        own = None
    if own and before.get("run_id") and before["run_id"] != own:
        raise SemrouteError(f"cannot resume from {resuming}: it is a checkpoint of another run (run id "
                            f"{before['run_id']}; {run.path} is run {own}), copied in from elsewhere. Resume that run "
                            "in its own folder, or move the checkpoint out of this one")
    record["run_id"] = before.get("run_id") or own or uuid.uuid4().hex
    if before:
        held_before = before.get("holdout", {}).get("sample_ids", [])
        if held_before != record["holdout"]["sample_ids"]:
            raise SemrouteError(f"{run.record_path} holds out {len(held_before)} samples but this resume would hold "
                                f"out {cfg.holdout} others (holdout and seed must stay as the run started)")
        require_match(text_fp, before["text_fingerprint"], None, f"text cache {cfg.text_cache} (run started on "
                                                                   f"{before['text_cache']})")
        require_match(latent_fp, before["latent_fingerprint"], None, f"latent cache {cfg.latent_cache} (run "
                                                                       f"started on {before['latent_cache']})")
        for kind, count in (("text", "text_captions"), ("latent", "latent_samples")):
            was = before.get(f"{kind}_content_sha256")
            appended = cfg.allow_new_data and before.get(count) != record[count]  # grown on purpose
            if was is not None and was != record[f"{kind}_content_sha256"] and not appended:
                raise FingerprintMismatch(
                    f"cannot resume: {kind} cache {getattr(cfg, kind + '_cache')} holds other data than the "
                    f"{kind} cache the run started on ({before[kind + '_cache']}): same encoder, other "
                    "captions/images. Resume with the original cache, or start a new --out")
    return record


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------
class NonFiniteLoss(SemrouteError):
    """The loss or gradient norm went NaN/inf: training stops before any checkpoint of those weights."""


class Trainer:
    """Builds everything from a :class:`TrainConfig`, then ``train()`` runs the loop.

    Building takes the run lock (one training process per run folder, held until ``train()`` ends or
    ``release()``), then 1. the data, 2. the model's optimization, 3. the run folder and the resumed state.
    """

    def __init__(self, cfg: TrainConfig, *, resume: str | None = None, progress: bool = True):
        if not cfg.text_cache or not cfg.latent_cache:
            raise SemrouteError("train needs --text-cache and --latent-cache")
        cfg.text_cache, cfg.latent_cache = absolute_location(cfg.text_cache), absolute_location(cfg.latent_cache)
        refuse_url_output(cfg.out, "--out")  # s3://b/r would be the local folder s3:/b/r
        self.cfg, self.progress = cfg, progress
        self.run = RunFolder(cfg.out)
        self.saved: Path | None = None  # the checkpoint this process wrote last
        self.run_dir = self.run.path
        cfg.check_tracker()  # before accelerate would start without the tracker, and before anything is written
        self.accelerator = _accelerator(cfg, self.run)
        cfg.check_global_batch(self.accelerator.num_processes)  # before the lock creates the run folder
        self.run.refuse_cache()
        # Held by the main process until train() ends; every process raises if the main one cannot take it.
        self.lock = RunLock(self.run_dir)
        process_info().run_on_main(lambda: bool(self.lock.acquire()))
        try:
            self._build(resume)
        except BaseException:
            self.lock.release(failed=True)
            raise

    def release(self) -> None:
        self.lock.release()

    def _build(self, resume: str | None) -> None:
        from accelerate.utils import set_seed

        self.resume_from = self.run.resolve_resume(resume)
        if resume == "latest" and self.resume_from is None and self.accelerator.is_main_process:
            # (so that a mistyped --out is not a silent new run)
            print(f"--resume latest: {self.run_dir} has no checkpoint yet; starting a new run", file=sys.stderr)
        if resume and resume != "latest" and self.resume_from is None:
            raise SemrouteError(f"--resume {resume}: no checkpoint found")
        held = self.run.holds_work() if not resume else None
        if held:
            raise SemrouteError(f"--out {self.run_dir} already holds a training run ({held}): continue it with "
                                "--resume latest, or choose another --out (nothing in it was changed)")
        self.changed_on_resume = {}
        if self.resume_from is not None:
            self.changed_on_resume = resume_settings.compare(self._config_before(), self.cfg.to_dict())
            self._refuse_steps_done(resume)
        _limit_cpu_threads()
        set_seed(self.cfg.seed)  # the model's initial weights come from the global RNG: a run is reproducible
        self._build_data()
        self._build_optimization()
        self._open_run()

    def _refuse_steps_done(self, resume: str) -> None:
        """A resume whose max_steps lies below the checkpoint's step would train nothing, yet record the lower
        max_steps as the run's: refused before anything is written."""
        step = RunFolder.train_state(self.resume_from).get("step")
        if isinstance(step, int) and step > self.cfg.max_steps:
            raise SemrouteError(
                f"--resume {resume}: {self.resume_from.name} is at step {step}, past max_steps {self.cfg.max_steps}, "
                f"so nothing would be trained (nothing in {self.run_dir} was changed). Pass a --max-steps above "
                f"{step} to train on from it, or start a new --out")

    def _build_data(self) -> None:
        """1. Data: both caches opened and joined once; the model, sized by them, then picks the layers read.
        Held-out samples (the same on every process) are validated on, never trained on."""
        cfg, acc = self.cfg, self.accelerator
        self.dataset = _open_caches(cfg)
        if cfg.holdout >= len(self.dataset):
            raise SemrouteError(
                f"holdout {cfg.holdout}: the caches join {len(self.dataset)} samples (image and caption), so none would "
                f"be left to train on; hold out a few percent of them (e.g. --holdout {max(1, len(self.dataset) // 20)})")
        stored = self.dataset.text  # every stored layer: what the sample grid's null caption is given as
        self.model = build_model(cfg, stored.fingerprint, stored.stored_layers, self.dataset.latents.latent_channels)
        self.dataset.use_text_layers(list(self.model.text_layers))
        _check_patch_size(self.dataset, int(self.model.config.patch_size))
        self.record = check_caches(cfg, self.dataset, self.run, resuming=self.resume_from)
        index_of = {self.dataset.latents.sample_ids[p]: i for i, p in enumerate(self.dataset.latent_pos)}
        self.heldout = np.array(sorted(index_of[s] for s in self.record["holdout"]["sample_ids"]), dtype=np.int64)
        training = np.setdiff1d(np.arange(len(self.dataset)), self.heldout)
        try:
            self.plan = EpochBatches(self.dataset.bucket_ids()[training], self.dataset.text_lengths()[training],
                                     cfg.batch_size, seed=cfg.seed, rank=acc.process_index,
                                     world_size=acc.num_processes, length_batching=cfg.length_batching,
                                     samples=training, window=cfg.shuffle_window,
                                     blocks=self.dataset.text_shards()[training] if cfg.shuffle == "shards" else None)
        except SemrouteError as err:
            if not len(self.heldout):
                raise
            raise SemrouteError(f"{err} or holdout: the caches join {len(self.dataset)} samples, of which "
                                f"{len(self.heldout)} are held out for validation") from None
        self.validation = self.samples_grid = None
        if cfg.holdout:
            self.validation = ValidationLoss(self.dataset, self.heldout, n_sigmas=cfg.val_sigmas,
                                             batch_size=cfg.batch_size, rank=acc.process_index,
                                             world_size=acc.num_processes)
            if cfg.val_samples and acc.is_main_process:
                self.samples_grid = SampleGrid(
                    self.dataset, self.heldout, n=cfg.val_samples, stored_layers=stored.stored_layers,
                    null_features=stored.null(), latent_fingerprint=self.dataset.latents.fingerprint,
                    shift=cfg.shift, steps=cfg.val_sample_steps, guidance=cfg.val_guidance,
                    guidance_interval=cfg.val_guidance_interval)

    def _build_optimization(self) -> None:
        """2. AdamW over the trainable parameters (the routing gates in their own group, with their lr scale
        and decay setting), its lr schedule, the EMA of the weights; everything a checkpoint holds is
        registered with accelerate."""
        cfg, acc = self.cfg, self.accelerator
        if cfg.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.model.to(acc.device)  # before the optimizer: fused AdamW wants its parameters on the device
        if cfg.compile:
            compile_blocks(self.model)
        router = getattr(self.model, "router", None)
        router_ids = {id(p) for p in router.parameters()} if router is not None else set()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trainable if id(p) not in router_ids], "weight_decay": cfg.weight_decay},
            {"params": [p for p in trainable if id(p) in router_ids], "lr": cfg.lr * cfg.fusion_lr_scale,
             "weight_decay": cfg.weight_decay if cfg.decay_fusion_logits else 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        self.base_lrs = [g.get("lr", cfg.lr) for g in groups]  # what a resume with another lr re-applies
        # Fused AdamW: one kernel per parameter group instead of several per tensor. On the CPU too (torch's
        # default there is a loop over the tensors): 4-7x less optimizer time per step (bench/bench_optimizer.py).
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas),
                                           fused=acc.device.type in FUSED_ADAMW_DEVICES)
        self.scheduler = _lr_schedule(self.optimizer, cfg)
        self.ema = build_ema(self.model, cfg) if cfg.ema else None
        if self.ema is not None:
            self.ema.to(acc.device)
        self.state = TrainState()
        # The scheduler is not handed to accelerate: its wrapper steps once per process per optimizer
        # step, which would make warm-up depend on the number of processes. We step it ourselves.
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        for stateful in (self.scheduler, self.ema, self.state):
            if stateful is not None:
                acc.register_for_checkpointing(stateful)

    def _open_run(self) -> None:
        """3. The run folder (config, run.json), the state of the checkpoint resumed from, the tracker."""
        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            self.run.create()
            cfg.save(self.run.config_path)
            self.run.save_record({**self.record, "world_size": acc.num_processes,
                                  "model_class": type(acc.unwrap_model(self.model)).__name__})
            if self.dataset.n_text_only or self.dataset.n_image_only:
                print(f"data: {len(self.dataset)} samples in both caches; left out: {self.dataset.n_text_only} "
                      f"caption ids without an image, {self.dataset.n_image_only} images without a caption",
                      file=sys.stderr)
            if self.dataset.join_warning:
                print(f"warning: {self.dataset.join_warning}", file=sys.stderr)
        if self.resume_from is not None:
            self._load_checkpoint()
        acc.wait_for_everyone()
        if cfg.report_to != "none":
            wandb = {"wandb": {"name": self.run_dir.name, "dir": str(self.run.logs)}}
            acc.init_trackers("tensorboard" if cfg.report_to == "tensorboard" else "semroute",
                              init_kwargs=wandb if cfg.report_to == "wandb" else {},
                              config={k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))})

    def _config_before(self) -> dict:
        """The settings the checkpoint was trained with (its own copy; older checkpoints: the run's)."""
        from semroute.stage2_train.config import load_yaml

        for path in (self.resume_from / "config.yaml", self.run.config_path):
            if path.exists():
                raw = load_yaml(path)
                # keys added since the checkpoint was written count as their defaults
                return TrainConfig(**{k: v for k, v in raw.items() if k in TrainConfig.keys()}).to_dict()
        return self.cfg.to_dict()

    def _load_checkpoint(self) -> None:
        acc = self.accelerator
        try:
            acc.load_state(str(self.resume_from))
        except (RuntimeError, KeyError, ValueError, OSError, EOFError) as err:
            first = first_line(err) or type(err).__name__
            raise SemrouteError(f"cannot resume from {self.resume_from}: its state does not load into the model "
                                f"and optimizer built from this run's config ({type(err).__name__}: {first[:300]})"
                                ) from None
        if {"lr", "fusion_lr_scale"} & set(self.changed_on_resume):
            resume_settings.apply_lr(self.optimizer, self.scheduler, self.base_lrs)
        if self.changed_on_resume and acc.is_main_process:
            changes = {k: list(v) for k, v in self.changed_on_resume.items()}
            print(f"resuming {self.resume_from.name} with changed settings: "
                  + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()), file=sys.stderr)
            self.run.log_metrics({"step": self.state.step, "event": "resume", "from": str(self.resume_from),
                                  "changed": changes})

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> dict:
        """Optimizer steps until ``max_steps``, the time budget or a stop request (Ctrl-C, SIGTERM: shared/interrupts.py):
        step, log, validate, checkpoint. Releases the run lock when it ends, however it ends."""
        from tqdm.auto import tqdm

        cfg, acc, state = self.cfg, self.accelerator, self.state
        loader = BatchLoader(self.dataset, self.plan, num_workers=cfg.num_workers, start_epoch=state.epoch,
                             start_index=state.index, pin_memory=acc.device.type == "cuda", workers=cfg.loader,
                             buckets=cfg.text_length_buckets())
        feed = DeviceFeed(loader, acc.device, self.dataset.text)  # batches on the device, the next one in flight
        bar = tqdm(total=cfg.max_steps, initial=state.step, desc="train", unit="step",
                   disable=not (self.progress and acc.is_main_process), dynamic_ncols=True)
        budget = TimeBudget(cfg, state, acc)
        window = MetricsWindow(self, feed, bar)
        samples_log = open(self.run.samples_log_path(acc.process_index), "a") if cfg.log_samples else None
        self.model.train()
        if budget.spent and acc.is_main_process:
            print(f"the run's time budget (max_minutes {cfg.max_minutes:g}) was spent at step {state.step}: nothing "
                  "to train; resume with a larger --max-minutes to go on", file=sys.stderr)
        elif state.step >= cfg.max_steps and acc.is_main_process:  # (a rerun of the finished run's command)
            print(f"the run is at step {state.step}, its max_steps {cfg.max_steps}: nothing to train; resume with a "
                  "larger --max-steps to go on", file=sys.stderr)
        stopped = None
        try:
            with StopRequest(say=acc.is_main_process) as request:
                while state.step < cfg.max_steps and not budget.spent:
                    window.add(*self.step(feed, samples_log))
                    stopped = budget.check(request.name)
                    done = state.step >= cfg.max_steps or stopped is not None
                    budget.show(bar, done)
                    if state.step % cfg.log_every == 0 or done:
                        window.log()
                    bar.update(1)
                    # (a stop request skips validation: a scheduler's grace period is short)
                    if self.validation is not None and (state.step % self.validate_every == 0 or done) \
                            and stopped in (None, TIME):
                        window.t0 += self.validate()  # samples/s counts training only
                    if state.step % cfg.checkpoint_every == 0 or done:
                        window.require_finite()
                        self.save_checkpoint()
                    if stopped is not None:
                        break
        finally:
            feed.close()
            bar.close()
            if samples_log is not None:
                samples_log.close()
            if cfg.report_to != "none":
                acc.end_training()
            self.release()
        cache = self.dataset.text.shard_cache
        if cache is not None and cache.errors and acc.is_main_process:  # (a full or read-only --cache-dir, say)
            print(f"warning: the node-local shard cache {cache.folder} had {len(cache.errors)} problem(s), its reads "
                  f"went to the object store instead; the first: {cache.errors[0]}", file=sys.stderr)
        # (not the run's newest folder: a damaged one that --resume latest passed over may be newer)
        latest = self.saved or self.resume_from
        return {"step": state.step, "train_seconds": state.train_seconds, "validation_seconds": state.validation_seconds,
                "stopped_by": stopped if stopped != TIME else None,
                "last": window.last, "checkpoint": str(latest) if latest else None}

    def step(self, feed, samples_log=None) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """One optimizer step over ``grad_accum`` micro-batches. Returns the mean loss (a device tensor: no
        sync per step), the gradient norm before clipping (None until gradients sync), and the step's model
        FLOPs (0 when unknown)."""
        cfg, acc, state = self.cfg, self.accelerator, self.state
        config = acc.unwrap_model(self.model).config
        step_loss = torch.zeros((), device=acc.device)
        grad_norm, flops = None, 0.0
        for micro in range(cfg.grad_accum):
            batch = next(feed)  # on the device, text decoded; the next one is being copied
            flops += dit_train_flops(config, _image_tokens(batch, config), batch.text_tokens / len(batch.sample_ids),
                                     len(batch.sample_ids)) or 0.0
            with acc.accumulate(self.model):
                # The noise and sigmas of a micro-step depend on (seed, step, rank, micro) only: exact resume.
                g = torch.Generator(acc.device).manual_seed(mix_seed(cfg.seed, state.step, acc.process_index, micro))
                with acc.autocast():
                    loss = flow_loss(self.model, batch.latents, batch.text, batch.text_mask,
                                     shift=cfg.shift, mean=cfg.logit_mean, std=cfg.logit_std, generator=g)
                acc.backward(loss)
                if acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.optimizer.step()  # a no-op until gradients sync (accumulation)
                if acc.sync_gradients:
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / cfg.grad_accum
            state.epoch, state.index = self.plan.after(batch.epoch, batch.index)
            if samples_log is not None:
                samples_log.write(json.dumps({"step": state.step, "micro": micro, "epoch": batch.epoch,
                                              "index": batch.index, "sample_ids": batch.sample_ids}) + "\n")
        state.step += 1
        state.samples += self.samples_per_step
        if self.ema is not None:
            update_ema(self.ema, state.step, self.model.parameters(), cfg.ema_every)
        return step_loss, grad_norm, flops

    @property
    def samples_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.accelerator.num_processes

    def log(self, record: dict, scalars: dict) -> None:
        """One row of metrics.jsonl (main process) and ``scalars`` to the tracker (``report_to``)."""
        if self.accelerator.is_main_process:
            self.run.log_metrics(record)
        if self.cfg.report_to != "none":
            self.accelerator.log(scalars, step=self.state.step)

    # -- validation ------------------------------------------------------------------------------
    @property
    def validate_every(self) -> int:
        return self.cfg.validate_every or self.cfg.checkpoint_every

    def validate(self) -> float:
        """Validation loss (current and EMA weights) on every process, samples on the main one; logged to
        metrics.jsonl and the tracker. Returns the seconds it took."""
        acc, state, cfg = self.accelerator, self.state, self.cfg
        t0 = time.perf_counter()
        model = acc.unwrap_model(self.model)
        weights = {"": None} if self.ema is None else {"": None, "_ema": self.ema}
        record: dict = {"step": state.step, "event": "validation", "holdout": len(self.heldout)}
        self.model.eval()
        for suffix, ema in weights.items():
            with _weights(model, ema):
                per_sigma = self.validation.compute(model, acc)  # unwrapped: DDP's forward is a collective
                record[f"val_loss{suffix}"] = sum(per_sigma.values()) / len(per_sigma)
                record[f"val_loss{suffix}_sigma"] = {f"{s:.4f}": v for s, v in per_sigma.items()}
        drawn = []

        def samples() -> None:
            """The sample grid, on the main process (the only one with ``samples_grid``)."""
            if self.samples_grid is None:
                return
            columns = {}
            for ema in weights.values():
                with _weights(model, ema):
                    columns["EMA" if ema is not None else "current"] = self.samples_grid.draw(model)
            pipe = self.samples_grid.pipeline(model)
            columns = {"truth": self.samples_grid.truth(pipe), **columns}
            path = self.run.sample_grid_path(state.step)
            drawn.append(self.samples_grid.write(columns, path, f"{cfg.fusion}, step {state.step}"))
            record["samples"] = str(path.relative_to(self.run_dir))

        # Through run_on_main, a collective: a failure there (a full disk) stops every process, named, rather
        # than leaving the others to die at the next step's gradient exchange.
        process_info().run_on_main(samples)
        self.model.train()
        grid = drawn[0] if drawn else None
        seconds = time.perf_counter() - t0
        state.validation_seconds += seconds
        record["seconds"] = round(seconds, 3)
        record["validation_seconds"] = round(state.validation_seconds, 2)
        scalars = {}
        for s in weights:
            scalars[f"val/loss{s}"] = record[f"val_loss{s}"]
            scalars.update({f"val/loss{s}_sigma_{k}": v for k, v in record[f"val_loss{s}_sigma"].items()})
        self.log(record, scalars)
        if grid is not None and cfg.report_to != "none":
            for tracker in acc.trackers:
                # TensorBoard takes an HWC array; wandb takes a list of images.
                image = np.asarray(grid)
                tracker.log_images({"samples": image if tracker.name == "tensorboard" else [image]},
                                   step=state.step, **({"dataformats": "HWC"} if tracker.name == "tensorboard" else {}))
        return seconds

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        try:
            self.saved = self._save_checkpoint()
            return self.saved
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError (iostream error)
            what = (f"{err.strerror or err} ({err.filename or 'a checkpoint file'})" if isinstance(err, OSError)
                    else str(err).strip().splitlines()[-1][:200])
            final = self.run.checkpoints_dir / checkpoint_name(self.state.step)
            if self.run.published == final:  # it failed after the rename (the routing plot's copy, pruning)
                raise SemrouteError(f"checkpoint {final.name} was written and published, but what follows failed: "
                                    f"{what}; --resume latest continues from {final.name}") from None
            found = self.saved or self.resume_from
            raise SemrouteError(
                f"writing checkpoint {checkpoint_name(self.state.step)} in {self.run.checkpoints_dir} failed: "
                f"{what}; nothing was published, and "
                + (f"--resume latest continues from {found.name}" if found else "no checkpoint exists yet")
            ) from None

    def _save_checkpoint(self) -> Path:
        acc, state = self.accelerator, self.state
        tmp = self.run.staging_path(state.step)
        # The main process's parts run through run_on_main, a collective: if one fails (a full disk), every
        # process raises, rather than the others waiting at a barrier for a process that has stopped.
        process_info().run_on_main(lambda: self.run.stage(state.step))
        acc.save_state(str(tmp))
        acc.wait_for_everyone()  # every process's RNG state is on disk before publish lists the files
        process_info().run_on_main(lambda: self._fill_and_publish(tmp))
        return self.run.checkpoints_dir / checkpoint_name(state.step)

    def _fill_and_publish(self, tmp: Path) -> None:
        """Main process: the checkpoint's model folders, state, config and routing, then publish it."""
        acc, state = self.accelerator, self.state
        model = acc.unwrap_model(self.model)
        model.save_pretrained(tmp / MODEL_DIR)
        if self.ema is not None:
            with _weights(model, self.ema):
                model.save_pretrained(tmp / EMA_MODEL_DIR)
        (tmp / TRAIN_STATE).write_text(json.dumps(state.state_dict()))
        # what a resume from this checkpoint is compared with, and what sample reads (checked by complete.json)
        self.cfg.save(tmp / "config.yaml")
        shutil.copyfile(self.run.record_path, tmp / RUN_RECORD)
        routing.save_routing(model, tmp, "routing", title=f"{self.cfg.fusion}, step {state.step}")
        self.run.publish(tmp, state.step, keep=self.cfg.keep_checkpoints)


class TimeBudget:
    """``max_minutes``: the training time so far (``state.train_seconds``, carried over a resume), when to
    stop, and where the progress bar ends."""

    def __init__(self, cfg: TrainConfig, state: TrainState, acc):
        self.cfg, self.state, self.acc = cfg, state, acc
        self.started = time.perf_counter()
        self.base_seconds, self.first_step = state.train_seconds, state.step
        # A run resumed with its budget spent trains no step (else each resume of a finished run adds one).
        self.spent = cfg.max_minutes is not None and state.train_seconds >= cfg.max_minutes * 60

    def check(self, signal_name: str | None = None) -> str | None:
        """After a step: whether to stop here, as ``TIME`` (the budget is spent) or the name of the signal that
        asked to stop (``stop.StopRequest``); None to go on. Every process must stop at the same step, so under
        several they agree on it (a collective, hence only every ``log_every`` steps and at step 1); one process
        stops for a signal at once."""
        cfg, state, acc = self.cfg, self.state, self.acc
        state.train_seconds = self.base_seconds + time.perf_counter() - self.started
        if acc.num_processes == 1 and signal_name is not None:
            return signal_name
        budgeted = cfg.max_minutes is not None
        if not (budgeted or acc.num_processes > 1) or not (state.step % cfg.log_every == 0 or state.step == 1):
            return None
        late = budgeted and state.train_seconds >= cfg.max_minutes * 60
        # 100 + the signal's number: some process was asked to stop (all of them stop); 1: late; 0: go on
        mine = 100 + signal.Signals[signal_name] if signal_name else int(late)
        verdict = int(acc.reduce(torch.tensor(float(mine), device=acc.device), "max").item())
        return None if verdict == 0 else TIME if verdict == 1 else signal.Signals(verdict - 100).name

    def show(self, bar, done: bool) -> None:
        """Under a time budget the bar ends where the budget runs out at the current pace (the check runs
        every log_every steps), not at max_steps, which would show an ETA of days."""
        cfg, state = self.cfg, self.state
        if cfg.max_minutes is None:
            return
        pace = (state.step - self.first_step) / max(time.perf_counter() - self.started, 1e-9)
        left = max(cfg.max_minutes * 60 - state.train_seconds, 0.0)
        end = -(-(state.step + int(left * pace) + 1) // cfg.log_every) * cfg.log_every
        bar.total = min(cfg.max_steps, state.step if done else max(end, state.step + 1))


class MetricsWindow:
    """Losses, samples and FLOPs since the last log line; ``log()`` writes one row of metrics.jsonl, the
    tracker's scalars and the bar's postfix, then starts a new window. ``t0`` is where the window's time
    starts (the loop moves it past validations: samples/s counts training only)."""

    def __init__(self, trainer: Trainer, feed: DeviceFeed, bar):
        self.trainer, self.feed, self.bar = trainer, feed, bar
        self.peak = peak_flops(trainer.accelerator.device, trainer.cfg.peak_tflops)
        self.last: dict = {}
        self.grad_norm = None
        self._reset()

    def _reset(self) -> None:
        device = self.trainer.accelerator.device
        # Sums that stay on the device (no sync). A NaN/inf loss or gradient norm of any step makes its sum
        # NaN/inf, so one isfinite at log time finds it: no extra kernels per step (issue 11).
        self.loss = torch.zeros((), device=device)
        self.grad_norms = torch.zeros((), device=device)
        self.bad_float = False  # a gradient norm handed over as a Python float that was NaN/inf
        self.first_step = self.trainer.state.step + 1
        self.steps, self.samples, self.flops, self.t0 = 0, 0, 0.0, time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm, flops: float) -> None:
        self.loss += loss
        if isinstance(grad_norm, torch.Tensor):
            self.grad_norms += grad_norm.to(self.grad_norms.device)
        elif grad_norm is not None and not math.isfinite(grad_norm):
            self.bad_float = True
        self.steps += 1
        self.samples += self.trainer.samples_per_step
        self.flops += flops
        self.grad_norm = grad_norm

    def log(self) -> dict:
        t, acc = self.trainer, self.trainer.accelerator
        dt = max(time.perf_counter() - self.t0, 1e-9)
        # one collective: the mean loss and whether any process saw a NaN/inf (the flag's mean is > 0)
        stats = acc.reduce(torch.stack([(self.loss / self.steps).float(), self._nonfinite()]), "mean").tolist()
        mean_loss = stats[0]
        if stats[1] > 0:
            self._stop()
        route = routing.summary(acc.unwrap_model(t.model))
        self.last = last = {
            "step": t.state.step, "loss": mean_loss,
            "grad_norm": float(self.grad_norm) if self.grad_norm is not None else None,
            "lr": t.scheduler.get_last_lr()[0], "samples_per_s": self.samples / dt,
            "epoch": t.state.epoch, "train_seconds": round(t.state.train_seconds, 2),
            "routing_entropy": route["entropy"], "routing_top_layer": route["top_layer"],
            "loader_wait_s": self.feed.take_wait() / self.steps,
            "tflops_per_s": self.flops / dt / 1e12 if self.flops else None,
            "mfu": self.flops / dt / self.peak if self.flops and self.peak else None,
        }
        scalars = {k: last[k] for k in ("loss", "lr", "samples_per_s", "grad_norm") if last[k] is not None}
        scalars["routing_entropy_mean"] = sum(route["entropy"]) / len(route["entropy"])
        t.log(last, scalars)
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", sps=f"{last['samples_per_s']:.1f}", refresh=False,
                             **({"retries": remote_stats.retries} if remote_stats.retries else {}))
        self._reset()
        return last

    def require_finite(self) -> None:
        """Before a checkpoint: stop if a step since the last log went NaN/inf (the log checks its own), so
        that diverged weights are never saved, and never prune the good checkpoints."""
        if self.steps and self.trainer.accelerator.reduce(self._nonfinite(), "max").item() > 0:
            self._stop()

    def _nonfinite(self) -> torch.Tensor:
        """1.0 on the device when a step of this window had a NaN/inf loss or gradient norm, else 0.0."""
        sums = torch.stack([self.loss.float(), self.grad_norms.float()])
        return (~torch.isfinite(sums)).any().float() + float(self.bad_float)

    def _stop(self) -> None:
        t = self.trainer
        latest = t.saved or t.resume_from
        t.log({"step": t.state.step, "event": "stopped", "reason": "non-finite loss or gradient norm",
               "steps": [self.first_step, t.state.step]}, {})
        raise NonFiniteLoss(
            f"training stopped at step {t.state.step}: the loss or the gradient norm became NaN/inf between steps "
            f"{self.first_step} and {t.state.step} (lr {t.scheduler.get_last_lr()[0]:g}); no checkpoint was "
            "written after it, "
            + (f"{latest.name} is the last and is untouched. Resume from it with a lower lr (or longer warm-up): "
               f"semroute train --out {t.run_dir} --resume latest --lr ..." if latest is not None
               else "and none was written before it. Start again with a lower --lr (or a longer warm-up)"))


class _weights:
    """``with _weights(model, ema):`` the model holds the EMA's weights inside the block (nothing when
    ``ema`` is None), its own again after."""

    def __init__(self, model: torch.nn.Module, ema):
        self.model, self.ema = model, ema

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.model.parameters())
            self.ema.copy_to(self.model.parameters())

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.model.parameters())


def _accelerator(cfg: TrainConfig, run: RunFolder):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    mixed = cfg.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(run.path), logging_dir=str(run.logs)),
    )


def _limit_cpu_threads() -> None:
    if torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # On a GPU the training process only launches kernels; a full set of CPU threads there
        # competes with the DataLoader workers and slowed a launch-bound step ~1.5x in our H100
        # measurement (bench/RESULTS.md). A few threads suffice.
        torch.set_num_threads(min(torch.get_num_threads(), 4))


def _open_caches(cfg: TrainConfig) -> PairedCaches:
    """Both caches joined (every stored text layer until ``use_text_layers``), remote ones through the
    node-local shard cache when ``cache_dir`` is set."""
    from semroute.shared.remote import ShardCache, parse_size, set_storage_options

    if cfg.storage_options:
        set_storage_options(cfg.storage_options)
    shard_cache = ShardCache(cfg.cache_dir, parse_size(cfg.cache_size)) if cfg.cache_dir else None
    return PairedCaches(cfg.text_cache, cfg.latent_cache, text_layers=None, seed=cfg.seed,
                        caption_dropout=cfg.caption_dropout, shard_cache=shard_cache)


def _check_patch_size(dataset: PairedCaches, patch: int) -> None:
    for bucket in dataset.latents.buckets:
        shape = bucket.latent_shape
        if shape[-1] % patch or shape[-2] % patch:
            raise SemrouteError(f"latent bucket {bucket.name} has shape {tuple(shape)}; its height and width "
                                f"must be multiples of the DiT patch size {patch}")


def _image_tokens(batch, config) -> int:
    h, w = batch.latents.shape[-2:]  # shapes are known on the host: no sync
    return (h // config.patch_size) * (w // config.patch_size)


def build_ema(model: torch.nn.Module, cfg: TrainConfig):
    """diffusers' ``EMAModel`` of every parameter of ``model``, on the schedule ``cfg.ema_warmup`` names.

    ``EMAModel`` ramps its decay as ``min(decay, (1 + n) / (10 + n))`` at its n-th update, after a plain
    copy at the first (``n`` counts EMA updates past ``update_after_step + 1``). Without the warm-up we want
    ``decay`` from the first update on: ``update_after_step=-1`` makes n >= 1 from the first update (no copy)
    and ``min_decay=decay`` pins the value, so each update is ``ema = decay * ema + (1 - decay) * param``,
    starting from the initial weights.
    """
    from diffusers.training_utils import EMAModel

    constant = {} if cfg.ema_warmup else dict(min_decay=cfg.ema_decay, update_after_step=-1)
    config = getattr(model, "config", None)  # diffusers models; lets EMAModel save itself as one
    return EMAModel(model.parameters(), decay=cfg.ema_decay, model_cls=type(model) if config is not None else None,
                    model_config=config, **constant)


def update_ema(ema, step: int, parameters, every: int) -> None:
    """After optimizer step ``step`` (counted from 1): one EMA update every ``every`` steps."""
    if step % every == 0:
        ema.step(parameters)


def _lr_schedule(optimizer, cfg: TrainConfig):
    from diffusers.optimization import get_scheduler

    name = {"constant": "constant", "warmup": "constant_with_warmup", "cosine": "cosine"}[cfg.lr_schedule]
    # Counted in optimizer steps (the trainer steps it once per synced update).
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)


def train(cfg: TrainConfig, *, resume: str | None = None, progress: bool = True) -> dict:
    with ranks.fail_together():  # one rank failing ends the others (no wait in a collective)
        trainer = Trainer(cfg, resume=resume, progress=progress)
        summary = trainer.train()
        ranks.keep_until_exit(trainer)  # not freed here: freeing the process group can hang (shared/processes.py)
        return summary


