"""Image autoencoders for the latent cache: any diffusers image autoencoder, and the exact pixel codec.

``--vae`` takes a hub id (``id@revision`` pins one), a local folder (``--vae-subfolder vae`` for a
pipeline folder), or ``pixel``. Both kinds are wrapped in a :class:`LatentEncoder`, which is what the
encoding run calls: ``uint8 [B, 3, H, W]`` pixels in, the arrays to store out.

- A diagonal-Gaussian VAE (``AutoencoderKL`` and kin: SD's 4 channels, SD3/FLUX's 16) yields the
  posterior ``mean`` and ``logvar`` ``[B, C, H/f, W/f]``; training samples ``mean + exp(logvar/2) * eps``
  each step, as an online VAE would. Stored in the compute dtype (``--dtype``).
- A deterministic autoencoder (``AutoencoderDC``, ``AutoencoderTiny``) yields one ``latent``.
- ``pixel`` (:class:`PixelCodec`) is a lossless space-to-depth of the pixels; its latent is stored as the
  uint8 pixel codes themselves, which the reader maps to [-1, 1] exactly as the encoder does.

Pixels reach any autoencoder as ``u8 / 127.5 - 1`` computed in float32, then cast to the compute dtype
(:func:`pixels_to_unit`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from semroute.shared.checks import read_json_object
from semroute.shared.errors import SemrouteError, first_line
from semroute.shared.fingerprint import folder_weights_sha256
from semroute.shared.dtypes import dtype_name, parse_dtype
from semroute.shared.llm import resolve_device

PIXEL = "pixel"
GAUSSIAN, EXACT = "gaussian", "exact"  # what a cache stores: a posterior, or the latent itself


def pixels_to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """``uint8 [..., H, W]`` -> float32 in [-1, 1]: the input every autoencoder here sees."""
    return pixels.to(torch.float32) / 127.5 - 1.0


def unit_to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pixels_to_unit` (clamped and rounded): float in [-1, 1] -> uint8."""
    return ((x.to(torch.float32) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# The pixel codec
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PixelCodecConfig:
    patch_size: int = 2
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    @property
    def latent_channels(self) -> int:
        return 3 * self.patch_size**2


@dataclass
class EncoderOutput:
    latent: torch.Tensor  # [B, 3p^2, H/p, W/p]


@dataclass
class DecoderOutput:
    sample: torch.Tensor  # [B, 3, H, W]


class PixelCodec(torch.nn.Module):
    """Exact pixel-space 'autoencoder': space-to-depth with patch ``p``.

    ``encode(x).latent``: ``[B, 3, H, W]`` in [-1, 1] -> ``[B, 3*p*p, H/p, W/p]`` (channel
    ``c*p*p + i*p + j`` holds pixel ``(i, j)`` of each ``p x p`` patch of color ``c``, as
    ``F.pixel_unshuffle``). ``decode(z).sample`` is the exact inverse. No weights. The call shapes and
    ``config`` fields (``scaling_factor``, ``shift_factor``, ``latent_channels``) are those of diffusers'
    ``AutoencoderDC``, so a pipeline can hold either; ``save_pretrained`` writes only ``config.json``.
    Deliberately free of diffusers imports: the demo and tests use it, and importing diffusers costs
    seconds.
    """

    def __init__(self, patch_size: int = 2, scaling_factor: float = 1.0, shift_factor: float = 0.0):
        super().__init__()
        if patch_size < 1:
            raise SemrouteError(f"pixel codec patch size must be >= 1, not {patch_size}")
        self.config = PixelCodecConfig(int(patch_size), float(scaling_factor), float(shift_factor))

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    # No weights: it computes in whatever dtype/device its input has. These let a diffusers pipeline's
    # `.to()` treat it like any other component.
    dtype = torch.float32
    device = torch.device("cpu")

    def _check(self, h: int, w: int) -> None:
        p = self.config.patch_size
        if h % p or w % p:
            raise SemrouteError(f"the pixel codec needs sides divisible by its patch size {p}, got {w}x{h}")

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        self._check(*x.shape[-2:])
        z = F.pixel_unshuffle(x, self.config.patch_size)  # [B, 3p^2, H/p, W/p]
        return EncoderOutput(latent=z) if return_dict else (z,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        x = F.pixel_shuffle(z, self.config.patch_size)  # [B, 3, H, W]
        return DecoderOutput(sample=x) if return_dict else (x,)

    def encode_codes(self, pixels: torch.Tensor) -> torch.Tensor:
        """``uint8 [B, 3, H, W]`` -> ``uint8 [B, 3p^2, H/p, W/p]``: the same rearrangement on the codes,
        so ``pixels_to_unit(encode_codes(u)) == encode(pixels_to_unit(u)).latent`` bit for bit."""
        self._check(*pixels.shape[-2:])
        return F.pixel_unshuffle(pixels, self.config.patch_size)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": "PixelCodec", **asdict(self.config)}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path, subfolder: str | None = None, **kwargs) -> "PixelCodec":
        file = Path(path) / (subfolder or "") / "config.json"
        config = read_json_object(file, "restore it (in an exported pipeline: export it again)")
        if config.pop("_class_name", None) != "PixelCodec":
            raise SemrouteError(f"{file} does not describe a PixelCodec")
        return cls(**config)


# ---------------------------------------------------------------------------------------------
# Describing an autoencoder from its config (no weights loaded)
# ---------------------------------------------------------------------------------------------
def downsample_factor(vae_or_config) -> int:
    """Pixels per latent cell along a side, from an autoencoder or its config (``config.json`` as a dict): the
    pixel codec's patch; a stated ``spatial_compression_ratio``; else one factor of 2 per encoder block but the
    last (diffusers' own vae_scale_factor rule), on ``block_out_channels`` (AutoencoderKL) or
    ``encoder_block_out_channels`` (AutoencoderDC, AutoencoderTiny). 0 when the config states none of these
    (``load_encoder`` then measures it). Stage one (the cache's shapes) and stage two (sampling) both ask here."""
    config = getattr(vae_or_config, "config", vae_or_config)
    if isinstance(config, PixelCodecConfig):
        return config.patch_size
    if config.get("spatial_compression_ratio"):
        return int(config["spatial_compression_ratio"])
    for key in ("block_out_channels", "encoder_block_out_channels"):
        if config.get(key):
            return 2 ** (len(config[key]) - 1)
    return 0


def latent_scale(vae_or_config) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` of an autoencoder or its config (1 and 0 where unset): the cache maps
    ``(z - shift) * scaling`` into the DiT's space, sampling maps back."""
    config = getattr(vae_or_config, "config", vae_or_config)
    get = (lambda key: getattr(config, key)) if isinstance(config, PixelCodecConfig) else config.get
    return float(get("scaling_factor") or 1.0), float(get("shift_factor") or 0.0)


@dataclass
class VAEInfo:
    """What the plan and the fingerprint need, read from ``config.json`` alone."""

    ref: str
    folder: Path | None  # the folder holding config.json (None for pixel)
    class_name: str
    posterior: str  # GAUSSIAN or EXACT
    latent_channels: int
    downsample: int  # pixels per latent cell along a side
    scaling_factor: float
    shift_factor: float
    identity: dict = field(default_factory=dict)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.downsample
        if height % f or width % f:
            raise SemrouteError(f"image size {width}x{height} is not divisible by the autoencoder's downsampling "
                                f"factor {f}; choose --resolution / --buckets as multiples of {f}")
        return (self.latent_channels, height // f, width // f)


def _resolve_folder(ref: str, subfolder: str | None) -> tuple[Path, str | None]:
    """A local folder (``folder/subfolder``) holding config.json, downloading from the hub if needed."""
    path = Path(ref).expanduser()
    revision = None
    if not path.is_dir():
        if path.exists() or ref.startswith((".", "/", "~")):
            raise SemrouteError(f"--vae {ref}: not a model folder, a hub id or 'pixel'")
        repo_id, _, revision = ref.partition("@")
        prefix = f"{subfolder}/" if subfolder else ""
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(repo_id, revision=revision or None,
                                          allow_patterns=[f"{prefix}*.json", f"{prefix}*.safetensors"]))
        except Exception as err:  # network, auth, unknown repo
            raise SemrouteError(f"--vae {ref}: could not fetch it from the Hugging Face hub ({type(err).__name__}: "
                                f"{err}). Pass a local folder, or set HF_HUB_OFFLINE=1 to use the local cache.") from None
        revision = path.name  # the snapshot's commit
    folder = path / subfolder if subfolder else path
    if not (folder / "config.json").is_file():
        hint = " (it looks like a pipeline folder: add --vae-subfolder vae)" if (path / "vae" / "config.json").is_file() else ""
        raise SemrouteError(f"--vae {ref}: no config.json in {folder}{hint}")
    return folder, revision


def describe_vae(ref: str, subfolder: str | None = None, patch_size: int = 2) -> VAEInfo:
    """Read an autoencoder's config (or the pixel codec's settings) without loading weights."""
    if ref == PIXEL:
        return VAEInfo(ref=PIXEL, folder=None, class_name="PixelCodec", posterior=EXACT,
                       latent_channels=3 * patch_size**2, downsample=patch_size, scaling_factor=1.0,
                       shift_factor=0.0, identity={"vae": PIXEL, "class": "PixelCodec", "patch_size": patch_size})
    folder, revision = _resolve_folder(ref, subfolder)
    config = read_json_object(folder / "config.json", f"--vae {ref}: restore the autoencoder's folder (a hub "
                              "download: delete it from the Hugging Face cache to fetch it again)")
    class_name = config.get("_class_name") or ""
    if not isinstance(class_name, str) or not class_name.startswith("Autoencoder"):
        raise SemrouteError(f"--vae {ref}: config.json describes {class_name or 'no diffusers class'}, not a diffusers "
                            "autoencoder (AutoencoderKL, AutoencoderDC, AutoencoderTiny, ...)")
    try:
        weights = folder_weights_sha256(folder)
    except FileNotFoundError as err:
        raise SemrouteError(f"--vae {ref}: {err}") from None
    scaling, shift = latent_scale(config)
    return VAEInfo(
        ref=ref, folder=folder, class_name=class_name,
        posterior=GAUSSIAN if class_name.startswith("AutoencoderKL") else EXACT,
        latent_channels=int(config.get("latent_channels", 0)), downsample=downsample_factor(config),
        scaling_factor=scaling, shift_factor=shift,
        identity={"vae": ref, "class": class_name, "subfolder": subfolder, "revision": revision,
                  "weights_sha256": weights},
    )


# ---------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------
class LatentEncoder:
    """A frozen autoencoder ready for stage one: ``encode(uint8 [B, 3, H, W]) -> {name: [B, C, h, w]}``.

    ``arrays`` names what is returned (``("mean", "logvar")`` or ``("latent",)``); ``store_dtype`` is
    the torch dtype of those tensors (the compute dtype, or uint8 for the pixel codec's codes).
    """

    def __init__(self, info: VAEInfo, model: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        self.info, self.model, self.device, self.dtype = info, model, device, dtype
        self.arrays = ("mean", "logvar") if info.posterior == GAUSSIAN else ("latent",)
        self.store_dtype = torch.uint8 if isinstance(model, PixelCodec) else dtype

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        if isinstance(self.model, PixelCodec):
            return {"latent": self.model.encode_codes(pixels)}
        x = pixels_to_unit(pixels.to(self.device, non_blocking=True)).to(self.dtype)  # [B, 3, H, W]
        out = self.model.encode(x)
        dist = getattr(out, "latent_dist", None)
        if dist is not None:
            if self.info.posterior != GAUSSIAN:
                raise SemrouteError(f"{self.info.class_name} returned a posterior; expected a plain latent")
            result = {"mean": dist.mean, "logvar": dist.logvar}  # logvar clamped to [-30, 20] by diffusers
        else:
            latent = getattr(out, "latent", None)
            latent = getattr(out, "latents", None) if latent is None else latent
            if latent is None:
                raise SemrouteError(f"{self.info.class_name}.encode returned {type(out).__name__} with no latent")
            result = {"latent": latent}
        for name, t in result.items():
            if t.ndim != 4:
                raise SemrouteError(f"{self.info.class_name} gave a {t.ndim}-D {name}; encode-images needs an image "
                                    "autoencoder with [B, C, h, w] latents (video autoencoders are not supported)")
            if not torch.isfinite(t).all():
                raise SemrouteError(f"{self.info.class_name} produced inf/NaN latents in {dtype_name(self.dtype)}; "
                                    "use --dtype float32 (the SD VAE overflows in float16)")
        return {k: v.contiguous().cpu() for k, v in result.items()}


def load_encoder(ref: str, subfolder: str | None = None, *, device: str | torch.device | None = "auto",
                 dtype: str | torch.dtype = "float32", patch_size: int = 2, info: VAEInfo | None = None) -> LatentEncoder:
    """Load ``--vae`` frozen, in ``dtype``, on ``device`` (``auto``: the GPU when present)."""
    info = info or describe_vae(ref, subfolder, patch_size)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = parse_dtype(dtype)
    if info.ref == PIXEL:
        return LatentEncoder(info, PixelCodec(int(info.identity["patch_size"])), torch.device("cpu"), dt)
    import diffusers

    cls = getattr(diffusers, info.class_name, None)
    if cls is None:
        raise SemrouteError(f"--vae {ref}: diffusers {diffusers.__version__} has no class {info.class_name}; "
                            "upgrade diffusers")
    try:
        model = cls.from_pretrained(str(info.folder), torch_dtype=dt)
    except Exception as err:  # noqa: BLE001 - diffusers raises OSError, ValueError, KeyError ... for a folder
        # missing its weights or holding damaged ones: the user's input, named, not a traceback
        raise SemrouteError(f"--vae {ref}: cannot load {info.class_name} from {info.folder} ({type(err).__name__}: "
                            f"{first_line(err)})") from None
    model = model.to(dev).eval().requires_grad_(False)
    encoder = LatentEncoder(info, model, dev, dt)
    if info.downsample == 0 or info.latent_channels == 0:
        # Not stated by the config: measure once on a small input.
        probe = encoder.encode(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
        c, h, _ = next(iter(probe.values())).shape[1:]
        info.latent_channels, info.downsample = int(c), 64 // int(h)
    return encoder


def store_dtype_name(info: VAEInfo, dtype: str | torch.dtype) -> str:
    """The dtype the cache holds its latents in (the compute dtype; uint8 codes for the pixel codec)."""
    return "uint8" if info.ref == PIXEL else dtype_name(parse_dtype(dtype))


__all__ = ["PIXEL", "GAUSSIAN", "EXACT", "PixelCodec", "VAEInfo", "LatentEncoder", "describe_vae", "load_encoder",
           "downsample_factor", "latent_scale", "pixels_to_unit", "unit_to_pixels", "store_dtype_name"]
