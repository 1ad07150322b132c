"""Synthetic colored shapes with GenEval-style captions and metadata: the demo's data set.

Each image is a few flat shapes on a white background, small enough (32x32 by default) for a tiny
pixel-space DiT to learn on a CPU. Every image comes from one GenEval-style prompt, and its record carries
that prompt's metadata in GenEval's own format (``tag``, ``include`` with ``class``/``count``/``color``/
``position``, ``exclude`` for counting), so the same checker scores ground truth and generated samples:

    single_object  "a photo of a circle"                     {class, count: 1}
    two_object     "a photo of a circle and a square"        two {class, count: 1}
    counting       "a photo of three triangles"              {class, count: N} + exclude {class, count: N+1}
    colors         "a photo of a red circle"                 {class, count: 1, color}
    position       "a photo of a circle left of a square"    [{square}, {circle, position: ["left of", 0]}]
    color_attr     "a photo of a red circle and a blue square"  two {class, count: 1, color}

Attributes a prompt does not state (the color in ``single_object``, say) are drawn at random.

Geometry is chosen so that a simple checker (``stage2_train/shape_checker.py``) can read an image back:
the three classes differ in how much of their bounding box they fill (square 1.0, circle ~0.79, upright
triangle 0.5) and triangles have their mass low in the box; the four colors are saturated and at least
~50 degrees apart in hue, and hue does not change when a color is blended with the white background
(anti-aliased or blurred edges). Objects never touch (a gap of ~8% of the image between boxes), and a
stated relation holds by a margin: the subject's center is past the other object's box along the
relation's axis, and the cross-axis offset is at most 0.3 of that distance, so GenEval's own relation
test (box centers, threshold 0.1) gives exactly the stated relation.

Held-out prompts. Four tags have tiny prompt spaces (3 to 12 distinct prompts with 3 classes and
4 colors), so every such prompt is also a training prompt: evaluation there measures new samples of seen
prompts, as GenEval does for real models. The two compositional tags hold out a fixed quarter of their
prompts (``HELDOUT_TAGS``; 6 of 24 ``position`` and 18 of 72 ``color_attr`` prompts, chosen once by
``HOLDOUT_SEED`` and independent of any data seed): ``split="train"`` never draws them, and
``heldout_prompts`` draws only them for these tags. A held-out ``position`` prompt may still have its
mirror ("a square right of a circle" for "a circle left of a square") in training, so it tests reading
the sentence, not a new scene.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from semroute.shared.files import write_atomic

CLASSES = ("square", "circle", "triangle")
PLURALS = {"square": "squares", "circle": "circles", "triangle": "triangles"}
# Saturated colors; hues about 0, 52, 129 and 227 degrees (see the module docstring).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (240, 210, 20),
    "green": (30, 170, 50),
    "blue": (40, 80, 220),
}
BACKGROUND = (255, 255, 255)
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
SPLITS = ("train", "heldout")

HELDOUT_TAGS = ("position", "color_attr")
HOLDOUT_SEED = 20240601  # fixed: the train/held-out split must not move with a data set's seed
HOLDOUT_FRACTION = 0.25

_SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges, like a smooth generated image
_CROSS_AXIS_MAX = 0.3  # cross-axis offset / along-axis distance, for a stated relation
# Object side as a fraction of the image side, by number of objects in the image.
_SIDE_FRACTION = {1: (0.34, 0.47), 2: (0.26, 0.36), 3: (0.22, 0.28), 4: (0.22, 0.28)}
# Below 7 pixels a rasterized circle fills ~89 % of its box and is no longer told from a square.
MIN_SIDE = 7
MIN_SIZE = 24


# -- prompts ------------------------------------------------------------------------------------------


def _a(word: str) -> str:
    return f"a {word}"


def _meta(tag: str, include: list[dict], prompt: str, exclude: list[dict] | None = None) -> dict:
    """A metadata dict with GenEval's key order (tag, include, [exclude], prompt)."""
    meta: dict = {"tag": tag, "include": include}
    if exclude is not None:
        meta["exclude"] = exclude
    meta["prompt"] = prompt
    return meta


def prompt_pool(tag: str) -> list[dict]:
    """Every distinct prompt of a tag, as GenEval-style metadata dicts, in a fixed order."""
    pairs = [(a, b) for a in CLASSES for b in CLASSES if a != b]
    colors = list(PALETTE)
    if tag == "single_object":
        return [_meta(tag, [{"class": c, "count": 1}], f"a photo of {_a(c)}") for c in CLASSES]
    if tag == "two_object":
        return [_meta(tag, [{"class": a, "count": 1}, {"class": b, "count": 1}], f"a photo of {_a(a)} and {_a(b)}")
                for a, b in pairs]
    if tag == "counting":
        return [_meta(tag, [{"class": c, "count": n}], f"a photo of {COUNT_WORDS[n]} {PLURALS[c]}",
                      exclude=[{"class": c, "count": n + 1}])
                for c in CLASSES for n in COUNT_WORDS]
    if tag == "colors":
        return [_meta(tag, [{"class": c, "count": 1, "color": k}], f"a photo of {_a(k)} {c}")
                for c in CLASSES for k in colors]
    if tag == "position":
        # GenEval order: the reference object first, the subject second with ["relation", 0].
        return [_meta(tag, [{"class": ref, "count": 1}, {"class": subj, "count": 1, "position": [rel, 0]}],
                      f"a photo of {_a(subj)} {rel} {_a(ref)}")
                for subj, ref in pairs for rel in RELATIONS]
    if tag == "color_attr":
        return [_meta(tag, [{"class": a, "count": 1, "color": ka}, {"class": b, "count": 1, "color": kb}],
                      f"a photo of {_a(ka)} {a} and {_a(kb)} {b}")
                for a, b in pairs for ka in colors for kb in colors if ka != kb]
    raise ValueError(f"unknown tag {tag!r}; expected one of {', '.join(TAGS)}")


def _heldout_prompt_texts() -> frozenset[str]:
    chosen: list[str] = []
    rng = np.random.default_rng(HOLDOUT_SEED)
    for tag in HELDOUT_TAGS:
        pool = prompt_pool(tag)
        k = max(1, round(len(pool) * HOLDOUT_FRACTION))
        chosen += [pool[i]["prompt"] for i in rng.permutation(len(pool))[:k]]
    return frozenset(chosen)


HELDOUT_PROMPTS = _heldout_prompt_texts()


def is_heldout(meta_or_prompt: dict | str) -> bool:
    """Whether a prompt (or its metadata) is kept out of the training split."""
    prompt = meta_or_prompt["prompt"] if isinstance(meta_or_prompt, dict) else meta_or_prompt
    return prompt in HELDOUT_PROMPTS


def split_pool(tag: str, split: str) -> list[dict]:
    """The prompts of ``tag`` that ``split`` draws from (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    pool = prompt_pool(tag)
    if tag not in HELDOUT_TAGS:
        return pool
    return [m for m in pool if is_heldout(m) == (split == "heldout")]


def paraphrase(meta: dict) -> str:
    """A second caption with the same content in other words (for ``text`` lists)."""
    inc, tag = meta["include"], meta["tag"]
    if tag == "single_object":
        return f"one {inc[0]['class']} on a white background"
    if tag == "two_object":
        return f"{_a(inc[1]['class'])} and {_a(inc[0]['class'])} on a white background"
    if tag == "counting":
        return f"{COUNT_WORDS[inc[0]['count']]} {PLURALS[inc[0]['class']]} on a white background"
    if tag == "colors":
        return f"{_a(inc[0]['class'])} colored {inc[0]['color']}"
    if tag == "position":
        where = {"left of": "to its left", "right of": "to its right", "above": "above it", "below": "below it"}
        return f"{_a(inc[0]['class'])} with {_a(inc[1]['class'])} {where[inc[1]['position'][0]]}"
    if tag == "color_attr":
        return f"{_a(inc[1]['color'])} {inc[1]['class']} and {_a(inc[0]['color'])} {inc[0]['class']}"
    raise ValueError(f"unknown tag {tag!r}")


def heldout_prompts(n: int, seed: int = 0) -> list[dict]:
    """``n`` GenEval-style metadata dicts for evaluation, tags in turn (``TAGS`` order).

    ``position`` and ``color_attr`` prompts come from the held-out quarter that training never sees; the
    other tags reuse their (few) training prompts. Each tag walks through its pool in a seeded order and
    repeats only once the pool is used up. Write them with ``write_prompt_file`` to get a file that
    ``semroute sample --prompts`` reads as GenEval's format.
    """
    rng = np.random.default_rng([seed, 1])
    pools = {tag: split_pool(tag, "heldout") for tag in TAGS}
    orders = {tag: rng.permutation(len(pools[tag])) for tag in TAGS}
    out = []
    for i in range(n):
        tag = TAGS[i % len(TAGS)]
        j = i // len(TAGS)
        out.append(copy.deepcopy(pools[tag][orders[tag][j % len(pools[tag])]]))
    return out


def write_prompt_file(metas: list[dict], path: str | Path) -> Path:
    """Write metadata dicts as a GenEval-format JSONL prompt file (one object per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(m) + "\n" for m in metas))
    return path


# -- scenes -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One drawn object; ``bbox`` is ``(x0, y0, x1, y1)`` in pixels, end exclusive, square."""

    cls: str
    color: str
    bbox: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2, (y0 + y1) / 2

    def to_json(self) -> dict:
        return {"class": self.cls, "color": self.color, "bbox": list(self.bbox)}


def _gap(size: int) -> int:
    # Empty pixels between boxes: keeps objects separate components even after a slight blur.
    return max(2, round(0.08 * size))


def _apart(a: tuple, b: tuple, gap: int) -> bool:
    """Boxes separated by at least ``gap`` empty pixels along x or y."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _relation_holds(subj: tuple, ref: tuple, rel: str, gap: int) -> bool:
    """``subj`` is ``rel`` ``ref`` with a margin: centers apart by at least half the two sides plus the
    gap along the relation's axis, cross-axis offset at most ``_CROSS_AXIS_MAX`` of that."""
    (sx, sy), (rx, ry) = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in (subj, ref)]
    along = {"left of": rx - sx, "right of": sx - rx, "above": ry - sy, "below": sy - ry}[rel]
    cross = abs(sy - ry) if rel in ("left of", "right of") else abs(sx - rx)
    need = (subj[2] - subj[0] + ref[2] - ref[0]) / 2 + gap
    return along >= need and cross <= _CROSS_AXIS_MAX * along


def _objects_of(meta: dict, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(class, color) of every object the metadata asks for; unstated colors at random."""
    colors = list(PALETTE)
    objs = []
    for entry in meta["include"]:
        for _ in range(entry["count"]):
            objs.append((entry["class"], entry.get("color") or colors[rng.integers(len(colors))]))
    return objs


def layout_scene(meta: dict, size: int, rng: np.random.Generator, max_tries: int = 2000) -> list[Shape]:
    """Place the objects of ``meta`` on a ``size`` x ``size`` canvas: no overlap, stated relation held.

    Rejection sampling; if a draw of sides does not fit after ``max_tries`` placements, the sides shrink
    by one pixel (down to ``MIN_SIDE``) and it tries again (deterministic for a given ``rng`` state).
    """
    objs = _objects_of(meta, rng)
    n = len(objs)
    lo, hi = _SIDE_FRACTION[min(n, 4)]
    sides = [int(rng.integers(max(MIN_SIDE, round(lo * size)), max(MIN_SIDE, round(hi * size)) + 1)) for _ in objs]
    # Index of each include entry's first object; a relation joins those (position entries have count 1).
    first = np.cumsum([0] + [e["count"] for e in meta["include"]])
    relation = None
    for k, entry in enumerate(meta["include"]):
        if "position" in entry:
            rel, ref = entry["position"]
            relation = (int(first[k]), int(first[ref]), rel)  # (subject, reference, relation)
    gap, margin = _gap(size), 1
    while True:
        for _ in range(max_tries):
            boxes: list[tuple] = []
            for side in sides:
                x, y = rng.integers(margin, size - margin - side + 1, size=2)
                box = (int(x), int(y), int(x) + side, int(y) + side)
                if not all(_apart(box, other, gap) for other in boxes):
                    break
                boxes.append(box)
            else:
                if relation is None or _relation_holds(boxes[relation[0]], boxes[relation[1]], relation[2], gap):
                    return [Shape(c, k, b) for (c, k), b in zip(objs, boxes)]
        if max(sides) <= MIN_SIDE:
            raise RuntimeError(f"cannot place {n} objects on a {size}x{size} image; use a larger size")
        sides = [max(MIN_SIDE, s - 1) for s in sides]


def render(shapes: list[Shape], size: int) -> Image.Image:
    """Draw shapes on a white RGB canvas, anti-aliased by supersampling."""
    ss = _SUPERSAMPLE
    big = Image.new("RGB", (size * ss, size * ss), BACKGROUND)
    draw = ImageDraw.Draw(big)
    for s in shapes:
        # Pillow's boxes include their end pixel, hence the -1.
        x0, y0, x1, y1 = s.bbox[0] * ss, s.bbox[1] * ss, s.bbox[2] * ss - 1, s.bbox[3] * ss - 1
        fill = PALETTE[s.color]
        if s.cls == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        elif s.cls == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif s.cls == "triangle":  # upright, isosceles, base = height
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            raise ValueError(f"unknown class {s.cls!r}; expected one of {', '.join(CLASSES)}")
    return big.resize((size, size), Image.Resampling.BOX)


# -- data sets ----------------------------------------------------------------------------------------


def tag_cycle(weights: dict[str, int] | None = None) -> tuple[str, ...]:
    """The order in which a data set's records take their tags: every tag once per round in ``TAGS`` order,
    and a tag of weight ``w`` in the first ``w`` rounds (``{"colors": 2}``: 7 records a cycle, 2 of them
    ``colors``). Weights default to 1; 0 leaves a tag out."""
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(TAGS))
    if unknown:
        raise ValueError(f"unknown tag {unknown[0]!r} in the tag weights; expected one of {', '.join(TAGS)}")
    if any(int(w) != w or w < 0 for w in weights.values()):
        raise ValueError(f"tag weights must be whole numbers >= 0, got {weights}")
    full = {tag: int(weights.get(tag, 1)) for tag in TAGS}
    cycle = tuple(tag for r in range(max(full.values())) for tag in TAGS if full[tag] > r)
    if not cycle:
        raise ValueError("the tag weights leave no tag")
    return cycle


def make_record(index: int, *, size: int = 32, seed: int = 0, split: str = "train",
                paraphrases: bool = False, tags: tuple[str, ...] = TAGS) -> tuple[dict, Image.Image]:
    """Record ``index`` of a data set and its image; its tag is ``tags[index % len(tags)]`` (see
    :func:`tag_cycle`). Each record has its own random stream, so record ``i`` is the same whatever the
    data set's length."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    tag = tags[index % len(tags)]
    pool = split_pool(tag, split)
    meta = pool[int(rng.integers(len(pool)))]
    shapes = layout_scene(meta, size, rng)
    record = {"id": f"{split}-{index:06d}", "image": None,
              "text": [meta["prompt"], paraphrase(meta)] if paraphrases else meta["prompt"], **meta,
              "objects": [s.to_json() for s in shapes]}
    return record, render(shapes, size)


def generate_dataset(out_dir: str | Path, n: int, *, size: int = 32, seed: int = 0, split: str = "train",
                     paraphrases: bool = False, tag_weights: dict[str, int] | None = None) -> Path:
    """Write ``n`` images and a JSONL manifest; return the manifest's path.

    Layout: ``<out_dir>/images/<split>-<index:06d>.png`` and ``<out_dir>/<split>.jsonl``. Each manifest
    line has ``id``, ``image`` (an absolute path, so ``semroute encode-images`` needs no
    ``--image-root``), ``text`` (the prompt, or ``[prompt, paraphrase]`` with ``paraphrases=True``), the
    GenEval metadata ``tag``/``include``/[``exclude``]/``prompt``, and ``objects`` (the drawn shapes with
    their boxes). Tags cycle in ``TAGS`` order, so every tag has n/6 images, unless ``tag_weights`` gives
    some tags more records (:func:`tag_cycle`). Deterministic in ``seed``.
    """
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels (shapes need {MIN_SIDE}), got {size}")
    out_dir = Path(out_dir).expanduser().resolve()
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    tags = tag_cycle(tag_weights)
    for i in range(n):
        record, image = make_record(i, size=size, seed=seed, split=split, paraphrases=paraphrases, tags=tags)
        path = image_dir / f"{record['id']}.png"
        image.save(path)
        record["image"] = str(path)
        lines.append(json.dumps(record) + "\n")
    manifest = out_dir / f"{split}.jsonl"
    write_atomic(manifest, "".join(lines))
    return manifest

