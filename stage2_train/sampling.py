"""``semroute sample``: prompts (given, or read from a benchmark's prompt file) -> images in the layout
that benchmark's scorer expects, plus a grid.

Image k of prompt i is drawn from its own generator seeded ``seed + i * n + k``, so every image can be
regenerated alone, whatever the batch size or number of processes. Prompts whose images all exist are
skipped (resume); ``OUT/sample_run.json`` records the settings and prompts that made them, and a rerun
with others is refused, so one folder never mixes two runs' images. Under ``accelerate launch`` process
r takes prompts r, r + world, ... and names files by the prompt's global index, so processes never collide.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from semroute.shared.checks import check_guidance_interval, check_number, read_json_object
from semroute.shared.distributed import process_info
from semroute.shared.errors import SemrouteError, first_line
from semroute.shared.files import write_atomic
from semroute.shared.interrupts import stoppable
from semroute.shared.llm import resolve_device
from semroute.stage2_train.config import DEFAULT_GUIDANCE, DEFAULT_SAMPLE_STEPS
from semroute.stage2_train.prompt_files import (PromptEntry, detect_format, layout_for, prompt_metadata_files,
                                                read_prompts, save_image)


@dataclass
class SampleConfig:
    checkpoint: str
    out: str
    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    format: str | None = None
    n: int = 1
    steps: int | None = None
    """Euler steps; None: the run's (or exported pipeline's) ``sample_steps``, else DEFAULT_SAMPLE_STEPS."""
    guidance: float | None = None
    """Guidance scale; None: the run's (or exported pipeline's) ``sample_guidance``, else DEFAULT_GUIDANCE."""
    guidance_interval: tuple[float, float] | None = None
    """Guide only where sigma is in ``[lo, hi]`` (conditional prediction alone elsewhere); None: every step."""
    resolution: int | None = None
    seed: int = 0
    batch_size: int = 8
    ema: bool = False
    llm: str | None = None
    device: str = "auto"
    grid: bool = True
    progress: bool = True


def check_sample_options(cfg: SampleConfig) -> None:
    if not str(cfg.out).strip():  # Path('') is the current folder: images would land among the user's files
        raise SemrouteError("-o is empty: name the folder for the images (-o . for the current folder)")
    for name, value in (("--n", cfg.n), ("--batch-size", cfg.batch_size), ("--steps", cfg.steps)):
        check_number(name, value, integer=True, low=1)
    check_number("--guidance", cfg.guidance)  # any finite scale (1 = no guidance, 0 = unconditional)
    if cfg.guidance_interval is not None:
        cfg.guidance_interval = check_guidance_interval(cfg.guidance_interval)
    check_number("--seed", cfg.seed, integer=True, low=0)
    check_number("--resolution", cfg.resolution, integer=True, low=1, optional=True)
    if cfg.device not in ("auto", None, ""):
        resolve_device(cfg.device)  # a device this machine lacks: refused before anything loads or is written


RECORD = "sample_run.json"
SETTINGS = ("model", "prompts", "format", "n", "steps", "guidance", "guidance_interval", "seed", "resolution", "ema")


def prompts_identity(entries: list[PromptEntry]) -> dict:
    """Which prompts the images show: their count and a hash of (index, name, text), the things that decide
    each image and its file name."""
    digest = hashlib.sha256(json.dumps([[e.index, e.name, e.text] for e in entries], ensure_ascii=False).encode())
    return {"count": len(entries), "sha256": digest.hexdigest()}


def model_identity(checkpoint: str, ema: bool) -> dict:
    """Which weights ``--checkpoint`` resolves to now: the model folder and its files' sizes and times (a
    run that trained on, or a pipeline exported again, gives another identity)."""
    folder = sampling_source(checkpoint).model_dir(ema).resolve()
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return {"folder": str(folder), "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}}


def output_settings(cfg: SampleConfig, fmt: str, entries: list[PromptEntry]) -> dict:
    """The settings that decide the images (``SETTINGS``), as ``OUT/sample_run.json`` records them."""
    return {"checkpoint": cfg.checkpoint, "model": model_identity(cfg.checkpoint, cfg.ema),
            "prompts": {**prompts_identity(entries), "file": cfg.prompts_file}, "format": fmt,
            "n": cfg.n, "steps": cfg.steps, "guidance": cfg.guidance,
            "guidance_interval": list(cfg.guidance_interval) if cfg.guidance_interval else None, "seed": cfg.seed,
            "resolution": cfg.resolution, "ema": cfg.ema}


def _compared(record: dict, key: str):
    """What must match for ``key``: for the prompts, which they are (not the file they came from)."""
    value = record.get(key)
    return {k: value.get(k) for k in ("count", "sha256")} if key == "prompts" and isinstance(value, dict) else value


def _describe(key: str, before, now) -> str:
    if key == "model" and isinstance(before, dict):
        return (f"model {before.get('folder')} -> {now['folder']}"
                + (" (same folder, other weights)" if before.get("folder") == now["folder"] else ""))
    if key == "prompts" and isinstance(before, dict):
        return (f"prompts {before.get('count')} prompts (sha256 {str(before.get('sha256'))[:12]}) -> "
                f"{now['count']} prompts (sha256 {now['sha256'][:12]})")
    return f"{key} {before!r} -> {now!r}"


def check_output(out: str | Path, settings: dict) -> None:
    """Refuse an output folder holding images made with other settings (other prompts, model, seed,
    guidance, ...): the skip-what-exists resume would otherwise mix old images with new ones. Writes
    nothing, so a run refused later (a bad size, a missing LLM) leaves the folder as it was."""
    from semroute.stage2_train.run_folder import refuse_output_inside_model

    refuse_output_inside_model(out, "-o")
    out = Path(out)
    record = out / RECORD
    images = next(out.rglob("*.png"), None) is not None
    # GenEval's per-prompt metadata is written before the prompt's images (a run killed or failed in between
    # leaves it alone); another prompt set would leave it beside its own folders, which the scorer reads too.
    metadata = [] if images else prompt_metadata_files(out)
    if not images and not metadata:
        return  # nothing to mix with: a record left by a run that failed before its first image describes none
    what = "images" if images else f"prompt metadata ({metadata[0].relative_to(out).as_posix()}, no images yet)"
    if record.exists():
        before = read_json_object(record, f"it says which settings made the {what} in {out}: sample into a new -o")
        if "prompts" not in before:
            raise SemrouteError(f"{record} was written by an older semroute that did not record its prompts, so "
                                f"which prompts the {what} in {out} show is unknown; sample into another -o so old "
                                "and new images do not mix")
        # a key missing from the record is one added since it was written (it had its default then); without
        # images only the prompts matter (a rerun after a failure may change the rest, e.g. --resolution)
        differ = [k for k in (SETTINGS if images else ("prompts",))
                  if k in before and _compared(before, k) != _compared(settings, k)]
        if differ:
            detail = ", ".join(_describe(k, before.get(k), settings[k]) for k in differ)
            raise SemrouteError(f"{out} holds {what} made with other settings ({detail}); sample into another -o "
                                "(or delete the folder) so old and new outputs do not mix")
    else:
        raise SemrouteError(f"-o {out} holds {what} but no {RECORD} saying which settings made them; sample into "
                            "another -o (or delete the folder) so old and new outputs do not mix")


def check_index(layout, prompts_file: str | None) -> None:
    """Refuse a prompt index (``OUT/prompts.jsonl``) that a sample run would overwrite but did not write: the
    user's own file (``--prompts prompts.jsonl -o .``), or one in a folder without a ``sample_run.json``."""
    index = layout.index_path
    if index is None or not index.exists():
        return
    if prompts_file and Path(prompts_file).resolve() == index.resolve():
        raise SemrouteError(f"--prompts {prompts_file} is the file this run writes its prompt index to ({index}); "
                            "sample into another -o (nothing was written)")
    if not (layout.out_dir / RECORD).exists():
        raise SemrouteError(f"-o {layout.out_dir} holds a {index.name} that no sample run wrote (no {RECORD}); this "
                            "run would overwrite it with its prompt index: sample into another -o (nothing was written)")


def claim_output(out: str | Path, settings: dict) -> dict:
    """Record ``settings`` in ``OUT/sample_run.json``, after every check and before the first image."""
    check_output(out, settings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_record(out, settings)
    return settings


def write_record(out: Path, record: dict) -> None:
    """``OUT/sample_run.json`` through a temporary file and a rename: one cut short by a kill or a full disk
    would make every rerun into the folder refused as damaged."""
    write_atomic(out / RECORD, (json.dumps(record, indent=2) + "\n").encode())


def sampling_source(checkpoint: str | Path):
    """``--checkpoint`` as ``run_folder.resolve_model_source`` reads it: an exported pipeline, or a run or one of
    its checkpoints (a pipeline is built from the run's record of its caches, so a checkpoint moved out of its
    run is refused)."""
    from semroute.stage2_train.run_folder import EXPORT, resolve_model_source

    source = resolve_model_source(checkpoint)
    if source is None:
        raise SemrouteError(f"--checkpoint {checkpoint}: not a run folder, a checkpoint folder or an exported pipeline")
    if source.kind != EXPORT and source.run is None:
        raise SemrouteError(f"--checkpoint {checkpoint}: a checkpoint folder outside its run (no run.json two levels "
                            "up); sampling needs the run's record of its caches: give the checkpoint in "
                            "RUN/checkpoints/, or an exported pipeline")
    return source


def load_pipeline(checkpoint: str | Path, *, ema: bool = False, llm=None, device: str = "auto"):
    """A run folder, a checkpoint folder, or an exported pipeline folder."""
    from semroute.stage2_train.pipeline import SemroutePipeline
    from semroute.stage2_train.run_folder import EXPORT

    source = sampling_source(checkpoint)
    if source.kind == EXPORT:
        source.model_dir(ema)  # (refuses --ema)
        return SemroutePipeline.from_pretrained(source.path, llm=llm, device=device)
    return SemroutePipeline.from_run(source.run.path, checkpoint=source.checkpoint, ema=ema, llm=llm, device=device)


def sampling_defaults(checkpoint: str | Path) -> dict:
    """``{"steps", "guidance"}`` that a run folder's config.yaml (also for one of its checkpoints) or an
    exported pipeline's text settings ask for; {} when they name none."""
    from semroute.stage2_train.run_folder import EXPORT, resolve_model_source

    source = resolve_model_source(checkpoint)
    if source is not None and source.kind == EXPORT:
        from semroute.stage2_train.pipeline import TEXT_CONFIG, TEXT_DIR, read_text_settings

        settings = source.path / TEXT_DIR / TEXT_CONFIG
        return (read_text_settings(source.path).get("sample_defaults") or {}) if settings.exists() else {}
    if source is None or source.run is None or not source.run.config_path.exists():
        return {}
    cfg = source.run.config()
    return {"steps": cfg.sample_steps, "guidance": cfg.sample_guidance}


def with_sampling_defaults(cfg: SampleConfig) -> SampleConfig:
    """``cfg`` with unset ``steps``/``guidance`` taken from the checkpoint's ``sampling_defaults`` (else
    config.py's DEFAULT_SAMPLE_STEPS / DEFAULT_GUIDANCE)."""
    if cfg.steps is not None and cfg.guidance is not None:
        return cfg
    defaults = sampling_defaults(cfg.checkpoint)
    return dataclasses.replace(
        cfg,
        steps=cfg.steps if cfg.steps is not None else int(defaults.get("steps", DEFAULT_SAMPLE_STEPS)),
        guidance=cfg.guidance if cfg.guidance is not None else float(defaults.get("guidance", DEFAULT_GUIDANCE)),
    )


def prompt_entries(cfg: SampleConfig) -> tuple[str, list[PromptEntry]]:
    if bool(cfg.prompts) == bool(cfg.prompts_file):
        raise SemrouteError("give either --prompt (one or more) or --prompts FILE")
    if cfg.prompts and cfg.format:
        raise SemrouteError(f"--format {cfg.format} applies to a --prompts FILE; prompts given with --prompt are "
                            "written in the generic layout (<index>_<k>.png and prompts.jsonl): drop --format, or "
                            "put the prompts in a file of that format")
    if cfg.prompts_file:
        fmt = cfg.format or detect_format(cfg.prompts_file)
        return fmt, read_prompts(cfg.prompts_file, fmt)
    from semroute.shared.manifest import check_unicode

    for i, p in enumerate(cfg.prompts):  # bytes that are not UTF-8 in the shell's argument
        check_unicode(p, f"--prompt {i + 1}")
        if not p.strip():  # no caption is empty (shared/manifest.py refuses them), so the model never saw one
            raise SemrouteError(f"--prompt {i + 1} is empty; give the text to draw (for unconditional images, from "
                                "the null caption alone, give any prompt with --guidance 0)")
    entries = [PromptEntry(index=i, name=f"{i:05d}", text=p, record={"prompt": p}, line=0)
               for i, p in enumerate(cfg.prompts)]
    return "generic", entries


def warn_truncated(pipe, entries: list[PromptEntry], shown: int = 5) -> int:
    """Warn (stderr) about prompts longer than the text cache's ``max_length``: they are cut there, as
    encode-text cut (and counted) the training captions. Returns how many."""
    encoder = pipe.text_encoder
    if encoder is None or not entries:
        return 0
    limit = encoder.fmt.max_length
    long = [(e, t) for e, t in zip(entries, encoder.tokenize([e.text for e in entries])) if t.truncated]
    for entry, tok in long[:shown]:
        where = f" (line {entry.line})" if entry.line else ""
        print(f"warning: prompt {entry.index}{where} has {tok.n_full} tokens (instruction included), more than the "
              f"text cache's max_length {limit}: its last {tok.n_full - len(tok.ids)} tokens are cut, as encode-text "
              "cut the training captions", file=sys.stderr)
    if len(long) > shown:
        print(f"warning: {len(long)} of {len(entries)} prompts are longer than max_length {limit} and cut (the first "
              f"{shown} are listed above)", file=sys.stderr)
    return len(long)


def sample(cfg: SampleConfig, *, pipe=None) -> dict:
    """Generate every pending image; returns counts and paths. Everything is checked (options, prompts, the
    output folder, the model, the LLM, the image size) before the output folder is claimed."""
    with stoppable(f"the images written to {cfg.out} are kept: run the same command to sample the rest"):
        return _sample(cfg, pipe)


def _sample(cfg: SampleConfig, pipe) -> dict:
    from tqdm.auto import tqdm

    from semroute.stage2_train.pipeline import PromptTruncated

    cfg = with_sampling_defaults(cfg)
    check_sample_options(cfg)
    proc = process_info()
    fmt, entries = prompt_entries(cfg)
    layout = layout_for(fmt, cfg.out, n_per_prompt=cfg.n)
    settings = output_settings(cfg, fmt, entries)
    proc.run_on_main(lambda: (check_output(cfg.out, settings), check_index(layout, cfg.prompts_file)))
    mine = layout.pending(entries[proc.rank:: proc.world_size])
    jobs = [(entry, k) for entry in mine for k in range(cfg.n)]
    truncated = 0
    if jobs:
        device = proc.device_for(cfg.device)
        # The folder the identity recorded, not --checkpoint again: a run still training may have published
        # a newer checkpoint since, whose images would then be recorded as this one's.
        source = Path(settings["model"]["folder"]).parent
        pipe = pipe or load_pipeline(source, ema=cfg.ema, llm=cfg.llm, device=device)
        check_image_size(pipe, cfg.resolution)
        truncated = warn_truncated(pipe, mine)
    proc.run_on_main(lambda: claim_output(cfg.out, settings))
    if proc.is_main:
        layout.write_index(entries)
    written = 0
    t0 = time.perf_counter()
    if jobs:
        pipe.set_progress_bar_config(disable=True)
        size = cfg.resolution
        bar = tqdm(total=len(jobs), unit="img", desc=f"sample[{proc.rank}]", disable=not cfg.progress)
        prepared: set[int] = set()
        for start in range(0, len(jobs), cfg.batch_size):
            batch = jobs[start: start + cfg.batch_size]
            generators = [torch.Generator().manual_seed(cfg.seed + e.index * cfg.n + k) for e, k in batch]
            with warnings.catch_warnings(), out_of_memory_named(pipe, cfg, len(batch), written):
                warnings.simplefilter("ignore", PromptTruncated)  # warn_truncated named them above, with their lines
                images = pipe([e.text for e, _ in batch], num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                              guidance_interval=cfg.guidance_interval, height=size, width=size,
                              generator=generators).images
            for (entry, k), image in zip(batch, images):
                if entry.index not in prepared:
                    layout.prepare(entry)
                    prepared.add(entry.index)
                save_image(image, layout.image_path(entry, k))
                written += 1
            bar.update(len(batch))
        bar.close()
    counts = proc.gather_object(written)
    proc.barrier()
    grid = None
    if proc.is_main:
        record = {**settings, "world_size": proc.world_size, "images_written_per_process": counts}
        write_record(Path(cfg.out), record)
        if cfg.grid:
            grid = write_grid(layout, entries, cfg.n, Path(cfg.out) / "grid.png")
    return {"format": fmt, "prompts": len(entries), "images_written": written,
            "skipped_prompts_done": len(entries[proc.rank:: proc.world_size]) - len(mine),
            "seconds": time.perf_counter() - t0, "grid": str(grid) if grid else None, "out": cfg.out,
            "truncated_prompts": truncated}


def check_image_size(pipe, resolution: int | None) -> tuple[int, int]:
    """``(height, width)`` of the images, refused unless the DiT can patchify its latent: a side must be a
    multiple of the autoencoder's factor times the DiT's patch size (``dit_base.patchify``), checked here before
    the output folder is claimed rather than in the first forward pass."""
    height, width = pipe.image_size(resolution, resolution)
    step = pipe.vae_downsample * pipe.transformer.config.patch_size
    if height % step or width % step:
        given = f"--resolution {resolution}" if resolution else f"the training size {width}x{height}"
        near = sorted({max(step, height // step * step), (height // step + 1) * step})
        raise SemrouteError(f"{given}: a side must be a multiple of {step} (the autoencoder's factor "
                            f"{pipe.vae_downsample} x the DiT's patch size {pipe.transformer.config.patch_size}), "
                            f"e.g. {' or '.join(map(str, near))}")
    return height, width


def is_out_of_memory(err: BaseException) -> bool:
    """An allocation that failed: torch's OutOfMemoryError (CUDA and other accelerators) or the CPU
    allocator's RuntimeError; no other RuntimeError."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and ("DefaultCPUAllocator" in str(err) or "can't allocate memory" in str(err))


@contextmanager
def out_of_memory_named(pipe, cfg: SampleConfig, batch: int, written: int):
    """Turn a failed allocation while drawing ``batch`` images into a message naming the size and batch and
    what to lower; the images already written are kept (``check_output`` lets a folder without any images be
    claimed again with other settings, the same prompts where it holds GenEval metadata)."""
    try:
        yield
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
        height, width = pipe.image_size(cfg.resolution, cfg.resolution)
        lower = "--resolution" + (" or --batch-size" if cfg.batch_size > 1 else "")
        raise SemrouteError(f"out of memory drawing {batch} image(s) of {width}x{height} px at once (--batch-size "
                            f"{cfg.batch_size}, --resolution {cfg.resolution or f'{height} (the training size)'}): "
                            f"{first_line(err)}; try a smaller {lower}"
                            + (f" into another -o (the {written} image(s) written are kept in {cfg.out})" if written
                               else "")) from None


def write_grid(layout, entries: list[PromptEntry], n: int, path: Path, max_prompts: int = 16) -> Path | None:
    """One row per prompt (the first ``max_prompts``), one column per sample, from the files on disk."""
    from PIL import Image

    rows = []
    for entry in entries[:max_prompts]:
        files = [layout.image_path(entry, k) for k in range(n)]
        if all(f.exists() for f in files):
            rows.append([Image.open(f).convert("RGB") for f in files])
    if not rows:
        return None
    w, h = rows[0][0].size
    sheet = Image.new("RGB", (w * n, h * len(rows)), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            sheet.paste(img.resize((w, h)), (c * w, r * h))
    scale = max(1, 256 // max(w, h))  # small images (the demo's 32 px) are enlarged to be seen
    if scale > 1:
        sheet = sheet.resize((sheet.width * scale, sheet.height * scale), Image.Resampling.NEAREST)
    save_image(sheet, path)  # whole, through a rename: a rerun stopped here leaves the earlier grid intact
    return path
