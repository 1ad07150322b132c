"""Sampling: a diffusers ``DiffusionPipeline`` holding the frozen LLM (through the same ``TextEncoder``
that wrote the text cache), the DiT with its gates, the VAE or pixel codec, and a
``FlowMatchEulerDiscreteScheduler`` with the training shift.

    pipe = SemroutePipeline.from_run("runs/depth")              # or .from_pretrained("exported/")
    images = pipe(["a red circle left of a blue square"], generator=torch.Generator().manual_seed(0)).images

(``num_inference_steps`` and ``guidance_scale`` default to config.py's ``DEFAULT_SAMPLE_STEPS`` and
``DEFAULT_GUIDANCE``; ``semroute sample`` takes the run's ``sample_steps`` / ``sample_guidance``.)

Folder written by ``save_pretrained`` / ``semroute export``::

    model_index.json          diffusers' index of the components below
    transformer/              the DiT (config.json + safetensors)
    vae/                      the autoencoder, or the pixel codec's config
    scheduler/                FlowMatchEulerDiscreteScheduler config (shift = training shift)
    text/semroute_text.json   how prompts are encoded: LLM reference and fingerprint, instruction, chat
                              template, max length, layers, compute dtype
    text/null.safetensors     the stored null caption's features (guidance and dropout used these)
    complete.json             size and crc32c of every file above (``checkpoint_files``), written last;
                              ``from_pretrained`` refuses a folder whose files no longer match it

``semroute export`` writes the folder under a temporary sibling name and renames it when complete, so a
crash never leaves a half export under the final name.

The LLM's weights are not copied: the folder names the LLM (hub id, folder, GGUF path or ``smollm2``),
``from_pretrained`` loads it and refuses one whose weights differ from the text cache's.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import diffusers
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput

from semroute.shared.checks import check_guidance_interval, read_json_object
from semroute.shared.errors import SemrouteError
from semroute.shared.interrupts import stoppable
from semroute.shared.llm import LoadedLLM, load_llm
from semroute.shared.text_encoder import PromptFormat, TextEncoder
from semroute.shared.text_store import pad_batch
from semroute.shared.vae import PIXEL, PixelCodec, downsample_factor, latent_scale
from semroute.stage2_train import checkpoint_files, models
from semroute.stage2_train.config import DEFAULT_GUIDANCE, DEFAULT_SAMPLE_STEPS
from semroute.stage2_train.run_folder import MODEL_INDEX, refuse_output_inside_model

TEXT_DIR = "text"
TEXT_CONFIG = "semroute_text.json"
NULL_FILE = "null.safetensors"
# The downsampling factor encode-images measured for an autoencoder whose config states none (shared/vae.py
# load_encoder), as the latent cache records it: held on the autoencoder (the pipeline's and the training sample
# grid's) and in an export's semroute_text.json.
LATENT_DOWNSAMPLE = "latent_downsample"


class PromptTruncated(UserWarning):
    """A prompt longer than the text cache's ``max_length`` was cut there (as encode-text cuts captions)."""


@dataclass
class SemroutePipelineOutput(BaseOutput):
    images: list  # PIL images, or a [B, 3, H, W] float tensor in [0, 1] with output_type="pt"


def text_settings_from_fingerprint(fp: dict) -> dict:
    """What the pipeline must reproduce from a text cache's fingerprint."""
    ref = fp["llm_ref"]
    if ref not in ("smollm2",) and Path(ref).exists():
        ref = str(Path(ref).resolve())  # a folder or GGUF named relative to where encode-text ran
    return {
        "llm_ref": ref,
        "llm_weights_sha256": fp["llm_weights_sha256"],
        "tokenizer_sha256": fp["tokenizer_sha256"],
        "instruction": fp["prompt_instruction"],
        "chat_template": fp["prompt_chat_template"],
        "max_length": fp["prompt_max_length"],
        "layers": list(fp["layers"]),
        "compute_dtype": fp["compute_dtype"],
        "storage": fp.get("storage", "exact"),
    }


class SemroutePipeline(DiffusionPipeline):
    """Text-to-image with a semroute DiT. Components: ``transformer``, ``vae``, ``scheduler``; the text
    side (``text_encoder``: a :class:`TextEncoder`) is attached by ``from_pretrained`` / ``from_run``."""

    model_cpu_offload_seq = "transformer->vae"

    def __init__(self, transformer, vae, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        self.text_encoder: TextEncoder | None = None
        self.text_settings: dict = {}
        self.null_features: torch.Tensor | None = None  # [n, L_stored, D]
        self.default_size: tuple[int, int] | None = None  # (height, width) in pixels
        # What `semroute sample` uses when not told: {"steps", "guidance"} of the training config.
        self.sample_defaults: dict = {}
        self.source_step = 0  # the training step of the weights (recorded in an export's manifest)

    # -- text ------------------------------------------------------------------------------------
    def attach_text(self, settings: dict, null_features: torch.Tensor, llm: LoadedLLM | str | None = None,
                    device: str | None = "auto") -> None:
        """Load (or take) the LLM named by ``settings`` and check it is the one the cache was made with."""
        if isinstance(llm, str) and llm:
            llm = load_llm(llm, device=device, dtype=settings["compute_dtype"])
        elif not isinstance(llm, LoadedLLM):
            llm = _load_recorded_llm(settings["llm_ref"], device=device, dtype=settings["compute_dtype"])
        ident = llm.identity
        for key in ("llm_weights_sha256", "tokenizer_sha256"):
            have = ident[key.removeprefix("llm_")]
            if have != settings[key]:
                raise SemrouteError(
                    f"the LLM {llm.ref!r} is not the one the text cache was encoded with ({key}: {have[:12]}... "
                    f"vs {settings[key][:12]}...); sampling with it would feed the DiT features it never saw. "
                    f"Pass the original model (it was {settings['llm_ref']!r})."
                )
        fmt = PromptFormat(instruction=settings["instruction"], chat_template=settings["chat_template"],
                           max_length=settings["max_length"])
        self.text_encoder = TextEncoder(llm, fmt, list(settings["layers"]))
        # the reference that loaded (same weights, checked above): an export then names an LLM that loads
        self.text_settings = {**settings, "llm_ref": ident.get("ref") or settings["llm_ref"]}
        self.null_features = null_features

    def attach_cached_text(self, stored_layers: list[int], null_features: torch.Tensor) -> None:
        """Text from a cache only, no LLM (samples during training): prompts are then given to ``__call__``
        as ``prompt_features``. ``null_features``: ``[n, L_stored, D]`` of the cache's ``stored_layers``."""
        self.text_encoder = None
        self.text_settings = {"layers": list(stored_layers)}
        self.null_features = null_features

    def _model_layers(self) -> list[int]:
        positions = self.transformer.layer_positions(self.text_settings["layers"])
        return positions

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> list[torch.Tensor]:
        """Each prompt's ``[n_tokens, L, D]`` features of the layers the DiT reads, exactly as the cache
        would hold them (same tokenizer, prompt format, layers, compute dtype)."""
        if self.text_encoder is None:
            raise SemrouteError("this pipeline has no text encoder attached; load it with from_pretrained/from_run")
        from semroute.shared.text_store import TextStorage

        tokenized = self.text_encoder.tokenize(prompts)
        cut = [(i, t) for i, t in enumerate(tokenized) if t.truncated]
        if cut:  # `semroute sample` names them by file and line itself (sampling.warn_truncated)
            warnings.warn(PromptTruncated(
                f"{len(cut)} of {len(prompts)} prompts are longer than the text cache's max_length "
                f"{self.text_encoder.fmt.max_length} tokens (instruction included) and are cut there: "
                + ", ".join(f"prompt {i} ({t.n_full} tokens)" for i, t in cut[:5]) + (", ..." if len(cut) > 5 else "")),
                stacklevel=3)
        feats, _ = self.text_encoder.forward([t.ids for t in tokenized])
        storage = TextStorage(self.text_settings.get("storage", "exact"), self.text_encoder.llm.dtype)
        pick = self._model_layers()
        # Through the cache's storage precision (a no-op for exact), as the training captions were.
        return [storage.roundtrip(feats[i, : len(t.ids)][:, pick].cpu()) for i, t in enumerate(tokenized)]

    # -- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, num_inference_steps: int = DEFAULT_SAMPLE_STEPS,
                 guidance_scale: float = DEFAULT_GUIDANCE,
                 height: int | None = None, width: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, num_images_per_prompt: int = 1,
                 output_type: str = "pil", reuse_text: bool = True, return_dict: bool = True,
                 prompt_features: list[torch.Tensor] | None = None,
                 guidance_interval: tuple[float, float] | None = None):
        """Generate images with Euler flow-matching steps and classifier-free guidance
        ``uncond + w * (cond - uncond)`` against the stored null caption.

        ``guidance_interval``: ``(lo, hi)``: guide only the steps whose sigma lies in ``[lo, hi]`` and take the
        conditional prediction alone elsewhere (one forward pass instead of two there). Guidance at the
        noisiest steps mostly pushes samples apart and at the cleanest changes little (Kynkaanniemi et al.
        2024, "Applying guidance in a limited interval"); None guides every step.

        ``prompt_features``: instead of ``prompt``, cached captions (each ``[n_tokens, L, D]`` of the layers
        the DiT reads, as a text cache holds them); the LLM does not run.

        ``generator``: one per image for per-image reproducibility (image i is then independent of its
        batch-mates), or one for all. ``reuse_text=False`` recomputes the text keys/values at every step
        (only for measuring what the reuse saves; results are the same).
        """
        if prompt_features is not None:
            cond = [f for f in prompt_features for _ in range(num_images_per_prompt)]
        else:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            cond = self.encode_prompts([p for p in prompts for _ in range(num_images_per_prompt)])
        n = len(cond)
        device = self.transformer.device
        dtype = self.transformer.dtype
        height, width = self.image_size(height, width)
        down = self.vae_downsample
        h, w = height // down, width // down

        # 1. Text: conditional prompts and (for guidance) the stored null caption, padded together.
        guided = guidance_scale != 1.0
        lo, hi = check_guidance_interval(guidance_interval) if guidance_interval is not None else (0.0, 1.0)
        items = cond + ([self.null_features[:, self._model_layers()]] * n if guided else [])
        text, mask = pad_batch(items)
        text, mask = text.to(device), mask.to(device)
        context = self.transformer.prepare_text(text, mask) if reuse_text else None
        # The conditional half alone, for the steps outside the guidance interval.
        partial = guided and guidance_interval is not None
        cond_context = self.transformer.prepare_text(text[:n], mask[:n]) if reuse_text and partial else None

        # 2. Initial noise, one generator per image when given.
        channels = self.transformer.config.in_channels
        shape = (channels, h, w)
        if isinstance(generator, list):
            if len(generator) != n:
                raise SemrouteError(f"got {len(generator)} generators for {n} images")
            latents = torch.stack([torch.randn(shape, generator=g) for g in generator])
        else:
            latents = torch.randn((n, *shape), generator=generator)
        latents = latents.to(device, dtype)

        # 3. Euler steps on the flow ODE from sigma = 1 (noise) to 0.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            sigma = float(t) / self.scheduler.config.num_train_timesteps
            guide = guided and lo <= sigma <= hi
            if guided and not guide:  # outside the interval: the conditional prediction alone
                model_in, step_context, step_text, step_mask = latents, cond_context, text[:n], mask[:n]
            else:
                model_in = torch.cat([latents, latents]) if guided else latents
                step_context, step_text, step_mask = context, text, mask
            timestep = t.expand(model_in.shape[0]).to(device)
            if reuse_text:
                velocity = self.transformer(model_in, timestep, text_context=step_context, return_dict=False)[0]
            else:
                velocity = self.transformer(model_in, timestep, step_text, step_mask, return_dict=False)[0]
            if guide:
                v_cond, v_uncond = velocity.chunk(2)
                velocity = v_uncond + guidance_scale * (v_cond - v_uncond)
            latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]

        # 4. Decode: the DiT's space -> the autoencoder's -> pixels in [0, 1].
        images = self.decode_latents(latents)
        if output_type == "pil":
            images = to_pil(images)
        return SemroutePipelineOutput(images=images) if return_dict else (images,)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents in the DiT's space ``[B, C, h, w]`` -> images ``[B, 3, H, W]`` in [0, 1] on the CPU."""
        z = latents / self.vae_scaling + self.vae_shift
        decoded = self.vae.decode(z.to(self.vae.device, self.vae_dtype), return_dict=False)[0]
        return ((decoded.float().clamp(-1, 1) + 1) / 2).cpu()

    def image_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """``(height, width)`` in pixels, the training size where not given; an error for a size the
        autoencoder cannot make (``sample`` checks this before it writes anything)."""
        height = height or (self.default_size[0] if self.default_size else None)
        width = width or (self.default_size[1] if self.default_size else None)
        if height is None or width is None:
            raise SemrouteError("give height and width (this pipeline has no training resolution recorded)")
        down = self.vae_downsample
        if height % down or width % down:
            raise SemrouteError(f"height and width must be multiples of {down} for this autoencoder, got {width}x{height}")
        return height, width

    # -- autoencoder facts -----------------------------------------------------------------------
    @property
    def vae_scaling(self) -> float:
        return latent_scale(self.vae)[0]

    @property
    def vae_shift(self) -> float:
        return latent_scale(self.vae)[1]

    @property
    def vae_dtype(self) -> torch.dtype:
        params = list(self.vae.parameters())
        return params[0].dtype if params else torch.float32

    @property
    def vae_downsample(self) -> int:
        """The factor the latent cache was made with: as encode-images read it from the config
        (shared.vae.downsample_factor), else as it measured it (``LATENT_DOWNSAMPLE``)."""
        down = downsample_factor(self.vae) or getattr(self.vae, LATENT_DOWNSAMPLE, 0)
        if not down:
            raise SemrouteError(f"cannot tell the downsampling factor of {type(self.vae).__name__}: its config states "
                                "no spatial_compression_ratio, block_out_channels or encoder_block_out_channels, and "
                                "no latent cache's record of it came with it")
        return down

    # -- saving and loading ----------------------------------------------------------------------
    def save_pretrained(self, save_directory, **kwargs) -> None:
        from safetensors.torch import save_file

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(out / "transformer")
        self.vae.save_pretrained(out / "vae")
        self.scheduler.save_pretrained(out / "scheduler")
        (out / TEXT_DIR).mkdir(exist_ok=True)
        measured = getattr(self.vae, LATENT_DOWNSAMPLE, None)
        settings = {**self.text_settings, "default_size": list(self.default_size) if self.default_size else None,
                    "sample_defaults": self.sample_defaults or None,
                    **({LATENT_DOWNSAMPLE: measured} if measured else {})}
        (out / TEXT_DIR / TEXT_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
        save_file({"null": self.null_features.contiguous()}, str(out / TEXT_DIR / NULL_FILE))
        index = {
            "_class_name": type(self).__name__,
            "_diffusers_version": diffusers.__version__,
            "transformer": [type(self.transformer).__module__, type(self.transformer).__name__],
            "vae": [type(self.vae).__module__, type(self.vae).__name__],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
        }
        (out / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        checkpoint_files.write_manifest(out, self.source_step)  # last: lists every file above

    @classmethod
    def from_pretrained(cls, path, *, llm: LoadedLLM | str | None = None, device: str | None = "auto",
                        **kwargs) -> "SemroutePipeline":
        """Load an exported folder; ``llm`` overrides where the LLM is loaded from (same weights required)."""
        from safetensors.torch import load_file

        from semroute.shared.llm import resolve_device

        folder = Path(path)
        checkpoint_files.check_export(folder)
        index_file = folder / MODEL_INDEX
        if not index_file.exists():
            raise SemrouteError(f"{folder} is not an exported semroute pipeline ({index_file} missing)")
        index = read_json_object(index_file, "export the pipeline again")
        if index.get("_class_name") != SemroutePipeline.__name__:
            raise SemrouteError(f"{index_file} describes a {index.get('_class_name')!r} pipeline, not a "
                                f"{SemroutePipeline.__name__}: load a folder `semroute export` wrote")
        settings = read_text_settings(folder)
        classes = {name: _index_class(index_file, index, name) for name in ("transformer", "vae", "scheduler")}
        # diffusers' own readers turn a damaged config into a bare OSError (the pixel codec and the DiT's loader
        # read theirs through read_json_object)
        for name in ("vae", "scheduler"):
            if classes[name] is not PixelCodec:
                read_json_object(folder / name / classes[name].config_name, "export the pipeline again")

        target = resolve_device(device)
        pipe = cls(models.load_model(folder / "transformer"), classes["vae"].from_pretrained(str(folder / "vae")),
                   classes["scheduler"].from_pretrained(folder / "scheduler"))
        pipe.to(target)
        null = load_file(str(folder / TEXT_DIR / NULL_FILE))["null"]
        size = settings.pop("default_size", None)
        pipe.default_size = tuple(size) if size else None
        pipe.sample_defaults = settings.pop("sample_defaults", None) or {}
        down = settings.pop(LATENT_DOWNSAMPLE, None)
        if down is not None:
            if not isinstance(down, int) or isinstance(down, bool) or down < 1:
                raise SemrouteError(f"{folder / TEXT_DIR / TEXT_CONFIG}: {LATENT_DOWNSAMPLE} is {json.dumps(down)}, "
                                    "not a whole number >= 1; export the pipeline again")
            setattr(pipe.vae, LATENT_DOWNSAMPLE, down)
        pipe.source_step = _manifest_step(folder)
        pipe.attach_text(settings, null, llm=llm, device=str(target))
        return pipe

    @classmethod
    def from_run(cls, run_dir, *, ema: bool = False, checkpoint: str | Path | None = None,
                 llm: LoadedLLM | str | None = None, device: str | None = "auto") -> "SemroutePipeline":
        """Build the pipeline from a training run folder: its newest checkpoint (or ``checkpoint``), the
        caches' fingerprints recorded in run.json, the training shift."""
        from semroute.shared.llm import resolve_device
        from semroute.stage2_train.run_folder import RunFolder

        run = RunFolder(run_dir)
        model_dir = run.model_dir(ema=ema, checkpoint=checkpoint)
        # the checkpoint's own copies of run.json and config.yaml (checked by its complete.json)
        record = run.record(checkpoint=model_dir.parent)
        cfg = run.config(checkpoint=model_dir.parent)
        transformer = models.load_model(model_dir)
        vae, size = _vae_from_fingerprint(record["latent_fingerprint"])
        scheduler = FlowMatchEulerDiscreteScheduler(shift=cfg.shift)
        target = resolve_device(device)
        pipe = cls(transformer, vae, scheduler)
        pipe.to(target)
        pipe.default_size = size
        pipe.sample_defaults = {"steps": cfg.sample_steps, "guidance": cfg.sample_guidance}
        pipe.source_step = _manifest_step(model_dir.parent)
        settings = text_settings_from_fingerprint(record["text_fingerprint"])
        null = _null_from_cache(record["text_cache"])
        pipe.attach_text(settings, null, llm=llm, device=str(target))
        if null is None:
            # The text cache has moved: re-encode the null caption with the same code and LLM.
            tok = pipe.text_encoder.null_caption()
            feats, _ = pipe.text_encoder.forward([tok.ids])
            pipe.null_features = feats[0].cpu()
        return pipe


def _load_recorded_llm(ref: str, *, device: str | None, dtype: str) -> LoadedLLM:
    """The LLM a text cache (or export) names. Caches written before references were recorded as absolute
    paths name a local LLM as it was typed to encode-text, relative to the folder it ran in: found from
    here, it loads; else the error says where it was looked for and how to pass it."""
    where = Path(ref).expanduser()
    if ref == "smollm2" or where.exists():
        return load_llm(ref, device=device, dtype=dtype)
    hint = "Pass the LLM explicitly: --llm PATH (sample, export) with the same weights the text cache was encoded with."
    if where.is_absolute() or ref.startswith((".", "~")) or ref.endswith(".gguf"):
        raise SemrouteError(f"the LLM recorded as {ref!r} is not there (looked for {where.absolute()}; moved or "
                            f"deleted?). {hint}")
    try:
        return load_llm(ref, device=device, dtype=dtype)  # a hub id, or a relative path that is not here
    except SemrouteError as err:
        raise SemrouteError(f"cannot load the LLM recorded as {ref!r}: there is no {Path.cwd() / where} (a local "
                            f"LLM is recorded relative to the folder encode-text ran in), and as a hub id: {err} "
                            f"{hint}") from None


# -- exported folders ----------------------------------------------------------------------------
def _index_class(index_file: Path, index: dict, name: str) -> type:
    """The class ``model_index.json`` names for component ``name``, if it is one ``save_pretrained`` writes there:
    a DiT of the model registry, the pixel codec or a diffusers autoencoder, diffusers' flow-matching scheduler.
    Looked up by its name among those; the module the file names is never imported (a folder from elsewhere must
    not choose the code that runs). Any other is refused, naming the file and the class."""
    allowed = {"transformer": " or ".join(sorted({path.split(":")[1] for path in models.MODELS.values()})),
               "vae": f"{PixelCodec.__name__} or a diffusers Autoencoder class",
               "scheduler": FlowMatchEulerDiscreteScheduler.__name__}
    entry = index.get(name)
    class_name = entry[1] if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str) else None
    klass = None
    if name == "transformer":
        by_class = {path.split(":")[1]: fusion for fusion, path in models.MODELS.items()}
        klass = models.model_class(by_class[class_name]) if class_name in by_class else None
    elif name == "vae" and class_name == PixelCodec.__name__:
        klass = PixelCodec
    elif name == "vae" and class_name and class_name.startswith("Autoencoder"):
        klass = getattr(diffusers, class_name, None)
    elif name == "scheduler" and class_name == FlowMatchEulerDiscreteScheduler.__name__:
        klass = FlowMatchEulerDiscreteScheduler
    if not isinstance(klass, type):
        raise SemrouteError(f"{index_file}: {name} is {json.dumps(entry)}, not a class semroute writes there "
                            f"({allowed[name]}); refusing to load it, as that would import whatever module the file "
                            "names. Load a folder `semroute export` wrote")
    return klass


def _manifest_step(folder: Path) -> int:
    """The training step a checkpoint's or an export's ``complete.json`` records (0 when it has none)."""
    try:
        return int(json.loads((Path(folder) / checkpoint_files.MANIFEST).read_text()).get("step") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def read_text_settings(folder: Path) -> dict:
    """An exported pipeline's ``text/semroute_text.json``."""
    path = Path(folder) / TEXT_DIR / TEXT_CONFIG
    if not path.exists():
        raise SemrouteError(f"{folder} is not an exported semroute pipeline ({path} missing)")
    return read_json_object(path, "export the pipeline again")


def is_export(folder: Path) -> bool:
    """A folder ``save_pretrained`` wrote (its ``model_index.json`` names this pipeline class); a damaged one is
    not taken for one (``export --overwrite`` replaces only what is surely an earlier export)."""
    try:
        return read_json_object(Path(folder) / MODEL_INDEX, "").get("_class_name") == SemroutePipeline.__name__
    except SemrouteError:
        return False


def check_export_target(out: Path, overwrite: bool) -> None:
    """``export --out``: a new or empty folder, or (with ``overwrite``) an earlier export. Anything else (a
    run folder, the current directory, a user's files, a file) is refused, with or without ``overwrite``,
    and keeps every byte."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise SemrouteError(f"--out {out} is a file; export to a new folder")
    if out.resolve() == Path.cwd().resolve():
        raise SemrouteError(f"--out {out} is the current directory; export to a new folder")
    if next(out.iterdir(), None) is None:
        return
    if not is_export(out):
        raise SemrouteError(f"--out {out} already exists and is not an exported semroute pipeline; refusing to "
                            "replace it: export to a new folder")
    if not overwrite:
        raise SemrouteError(f"--out {out} already holds an exported pipeline; pass --overwrite to replace it, or "
                            "export to another --out")


def export_pipeline(run: str | Path, out: str | Path, *, ema: bool = False, checkpoint: str | Path | None = None,
                    llm: str | None = None, overwrite: bool = False) -> SemroutePipeline:
    """``semroute export``: the pipeline of a run (or of one of its checkpoints) written to ``out`` through
    a temporary sibling folder and a rename; an earlier export there is replaced only with ``overwrite``."""
    from semroute.stage2_train.run_folder import EXPORT, resolve_model_source

    refuse_output_inside_model(out, "--out", replacing_export=True)
    out = Path(out)
    final = out.resolve()
    tmp, old = final.with_name(f".{final.name}.export.tmp"), final.with_name(f".{final.name}.export.old")
    if old.is_dir() and not final.exists():  # an --overwrite that crashed between its two renames
        os.replace(old, final)  # the earlier export, whole, is back under its name
    check_export_target(out, overwrite)
    source = resolve_model_source(run)
    if source is None or source.kind == EXPORT or source.run is None:
        raise SemrouteError(f"{run} is not a run folder or one of its checkpoints (no run.json); export takes the "
                            "folder `semroute train --out` wrote")
    if checkpoint is not None and source.checkpoint is not None and \
            Path(checkpoint).resolve() != source.checkpoint.resolve():
        raise SemrouteError(f"{run} is a checkpoint, and --checkpoint {checkpoint} another: give the run folder "
                            "with --checkpoint, or the checkpoint alone")
    pipe = SemroutePipeline.from_run(source.run.path, ema=ema, checkpoint=checkpoint or source.checkpoint, llm=llm,
                                     device="cpu")
    with stoppable(f"nothing was exported to {out} (an earlier export there is kept): run the same command again"):
        for leftover in (tmp, old):  # of an export that crashed: ours, never a user's (hidden, our suffix)
            if leftover.exists():
                shutil.rmtree(leftover)
        try:
            pipe.save_pretrained(tmp)
        except BaseException:  # (a SIGTERM too: shared/interrupts.py)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists() and next(final.iterdir(), None) is not None:  # an earlier export, --overwrite given
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    return pipe


def to_pil(images: torch.Tensor) -> list:
    """``[B, 3, H, W]`` in [0, 1] -> PIL images."""
    from PIL import Image

    arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def _null_from_cache(text_cache: str) -> torch.Tensor | None:
    """The stored null caption; None when the cache is gone (moved or deleted: the caller re-encodes it).
    A cache that is there but damaged is an error, never silently replaced."""
    from semroute.shared.remote import is_url
    from semroute.shared.text_store import TextCacheReader

    if not is_url(text_cache) and not Path(text_cache).exists():
        return None
    return TextCacheReader(text_cache).null()


def _vae_from_fingerprint(fp: dict):
    """The autoencoder a latent cache was made with, and the cache's image size (height, width)."""
    from semroute.shared.vae import load_encoder

    size = fp.get("resolution")
    size = (int(size), int(size)) if isinstance(size, (int, float)) and not fp.get("buckets") else None
    if fp.get("vae") == PIXEL:
        return PixelCodec(int(fp.get("patch_size", 2))), size
    dtype = fp.get("stored_dtype", "float32")
    encoder = load_encoder(fp["vae"], fp.get("subfolder"), device="cpu", dtype=dtype if dtype != "uint8" else "float32")
    if fp.get("weights_sha256") and encoder.info.identity.get("weights_sha256") != fp["weights_sha256"]:
        raise SemrouteError(f"the VAE at {fp['vae']} has other weights than the one the latent cache was made with")
    if not downsample_factor(encoder.model):  # its config states none: the factor encode-images measured
        setattr(encoder.model, LATENT_DOWNSAMPLE, int(fp.get("downsample") or encoder.info.downsample))
    return encoder.model, size


