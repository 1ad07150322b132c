"""Reading training images: decode, orient, convert to RGB, resize and crop to a target size.

Two entry points, both pure functions of (file, options) so that any process gives the same pixels:

- :func:`probe_image` reads only the header (Pillow opens lazily): existence, size, EXIF orientation,
  format, and the checks that need no pixels (zero-byte, not an image, too small, decompression bomb).
  The encoding run uses it to plan which images go into which bucket before any model runs.
- :func:`load_image` decodes fully and returns ``uint8 [3, H, W]`` at the target size, or raises
  :class:`BadImage` (truncated or corrupt data only shows up here).

Preprocessing, in order (the reference's ``Resize(shorter side) + CenterCrop``, done in one resampling
step): EXIF transpose; RGB conversion (grayscale, palette, CMYK, 16-bit; alpha composited on a stated
background); then the centered crop of the target's aspect ratio is resampled straight to the target
size (``Image.resize(size, box=...)``), which equals resize-then-crop without rounding the
intermediate size to whole pixels.

A bad image is never replaced by anything: it raises, and the caller reports and leaves it out.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import ExifTags, Image, ImageColor, ImageOps, UnidentifiedImageError

from semroute.shared.errors import SemrouteError

# Pillow's own guard: it warns above MAX_IMAGE_PIXELS and refuses above twice that.
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees

# Short reason names: the ``status`` column of a latent cache's index and the skipped-images report.
MISSING, ZERO_BYTE, NOT_AN_IMAGE, TOO_SMALL, BOMB = "missing", "zero-byte", "not an image", "too small", "decompression bomb"
TRUNCATED, DECODE_ERROR, UNREADABLE = "truncated", "decode error", "unreadable"


class BadImage(SemrouteError):
    """An image that cannot be used. ``reason`` is one of the short names above, ``detail`` says why."""

    def __init__(self, path: str, reason: str, detail: str):
        super().__init__(f"{path}: {reason}: {detail}")
        self.path, self.reason, self.detail = path, reason, detail


# ---------------------------------------------------------------------------------------------
# Options and buckets
# ---------------------------------------------------------------------------------------------
def parse_background(spec: str) -> tuple[int, int, int]:
    """``white``, ``black``, ``#808080``, ``128,128,128`` ... -> an RGB triple."""
    try:
        if "," in spec:
            rgb = tuple(int(v) for v in spec.split(","))
            if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
                raise ValueError
            return rgb  # type: ignore[return-value]
        return ImageColor.getrgb(spec)[:3]
    except ValueError:
        raise SemrouteError(f"--background {spec!r} is not a color; use a name (white), #rrggbb or r,g,b") from None


def auto_buckets(resolution: int, multiple: int, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """``(width, height)`` buckets of about ``resolution**2`` pixels, sides multiples of ``multiple``,
    aspect ratios within ``[1/max_aspect, max_aspect]``, sorted from tall to wide."""
    area = resolution * resolution
    out = set()
    h = multiple
    while h <= resolution:  # landscape sizes (w >= h); portrait ones are their mirror images
        w = max(multiple, round(area / h / multiple) * multiple)
        if w >= h and w / h <= max_aspect + 1e-9:
            out.update({(w, h), (h, w)})
        h += multiple
    return sorted(out, key=lambda wh: wh[0] / wh[1])


def parse_buckets(spec: str | None, resolution: int, multiple: int) -> tuple[tuple[int, int], ...] | None:
    """``none`` -> None (square center crop); ``auto`` / ``auto:3`` -> :func:`auto_buckets`;
    ``WxH,WxH,...`` -> that list. Sides must be multiples of ``multiple`` (latent size x 2 for the DiT's
    patch size)."""
    if spec in (None, "", "none"):
        return None
    if spec == "auto" or spec.startswith("auto:"):
        _, _, ratio = spec.partition(":")
        try:
            max_aspect = float(ratio) if ratio else 2.0
        except ValueError:
            max_aspect = float("nan")
        if not (1.0 <= max_aspect < float("inf")):  # below 1 no bucket fits: it read as no buckets (a square crop)
            raise SemrouteError(f"--buckets {spec!r}: expected auto or auto:MAX_ASPECT with MAX_ASPECT >= 1, e.g. "
                                "auto:2")
        return tuple(auto_buckets(resolution, multiple, max_aspect))
    out = []
    for item in spec.split(","):
        try:
            w, h = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SemrouteError(f"--buckets: {item!r} is not WIDTHxHEIGHT (e.g. 256x192)") from None
        if w % multiple or h % multiple or w <= 0 or h <= 0:
            raise SemrouteError(f"--buckets: {item} has a side that is not a positive multiple of {multiple} "
                                "(the autoencoder's downsampling times the DiT's patch size 2)")
        out.append((w, h))
    return tuple(sorted(set(out), key=lambda wh: wh[0] / wh[1]))


@dataclass(frozen=True)
class ImageOptions:
    """How every image becomes a training input. All fields go into the latent cache's fingerprint."""

    resolution: int = 256
    buckets: tuple[tuple[int, int], ...] | None = None  # (width, height) targets; None = square crop
    background: tuple[int, int, int] = (255, 255, 255)  # alpha is composited on this color
    allow_upscale: bool = False  # else images under resolution/4 on a side are refused as too small
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused as decompression bombs
    resample: str = "bicubic"
    targets: tuple[tuple[int, int], ...] = field(init=False)

    def __post_init__(self):
        if self.resample not in RESAMPLE:
            raise SemrouteError(f"--resample {self.resample!r} is not one of {', '.join(RESAMPLE)}")
        object.__setattr__(self, "targets", self.buckets or ((self.resolution, self.resolution),))

    def fingerprint(self) -> dict:
        fp = asdict(self)
        fp.pop("targets")
        fp["crop"] = "buckets" if self.buckets else "center"
        fp["buckets"] = [f"{w}x{h}" for w, h in self.buckets] if self.buckets else None
        fp["background"] = list(self.background)
        return fp

    def nearest_target(self, width: int, height: int) -> int:
        """Index of the target whose aspect ratio is nearest (in log ratio) to ``width/height``."""
        ar = math.log(width / height)
        return min(range(len(self.targets)), key=lambda i: abs(math.log(self.targets[i][0] / self.targets[i][1]) - ar))


def center_box(width: int, height: int, target: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centered region of a ``width x height`` image with the target's aspect ratio: what
    'resize the shorter side, then center crop' keeps, in source pixel coordinates."""
    tw, th = target
    # The side that limits the scale is kept whole, exactly (no float round-off past the edge).
    if tw * height >= th * width:  # relatively wider target: full width, crop rows
        ch = width * th / tw
        y0 = (height - ch) / 2
        return (0.0, y0, float(width), y0 + ch)
    cw = height * tw / th
    x0 = (width - cw) / 2
    return (x0, 0.0, x0 + cw, float(height))


# ---------------------------------------------------------------------------------------------
# Header probe
# ---------------------------------------------------------------------------------------------
@dataclass
class Probe:
    """What the header says about one image. ``width``/``height`` are as stored in the file;
    ``oriented`` is the size after EXIF orientation. ``reason`` is None for a usable image."""

    path: str
    file_bytes: int = -1
    width: int = -1
    height: int = -1
    orientation: int = 1
    mode: str = ""
    format: str = ""
    reason: str | None = None
    detail: str = ""
    target: int = -1  # index into ImageOptions.targets

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def oriented(self) -> tuple[int, int]:
        return (self.height, self.width) if self.orientation in _SWAPS_SIDES else (self.width, self.height)


def _open(path: str, opts: ImageOptions, data: bytes | None = None) -> Image.Image:
    """``Image.open`` with our pixel cap, and file problems turned into :class:`BadImage`.

    ``data``: the image's bytes when it lives inside a container (a tar member, a Parquet cell; see
    ``shared/sources.py``); ``path`` then only names it in messages.
    """
    # Pillow refuses images over 2x MAX_IMAGE_PIXELS at open; set the cap so ours is the one that counts
    # (checked exactly in _check_size). A process-wide setting, but every caller here passes the same cap.
    Image.MAX_IMAGE_PIXELS = opts.max_pixels
    if data is None:
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            if "://" in str(path):  # (a manifest's image is a local path; tar members and Parquet cells carry bytes)
                raise BadImage(path, MISSING, "an image URL: a manifest's images are read from local files; download "
                                              "them first, or pack them into WebDataset tars or Parquet, which are "
                                              "read from URLs") from None
            raise BadImage(path, MISSING, "no such file") from None
        except OSError as err:
            raise BadImage(path, UNREADABLE, err.strerror or str(err)) from None
    else:
        size = len(data)
    if size == 0:
        raise BadImage(path, ZERO_BYTE, "the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path if data is None else io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise BadImage(path, BOMB, f"{err} (raise the cap with --max-pixels if the image is legitimate)") from None
    except UnidentifiedImageError:
        raise BadImage(path, NOT_AN_IMAGE, "Pillow cannot identify the file as an image") from None
    except IsADirectoryError:
        raise BadImage(path, NOT_AN_IMAGE, "it is a directory") from None
    except OSError as err:
        raise BadImage(path, UNREADABLE, str(err)) from None


def _check_size(path: str, width: int, height: int, opts: ImageOptions) -> None:
    if width * height > opts.max_pixels:
        raise BadImage(path, BOMB, f"{width}x{height} = {width * height} pixels exceeds the cap of {opts.max_pixels} "
                                   "(raise it with --max-pixels if the image is legitimate)")
    least = opts.resolution / 4
    if not opts.allow_upscale and min(width, height) < least:
        raise BadImage(path, TOO_SMALL, f"{width}x{height} px; at --resolution {opts.resolution} each side needs at "
                                        f"least {least:g} px (pass --allow-upscale to upscale small images)")


def probe_image(path: str, opts: ImageOptions, data: bytes | None = None) -> Probe:
    """Header-only checks and the image's target (bucket). Never raises for a bad image: the returned
    probe carries ``reason`` and ``detail`` instead. ``data``: the bytes of an image in a container."""
    probe = Probe(path=path)
    try:
        probe.file_bytes = os.stat(path).st_size if data is None else len(data)
    except OSError:
        pass
    try:
        with _open(path, opts, data) as img:
            probe.width, probe.height = img.size
            probe.mode, probe.format = img.mode, img.format or ""
            try:
                probe.orientation = int(img.getexif().get(ExifTags.Base.Orientation, 1) or 1)
            except Exception:  # a malformed EXIF block: Pillow's exif_transpose will ignore it too
                probe.orientation = 1
        _check_size(path, probe.width, probe.height, opts)
        probe.target = opts.nearest_target(*probe.oriented)
    except BadImage as bad:
        probe.reason, probe.detail = bad.reason, bad.detail
    return probe


# ---------------------------------------------------------------------------------------------
# Full decode
# ---------------------------------------------------------------------------------------------
def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """16-bit grayscale (``I;16*``, or ``I`` as Pillow opens 16-bit PNGs) scaled to 8 bits.

    ``convert("L")`` would clip everything above 255 to white; we scale 0..65535 to 0..255 instead.
    """
    arr = np.asarray(img).astype(np.int64)
    return Image.fromarray(((np.clip(arr, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8), "L")


def to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode -> ``RGB``. Transparency (alpha band, palette or color-key tRNS) is composited
    on ``background``; CMYK uses Pillow's conversion (Adobe-inverted JPEGs are handled by its decoder)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        img = _sixteen_bit_to_l(img)
    has_alpha = img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _classify_decode_error(path: str, err: Exception) -> BadImage:
    text = str(err)
    if isinstance(err, (EOFError,)) or "truncated" in text.lower() or "unexpected end" in text.lower():
        return BadImage(path, TRUNCATED, text or "the file ends before the image data does")
    return BadImage(path, DECODE_ERROR, f"{type(err).__name__}: {text}")


def load_image(path: str, opts: ImageOptions, target: tuple[int, int] | None = None, data: bytes | None = None
               ) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Decode ``path`` to ``uint8 [3, H, W]`` at ``target = (W, H)`` (default: the probe's nearest target).

    Returns the pixels and the crop box ``(x0, y0, x1, y1)`` in the EXIF-oriented source image.
    Raises :class:`BadImage` for missing, empty, non-image, too small, too large, truncated or corrupt files.
    ``data``: the bytes of an image inside a container (``path`` then names it in messages).
    """
    with _open(path, opts, data) as img:
        _check_size(path, *img.size, opts)
        try:
            img.load()  # decode now, so truncation is reported as such and not as a later resize error
            oriented = ImageOps.exif_transpose(img)
            rgb = to_rgb(oriented, opts.background)
        except BadImage:
            raise
        except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, EOFError ... on bad data
            raise _classify_decode_error(path, err) from None
    if target is None:
        target = opts.targets[opts.nearest_target(*rgb.size)]
    box = center_box(*rgb.size, target)
    out = rgb.resize(target, RESAMPLE[opts.resample], box=box)
    return np.ascontiguousarray(np.asarray(out, dtype=np.uint8).transpose(2, 0, 1)), box
