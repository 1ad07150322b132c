"""The synthetic shapes data set and the GenEval-style checker that reads it back."""

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from semroute.shared import shapes
from semroute.shared.manifest import read_manifest
from semroute.stage2_train import shape_checker as checker
from semroute.shared.errors import SemrouteError
from semroute.stage2_train.prompt_files import layout_for, read_prompts, save_image
from testkit import run_cli


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    """240 ground-truth images (40 per tag) at 32x32: (manifest path, records)."""
    manifest = shapes.generate_dataset(tmp_path_factory.mktemp("shapes"), 240, seed=1)
    return manifest, [json.loads(line) for line in manifest.read_text().splitlines()]


def _image(record):
    with Image.open(record["image"]) as img:
        return img.convert("RGB")


def test_deterministic_and_prefix_stable(tmp_path):
    a = shapes.generate_dataset(tmp_path / "a", 12, seed=7, paraphrases=True)
    b = shapes.generate_dataset(tmp_path / "b", 12, seed=7, paraphrases=True)
    ra, rb = ([json.loads(l) for l in m.read_text().splitlines()] for m in (a, b))
    strip = lambda rs: [{k: v for k, v in r.items() if k != "image"} for r in rs]  # noqa: E731
    assert strip(ra) == strip(rb)
    assert all(np.array_equal(np.asarray(_image(x)), np.asarray(_image(y))) for x, y in zip(ra, rb))
    # Record i does not depend on the data set's length; another seed gives other scenes.
    rec, img = shapes.make_record(5, seed=7, paraphrases=True)
    assert {k: v for k, v in rec.items() if k != "image"} == strip(ra)[5]
    assert np.array_equal(np.asarray(img), np.asarray(_image(ra[5])))
    other = [shapes.make_record(i, seed=8)[0]["objects"] for i in range(12)]
    assert other != [r["objects"] for r in ra]
    assert all(isinstance(r["text"], list) and len(r["text"]) == 2 for r in ra)


def test_tag_weights_give_tags_their_shares(tmp_path):
    assert shapes.tag_cycle() == shapes.TAGS
    cycle = shapes.tag_cycle({"single_object": 2, "colors": 3, "position": 0})
    assert Counter(cycle) == {"single_object": 2, "colors": 3, "two_object": 1, "counting": 1, "color_attr": 1}
    manifest = shapes.generate_dataset(tmp_path, 16, seed=3, tag_weights={"single_object": 2, "colors": 2})
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert Counter(r["tag"] for r in records) == {"single_object": 4, "colors": 4, "two_object": 2, "counting": 2,
                                                  "position": 2, "color_attr": 2}
    # Each record's caption, metadata and drawing agree whatever tag the cycle gave it.
    for r in records:
        assert r["prompt"] == r["text"] and len(r["objects"]) == sum(i.get("count", 1) for i in r["include"])
    for bad in ({"squares": 2}, {"colors": -1}, {t: 0 for t in shapes.TAGS}):
        with pytest.raises(ValueError):
            shapes.tag_cycle(bad)


def test_demo_tag_weights_option_errors_are_clear():
    from semroute.demo import parse_tag_weights
    from semroute.shared.errors import SemrouteError

    assert parse_tag_weights(" single_object=2, colors=3 ") == {"single_object": 2, "colors": 3}
    assert parse_tag_weights("") == {}
    with pytest.raises(SemrouteError, match="'colors' is not TAG=WHOLE_NUMBER"):
        parse_tag_weights("colors")
    with pytest.raises(SemrouteError, match="unknown tag 'shape'"):
        parse_tag_weights("shape=2")


def test_demo_refuses_a_folder_made_with_other_settings(tmp_path):
    """A rerun of the demo reuses the folder's data, caches, run and samples: with other settings it must refuse
    (naming what differs) rather than report the old settings' results as the new ones'."""
    from semroute.demo import SETTINGS_FILE, DemoConfig, claim_folder, recorded_settings

    out = tmp_path / "demo"
    bad = run_cli("demo", "--out", str(out), "--tag-weights", "colour=2", "--no-progress", check=False)
    assert bad.returncode != 0 and "unknown tag 'colour'" in bad.stderr and "Traceback" not in bad.stderr
    assert not out.exists()  # named before anything is generated or encoded
    few = run_cli("demo", "--out", str(out), "--images", "20", "--no-progress", check=False)
    assert "cannot fill one batch of 32" in few.stderr and "Traceback" not in few.stderr and not out.exists()

    claim_folder(DemoConfig(out=str(out), seed=0))
    assert json.loads((out / SETTINGS_FILE).read_text()) == recorded_settings(DemoConfig(seed=0))
    claim_folder(DemoConfig(out=str(out), seed=0, progress=False, num_workers=3))  # same settings: reused
    (out / "data").mkdir()
    (out / "data" / "train.jsonl").write_text("kept\n")
    other = run_cli("demo", "--out", str(out), "--seed", "1", "--images", "90", "--no-progress", check=False)
    assert other.returncode != 0 and "Traceback" not in other.stderr
    assert "seed 0 (now 1)" in other.stderr and "images 1800 (now 90)" in other.stderr, other.stderr
    assert (out / "data" / "train.jsonl").read_text() == "kept\n" and sorted(p.name for p in out.iterdir()) == [
        "data", SETTINGS_FILE]

    (tmp_path / "a-file").write_text("mine\n")
    with pytest.raises(SemrouteError, match="is a file"):
        claim_folder(DemoConfig(out=str(tmp_path / "a-file")))
    assert (tmp_path / "a-file").read_text() == "mine\n"

    (out / SETTINGS_FILE).unlink()  # a folder from before the record: its settings are unknown
    with pytest.raises(SemrouteError, match="without a record of its settings"):
        claim_folder(DemoConfig(out=str(out)))


def test_manifest_reads_and_metadata_matches_the_drawn_objects(train_set):
    manifest, records = train_set
    m = read_manifest(manifest, need_image=True)
    assert len(m.records) == 240 and m.records[0].sample_id == "train-000000"
    assert Counter(r["tag"] for r in records) == {t: 40 for t in shapes.TAGS}
    for r in records:
        assert r["text"] == r["prompt"]
        objs = r["objects"]
        want = Counter((e["class"], e.get("color")) for e in r["include"] for _ in range(e["count"]))
        got = Counter((o["class"], o["color"] if any("color" in e for e in r["include"]) else None) for o in objs)
        assert got == want, r["prompt"]
        assert ("exclude" in r) == (r["tag"] == "counting")
        boxes = [o["bbox"] for o in objs]
        for i, a in enumerate(boxes):  # inside the image, square, apart from every other box
            assert 0 <= a[0] < a[2] <= 32 and 0 <= a[1] < a[3] <= 32 and a[2] - a[0] == a[3] - a[1]
            assert all(shapes._apart(tuple(a), tuple(b), 2) for b in boxes[i + 1:])
        for k, e in enumerate(r["include"]):
            if "position" in e:  # the stated relation is the only one GenEval's rule sees
                rel, j = e["position"]
                det = [checker.Detection(o["class"], o["color"], tuple(o["bbox"]), 0, 0.0, 0.0) for o in objs]
                assert checker.relations(det[k], det[j]) == {rel}, r["prompt"]
        assert not shapes.is_heldout(r)


def test_heldout_prompts():
    metas = shapes.heldout_prompts(60, seed=3)
    assert metas == shapes.heldout_prompts(60, seed=3)
    assert Counter(m["tag"] for m in metas) == {t: 10 for t in shapes.TAGS}
    for m in metas:
        assert shapes.is_heldout(m) == (m["tag"] in shapes.HELDOUT_TAGS)
    # Held-out prompts still only use classes and colors that training shows in the same tag.
    for tag in shapes.HELDOUT_TAGS:
        train = shapes.split_pool(tag, "train")
        facts = lambda pool: {(e["class"], e.get("color")) for m in pool for e in m["include"]}  # noqa: E731
        assert facts(shapes.split_pool(tag, "heldout")) <= facts(train)
    distinct = {m["prompt"] for m in metas if m["tag"] == "color_attr"}
    assert len(distinct) == 10  # no repeat before the held-out pool is used up


def test_prompt_file_round_trip(tmp_path):
    metas = shapes.heldout_prompts(12)
    path = shapes.write_prompt_file(metas, tmp_path / "heldout.jsonl")
    entries = read_prompts(path)
    assert [e.record for e in entries] == metas


def test_checker_scores_ground_truth_near_100(train_set):
    _, records = train_set
    summary = checker.summarize(checker.score_image(_image(r), r) for r in records)
    assert summary["overall"] >= 0.98, checker.format_summary(summary)
    assert set(summary["per_tag"]) == set(shapes.TAGS) and summary["n_images"] == 240


def _content(meta):
    """What an image of ``meta`` shows, independent of wording (a left of b == b right of a)."""
    inc = meta["include"]
    if meta["tag"] == "position":
        rel, j = inc[1]["position"]
        a, b = inc[1]["class"], inc[j]["class"]
        flip = {"right of": "left of", "below": "above"}
        return (b, flip[rel], a) if rel in flip else (a, rel, b)
    return frozenset((e["class"], e["count"], e.get("color")) for e in inc)


def test_checker_scores_mismatched_pairs_near_0(train_set):
    _, records = train_set
    results = []
    for i, r in enumerate(records):
        other = next(o for o in records[i + 1:] + records[:i] if o["tag"] == r["tag"] and _content(o) != _content(r))
        results.append(checker.score_image(_image(r), other))
    summary = checker.summarize(results)
    assert summary["overall"] <= 0.1, checker.format_summary(summary)
    assert all(r.reason for r in results if not r.correct)


def test_checker_tolerates_noise_and_slight_blur(train_set):
    _, records = train_set
    rng = np.random.default_rng(0)
    results = []
    for r in records:
        img = _image(r).filter(ImageFilter.GaussianBlur(0.6))
        noisy = np.asarray(img).astype(np.float32) + rng.normal(0, 10, (32, 32, 3))
        results.append(checker.score_image(np.clip(noisy, 0, 255).astype(np.uint8), r))
    summary = checker.summarize(results)
    assert summary["overall"] >= 0.95, checker.format_summary(summary)


@pytest.mark.parametrize("size", [48, 64])
def test_checker_at_larger_sizes(tmp_path, size):
    manifest = shapes.generate_dataset(tmp_path, 36, size=size, seed=2)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    summary = checker.summarize(checker.score_image(_image(r), r) for r in records)
    assert summary["overall"] == 1.0, checker.format_summary(summary)


def test_label_components_connectivity():
    mask = np.array([
        [1, 1, 0, 0, 0],
        [0, 1, 0, 1, 1],
        [0, 0, 1, 0, 1],
        [1, 0, 0, 0, 0],
    ], dtype=bool)
    labels, n = checker.label_components(mask, connectivity=8)
    assert n == 2 and labels[0, 0] == labels[2, 2] == labels[1, 3] != labels[3, 0]  # joined at corners
    labels4, n4 = checker.label_components(mask, connectivity=4)
    assert n4 == 4 and labels4[0, 0] == labels4[1, 1] != labels4[2, 2]
    assert (labels4 == -1).sum() == (~mask).sum()
    # A long snake converges too.
    snake = np.zeros((9, 9), dtype=bool)
    snake[::2, :] = True
    snake[1::4, -1] = snake[3::4, 0] = True
    assert checker.label_components(snake)[1] == 1


def test_scoring_rules_follow_geneval():
    def det(cls, color, x, y, s=8):
        return checker.Detection(cls, color, (x, y, x + s, y + s), s * s, 0.0, 0.0)

    meta = {"tag": "position", "include": [{"class": "square", "count": 1},
                                           {"class": "circle", "count": 1, "position": ["left of", 0]}]}
    assert checker.score_detections([det("square", "red", 20, 10), det("circle", "blue", 2, 12)], meta) == (True, "")
    ok, reason = checker.score_detections([det("square", "red", 20, 10), det("circle", "blue", 14, 20)], meta)
    assert not ok and "expected circle left of target" in reason
    ok, reason = checker.score_detections([det("circle", "blue", 2, 12)], meta)
    assert not ok and "expected square>=1, found 0" in reason and "no target" in reason
    counting = {"tag": "counting", "include": [{"class": "circle", "count": 2}],
                "exclude": [{"class": "circle", "count": 3}]}
    two, three = [det("circle", "red", 0, 0), det("circle", "red", 10, 0)], [det("circle", "red", 20, 20)]
    assert checker.score_detections(two, counting)[0]
    assert checker.score_detections(two + three, counting) == (False, "expected circle<3, found 3")
    color = {"tag": "colors", "include": [{"class": "square", "count": 1, "color": "red"}]}
    ok, reason = checker.score_detections([det("square", "blue", 0, 0, 9), det("square", "red", 20, 20)], color)
    assert not ok and reason.startswith("expected red square>=1, found 0 red")  # the largest one counts


def test_score_folder_in_geneval_layout(tmp_path, train_set):
    _, records = train_set
    picked = records[:12]
    metas = [{k: r[k] for k in ("tag", "include", "exclude", "prompt") if k in r} for r in picked]
    entries = read_prompts(shapes.write_prompt_file(metas, tmp_path / "p.jsonl"))
    layout = layout_for("geneval", tmp_path / "out", n_per_prompt=2)
    for e, r in zip(entries, picked):
        layout.prepare(e)
        save_image(_image(r), layout.image_path(e, 0))
        save_image(Image.new("RGB", (32, 32), "white"), layout.image_path(e, 1))  # an empty sample
    results = checker.score_folder(tmp_path / "out")
    summary = checker.summarize(results)
    assert summary["n_images"] == 24 and summary["n_prompts"] == 12 and summary["correct_prompts"] == 1.0
    assert [r.correct for r in results[:2]] == [True, False]
    lines = checker.write_results(results, tmp_path / "results.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert first["filename"].endswith("00000/samples/0000.png") and json.loads(first["metadata"]) == metas[0]
    assert set(json.loads(first["details"])) == {o["class"] for o in picked[0]["objects"]}


def _meta(tag, *include, exclude=None):
    meta = {"tag": tag, "include": list(include), "prompt": tag}
    if exclude:
        meta["exclude"] = exclude
    return meta


_CIRCLE_LEFT_OF_SQUARE = _meta("position", {"class": "square", "count": 1},
                               {"class": "circle", "count": 1, "position": ["left of", 0]})
_THREE_TRIANGLES = _meta("counting", {"class": "triangle", "count": 3}, exclude=[{"class": "triangle", "count": 4}])
_RED_CIRCLE = _meta("colors", {"class": "circle", "count": 1, "color": "red"})


@pytest.mark.parametrize("meta, right, wrong, reason", [
    # wrong kind: a red square for "a red circle"
    (_RED_CIRCLE, [("circle", "red", (10, 10, 22, 22))], [("square", "red", (10, 10, 22, 22))],
     "expected circle>=1, found 0"),
    # wrong color: a blue circle
    (_RED_CIRCLE, [("circle", "red", (10, 10, 22, 22))], [("circle", "blue", (10, 10, 22, 22))],
     "expected red circle>=1, found 0 red"),
    # wrong count: two triangles, then four, for "three triangles"
    (_THREE_TRIANGLES, [("triangle", "green", (2, 2, 12, 12)), ("triangle", "green", (18, 2, 28, 12)),
                        ("triangle", "green", (10, 18, 20, 28))],
     [("triangle", "green", (2, 2, 12, 12)), ("triangle", "green", (18, 2, 28, 12))], "expected triangle>=3, found 2"),
    (_THREE_TRIANGLES, [("triangle", "green", (2, 2, 12, 12)), ("triangle", "green", (18, 2, 28, 12)),
                        ("triangle", "green", (2, 18, 12, 28))],
     [("triangle", "green", (2, 2, 12, 12)), ("triangle", "green", (18, 2, 28, 12)),
      ("triangle", "green", (2, 18, 12, 28)), ("triangle", "green", (18, 18, 28, 28))], "expected triangle<4, found 4"),
    # wrong position: the circle right of the square
    (_CIRCLE_LEFT_OF_SQUARE, [("circle", "blue", (2, 10, 13, 21)), ("square", "red", (19, 10, 30, 21))],
     [("circle", "blue", (19, 10, 30, 21)), ("square", "red", (2, 10, 13, 21))], "expected circle left of target"),
])
def test_checker_fails_wrong_kind_count_color_and_position(meta, right, wrong, reason):
    def draw(objs):
        return shapes.render([shapes.Shape(c, col, box) for c, col, box in objs], 32)

    good = checker.score_image(draw(right), meta)
    assert good.correct, good.reason  # the same scene drawn as asked passes
    bad = checker.score_image(draw(wrong), meta)
    assert not bad.correct and reason in bad.reason, bad.reason
