"""The run folder of a training run: the one place that knows its files.

::

    RUN/config.yaml                 the resolved configuration
    RUN/run.json                    the caches and their fingerprints (a resume must use the same ones)
    RUN/checkpoints/step-NNNNNNN/   accelerate state (model, optimizer, scheduler, RNG, EMA, data position),
                                    train_state.json, routing.{png,csv}
                                    + model/ (and model_ema/) as diffusers folders for `sample` / `export`
    RUN/logs/metrics.jsonl          loss, grad norm, lr, samples/s, routing entropy and top layer per block
    RUN/logs/tensorboard/           the same scalars (and sample grids) through accelerate's tracker
                                    (--report-to tensorboard | wandb | none)
    RUN/routing/step-NNNNNNN.png    routing heatmap (+ .csv) at every checkpoint; latest.png
    RUN/samples/step-NNNNNNN.png    with --holdout: held-out captions drawn at each validation, beside
                                    their ground truth (validation losses are in metrics.jsonl)

A checkpoint is written to a temporary folder (``.step-NNNNNNN.tmp``) and renamed when complete, so a
crash never leaves a half checkpoint that ``--resume`` would pick up. Its last file, ``complete.json``,
lists every file with its size and crc32c (checkpoint_files.py): ``--resume latest`` and the model
loaders take the newest checkpoint whose files match it and name any damaged one they pass over.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from semroute.shared.checks import read_json_object
from semroute.shared.errors import SemrouteError
from semroute.shared.files import write_atomic
from semroute.shared.remote import is_url
from semroute.stage2_train import checkpoint_files, models
from semroute.stage2_train.checkpoint_files import TRAIN_STATE

CHECKPOINT_PREFIX = "step-"
RUN_RECORD = "run.json"  # the caches and fingerprints of a run (a checkpoint holds a copy)
MODEL_DIR, EMA_MODEL_DIR = "model", "model_ema"  # a checkpoint's diffusers model folders
MODEL_INDEX = "model_index.json"  # the file that marks an exported pipeline (pipeline.save_pretrained)


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def is_checkpoint(path: Path) -> bool:
    """What a checkpoint holds at the least: the training state (``--resume``) or the model folder (``sample``,
    ``export``). A ``complete.json`` alone is not one (``not_a_checkpoint`` says what it lost)."""
    path = Path(path)
    return (path / TRAIN_STATE).exists() or (path / MODEL_DIR).is_dir()


def not_a_checkpoint(path: Path, what: str, expected: str = "RUN/checkpoints/step-*") -> SemrouteError:
    """Why ``path`` (given as ``what``) is not a checkpoint: a checkpoint or export that lost the files that make
    one, named from its ``complete.json``; else no checkpoint at all."""
    path = Path(path)
    if (path / checkpoint_files.MANIFEST).is_file():
        lost = checkpoint_files.problems(path, crc=False)
        return checkpoint_files.DamagedCheckpoint(
            f"{path} is damaged: it has a {checkpoint_files.MANIFEST}, but not what makes a checkpoint "
            f"({MODEL_DIR}/ or {TRAIN_STATE}) or an exported pipeline ({MODEL_INDEX})"
            + (f" ({'; '.join(lost[:3])}{'; ...' if len(lost) > 3 else ''})" if lost else "")
            + "; use another checkpoint of the run, or export again")
    return SemrouteError(f"{what}: not a checkpoint folder (expected {expected})")


def refuse_url_output(out: str | Path, flag: str) -> None:
    """Runs, exports, samples and reports are written to a local folder; only the caches may be on object storage.
    A URL given for one would be taken as a local path (``s3://b/r`` as the folder ``s3:/b/r``)."""
    if is_url(out):  # (it also refuses s3:/b/r, a URL with a slash missing)
        raise SemrouteError(f"{flag} {out}: this is written to a local folder, not to a URL (only the caches may be "
                            "on object storage); give a local path")


def refuse_output_inside_model(out: str | Path, flag: str, *, replacing_export: bool = False) -> None:
    """Refuse an output at or below a checkpoint or an exported pipeline: a resume prunes old checkpoints whole,
    with whatever was written into them, and both are checked against the list of their own files.
    ``replacing_export``: ``out`` itself may be an earlier export (``export --overwrite`` replaces it whole)."""
    refuse_url_output(out, flag)
    path = Path(out).resolve()
    for folder in (path, *path.parents):
        if replacing_export and folder == path and (folder / MODEL_INDEX).exists():
            continue
        # (a complete.json alone: the folder is checked against it, whatever else it lost)
        if folder.is_dir() and (is_checkpoint(folder) or (folder / MODEL_INDEX).exists()
                                or (folder / checkpoint_files.MANIFEST).exists()):
            kind = "an exported pipeline" if (folder / MODEL_INDEX).exists() else "a checkpoint"
            raise SemrouteError(f"{flag} {out} is {'' if folder == path else 'inside '}{kind} ({folder}), which "
                                "training prunes or checks against its own list of files: choose a folder outside it")


class _Inside:
    """A path inside the run folder, read as an attribute: ``run.logs`` is ``run.path / "logs"``."""

    def __init__(self, *parts: str):
        self.parts = parts

    def __get__(self, run: "RunFolder | None", owner=None):
        return self if run is None else run.path.joinpath(*self.parts)


class RunFolder:
    """A training run's folder: its config, cache record, logs, checkpoints and their models."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.published: Path | None = None  # the checkpoint this object's last publish() renamed into place

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # -- finding runs ----------------------------------------------------------------------------
    @staticmethod
    def is_run(path: str | Path) -> bool:
        """A folder written by ``train`` (it has config.yaml; a checkpoint, which holds a copy, is not one, nor is
        a damaged one: a run folder has no complete.json)."""
        path = Path(path)
        return ((path / "config.yaml").exists() and not is_checkpoint(path)
                and not (path / checkpoint_files.MANIFEST).exists())

    # -- files (the layout drawn above) ----------------------------------------------------------
    config_path = _Inside("config.yaml")
    record_path = _Inside(RUN_RECORD)
    logs = _Inside("logs")
    metrics_path = _Inside("logs", "metrics.jsonl")
    checkpoints_dir = _Inside("checkpoints")
    routing_dir = _Inside("routing")
    samples_dir = _Inside("samples")

    def latest_routing(self, suffix: str) -> Path:
        """routing/latest.png (``suffix`` png) or .csv: the newest checkpoint's routing plot or table."""
        return self.routing_dir / f"latest.{suffix}"

    def sample_grid_path(self, step: int) -> Path:
        """The sheet of held-out samples drawn at a validation."""
        return self.samples_dir / f"{checkpoint_name(step)}.png"

    def create(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)

    def refuse_cache(self) -> None:
        """Refuse a cache folder: a run written into it masks the cache (``info`` reads a run), and the cache's
        ``--overwrite`` would then delete the run with it. (Other folders of the user's are fine: a config file
        kept beside the run is a common layout.)"""
        if (self.path / "zarr.json").exists():
            raise SemrouteError(f"--out {self.path} is a cache (it has zarr.json), not a run folder: train into a "
                                "folder of its own (e.g. runs/NAME)")

    def config_file(self, checkpoint: str | Path | None = None) -> Path:
        """The config a checkpoint was trained with: its own copy (checked by its complete.json), else the
        run's config.yaml (checkpoints written before the copy existed)."""
        if checkpoint is not None and (Path(checkpoint) / "config.yaml").exists():
            return Path(checkpoint) / "config.yaml"
        return self.config_path

    def config(self, checkpoint: str | Path | None = None):
        """The run's ``TrainConfig`` (keys a run of an older version lacks take today's defaults); with a
        checkpoint, the one that checkpoint was trained with."""
        from semroute.stage2_train.config import TrainConfig, load_yaml

        path = self.config_file(checkpoint)
        if not path.exists():
            raise SemrouteError(f"{self.path} is not a training run folder (no config.yaml)")
        if "fusion" not in load_yaml(path):  # every saved config lists every key: this one was cut short
            raise SemrouteError(f"{path} is damaged (empty or cut short: it lacks keys every saved config holds, "
                                "such as fusion); a checkpoint's config.yaml is a whole copy of it")
        return TrainConfig.build(config_file=str(path))

    def record(self, required: bool = True, checkpoint: str | Path | None = None) -> dict:
        """run.json: the caches and fingerprints the run trains on ({} if absent and not ``required``); with
        a checkpoint, that checkpoint's copy when it has one."""
        path = self.record_path
        if checkpoint is not None and (Path(checkpoint) / RUN_RECORD).exists():
            path = Path(checkpoint) / RUN_RECORD
        if not path.exists():
            if required:
                raise SemrouteError(f"{self.path} is not a training run folder (no run.json)")
            return {}
        return read_json_object(path, "the checkpoint's copy is checked by its complete.json" if path != self.record_path
                                else "a resume rewrites it from the newest checkpoint's copy")

    def save_record(self, record: dict) -> None:
        write_atomic(self.record_path, json.dumps(record, indent=2, default=str))

    def log_metrics(self, row: dict) -> None:
        with open(self.metrics_path, "a+b") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell():  # a line cut short (a crash mid-write) must not swallow the next one
                fh.seek(-1, os.SEEK_END)
                torn = fh.read(1) != b"\n"
            else:
                torn = False
            fh.write((("\n" if torn else "") + json.dumps(row, default=str) + "\n").encode())

    def metrics(self) -> list[dict]:
        """Every row of logs/metrics.jsonl (losses and checkpoint events), in order. The log is appended to
        as training goes, so a line cut short by a crash (or damaged) is left out, with a warning."""
        if not self.metrics_path.exists():
            return []
        rows, bad = [], []
        for n, line in enumerate(self.metrics_path.read_bytes().splitlines(), 1):
            try:
                row = json.loads(line) if line.strip() else None
            except (ValueError, UnicodeDecodeError):
                bad.append(n)
                continue
            if isinstance(row, dict) and _row_ok(row):
                rows.append(row)
            elif row is not None:
                bad.append(n)
        if bad:
            print(f"warning: {self.metrics_path}: left out {len(bad)} unreadable line(s) (first: line {bad[0]})",
                  file=sys.stderr)
        return rows

    def samples_log_path(self, rank: int) -> Path:
        return self.logs / f"samples-rank{rank}.jsonl"

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoints_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def newest_intact(self, under: str | None = None) -> Path | None:
        """The newest checkpoint whose files (those below ``under``, e.g. ``model``) match its
        ``complete.json``; each newer damaged one is named on stderr. None when there is no checkpoint; an
        error when every one is damaged."""
        found = self.checkpoints()
        skipped = []
        for ckpt in reversed(found):
            bad = checkpoint_files.problems(ckpt, under=under) or (
                [] if is_checkpoint(ckpt) else [f"{ckpt} holds neither {MODEL_DIR}/ nor {TRAIN_STATE}"])
            if not bad:
                for name, why in skipped:
                    print(f"warning: skipping damaged checkpoint {name}: {why}", file=sys.stderr)
                return ckpt
            skipped.append((ckpt.name, "; ".join(bad[:3])))
        if skipped:
            raise checkpoint_files.DamagedCheckpoint(
                f"every checkpoint of {self.path} is damaged: " + " | ".join(f"{n}: {w}" for n, w in skipped)
                + ". Start a new --out")
        return None

    def holds_work(self) -> str | None:
        """What a run already in this folder holds (None when there is none): what a new run must not be
        written over."""
        found = self.checkpoints()
        if found:
            return f"{len(found)} checkpoint(s), the newest {found[-1].name}"
        if self.config_path.exists() or self.record_path.exists() or self.metrics_path.exists():
            return "a run's config and logs, no checkpoint yet"
        return None

    def resolve_resume(self, resume: str | None) -> Path | None:
        """``latest`` -> the newest intact checkpoint of the run (None for a new run); else a path, which must
        be one of this run's checkpoints (another run's would mix two runs' logs and data positions) and its
        newest (training on from an older one would overwrite and prune the newer ones)."""
        if resume in (None, "", "no"):
            return None
        if resume == "latest":
            return self.newest_intact()
        path = Path(resume)
        if not is_checkpoint(path):
            raise not_a_checkpoint(path, f"--resume {resume}", f"{self.path}/checkpoints/step-*")
        if path.resolve().parent != self.checkpoints_dir.resolve():
            owner = path.resolve().parent.parent
            raise SemrouteError(
                f"--resume {resume}: a checkpoint of another run ({owner}), not of --out {self.path}; to continue "
                f"that run, pass --out {owner}")
        newer = [p.name for p in self.checkpoints() if p.name > path.resolve().name]
        if newer:
            raise SemrouteError(
                f"--resume {resume}: {self.path} has newer checkpoints ({', '.join(newer)}), which training on from "
                f"{path.name} would overwrite and prune. To go back to {path.name}, first move them out of "
                f"{self.checkpoints_dir} (e.g. into {self.path / 'set-aside'}); to continue the run: --resume latest")
        checkpoint_files.require_intact(path)
        return path

    def checkpoint(self, checkpoint: str | Path | None = None) -> Path:
        """``checkpoint`` (a folder) if given, else the newest one; an error if the run has none."""
        if checkpoint is not None:
            path = Path(checkpoint)
            if not is_checkpoint(path):
                raise not_a_checkpoint(path, str(path), f"{self.path}/checkpoints/step-*")
            owner = path.resolve().parent.parent  # (RUN/checkpoints/step-N, or a folder beside it: set-aside/)
            if owner != self.path.resolve():
                # its weights would be read with this run's config and caches (a checkpoint written before it held
                # its own copies), and sampled or exported under this run's name
                raise SemrouteError(f"{path} is a checkpoint of {owner}, not of the run given ({self.path}): give it "
                                    f"with its own run ({owner}), or one of {self.checkpoints_dir}/step-*")
            return path
        found = self.latest_checkpoint()
        if found is None:
            raise SemrouteError(f"{self.path} has no checkpoint yet")
        return found

    @staticmethod
    def train_state(checkpoint: Path) -> dict:
        """Step, epoch, samples and training seconds saved with a checkpoint."""
        return read_json_object(Path(checkpoint) / TRAIN_STATE, "the checkpoint is damaged: resume from another one")

    def model_dir(self, ema: bool = False, checkpoint: str | Path | None = None) -> Path:
        """The diffusers model folder (``model/`` or ``model_ema/``) of a checkpoint (default: the newest
        whose model files are intact), its files checked against the checkpoint's ``complete.json``."""
        name = EMA_MODEL_DIR if ema else MODEL_DIR
        ckpt = self.checkpoint(checkpoint) if checkpoint is not None else (self.newest_intact(under=name)
                                                                            or self.checkpoint())
        checkpoint_files.require_intact(ckpt, under=name)
        if not (ckpt / name).is_dir():
            raise SemrouteError(f"{ckpt} has no {name}/ (was the run trained with ema: true?)")
        return ckpt / name

    def load_model(self, ema: bool = False, checkpoint: str | Path | None = None):
        """The DiT of a checkpoint (default: the newest), its class chosen by the model registry."""
        return models.load_model(self.model_dir(ema=ema, checkpoint=checkpoint))

    # Writing a checkpoint: the trainer fills ``stage(step)``, then ``publish`` makes it visible.
    def staging_path(self, step: int) -> Path:
        """The temporary folder the checkpoint of ``step`` is written to."""
        return self.checkpoints_dir / f".{checkpoint_name(step)}.tmp"

    def stage(self, step: int) -> Path:
        """Create an empty ``staging_path(step)`` (main process only)."""
        tmp = self.staging_path(step)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def publish(self, staged: Path, step: int, keep: int) -> Path:
        """Rename a complete staged checkpoint into place, copy its routing plot into routing/, log it, and
        drop all but the ``keep`` newest checkpoints."""
        name = checkpoint_name(step)
        final = self.checkpoints_dir / name
        checkpoint_files.write_manifest(staged, step)  # last file of the checkpoint: lists all the others
        if final.exists():  # a damaged checkpoint of this step, which the resume passed over
            self._discard(final)
        os.replace(staged, final)  # only now does the checkpoint exist for --resume
        self.published = final  # (what a failure in the steps below must not call unpublished)
        self.routing_dir.mkdir(exist_ok=True)
        for suffix in ("png", "csv"):
            if (final / f"routing.{suffix}").exists():
                shutil.copyfile(final / f"routing.{suffix}", self.routing_dir / f"{name}.{suffix}")
                shutil.copyfile(final / f"routing.{suffix}", self.latest_routing(suffix))
        self.log_metrics({"step": step, "event": "checkpoint", "path": str(final)})
        # Only checkpoints up to this one count: newer ones are damaged ones that --resume latest passed over
        # (it takes the newest intact one); counted, they would prune the checkpoint just written.
        for old in [p for p in self.checkpoints() if p.name <= name][:-keep]:
            self._discard(old)
        for leftover in self.checkpoints_dir.glob(f".{CHECKPOINT_PREFIX}*.del"):  # of a kill mid-delete
            shutil.rmtree(leftover, ignore_errors=True)
        return final

    def _discard(self, checkpoint: Path) -> None:
        """Delete a checkpoint, renamed out of sight first: a kill mid-delete never leaves part of one under
        its step name (where, its complete.json gone, its train_state.json would pass it as intact)."""
        trash = self.checkpoints_dir / f".{checkpoint.name}.del"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(checkpoint, trash)
        shutil.rmtree(trash, ignore_errors=True)


# What each kind of metrics.jsonl row must hold for `report` and `info` to read it (other keys may be absent,
# as in runs of older versions); a row without them was damaged or hand-edited.
_ROW_FIELDS = {None: {"loss": (int, float)}, "validation": {"val_loss": (int, float), "val_loss_sigma": dict},
               "checkpoint": {"path": str}}


def _row_ok(row: dict) -> bool:
    if not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool):
        return False
    need = _ROW_FIELDS.get(row.get("event"), {})
    return all(isinstance(row.get(key), kinds) and not isinstance(row.get(key), bool) for key, kinds in need.items())


# -- what a path given to sample, export, routing or info is ------------------------------------------
EXPORT, CHECKPOINT, RUN = "export", "checkpoint", "run"


@dataclass(frozen=True)
class ModelSource:
    """A path ``resolve_model_source`` recognised."""

    kind: str  # EXPORT, CHECKPOINT or RUN
    path: Path
    run: RunFolder | None  # the run folder (of a checkpoint: None when it was moved out of its run)
    checkpoint: Path | None  # the checkpoint folder, when one was given

    def model_dir(self, ema: bool = False) -> Path:
        """The DiT's folder: an export's ``transformer/``; else ``model/`` (``model_ema/``) of the checkpoint
        (default: the run's newest intact one), checked against its complete.json (``RunFolder.model_dir``)."""
        if self.kind == EXPORT:
            if ema:
                raise SemrouteError("--ema applies to run folders; an exported pipeline holds one set of weights")
            if not (self.path / "transformer").is_dir():
                raise SemrouteError(f"exported pipeline {self.path} has no transformer/ (the DiT): it is damaged or "
                                    "cut short; export it again")
            return self.path / "transformer"
        run = self.run or RunFolder(self.path.parent.parent)  # a checkpoint moved out of its run: its own files
        return run.model_dir(ema=ema, checkpoint=self.checkpoint)


def resolve_model_source(path: str | Path) -> ModelSource | None:
    """What ``path`` is, by the file that marks each kind (none is read): an exported pipeline (``model_index.json``),
    a checkpoint folder (``is_checkpoint``; tested before runs, as it holds copies of their files), with its run
    when the folder two levels up has run.json; a run folder (run.json or config.yaml, which train writes
    together). None when it is none of these; refused, as damaged, when it has a complete.json but lost what marks
    its kind. Each command decides which kinds it takes; a file a kind lacks is named where it is read
    (``RunFolder.record``, ``RunFolder.config``, ``SemroutePipeline.from_pretrained``)."""
    path = Path(path)
    if (path / MODEL_INDEX).exists():
        return ModelSource(EXPORT, path, None, None)
    if is_checkpoint(path):
        home = path.parent.parent
        return ModelSource(CHECKPOINT, path, RunFolder(home) if (home / RUN_RECORD).exists() else None, path)
    if (path / checkpoint_files.MANIFEST).exists():  # a checkpoint (or export) that lost what marks it
        raise not_a_checkpoint(path, str(path))
    if (path / RUN_RECORD).exists() or (path / "config.yaml").exists():
        return ModelSource(RUN, path, RunFolder(path), None)
    return None


def open_model(path: str | Path, ema: bool = False):
    """The DiT of a run (newest intact checkpoint), a checkpoint folder (also one moved out of its run), or an
    exported pipeline (checked against its complete.json first); and a label."""
    source = resolve_model_source(path)
    if source is None:
        raise SemrouteError(f"{path} is not a run folder, a checkpoint or an exported pipeline")
    model_dir = source.model_dir(ema)
    if source.kind == EXPORT:
        checkpoint_files.check_export(source.path)
        return models.load_model(model_dir), source.path.name
    return models.load_model(model_dir), model_dir.parent.name
