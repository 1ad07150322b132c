"""``semroute demo``: the whole method end to end on synthetic shapes, in minutes on a CPU.

1. Generate colored-shape images with GenEval-style captions (``shared/shapes.py``).
2. Stage one, once: encode the captions with SmolLM2 (all 30 layers) and the images with the exact
   pixel codec.
3. Stage two: train the ``depth`` strategy (one softmax over LLM layers per DiT block) with a narrow
   4-block DiT for a bounded time, from the caches only, validating on held-out samples (loss on a
   fixed noise grid and sample grids in ``run-depth/samples/``) as it goes.
4. Sample held-out prompts in GenEval's layout, plot the routing weights, and score the samples with
   the built-in shape checker (accuracy per GenEval tag), next to the checker's score on ground-truth
   images of the same prompts; write ``report.html`` (curves, routing and samples over training).

Each step reuses what an earlier run of the demo already wrote in the output folder; the folder records
the settings it was made with (``demo_settings.json``) and a rerun with other settings is refused, so that
nothing of one set of settings is reported as another's.
The strategy comparison benchmark (``bench/bench_strategies.py``) runs steps 3-4 once per strategy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from semroute.shared.errors import SemrouteError
from semroute.shared.files import write_atomic

# torch and numpy are imported where used: the CLI reads DemoConfig's defaults for `semroute demo --help`.


@dataclass
class DemoConfig:
    out: str = "demo_out"
    images: int = 1800
    """Training images (GenEval tags in turn, as ``tag_weights`` says)."""
    tag_weights: str = "single_object=2,colors=2"
    """Extra shares of some tags in the training images, ``TAG=W,...`` (the rest weigh 1; ``shared/shapes.py``'s
    ``tag_cycle``). One-object scenes twice as often as each other kind (25% single objects, 25% colors): on
    seed 0 at 2000 steps that lifted single objects from 0.600 to 0.775 and colors from 0.525 to 0.775, the
    other tags no lower beyond noise; over three seeds the whole demo then scored single 0.700 +- 0.156,
    colors 0.633 +- 0.151 (bench/RESULTS.md, "fourth round"). The held-out prompts keep equal shares."""
    size: int = 32
    heldout: int = 60
    """Held-out prompts to sample and score (10 per tag)."""
    samples_per_prompt: int = 4
    fusion: str = "depth"
    preset: str = "small"
    # The DiT for a CPU budget of minutes: narrower and shallower than the `small` preset, so that many
    # more optimizer steps fit (bench/RESULTS.md, "Watching a run and the demo recipe"). 0 keeps the preset's value.
    width: int = 128
    """hidden_size (heads of 64, half as many KV heads, SwiGLU 3x width)."""
    blocks: int = 4
    adaln: bool = True
    """A timestep input (adaLN-Zero). The reference DiT has none; the demo's recipe uses one (bench/RESULTS.md)."""
    proj_out_std: float = 0.02
    """The output projection starts N(0, 0.02) instead of zero (the reference): a zero projection passes no
    gradient into the blocks until it has grown, a ~100-step plateau of a short run (bench/RESULTS.md)."""
    llm: str = "smollm2"
    train_minutes: float = 9.0
    max_steps: int = 100_000
    batch_size: int = 32
    """The global batch: split evenly over the training processes."""
    processes: int = 0
    """Training processes. 0: two on a CPU with two or more cores (the demo's DiT is too small for a second
    thread to speed up one process, while two one-thread processes train 1.7x faster: bench/RESULTS.md), one
    otherwise (a GPU, or one core)."""
    # Short-budget settings (the reference trains for days): a larger lr (2e-3 reached a lower validation
    # loss than 1e-3 at equal steps, bench/RESULTS.md), routing gates at 10x it so
    # they visibly move within minutes, and shift 1.0, which spends more of the few steps on the low
    # noise levels that clean up 32-pixel images (with 3.0 the samples kept visible speckle noise).
    lr: float = 2e-3
    fusion_lr_scale: float = 10.0
    shift: float = 1.0
    warmup_steps: int = 20
    ema: bool = True
    ema_decay: float = 0.995
    holdout: int = 32
    """Training samples kept out for the validation loss and the sample grids during training."""
    validate_every: int = 250
    """Steps between validations (and checkpoints): one validation costs about 10 training steps here
    (bench/RESULTS.md), so this keeps it under ~5% of the training time."""
    sample_steps: int = 50
    guidance: float = 3.0
    """Classifier-free guidance of the demo's samples, applied only within ``guidance_interval``. Guidance at
    every step (6, the pipeline's default) empties many single-object samples of this small model: the
    unconditional prediction holds more objects than "a photo of a triangle", and guidance pushes away from
    it (bench/RESULTS.md)."""
    guidance_interval: tuple[float, float] | None = (0.3, 0.8)
    """Sigmas between which the samples are guided; the conditional prediction alone elsewhere."""
    seed: int = 0
    num_workers: int = 1
    progress: bool = True


SETTINGS_FILE = "demo_settings.json"
# The `semroute demo` option of each setting that has one (declared in cli.py's demo_cmd), for errors to name a
# setting as the user gave it; the other settings are the demo's recipe, named by their key.
OPTIONS = {key: "--" + key.replace("_", "-") for key in (
    "out", "images", "tag_weights", "heldout", "train_minutes", "max_steps", "fusion", "preset", "llm",
    "samples_per_prompt", "guidance", "guidance_interval", "batch_size", "processes", "seed",
)} | {"sample_steps": "--steps"}
# Settings that change nothing the folder holds.
_NOT_RECORDED = ("out", "progress", "num_workers")


def recorded_settings(cfg: DemoConfig) -> dict:
    """The settings a demo folder's data, caches, run and samples depend on, as JSON values."""
    return json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k not in _NOT_RECORDED}))


def claim_folder(cfg: DemoConfig) -> None:
    """Refuse to reuse a demo folder made with other settings; record the settings in a new one.

    Every step reuses what the folder already holds (the images, both caches, the trained run, the samples),
    so a rerun with another ``--seed``, ``--images``, ``--tag-weights``, ... would otherwise report the old
    settings' results as the new ones'."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SemrouteError(f"--out {out} is a file; the demo writes a folder there (data, caches, run, samples)")
    path = out / SETTINGS_FILE
    now = recorded_settings(cfg)
    if path.exists():
        try:
            before = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise SemrouteError(f"{path}: cannot read the demo's settings ({err}); delete {out} to start over, "
                                "or use another --out") from None
        changed = [f"{OPTIONS.get(k, k)} {json.dumps(before.get(k))} (now {json.dumps(v)})"
                   for k, v in now.items() if before.get(k) != v]
        if changed:
            raise SemrouteError(
                f"{out} holds a demo made with other settings: {'; '.join(changed)}. Its data, caches, run and "
                f"samples belong to those settings. Rerun with them to reuse it, use another --out, or delete {out} "
                "to start over.")
        return
    made = [name for name in ("data/train.jsonl", "captions.text.zarr", "images.latents.zarr") if (out / name).exists()]
    if made:
        raise SemrouteError(f"{out} holds a demo ({', '.join(made)}) without a record of its settings ({SETTINGS_FILE}: "
                            f"an earlier semroute did not write one), so reusing it could report other settings' "
                            f"results as these. Use another --out, or delete {out} to start over.")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(now, indent=2) + "\n")


def held_out(cfg: DemoConfig) -> int:
    """Images the training keeps out for validation: ``holdout``, at most an eighth of ``images`` (the check
    that the rest fills a batch and the training config both use this)."""
    return min(cfg.holdout, cfg.images // 8)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _complete(cache: Path) -> bool:
    if not (cache / "zarr.json").exists():
        return False
    from semroute.shared.store import read_attrs

    try:
        return bool(read_attrs(cache).get("complete"))
    except SemrouteError:
        return False


def prepare_data(cfg: DemoConfig, llm=None) -> dict:
    """Steps 1-2: data set, held-out prompts and both caches (skipped when already there)."""
    from semroute.shared import shapes
    from semroute.stage1_encode.images import EncodeImagesConfig, encode_images
    from semroute.stage1_encode.text import EncodeTextConfig, encode_text

    out = Path(cfg.out)
    data = out / "data"
    manifest = data / "train.jsonl"
    if not manifest.exists():
        _say(f"generating {cfg.images} training images of {cfg.size}x{cfg.size} shapes ...")
        manifest = shapes.generate_dataset(data, cfg.images, size=cfg.size, seed=cfg.seed, split="train",
                                           tag_weights=parse_tag_weights(cfg.tag_weights))
    prompts = shapes.write_prompt_file(shapes.heldout_prompts(cfg.heldout, seed=cfg.seed), out / "heldout_prompts.jsonl")
    truth = _ground_truth(cfg, out / "heldout_truth")

    text_cache, latent_cache = out / "captions.text.zarr", out / "images.latents.zarr"
    if not _complete(text_cache):
        llm = llm or _load_llm(cfg)
        on_cpu = llm.device.type == "cpu"
        _say(f"encoding captions with {cfg.llm} ({llm.num_hidden_layers} layers, "
             f"{'float32 compute, bf16 storage' if on_cpu else 'bf16'}) ...")
        encode_text(EncodeTextConfig(data=str(manifest), out=str(text_cache), llm=cfg.llm, layers="all",
                                     dtype=str(llm.dtype).removeprefix("torch."),
                                     storage="bf16" if on_cpu else "exact", resume=True, progress=cfg.progress),
                    llm=llm)
    if not _complete(latent_cache):
        _say("encoding images with the pixel codec ...")
        encode_images(EncodeImagesConfig(data=str(manifest), out=str(latent_cache), vae="pixel", resolution=cfg.size,
                                         resume=True, workers=0, progress=cfg.progress))
    return {"manifest": manifest, "prompts": prompts, "truth": truth, "text_cache": text_cache,
            "latent_cache": latent_cache, "llm": llm}


def parse_tag_weights(text: str) -> dict[str, int]:
    """``"single_object=2,colors=2"`` -> ``{"single_object": 2, "colors": 2}``."""
    from semroute.shared import shapes

    out: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        tag, eq, weight = item.partition("=")
        if not eq or not weight.strip().isdigit():
            raise SemrouteError(f"--tag-weights: {item!r} is not TAG=WHOLE_NUMBER (e.g. single_object=2)")
        out[tag.strip()] = int(weight)
    try:
        shapes.tag_cycle(out)
    except ValueError as err:
        raise SemrouteError(f"--tag-weights: {err}") from None
    return out


def _load_llm(cfg: DemoConfig):
    from semroute.shared.llm import load_llm

    # CPUs run bf16 matmuls several times slower than float32; the cache then stores bf16 (same bytes).
    import torch

    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    _say(f"loading {cfg.llm} ...")
    return load_llm(cfg.llm, device="auto", dtype=dtype)


def _ground_truth(cfg: DemoConfig, folder: Path) -> Path:
    """The held-out prompts drawn by the data generator, in GenEval's layout: the checker's ceiling."""
    import numpy as np

    from semroute.shared import shapes
    from semroute.stage2_train.prompt_files import layout_for, read_prompts, save_image

    prompts = read_prompts(Path(cfg.out) / "heldout_prompts.jsonl", "geneval")
    layout = layout_for("geneval", folder, n_per_prompt=1)
    for entry in layout.pending(prompts):
        rng = np.random.default_rng([cfg.seed, 7, entry.index])
        image = shapes.render(shapes.layout_scene(entry.record, cfg.size, rng), cfg.size)
        layout.prepare(entry)
        save_image(image, layout.image_path(entry, 0))
    return folder


def train_strategy(cfg: DemoConfig, data: dict, fusion: str, run_dir: Path) -> dict:
    """Step 3: train one strategy from the caches for the configured budget."""
    from semroute.stage2_train.config import TrainConfig
    from semroute.stage2_train.run_folder import RunFolder
    from semroute.stage2_train.train import Trainer

    done = trained_marker(run_dir)
    if done.exists():
        from semroute.shared.checks import read_json_object

        trained = read_json_object(done, f"delete it: the demo then resumes {run_dir} from its newest checkpoint")
        _say(f"{run_dir} is already trained ({trained['step']} steps); reusing it")
        return trained
    # A checkpoint without the marker: a training that stopped before its budget was spent (a crash, Ctrl-C).
    # "latest" also for a run that stopped before its first checkpoint: it starts again at step 0 (train
    # refuses to write a new run over one already in its folder).
    resume = "latest" if RunFolder(run_dir).holds_work() else None
    if RunFolder(run_dir).latest_checkpoint() is not None:
        _say(f"{run_dir} stopped at step {_trained(run_dir)['step']} before its budget was spent; resuming it")
    processes = training_processes(cfg)
    tcfg = TrainConfig(
        text_cache=str(data["text_cache"]), latent_cache=str(data["latent_cache"]), out=str(run_dir), fusion=fusion,
        preset=cfg.preset, model=model_overrides(cfg), lr=cfg.lr, lr_schedule="warmup",
        warmup_steps=cfg.warmup_steps, fusion_lr_scale=cfg.fusion_lr_scale, shift=cfg.shift,
        max_steps=cfg.max_steps, max_minutes=cfg.train_minutes, batch_size=cfg.batch_size // processes,
        # A checkpoint (hence a routing heatmap) at each validation, for the report's routing over training.
        checkpoint_every=cfg.validate_every, keep_checkpoints=1, log_every=20, seed=cfg.seed,
        num_workers=cfg.num_workers, ema=cfg.ema, ema_decay=cfg.ema_decay, report_to="tensorboard",
        holdout=held_out(cfg), validate_every=cfg.validate_every, val_guidance=cfg.guidance,
        val_guidance_interval=list(cfg.guidance_interval) if cfg.guidance_interval else None,
    )
    size = f"{cfg.blocks or 'preset'} blocks x {cfg.width or 'preset'} wide"
    size += f", {processes} processes" if processes > 1 else ""
    _say(f"training {fusion} ({cfg.preset} preset, {size}) for up to {cfg.train_minutes:g} minutes ...")
    extras = (["a timestep input (adaLN-Zero)"] if cfg.adaln else []) + (
        [f"an output projection initialised N(0, {cfg.proj_out_std:g}) instead of zero"] if cfg.proj_out_std else [])
    if extras:
        _say(f"note: this DiT gets {' and '.join(extras)}, which the reference DiT does not have; the demo's "
             "short-budget recipe uses them (bench/RESULTS.md, 'Watching a run and the demo recipe')")
    if processes == 1:
        trained = Trainer(tcfg, resume=resume, progress=cfg.progress).train()
        if trained["stopped_by"]:  # (Ctrl-C: shared/interrupts.py) not the budget: no marker
            raise SemrouteError(f"training stopped by {trained['stopped_by']} at step {trained['step']}, its checkpoint "
                                "written; rerun the same command to go on")
    else:
        launch_training(tcfg, processes, Path(cfg.out) / f"{run_dir.name}.train.yaml", cfg.progress, resume=resume)
        trained = _trained(run_dir)
    trained = {k: trained[k] for k in ("step", "train_seconds", "validation_seconds")}
    write_atomic(done, json.dumps(trained) + "\n")
    return trained


def trained_marker(run_dir: Path) -> Path:
    """Written beside the run folder when its training has spent its budget: a rerun reuses the run."""
    return run_dir.parent / f"{run_dir.name}.trained.json"


def _trained(run_dir: Path) -> dict:
    """Steps and seconds of a finished run, from its latest checkpoint."""
    from semroute.stage2_train.run_folder import RunFolder

    done = RunFolder.train_state(RunFolder(run_dir).newest_intact())  # a damaged newer one is passed over
    return {"step": done["step"], "train_seconds": done["train_seconds"],
            "validation_seconds": done.get("validation_seconds", 0.0)}


def training_processes(cfg: DemoConfig) -> int:
    """``cfg.processes``, or the automatic choice; the global batch must split evenly over them."""
    import torch

    if cfg.processes < 0:
        raise SemrouteError(f"--processes must be >= 0 (0: automatic), got {cfg.processes}")
    n = cfg.processes or (2 if not torch.cuda.is_available() and (os.cpu_count() or 1) >= 2 else 1)
    if cfg.batch_size % n:
        raise SemrouteError(f"--processes {n}: the batch size {cfg.batch_size} must split evenly over the processes")
    return n


def launch_training(tcfg, processes: int, config_file: Path, progress: bool, resume: str | None = None) -> None:
    """``semroute train --config FILE`` in ``processes`` one-thread CPU processes (gloo), through accelerate's
    launcher, as a user would start a multi-process run."""
    tcfg.save(config_file)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "0",  # a free port: another run on this machine may hold the default
           # this checkout's cli.py, not whichever `semroute` the interpreter would import by name
           str(Path(__file__).with_name("cli.py")), "train", "--config", str(config_file),
           *([] if progress else ["--no-progress"]),
           *(["--resume", resume] if resume else [])]
    child = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=die_with_parent())
    try:
        code = child.wait()
    except KeyboardInterrupt:
        # The terminal's Ctrl-C reached the training processes too: they stop with a checkpoint (shared/interrupts.py)
        _say("Ctrl-C: waiting for the training processes to write their checkpoint (Ctrl-C again stops at once)")
        try:
            child.wait()
        except KeyboardInterrupt:
            child.kill()
            raise
        raise SemrouteError("training stopped by Ctrl-C, its checkpoint written; rerun the same command to go "
                            "on") from None
    if code:
        raise SemrouteError(f"training in {processes} processes failed (exit {code}; its messages are "
                            f"above); rerun the same command to resume it, or train in this process with "
                            f"`--processes 1` and another --out")


def die_with_parent() -> Callable[[], object] | None:
    """A ``preexec_fn`` that has the kernel SIGTERM the child when this process dies, even by SIGKILL, so that
    the launcher stops its training processes (it passes SIGTERM on) instead of leaving them training unseen
    and holding the run folder's lock against the rerun. Looked up before the fork (only the call runs in the
    child); None (nothing) off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    prctl, sigterm = ctypes.CDLL(None, use_errno=True).prctl, int(signal.SIGTERM)
    return lambda: prctl(1, sigterm)  # PR_SET_PDEATHSIG = 1 (linux/prctl.h)


def model_overrides(cfg: DemoConfig) -> dict:
    """The demo's DiT size on top of its preset."""
    out: dict = {"adaln": cfg.adaln, "proj_out_std": cfg.proj_out_std}
    if cfg.blocks:
        out["num_blocks"] = cfg.blocks
    if cfg.width:
        heads = max(1, cfg.width // 64)
        out.update(hidden_size=cfg.width, num_heads=heads, num_kv_heads=max(1, heads // 2), head_dim=64,
                   mlp_hidden_size=3 * cfg.width)
    return out


def evaluate(cfg: DemoConfig, data: dict, run_dir: Path, out: Path) -> dict:
    """Step 4: sample the held-out prompts from the run, score them, and score the ground truth."""
    from semroute.stage2_train import shape_checker
    from semroute.stage2_train.pipeline import SemroutePipeline
    from semroute.stage2_train.sampling import SampleConfig, sample

    samples = out / "samples"
    pipe = SemroutePipeline.from_run(run_dir, ema=cfg.ema, llm=data.get("llm"), device="auto")
    data["llm"] = pipe.text_encoder.llm  # loaded once, reused by later strategies
    t0 = time.perf_counter()
    sample(SampleConfig(checkpoint=str(run_dir), out=str(samples), prompts_file=str(data["prompts"]), format="geneval",
                        n=cfg.samples_per_prompt, steps=cfg.sample_steps, guidance=cfg.guidance,
                        guidance_interval=cfg.guidance_interval, seed=cfg.seed,
                        batch_size=32, progress=cfg.progress), pipe=pipe)
    sample_seconds = time.perf_counter() - t0
    results = shape_checker.score_folder(samples)
    shape_checker.write_results(results, out / "results.jsonl")
    summary = shape_checker.summarize(results)
    truth = shape_checker.summarize(shape_checker.score_folder(data["truth"]))
    return {"samples": summary, "ground_truth": truth, "sample_seconds": sample_seconds, "samples_dir": str(samples)}


def run_demo(cfg: DemoConfig, llm=None) -> dict:
    """All four steps; ``llm`` may be passed already loaded (tests). Ctrl-C or SIGTERM stops it with one line
    saying that a rerun goes on (the commands it runs in this process then say nothing of their own)."""
    from semroute.shared.interrupts import stoppable

    with stoppable(f"what {cfg.out} holds is kept: run the same command to go on where it stopped"):
        return _run_demo(cfg, llm)


def _run_demo(cfg: DemoConfig, llm=None) -> dict:
    from semroute.stage2_train import shape_checker
    from semroute.stage2_train.report import write_report
    from semroute.stage2_train.run_folder import RunFolder

    if cfg.size % 2:
        raise SemrouteError(f"DemoConfig.size must be even (the pixel codec's patch is 2), got {cfg.size}")
    # Mistakes named before minutes of generating and encoding, not after.
    from semroute.shared.checks import check_number

    if not str(cfg.out).strip():  # Path('') is the current folder: the demo's files would land among the user's
        raise SemrouteError("--out is empty: name the demo's folder (--out . for the current folder)")
    for key, rule in (("images", dict(integer=True, low=1)), ("heldout", dict(integer=True, low=1)),
                      ("samples_per_prompt", dict(integer=True, low=1)), ("sample_steps", dict(integer=True, low=1)),
                      ("batch_size", dict(integer=True, low=1)), ("train_minutes", dict(low=0.0, low_open=True)),
                      ("max_steps", dict(integer=True, low=1)), ("guidance", {}), ("seed", dict(integer=True, low=0))):
        check_number(OPTIONS[key], getattr(cfg, key), **rule)
    from semroute.stage2_train.config import check_preset
    from semroute.stage2_train.models import check_fusion

    check_fusion(cfg.fusion, "--fusion")
    check_preset(cfg.preset, "--preset")
    parse_tag_weights(cfg.tag_weights)
    training_processes(cfg)
    held = held_out(cfg)
    if cfg.images - held < cfg.batch_size:
        raise SemrouteError(f"--images {cfg.images}: {cfg.images - held} training images ({held} held out for "
                            f"validation) cannot fill one batch of {cfg.batch_size}; generate more or lower --batch-size")
    out = Path(cfg.out)
    claim_folder(cfg)
    t0 = time.perf_counter()
    data = prepare_data(cfg, llm=llm)
    data["llm"] = data["llm"] or llm
    prep_seconds = time.perf_counter() - t0
    run_dir = out / f"run-{cfg.fusion}"
    trained = train_strategy(cfg, data, cfg.fusion, run_dir)
    report = evaluate(cfg, data, run_dir, out)
    shutil.copyfile(RunFolder(run_dir).latest_routing("png"), out / "routing.png")
    shutil.copyfile(RunFolder(run_dir).latest_routing("csv"), out / "routing.csv")
    shutil.copyfile(Path(report["samples_dir"]) / "grid.png", out / "grid.png")
    report.update({"config": asdict(cfg), "run_dir": str(run_dir), "train_steps": trained.get("step"),
                   "train_seconds": trained.get("train_seconds"), "validation_seconds": trained.get("validation_seconds"),
                   "prepare_seconds": prep_seconds,
                   "total_seconds": time.perf_counter() - t0})
    write_atomic(out / "report.json", json.dumps(report, indent=2, default=str))
    html = write_report([run_dir], out / "report.html", title=f"semroute demo: {cfg.fusion}")
    val = report["validation_seconds"] or 0.0
    _say(f"trained {report['train_steps']} steps in {report['train_seconds']:.0f}s, of which validation "
         f"{val:.0f}s ({val / max(report['train_seconds'] - val, 1e-9):.1%} of the training time); sampled "
         f"{report['samples']['n_images']} images in {report['sample_seconds']:.0f}s")
    _say("checker on generated samples:\n" + shape_checker.format_summary(report["samples"]))
    _say("checker on ground-truth images of the same prompts:\n" + shape_checker.format_summary(report["ground_truth"]))
    _say(f"grid: {out / 'grid.png'}   routing: {out / 'routing.png'}   report: {html} (and report.json)")
    return report
