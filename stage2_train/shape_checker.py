"""A GenEval-style checker for the synthetic shapes of ``shared/shapes.py``: find, classify, score.

GenEval detects objects with Mask2Former and names colors with CLIP; on flat shapes over a white
background, color segmentation and a little geometry do the same job exactly and in milliseconds:

1. **Segment.** A pixel belongs to an object when its color is clearly not white: its chroma
   (max - min channel) is at least half the chroma of the palette color nearest in hue. Hue and the
   chroma ratio are unchanged when a color is mixed with white, so anti-aliased or blurred edges are
   cut near their 50 % coverage line whatever the color.
2. **Label.** 8-connected components of that mask (numpy label propagation); components smaller than
   ``min_area`` are noise and dropped. Each component's color is the majority of its pixels' colors.
3. **Classify** by geometry of the component, with features that average over all its pixels and so
   stay stable under noise and slight blur. An upright triangle's rows widen downwards, so the skewness
   of its pixels' y coordinates is about -0.57 (circles and squares: 0). A square and a circle are told
   apart by which fits better: the component is compared (IoU) with a square and with a disk of its own
   area centered on its centroid; their difference lies in four corner regions of ~5 % of the area
   each, far more than edge noise moves. Blur rounds corners, so ties go to the square (``SQUARE_BIAS``).
4. **Score** against GenEval metadata as GenEval's ``evaluate_images.py`` does (reimplemented from its
   documented behaviour): every ``include`` clause must hold and no ``exclude`` clause may. A clause needs
   at least ``count`` objects of its class; with ``color``, the ``count`` largest of them (largest stands
   in for GenEval's detector confidence) must all have that color; with ``position: [relation, j]``,
   each of them must stand in that relation to each object matched by clause ``j``. The relation test is
   GenEval's: box-center offset, shrunk per axis by 0.1 x the sum of the two boxes' sides, then an axis
   counts when its share of the (unshrunk) offset's length exceeds 0.5. ``summarize`` reports accuracy per
   tag over images and their unweighted mean, GenEval's overall score.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from semroute.shared.shapes import PALETTE, TAGS

_PALETTE_NAMES = tuple(PALETTE)
_PALETTE_RGB = np.array([PALETTE[k] for k in _PALETTE_NAMES], dtype=np.float32)

# Thresholds, with the ground-truth feature values they separate.
MIN_COVERAGE = 0.5  # chroma / palette chroma; 0.5 cuts an anti-aliased edge in the middle
MIN_CHROMA = 24.0  # below this the hue of a pixel is noise (Gaussian noise on white stays under it)
TRIANGLE_MAX_SKEW = -0.2  # skewness of y: triangle ~-0.57 (-0.2 under blur + noise), others |.| < 0.11
SQUARE_BIAS = -0.03  # square if IoU(square) - IoU(disk) >= this: clean squares +0.06..0.19, disks -0.25..-0.11
POSITION_THRESHOLD = 0.1  # GenEval's default
_GENEVAL_KEYS = ("tag", "include", "exclude", "prompt")


@dataclass(frozen=True)
class Detection:
    """One found object. ``bbox`` is ``(x0, y0, x1, y1)`` in pixels, end exclusive."""

    cls: str
    color: str
    bbox: tuple[int, int, int, int]
    area: int
    squareness: float  # IoU with a square minus IoU with a disk (same area, same centroid)
    skew: float  # skewness of the pixels' y coordinates; negative = mass low in the box (a triangle)

    @property
    def center(self) -> tuple[float, float]:
        return (self.bbox[0] + self.bbox[2]) / 2, (self.bbox[1] + self.bbox[3]) / 2


@dataclass
class ImageResult:
    """The verdict on one image; ``reason`` is empty when correct."""

    tag: str
    prompt: str
    correct: bool
    reason: str
    metadata: dict
    detections: list[Detection] = field(default_factory=list)
    filename: str | None = None


# -- 1-2. segmentation and components -----------------------------------------------------------------


def _as_rgb_array(image) -> np.ndarray:
    """``(H, W, 3)`` float32 in 0..255 from a PIL image or a uint8 / float (0..1) array."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got shape {arr.shape}")
    arr = arr[..., :3].astype(np.float32)
    if np.asarray(image).dtype.kind == "f" and arr.max(initial=0.0) <= 1.0:
        arr *= 255.0
    return arr


def _hue(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees; (..., 3) -> (...). Zero where the pixel is gray."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    c = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return 60.0 * h


def color_map(image) -> np.ndarray:
    """Per-pixel palette index, -1 for background; ``(H, W)`` int."""
    rgb = _as_rgb_array(image)  # (H, W, 3)
    chroma = rgb.max(-1) - rgb.min(-1)
    diff = np.abs(_hue(rgb)[..., None] - _hue(_PALETTE_RGB)[None, None, :])  # (H, W, K)
    nearest = np.minimum(diff, 360.0 - diff).argmin(-1)
    palette_chroma = _PALETTE_RGB.max(-1) - _PALETTE_RGB.min(-1)
    fg = (chroma >= MIN_CHROMA) & (chroma >= MIN_COVERAGE * palette_chroma[nearest])
    return np.where(fg, nearest, -1)


def _shift(a: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """``out[y, x] = a[y - dy, x - dx]``, ``fill`` where that falls outside."""
    out = np.full_like(a, fill)
    h, w = a.shape
    dst = (slice(max(dy, 0), h + min(dy, 0)), slice(max(dx, 0), w + min(dx, 0)))
    src = (slice(max(-dy, 0), h - max(dy, 0)), slice(max(-dx, 0), w - max(dx, 0)))
    out[dst] = a[src]
    return out


def label_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components of a boolean ``(H, W)`` mask: ``(labels, n)``, labels -1 outside the mask.

    Each pixel starts with its own flat index as label and repeatedly takes the smallest label among
    its neighbours; pointer jumping (``label = label[label]``) makes that converge in a few rounds for
    compact blobs. Labels are then renumbered 0..n-1 in raster order of each component's first pixel.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    h, w = mask.shape
    big = h * w
    labels = np.where(mask, np.arange(big).reshape(h, w), big)
    steps = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    if connectivity == 8:
        steps += [(1, 1), (1, -1), (-1, 1), (-1, -1)]
    while True:
        new = labels
        for dy, dx in steps:
            new = np.minimum(new, _shift(labels, dy, dx, big))
        new = np.where(mask, new, big)
        flat = np.append(new.ravel(), big)  # index ``big`` maps to itself
        new = flat[flat[new]]  # pointer jumping, twice
        if np.array_equal(new, labels):
            break
        labels = new
    roots, inverse = np.unique(labels, return_inverse=True)
    n = int((roots < big).sum())
    out = np.where(mask, inverse.reshape(h, w), -1)
    return out, n


# -- 3. objects ---------------------------------------------------------------------------------------


def _template_iou(xs: np.ndarray, ys: np.ndarray, kind: str) -> float:
    """IoU of the pixels ``(ys, xs)`` with an axis-aligned square or a disk of the same area, both
    centered on their centroid (coordinates are pixel indices)."""
    cx, cy = xs.mean(), ys.mean()
    gy, gx = np.mgrid[ys.min() - 2:ys.max() + 3, xs.min() - 2:xs.max() + 3]  # the box plus a margin
    mask = np.zeros(gx.shape, dtype=bool)
    mask[ys - gy[0, 0], xs - gx[0, 0]] = True
    if kind == "square":
        half = np.sqrt(len(xs)) / 2
        template = (np.abs(gx - cx) < half) & (np.abs(gy - cy) < half)
    else:
        template = (gx - cx) ** 2 + (gy - cy) ** 2 < len(xs) / np.pi
    return float((mask & template).sum() / (mask | template).sum())


def _classify(squareness: float, skew: float) -> str:
    if skew <= TRIANGLE_MAX_SKEW:
        return "triangle"
    return "square" if squareness >= SQUARE_BIAS else "circle"


def default_min_area(height: int, width: int) -> int:
    """Smaller components are noise: about a quarter of the smallest drawn shape's area."""
    return max(5, round(0.006 * height * width))


def detect(image, *, min_area: int | None = None, connectivity: int = 8) -> list[Detection]:
    """Find the shapes in an RGB image (PIL image or ``(H, W, 3)`` array), largest first."""
    colors = color_map(image)
    h, w = colors.shape
    min_area = default_min_area(h, w) if min_area is None else min_area
    labels, n = label_components(colors >= 0, connectivity)
    found = []
    for k in range(n):
        ys, xs = np.nonzero(labels == k)
        area = len(ys)
        if area < min_area:
            continue
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        squareness = _template_iou(xs, ys, "square") - _template_iou(xs, ys, "disk")
        yc = ys - ys.mean()
        skew = float((yc**3).mean() / max((yc**2).mean(), 1e-6) ** 1.5)
        color = _PALETTE_NAMES[int(np.bincount(colors[ys, xs], minlength=len(_PALETTE_NAMES)).argmax())]
        found.append(Detection(_classify(squareness, skew), color, (x0, y0, x1, y1), area, round(squareness, 4),
                               round(skew, 4)))
    return sorted(found, key=lambda d: -d.area)


# -- 4. scoring ---------------------------------------------------------------------------------------


def relations(obj: Detection, target: Detection, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Where ``obj`` is relative to ``target``, by GenEval's rule (see the module docstring)."""
    (ox, oy), (tx, ty) = obj.center, target.center
    offset = np.array([ox - tx, oy - ty])
    sides = np.array([obj.bbox[2] - obj.bbox[0] + target.bbox[2] - target.bbox[0],
                      obj.bbox[3] - obj.bbox[1] + target.bbox[3] - target.bbox[1]], dtype=float)
    shrunk = np.sign(offset) * np.maximum(np.abs(offset) - threshold * sides, 0.0)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:  # image y grows downwards
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


def score_detections(found: list[Detection], metadata: dict) -> tuple[bool, str]:
    """``(correct, reason)`` for detections against one GenEval metadata dict."""
    reasons: list[str] = []
    groups: list[list[Detection] | None] = []
    for clause in metadata.get("include", []):
        cls, count = clause["class"], clause["count"]
        of_class = [d for d in found if d.cls == cls]  # largest first
        if len(of_class) < count:
            reasons.append(f"expected {cls}>={count}, found {len(of_class)}")
            groups.append(None)
            continue
        chosen = of_class[:count]
        if "color" in clause:
            n_right = sum(d.color == clause["color"] for d in chosen)
            if n_right < count:
                others = sorted(d.color for d in chosen if d.color != clause["color"])
                reasons.append(f"expected {clause['color']} {cls}>={count}, found {n_right} {clause['color']}; "
                               f"and {', '.join(others)}")
        if "position" in clause:
            rel, j = clause["position"]
            targets = groups[j] if j < len(groups) else None
            if not targets:
                reasons.append(f"no target for {cls} to be {rel}")
            else:
                bad = [relations(d, t) for d in chosen for t in targets if rel not in relations(d, t)]
                if bad:
                    reasons.append(f"expected {cls} {rel} target, found {sorted(bad[0]) or 'no clear relation'}")
        groups.append(chosen)
    for clause in metadata.get("exclude", []):
        cls, count = clause["class"], clause["count"]
        n = sum(d.cls == cls and d.color == clause.get("color", d.color) for d in found)
        if n >= count:
            reasons.append(f"expected {cls}<{count}, found {n}")
    return not reasons, "\n".join(reasons)


def score_image(image, metadata: dict, *, filename: str | None = None, **detect_kwargs) -> ImageResult:
    """Detect the shapes of one image and score them against its GenEval metadata."""
    found = detect(image, **detect_kwargs)
    correct, reason = score_detections(found, metadata)
    return ImageResult(metadata.get("tag", ""), metadata.get("prompt", ""), correct, reason, metadata, found,
                       filename)


def score_folder(folder: str | Path, **detect_kwargs) -> list[ImageResult]:
    """Score a folder in GenEval's layout: ``<folder>/<digits>/metadata.jsonl`` (one JSON object) and
    ``samples/<digits>.png``, the layout ``semroute sample`` writes for GenEval-format prompt files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    results = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()):
        meta_path = sub / "metadata.jsonl"
        try:
            metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{meta_path}: cannot read GenEval metadata (one JSON object expected): {err}") from None
        samples = sub / "samples"
        names = sorted(p.name for p in samples.iterdir() if re.match(r"\d+\.png", p.name)) if samples.is_dir() else []
        for name in names:
            with Image.open(samples / name) as img:
                results.append(score_image(img, metadata, filename=str(samples / name), **detect_kwargs))
    return results


def summarize(results: Iterable[ImageResult]) -> dict:
    """GenEval's summary: accuracy per tag over images, and ``overall`` = their unweighted mean.

    Also ``n_images``, ``n_prompts`` (distinct metadata), ``correct_images`` and ``correct_prompts``
    (a prompt counts when any of its images is correct). Tags appear in ``TAGS`` order, then others.
    """
    results = list(results)
    by_tag: dict[str, list[bool]] = {}
    by_prompt: dict[str, bool] = {}
    for r in results:
        by_tag.setdefault(r.tag, []).append(r.correct)
        # A prompt is its GenEval metadata; other keys (a data set record's id, image, objects) are not.
        key = json.dumps({k: r.metadata[k] for k in _GENEVAL_KEYS if k in r.metadata}, sort_keys=True)
        by_prompt[key] = by_prompt.get(key, False) or r.correct
    order = [t for t in TAGS if t in by_tag] + [t for t in by_tag if t not in TAGS]
    per_tag = {t: float(np.mean(by_tag[t])) for t in order}
    return {
        "overall": float(np.mean(list(per_tag.values()))) if per_tag else float("nan"),
        "per_tag": per_tag,
        "n_per_tag": {t: len(by_tag[t]) for t in order},
        "n_images": len(results),
        "n_prompts": len(by_prompt),
        "correct_images": float(np.mean([r.correct for r in results])) if results else float("nan"),
        "correct_prompts": float(np.mean(list(by_prompt.values()))) if by_prompt else float("nan"),
    }


def format_summary(summary: dict) -> str:
    """A short text table in the spirit of GenEval's ``summary_scores.py``."""
    lines = [f"images {summary['n_images']}, prompts {summary['n_prompts']}, "
             f"correct images {summary['correct_images']:.2%}, correct prompts {summary['correct_prompts']:.2%}"]
    for tag, acc in summary["per_tag"].items():
        lines.append(f"  {tag:<16} {acc:7.2%}  ({summary['n_per_tag'][tag]} images)")
    lines.append(f"overall (mean over tags): {summary['overall']:.5f}")
    return "\n".join(lines)


def write_results(results: Iterable[ImageResult], path: str | Path) -> Path:
    """Write one JSON line per image in the fields of GenEval's ``results.jsonl`` (``filename``, ``tag``,
    ``prompt``, ``correct``, ``reason``, ``metadata`` and ``details`` as JSON strings; boxes get score 1),
    so GenEval's ``summary_scores.py`` can read it too; plus ``detections`` with colors and features."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fp:
        for r in results:
            details: dict[str, list] = {}
            for d in r.detections:
                details.setdefault(d.cls, []).append([*d.bbox, 1.0])
            fp.write(json.dumps({
                "filename": r.filename, "tag": r.tag, "prompt": r.prompt, "correct": r.correct,
                "reason": r.reason, "metadata": json.dumps(r.metadata), "details": json.dumps(details),
                "detections": [asdict(d) for d in r.detections],
            }) + "\n")
    return path
