"""The ``semroute`` command line: registers the commands; each one parses, checks flags, and calls stage code.

Run it installed (``semroute encode-text ...``), from a checkout (``python cli.py encode-text ...``) or on
many processes (``accelerate launch cli.py encode-text ...``).
"""

from __future__ import annotations

if __package__ in (None, ""):
    # Run as a script from a checkout: the repository root *is* the `semroute` package (pyproject's
    # package-dir), so register it under that name before anything imports `semroute.*`.
    import importlib.util
    import pathlib
    import sys

    _root = pathlib.Path(__file__).resolve().parent
    _spec = importlib.util.spec_from_file_location(
        "semroute", _root / "__init__.py", submodule_search_locations=[str(_root)]
    )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["semroute"] = _module
    _spec.loader.exec_module(_module)

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from semroute.demo import DemoConfig  # light: the demo imports torch only where it runs
from semroute.shared.errors import SemrouteError, describe_path_error, write_faults_named
from semroute.stage2_train.config import DEFAULT_GUIDANCE, DEFAULT_SAMPLE_STEPS, config_names, field_help

app = typer.Typer(
    name="semroute",
    help="Train text-to-image DiTs on many layers of a frozen LLM, fused by semantic-routing gates, from offline caches.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if not value:
        return
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from semroute import __version__

    def of(package: str) -> str:
        try:
            return f"{package} {version(package)}"
        except PackageNotFoundError:
            return f"{package} not installed"

    libraries = ", ".join(of(p) for p in ("torch", "transformers", "diffusers", "accelerate"))
    typer.echo(f"semroute {__version__} ({libraries}; Python {platform.python_version()})")
    raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print semroute's version and its libraries' (for a bug report), "
                                               "then exit.")] = False,
) -> None:
    pass


# -- options shared by several commands ------------------------------------------------------
DataArg = Annotated[str, typer.Argument(
    help="The data: a JSON/JSONL manifest; a folder of images with same-named .txt captions; Parquet/CSV tables "
         "(path or image-bytes column); or WebDataset .tar shards (paths or URLs, brace ranges "
         "data-{000000..000127}.tar, or a folder of .tar files).", show_default=False)]
InputFormat = Annotated[str, typer.Option("--input-format", help="auto (from the name) | manifest | folder | parquet | csv | webdataset")]
StorageOptions = Annotated[Optional[str], typer.Option(
    "--storage-options", help='JSON of fsspec options for s3:// URLs, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\' '
                              "(credentials otherwise come from the standard AWS environment variables).")]


def _echo_shards_before(summary: dict, append: bool) -> None:
    """The encoders' line on shards a run found written: an append's are the cache it grows."""
    before, total = summary["shards_done_before"], summary["shards"]
    if append:
        typer.echo(f"appended: {total - before} new shard(s) written; {before} of {total} were there before")
    elif before:
        typer.echo(f"resumed: {before} of {total} shards were already written")


def _storage_options(text: str | None) -> dict | None:
    if not text:
        return None
    from semroute.shared.checks import json_object
    from semroute.shared.remote import set_storage_options

    value = json_object(text, "--storage-options")
    set_storage_options(value)  # for every URL this process and its workers open (caches and inputs)
    return value


TextKey = Annotated[str, typer.Option("--text-key", help="Key of the caption (a string or a list of strings).")]
ImageKey = Annotated[str, typer.Option("--image-key", help="Key of the image path.")]
IdKey = Annotated[str, typer.Option("--id-key", help="Key of the optional sample id (else the record's position).")]
SkipBad = Annotated[bool, typer.Option("--skip-bad", help="Leave bad records out (listed in a report) instead of stopping.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run; finished shards are kept.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing cache.")]
Estimate = Annotated[bool, typer.Option("--estimate", help="Print the store's size and plan, then stop before any model runs.")]
Device = Annotated[str, typer.Option("--device", help="auto (GPU when present), cpu, cuda, cuda:1, ...")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")]


def _print_json(obj: dict) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


@app.command("encode-text")
def encode_text_cmd(
    data: DataArg,
    out: Annotated[str, typer.Option("--out", "-o", help="Text cache to write (folder or fsspec URL), e.g. data.text.zarr")],
    llm: Annotated[str, typer.Option("--llm", help="Hub id (id@revision), local folder, .gguf file, or smollm2.")] = "smollm2",
    layers: Annotated[str, typer.Option("--layers", help="all | last:K | every:K | penultimate | i,j,k | a-b (hidden_states numbering).")] = "all",
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per caption, instruction included; longer ones are truncated and counted.")] = 512,
    instruction: Annotated[str, typer.Option("--instruction", help="Text put before every caption; alone it is the null caption.")] = "Describe this image.",
    chat_template: Annotated[bool, typer.Option("--chat-template", help="Wrap instruction+caption in the tokenizer's chat template.")] = False,
    storage: Annotated[str, typer.Option("--storage", help="exact (the model's bits), bf16 (rounded; for float32 compute) or fp8 (e4m3 + per token-layer scale).")] = "exact",
    dtype: Annotated[str, typer.Option("--dtype", help="Compute dtype of the LLM: bfloat16, float16 or float32.")] = "bfloat16",
    device: Device = "auto",
    batch_tokens: Annotated[int, typer.Option("--batch-tokens", help="Padded tokens per forward pass (batch size x longest caption).")] = 8192,
    shard_mb: Annotated[float, typer.Option("--shard-mb", help="Target shard size in MiB (the unit of writing and resuming).")] = 128.0,
    text_key: TextKey = "text",
    id_key: IdKey = "id",
    input_format: InputFormat = "auto",
    storage_options: StorageOptions = None,
    append: Annotated[bool, typer.Option("--append", help="Add DATA's captions to the existing cache --out (same model and settings; new shards only; run again to continue an interrupted append).")] = False,
    skip_bad: SkipBad = False,
    resume: Resume = False,
    overwrite: Overwrite = False,
    estimate: Estimate = False,
    no_progress: NoProgress = False,
) -> None:
    """Run the frozen LLM once over every caption and store the selected layers' hidden states.

    Examples:

      semroute encode-text captions.jsonl --llm smollm2 --out data.text.zarr

      semroute encode-text 'shards/data-{000000..000127}.tar' --llm smollm2 --out data.text.zarr

      semroute encode-text images/ --llm smollm2 --out data.text.zarr   (a folder of images with .txt captions)

      semroute encode-text more.jsonl --llm smollm2 --out data.text.zarr --append   (grow the cache)

      semroute encode-text captions.jsonl --llm Qwen/Qwen3-VL-4B-Instruct --layers all --out data.text.zarr --estimate

      accelerate launch --num_processes 8 cli.py encode-text captions.jsonl --llm ./qwen3 --out data.text.zarr --resume
    """
    from semroute.shared.store import format_bytes
    from semroute.shared.text_store import BAD_RECORDS_FILE
    from semroute.stage1_encode.text import EncodeTextConfig, encode_text

    cfg = EncodeTextConfig(
        data=str(data), out=out, llm=llm, layers=layers, max_length=max_length, instruction=instruction,
        chat_template=chat_template, storage=storage, dtype=dtype, device=device, batch_tokens=batch_tokens,
        shard_mb=shard_mb, text_key=text_key, id_key=id_key, input_format=input_format,
        storage_options=_storage_options(storage_options), skip_bad=skip_bad, resume=resume, append=append,
        overwrite=overwrite, estimate=estimate, progress=not no_progress,
    )
    with write_faults_named(out, f"what was written is kept: run the same command with --resume to finish {out}"):
        summary = encode_text(cfg)
    if not summary:
        return
    for problem in summary.get("problems", []):
        typer.secho(f"skipped: {problem}", fg=typer.colors.YELLOW, err=True)
    if "estimate" in summary:
        est = summary["estimate"]
        typer.echo(f"captions           {est['captions']}")
        typer.echo(f"tokens             {est['tokens']} ({est['truncated']} captions truncated at {max_length})")
        typer.echo(f"layers             {len(est['layers'])} x D={est['hidden_size']}: {est['layers']}")
        typer.echo(f"storage            {est['storage']}")
        typer.echo(f"shards             {est['shards']} of {est['tokens_per_shard']} tokens")
        for name, n in est["array_bytes"].items():
            typer.echo(f"{name:<18} {format_bytes(n)} ({n} bytes)")
        typer.echo(f"bytes/value        {est['bytes_per_token_layer_value']:.4f}")
        typer.echo(f"padding efficiency {est['padding_efficiency']:.3f} (real / padded tokens per forward pass)")
        return
    typer.echo(
        f"encoded {summary['encoded_captions_this_run']} captions ({summary['encoded_tokens_this_run']} tokens) "
        f"in {summary['seconds']:.1f}s: {summary['captions_per_s']:.1f} captions/s, {summary['tokens_per_s']:.0f} tokens/s"
        f" on {summary['world_size']} process(es)"
    )
    _echo_shards_before(summary, append)
    typer.echo(f"truncated at --max-length {summary['max_length']}: {summary['truncated']} of {summary['captions']} captions")
    if summary["bad_records"]:
        typer.echo(f"bad records left out: {summary['bad_records']} (see {out}/{BAD_RECORDS_FILE})")
    typer.echo(f"cache: {out} ({format_bytes(summary['bytes'])}, {summary['captions']} captions, {summary['tokens']} tokens)")


@app.command("encode-images")
def encode_images_cmd(
    data: DataArg,
    out: Annotated[str, typer.Option("--out", "-o", help="Latent cache to write (folder or fsspec URL), e.g. data.latents.zarr")],
    vae: Annotated[str, typer.Option("--vae", help="Diffusers autoencoder (hub id[@revision] or local folder), or 'pixel' (exact space-to-depth codec).", show_default=False)],
    vae_subfolder: Annotated[Optional[str], typer.Option("--vae-subfolder", help="Subfolder holding the autoencoder, e.g. vae for a pipeline folder.")] = None,
    resolution: Annotated[int, typer.Option("--resolution", help="Shorter side is resized to this, then center-cropped square (or the pixel count of each bucket).")] = 256,
    buckets: Annotated[str, typer.Option("--buckets", help="none (square crop) | auto[:MAX_ASPECT] (equal-area buckets) | WxH,WxH,...")] = "none",
    image_root: Annotated[Optional[str], typer.Option("--image-root", help="Folder that relative image paths resolve against; images must lie inside it (after .. and symlinks).")] = None,
    allow_outside_root: Annotated[bool, typer.Option("--allow-outside-root", help="Let manifest paths (absolute, .., symlinks) leave --image-root.")] = False,
    background: Annotated[str, typer.Option("--background", help="Color that transparent images are composited on: name, #rrggbb or r,g,b.")] = "white",
    allow_upscale: Annotated[bool, typer.Option("--allow-upscale", help="Upscale images under resolution/4 on a side instead of skipping them.")] = False,
    max_pixels: Annotated[int, typer.Option("--max-pixels", help="Larger images are skipped as decompression bombs.")] = 89_478_485,
    resample: Annotated[str, typer.Option("--resample", help="bicubic | bilinear | lanczos | nearest")] = "bicubic",
    patch_size: Annotated[int, typer.Option("--patch-size", help="Patch of the pixel codec (latent channels 3*p*p).")] = 2,
    dtype: Annotated[str, typer.Option("--dtype", help="Compute (= stored) dtype of the autoencoder: float32, bfloat16 or float16.")] = "float32",
    device: Device = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per autoencoder call.")] = 16,
    workers: Annotated[int, typer.Option("--workers", help="Image decoding processes (-1: one per spare core, at most 8; 0: decode in the main process).")] = -1,
    shard_mb: Annotated[float, typer.Option("--shard-mb", help="Target shard size in MiB (the unit of writing and resuming).")] = 64.0,
    image_key: ImageKey = "image",
    id_key: IdKey = "id",
    input_format: InputFormat = "auto",
    storage_options: StorageOptions = None,
    append: Annotated[bool, typer.Option("--append", help="Add DATA's images to the existing cache --out (same autoencoder and settings; new shards only; run again to continue an interrupted append).")] = False,
    skip_bad: SkipBad = False,
    resume: Resume = False,
    overwrite: Overwrite = False,
    estimate: Estimate = False,
    no_progress: NoProgress = False,
) -> None:
    """Run the frozen autoencoder once over every image and store its posterior (or exact latent).

    Unusable images (missing, empty, not an image, truncated, too small, decompression bombs) are
    reported in CACHE/skipped.jsonl and on the console, and left out.

    Examples:

      semroute encode-images data.jsonl --vae pixel --resolution 64 --out data.latents.zarr

      semroute encode-images 'shards/data-{000000..000127}.tar' --vae pixel --resolution 64 --out data.latents.zarr

      semroute encode-images table.parquet --image-key jpg --id-key key --vae pixel --out data.latents.zarr

      semroute encode-images data.jsonl --vae black-forest-labs/FLUX.1-dev --vae-subfolder vae --image-root imgs/ --out data.latents.zarr --estimate

      accelerate launch --num_processes 8 cli.py encode-images data.jsonl --vae ./sd3/vae --buckets auto --out data.latents.zarr --resume
    """
    from semroute.shared.store import format_bytes
    from semroute.stage1_encode.images import EncodeImagesConfig, encode_images

    if batch_size < 1:
        raise SemrouteError(f"--batch-size must be at least 1, not {batch_size}")
    cfg = EncodeImagesConfig(
        data=str(data), out=out, vae=vae, vae_subfolder=vae_subfolder, patch_size=patch_size, resolution=resolution,
        buckets=buckets, image_root=image_root,  # (text: a Path would read '' as the current folder)
        allow_outside_root=allow_outside_root, image_key=image_key, id_key=id_key,
        background=background, allow_upscale=allow_upscale, max_pixels=max_pixels, resample=resample, dtype=dtype,
        device=device, batch_size=batch_size, workers=workers, shard_mb=shard_mb, input_format=input_format,
        storage_options=_storage_options(storage_options), skip_bad=skip_bad, resume=resume, append=append,
        overwrite=overwrite, estimate=estimate, progress=not no_progress,
    )
    with write_faults_named(out, f"what was written is kept: run the same command with --resume to finish {out}"):
        summary = encode_images(cfg)
    if not summary:
        return
    skipped = summary.get("skipped", [])
    for entry in skipped[:50]:
        where = entry["path"] if "sample_id" in entry else f"{entry['path']}:{entry['line']}"
        typer.secho(f"skipped: {where}: {entry.get('status', 'bad record')}: {entry['reason']}", fg=typer.colors.YELLOW, err=True)
    if len(skipped) > 50:
        typer.secho(f"... and {len(skipped) - 50} more", fg=typer.colors.YELLOW, err=True)
    if "estimate" in summary:
        est = summary["estimate"]
        typer.echo(f"records            {est['records']}")
        typer.echo(f"images             {est['images']} (skipped before decoding: {est['skipped_before_decoding'] or 'none'})")
        typer.echo(f"stores             {est['stores']}")
        for name, b in est["buckets"].items():
            typer.echo(f"bucket {name:<11} {b['images']} images, latent {b['latent_shape']}, {b['shards']} shards of {b['images_per_shard']}")
        typer.echo(f"arrays             {format_bytes(est['bytes_total_arrays'])} ({est['bytes_total_arrays']} bytes)")
        typer.echo(f"bytes/image        {est['bytes_per_image']:.1f} (raw latent {est['raw_latent_bytes_per_image']:.1f} per array)")
        return
    typer.echo(f"encoded {summary['encoded_this_run']} images in {summary['seconds']:.1f}s: "
               f"{summary['images_per_s']:.1f} images/s on {summary['world_size']} process(es)")
    _echo_shards_before(summary, append)
    typer.echo(f"images: {summary['n_encoded']} encoded, {summary['n_skipped_images']} skipped"
               + (f", {summary['n_bad_records']} bad manifest records" if summary["n_bad_records"] else "")
               + (f" (see {out}/skipped.jsonl)" if skipped else ""))
    typer.echo(f"cache: {out} ({format_bytes(summary['bytes'])})")


# -- options of `train` that set a TrainConfig field: `lr: Field["lr"] = None` is the option --lr, parsed to
# the field's type, its help the field's docstring; None when not given (the config file's value or the default stays)
class _FieldOptions:
    DECLS = {"out": ("--out", "-o"), "compile": ("--compile/--no-compile",)}  # else --name-with-dashes

    def __getitem__(self, name: str) -> object:
        from semroute.stage2_train.config import TrainConfig

        default = TrainConfig.default(name)
        shown = f" (default: {default})" if default not in (None, "") and default is not False else ""  # 0 == False
        return Annotated[Optional[TrainConfig.option_type(name)],
                         typer.Option(*self._decls(name), help=field_help(name) + shown, show_default=False)]

    def _decls(self, name: str) -> tuple[str, ...]:
        return self.DECLS.get(name, ("--" + name.replace("_", "-"),))

    def flag(self, name: str) -> str:
        """The option of field ``name`` as typed (``--batch-size``), for errors to name it."""
        return self._decls(name)[0].split("/")[0]


Field = _FieldOptions()


@app.command("train")
def train_cmd(
    text_cache: Field["text_cache"] = None,
    latent_cache: Field["latent_cache"] = None,
    fusion: Field["fusion"] = None,
    config: Annotated[Optional[str], typer.Option("--config", help="A YAML file, or the name of one under configs/: " + ", ".join(config_names()) + ". Flags override it.")] = None,
    preset: Field["preset"] = None,
    out: Field["out"] = None,
    max_steps: Field["max_steps"] = None,
    max_minutes: Field["max_minutes"] = None,
    batch_size: Field["batch_size"] = None,
    lr: Field["lr"] = None,
    num_workers: Field["num_workers"] = None,
    compile_: Field["compile"] = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="'latest' or a checkpoint folder.", show_default=False)] = None,
    holdout: Field["holdout"] = None,
    validate_every: Field["validate_every"] = None,
    report_to: Field["report_to"] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override any config key (YAML value), repeatable: --set ema=true --set model.adaln=true.")] = None,
    allow_new_data: Field["allow_new_data"] = None,
    cache_dir: Field["cache_dir"] = None,
    cache_size: Field["cache_size"] = None,
    shuffle: Field["shuffle"] = None,
    storage_options: StorageOptions = None,
    no_progress: NoProgress = False,
) -> None:
    """Train the DiT and its routing gates from the two caches (the LLM never runs).

    Ctrl-C or SIGTERM stops with a checkpoint (exit 130 or 143); --resume latest goes on from it.

    Examples:

      semroute train --text-cache data.text.zarr --latent-cache data.latents.zarr --fusion depth --out runs/depth

      semroute train --config joint --text-cache t.zarr --latent-cache l.zarr --set lr=2e-4 --set ema=true

      semroute train --config paper/depth-wise --text-cache t.zarr --latent-cache l.zarr   (the reference's run)

      semroute train --out runs/depth --resume latest     (continue a run with its saved config)

      semroute train --text-cache t.zarr --latent-cache l.zarr --fusion depth --preset paper --compile   (GPU)

      semroute train --text-cache s3://bkt/d.text.zarr --latent-cache s3://bkt/d.latents.zarr --cache-dir /scratch/shards --cache-size 200G --shuffle shards

      semroute train --text-cache t.zarr --latent-cache l.zarr --holdout 256 --validate-every 500 --report-to wandb

      accelerate launch --num_processes 8 cli.py train --text-cache t.zarr --latent-cache l.zarr --fusion depth --preset paper
    """
    from semroute.shared.distributed import process_info
    from semroute.stage2_train.config import TrainConfig
    from semroute.stage2_train.run_folder import RunFolder
    from semroute.stage2_train.train import train

    config_file = config  # '' reaches TrainConfig.build, which refuses it (it is not "no --config")
    if resume and config_file is None and out and RunFolder.is_run(out):
        # a resumed run keeps the config its checkpoint was trained with unless told otherwise
        run = RunFolder(out)
        config_file = str(run.config_file(run.resolve_resume(resume)))
    fields = dict(
        text_cache=text_cache, latent_cache=latent_cache, fusion=fusion, preset=preset, out=out, max_steps=max_steps,
        max_minutes=max_minutes, batch_size=batch_size, lr=lr, num_workers=num_workers, compile=compile_,
        holdout=holdout, validate_every=validate_every, report_to=report_to, allow_new_data=allow_new_data,
        cache_dir=cache_dir, cache_size=cache_size, shuffle=shuffle, storage_options=_storage_options(storage_options))
    cfg = TrainConfig.build(config_file=config_file, overrides=set_ or [], flags={k: Field.flag(k) for k in fields},
                            **fields)
    summary = train(cfg, resume=resume, progress=not no_progress)
    last = summary["last"]
    if process_info().is_main:  # (every process has the same summary)
        if last:
            typer.echo(f"step {summary['step']}: loss {last['loss']:.4f}, {last['samples_per_s']:.1f} samples/s, "
                       f"{summary['train_seconds']:.0f}s of training")
        typer.echo(f"checkpoint: {summary['checkpoint']}")
    if summary["stopped_by"]:  # (Ctrl-C, a scheduler's SIGTERM): the exit status says so, as a shell expects
        import signal

        if process_info().is_main:
            typer.echo(f"stopped by {summary['stopped_by']} at step {summary['step']}: continue with --resume "
                       "latest", err=True)
        raise typer.Exit(128 + signal.Signals[summary["stopped_by"]])


def _interval(text: str | None) -> tuple[str, ...] | None:
    """``--guidance-interval LO,HI`` split (the pipeline checks the numbers)."""
    return None if text is None else tuple(v.strip() for v in text.split(","))


@app.command("sample")
def sample_cmd(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c", help="A run folder, a checkpoint folder or an exported pipeline.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder.")],  # str: '' is refused, not read as '.'
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A prompt (repeatable).")] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="Prompt file: text lines, JSONL with 'prompt', GenEval metadata, GenAI-Bench json, DrawBench tsv/json.")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="Override the detected prompt-file format (text, jsonl, geneval, genaibench, drawbench, drawbench_json).")] = None,
    n: Annotated[int, typer.Option("--n", help="Images per prompt.")] = 1,
    steps: Annotated[Optional[int], typer.Option("--steps", help=f"Euler flow-matching steps (default: the run's sample_steps, {DEFAULT_SAMPLE_STEPS} unless its config sets it).", show_default=False)] = None,
    guidance: Annotated[Optional[float], typer.Option("--guidance", help=f"Classifier-free guidance scale w (1 = none, 0 = unconditional: the null caption alone) (default: the run's sample_guidance, {DEFAULT_GUIDANCE} unless its config sets it).", show_default=False)] = None,
    guidance_interval: Annotated[Optional[str], typer.Option("--guidance-interval", metavar="LO,HI", help="Guide only the steps whose sigma is in [LO, HI] (1 = noise, 0 = image), e.g. 0.3,0.8; elsewhere the conditional prediction alone, at half the cost (default: every step).", show_default=False)] = None,
    resolution: Annotated[Optional[int], typer.Option("--resolution", help="Image side in pixels (default: the training resolution).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Image k of prompt i uses seed + i*n + k.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 8,
    ema: Annotated[bool, typer.Option("--ema", help="Use the run's EMA weights.")] = False,
    llm: Annotated[Optional[str], typer.Option("--llm", help="Load the LLM from here instead of the recorded reference (same weights required).")] = None,
    device: Device = "auto",
    no_progress: NoProgress = False,
) -> None:
    """Generate images; with a benchmark prompt file, in the layout its scorer reads. Resumable.

    Examples:

      semroute sample -c runs/depth -p "a red circle to the left of a blue square" --n 4 -o samples/

      semroute sample -c runs/depth --prompts prompts.txt --guidance 4 --guidance-interval 0.3,0.8 -o samples/

      semroute sample -c pipelines/depth --prompts evaluation_metadata.jsonl --n 4 -o geneval/

      accelerate launch --num_processes 8 cli.py sample -c runs/depth --prompts genai_image.json -o genai/
    """
    from semroute.stage2_train.sampling import SampleConfig, sample

    cfg = SampleConfig(checkpoint=str(checkpoint), out=out, prompts=list(prompt or []),
                       prompts_file=str(prompts) if prompts else None, format=fmt, n=n, steps=steps,
                       guidance=guidance, guidance_interval=_interval(guidance_interval), resolution=resolution,
                       seed=seed, batch_size=batch_size, ema=ema, llm=llm,
                       device=device, progress=not no_progress)
    summary = sample(cfg)
    if summary["images_written"] or summary["grid"]:
        typer.echo(f"wrote {summary['images_written']} images for {summary['prompts']} prompts ({summary['format']} layout) "
                   f"to {out} in {summary['seconds']:.1f}s; {summary['skipped_prompts_done']} prompts were already done")
    if summary["grid"]:
        typer.echo(f"grid: {summary['grid']}")


@app.command("export")
def export_cmd(
    run: Annotated[Path, typer.Argument(help="A training run folder, or one of its checkpoint folders.", show_default=False)],
    out: Annotated[str, typer.Option("--out", "-o", help="Folder to write the pipeline to.")],
    ema: Annotated[bool, typer.Option("--ema", help="Export the EMA weights.")] = False,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="A specific checkpoint folder (default: the newest).")] = None,
    llm: Annotated[Optional[str], typer.Option("--llm", help="Load the LLM from here instead of the recorded reference (same weights required); the export then names this one.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier export in --out (any other existing folder is refused).")] = False,
) -> None:
    """Write a diffusers-style pipeline folder that `from_pretrained` loads with only the folder and the LLM it names.

    Example:  semroute export runs/depth --out pipelines/depth --ema
    """
    from semroute.stage2_train.pipeline import export_pipeline

    pipe = export_pipeline(run, out, ema=ema, checkpoint=checkpoint, llm=llm, overwrite=overwrite)
    typer.echo(f"exported {run} ({'EMA' if ema else 'raw'} weights) to {out}; LLM: {pipe.text_settings['llm_ref']}")


@app.command("routing")
def routing_cmd(
    run: Annotated[Path, typer.Argument(help="A run folder, a checkpoint folder or an exported pipeline.", show_default=False)],
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Folder for routing.png and routing.csv (default: RUN/routing).")] = None,
    ema: Annotated[bool, typer.Option("--ema", help="Use the EMA weights.")] = False,
) -> None:
    """Plot the routing weights (blocks x LLM layers; over sigma for time-wise/joint gates) and write them as CSV.

    Example:  semroute routing runs/depth
    """
    from semroute.stage2_train.routing import save_routing
    from semroute.stage2_train.run_folder import (CHECKPOINT, EXPORT, open_model, refuse_output_inside_model,
                                                  refuse_url_output, resolve_model_source)

    if out is not None:
        refuse_url_output(out, "--out")  # (typed as text: a Path would have made s3://b/x the folder s3:/b/x)
    target = resolve_model_source(out) if out is not None else None
    if target is not None and target.kind in (CHECKPOINT, EXPORT):
        # its complete.json lists its own routing.png/csv: rewritten, the checkpoint would read as damaged
        raise SemrouteError(f"--out {out} is a checkpoint or an exported pipeline, whose files routing does not "
                            "write over: pass another folder (or no --out: RUN/routing)")
    if out is not None:
        refuse_output_inside_model(out, "--out")  # a folder inside one: pruned with it, or unlisted in it
    model, where = open_model(run, ema=ema)
    name = "routing"
    if out is None:
        # Never into the checkpoint or pipeline read: their complete.json lists their files. A run's (or its
        # checkpoint's) plot goes to RUN/routing/, named after the checkpoint.
        source = resolve_model_source(run)
        if source.run is None:
            raise SemrouteError(f"{run} is not a run folder or one of its checkpoints (an exported pipeline, say), "
                                "which routing does not write into: pass --out FOLDER")
        out, name = source.run.routing_dir, where + ("-ema" if ema else "")
    png, csv_path = save_routing(model, Path(out), name, title=f"{model.config.fusion}: {where}{' (EMA)' if ema else ''}")
    typer.echo(f"wrote {png} and {csv_path}")


_DEMO = DemoConfig()  # the demo's defaults, owned by DemoConfig


@app.command("demo")
def demo_cmd(
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder (data, caches, run, samples, report).")] = _DEMO.out,
    images: Annotated[int, typer.Option("--images", help="Training images to generate.")] = _DEMO.images,
    tag_weights: Annotated[str, typer.Option("--tag-weights", metavar="TAG=W,...", help="Extra shares of GenEval tags in the training images (others weigh 1); '' for equal shares.")] = _DEMO.tag_weights,
    heldout: Annotated[int, typer.Option("--heldout", help="Held-out prompts to sample and score.")] = _DEMO.heldout,
    train_minutes: Annotated[float, typer.Option("--train-minutes", help="Training time budget.")] = _DEMO.train_minutes,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Training steps cap (whichever comes first).")] = _DEMO.max_steps,
    fusion: Annotated[str, typer.Option("--fusion", help="Routing strategy to train.")] = _DEMO.fusion,
    preset: Annotated[str, typer.Option("--preset", help="DiT size.")] = _DEMO.preset,
    llm: Annotated[str, typer.Option("--llm", help="LLM for the captions.")] = _DEMO.llm,
    samples_per_prompt: Annotated[int, typer.Option("--samples-per-prompt", help="Images per held-out prompt.")] = _DEMO.samples_per_prompt,
    steps: Annotated[int, typer.Option("--steps", help="Sampling steps.")] = _DEMO.sample_steps,
    guidance: Annotated[float, typer.Option("--guidance", help="Classifier-free guidance of the samples.")] = _DEMO.guidance,
    guidance_interval: Annotated[str, typer.Option("--guidance-interval", metavar="LO,HI", help="Guide only where sigma is in [LO, HI]; 'none': every step.")] = ",".join(f"{v:g}" for v in _DEMO.guidance_interval or ()) or "none",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Training batch size (over all processes).")] = _DEMO.batch_size,
    processes: Annotated[int, typer.Option("--processes", help="Training processes; 0: two on a CPU with 2+ cores, else one.")] = _DEMO.processes,
    seed: Annotated[int, typer.Option("--seed")] = _DEMO.seed,
    no_progress: NoProgress = False,
) -> None:
    """Run everything on synthetic colored shapes: generate, encode with SmolLM2 + pixel codec, train the
    depth-wise gates, sample held-out prompts, plot the routing, and score the samples per GenEval tag.

    About 12 minutes on a 2-core CPU with the defaults. A quick smoke run:

      semroute demo --images 120 --heldout 12 --train-minutes 0.5 --samples-per-prompt 1 --steps 4
    """
    from semroute.demo import run_demo
    from semroute.shared.checks import check_guidance_interval

    interval = None if guidance_interval.strip().lower() == "none" else check_guidance_interval(_interval(guidance_interval))
    run_demo(DemoConfig(out=out, images=images, tag_weights=tag_weights, heldout=heldout, train_minutes=train_minutes,
                        max_steps=max_steps, fusion=fusion, preset=preset, llm=llm,
                        samples_per_prompt=samples_per_prompt, sample_steps=steps, guidance=guidance,
                        guidance_interval=interval, batch_size=batch_size, processes=processes, seed=seed,
                        progress=not no_progress))


@app.command("report")
def report_cmd(
    runs: Annotated[list[Path], typer.Argument(help="One or more training run folders.", show_default=False)],
    out: Annotated[str, typer.Option("--out", "-o", help="HTML file to write.")] = "report.html",
    title: Annotated[str, typer.Option("--title", help="Page title.")] = "semroute runs",
) -> None:
    """Write one self-contained HTML page (no server, no network): loss and validation-loss curves, routing
    heatmaps and sample grids over training, the resolved config and both caches' fingerprints. With several
    runs, their curves are overlaid and a table compares final validation losses (and checker scores).

    Examples:

      semroute report runs/depth --out depth.html

      semroute report runs/depth runs/static runs/penultimate --out strategies.html
    """
    from semroute.stage2_train.report import write_report
    from semroute.stage2_train.run_folder import refuse_output_inside_model

    refuse_output_inside_model(out, "--out")
    path = write_report([str(r) for r in runs], out, title=title)
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) for {len(runs)} run(s)")


@app.command("info")
def info_cmd(
    path: Annotated[str, typer.Argument(help="A text or latent cache, or a run folder.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print everything as JSON.")] = False,
    storage_options: StorageOptions = None,
) -> None:
    """Describe a cache or run: what made it, its size, completeness, and (fp8) its measured error.

    Example:  semroute info data.text.zarr      semroute info s3://bucket/data.text.zarr
    """
    _storage_options(storage_options)
    from semroute.shared.inspect import describe
    from semroute.shared.remote import is_url
    from semroute.stage2_train.run_folder import RUN, resolve_model_source

    source = None if is_url(path) else resolve_model_source(path)
    if source is not None and source.kind == RUN:
        from semroute.stage2_train.run_info import describe_run

        info = describe_run(path)
    else:
        info = describe(path)
    if as_json:
        _print_json(info)
        return
    for key, value in info.items():
        if isinstance(value, dict):
            typer.echo(f"{key}:")
            for k, v in value.items():
                typer.echo(f"  {k:<26} {v}")
        else:
            typer.echo(f"{key:<28} {value}")


@app.command("verify")
def verify_cmd(
    path: Annotated[str, typer.Argument(help="A text or latent cache (folder or s3:// URL).", show_default=False)],
    storage_options: StorageOptions = None,
) -> None:
    """Check every byte a reader relies on: each chunk's crc32c and shard index, the done flags, the small
    arrays, index.parquet and the attributes (against the sha256s sealed when the cache was finished), and
    the index against the arrays. Each problem names its file and what to do.

    Example:  semroute verify data.text.zarr      semroute verify s3://bucket/data.text.zarr
    """
    _storage_options(storage_options)
    from semroute.shared.inspect import verify

    checked, problems, notes = verify(path)
    for note in notes:
        typer.echo(f"note {note}")
    for problem in problems:
        typer.secho(f"BAD  {problem}", fg=typer.colors.RED)
    if problems:
        raise SemrouteError(f"{path}: {len(problems)} problem(s) found ({checked} chunks and files were readable)")
    typer.echo(f"OK   {path}: {checked} chunks and files, all checksums match")


def main() -> None:
    """Entry point: run the app; known errors print one message and exit 1. A command that finished under several
    processes ends its process without freeing the process group (``end_process``: that can hang)."""
    from semroute.shared.processes import end_process

    try:
        app()
        end_process()
    except SystemExit as done:
        # (128 + a signal's number: train stopped by Ctrl-C or SIGTERM, its checkpoint written: finished too)
        if done.code in (0, None) or (isinstance(done.code, int) and done.code > 128):
            end_process(done.code or 0)
        raise
    except SemrouteError as err:
        if os.environ.get("SEMROUTE_TRACEBACK"):
            raise
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(1)
    except OSError as err:  # a path the user named: in the way, missing, not allowed (else the traceback)
        message = describe_path_error(err)
        if message is None or os.environ.get("SEMROUTE_TRACEBACK"):
            raise
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
