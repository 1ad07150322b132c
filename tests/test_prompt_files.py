"""Prompt-file readers on the real GenEval / GenAI-Bench / DrawBench files, and the output layouts."""

import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from semroute.stage2_train.prompt_files import (
    PromptFileError,
    detect_format,
    layout_for,
    read_prompts,
    save_image,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GENEVAL = DATA / "geneval" / "evaluation_metadata.jsonl"
GENAI = DATA / "genaibench" / "genai_image.json"
DRAW_TSV = DATA / "drawbench" / "DrawBench.tsv"
DRAW_JSON = DATA / "drawbench" / "drawbench_meta.json"

pytestmark = pytest.mark.skipif(not GENEVAL.is_file(), reason=f"prompt sets not found under {DATA}")


def _img():
    return Image.new("RGB", (4, 4), (255, 0, 0))


@pytest.mark.parametrize("path, fmt, n", [
    (GENEVAL, "geneval", 553),
    (GENAI, "genaibench", 1600),
    (DRAW_TSV, "drawbench", 200),
    (DRAW_JSON, "drawbench_json", 200),
    (DATA / "geneval" / "generation_prompts.txt", "text", 553),
])
def test_real_files_detected_and_counted(path, fmt, n):
    assert detect_format(path) == fmt
    entries = read_prompts(path)
    assert len(entries) == n
    assert [e.index for e in entries] == list(range(n))
    assert all(e.text.strip() for e in entries)


def test_geneval_records_are_the_source_lines():
    entries = read_prompts(GENEVAL)
    source = [json.loads(line) for line in GENEVAL.read_text().splitlines()]
    assert [e.record for e in entries] == source
    assert [e.text for e in entries] == [r["prompt"] for r in source]
    # The plain-text copy of the same prompts reads as the same list.
    assert [e.text for e in read_prompts(DATA / "geneval" / "generation_prompts.txt")] == [e.text for e in entries]


def test_genaibench_names_are_ids_and_drawbench_tsv_matches_its_json():
    genai = read_prompts(GENAI)
    raw = json.loads(GENAI.read_text())
    assert [e.name for e in genai] == [v["id"] for v in raw.values()]
    assert genai[0].text == raw["00000"]["prompt"]
    assert genai[1].line == 39  # where "00001": starts in the file

    tsv, meta = read_prompts(DRAW_TSV), read_prompts(DRAW_JSON)
    assert [e.record for e in tsv] == [e.record for e in meta] == list(json.loads(DRAW_JSON.read_text()).values())
    categories = {e.record["category"] for e in tsv}
    assert len(categories) == 11 and "Gary Marcus et al." in categories
    assert any("Schönhausen" in e.text for e in tsv)


def _write_all(layout, entries):
    for e in layout.pending(entries):
        layout.prepare(e)
        for p in layout.image_paths(e):
            save_image(_img(), p)


def test_geneval_layout_is_what_the_evaluator_reads(tmp_path):
    entries = read_prompts(GENEVAL)
    picked = [entries[0], entries[200], entries[552]]
    layout = layout_for("geneval", tmp_path, n_per_prompt=2)
    assert layout.write_index(entries) is None
    _write_all(layout, picked)
    # Walk the folder the way GenEval's evaluate_images.py does.
    found = {}
    for sub in os.listdir(tmp_path):
        assert sub.isdigit(), sub
        with open(tmp_path / sub / "metadata.jsonl") as fp:
            meta = json.load(fp)  # exactly one JSON object
        samples = sorted(n for n in os.listdir(tmp_path / sub / "samples") if re.match(r"\d+\.png", n))
        found[sub] = (meta, samples)
    assert sorted(found) == ["00000", "00200", "00552"]
    for e in picked:
        meta, samples = found[f"{e.index:05d}"]
        assert meta == json.loads(GENEVAL.read_text().splitlines()[e.index])
        assert samples == ["0000.png", "0001.png"]
        assert len((tmp_path / f"{e.index:05d}" / "metadata.jsonl").read_text().strip().splitlines()) == 1
    assert not list(tmp_path.rglob("*.tmp"))


def test_resume_skips_complete_prompts_only(tmp_path):
    entries = read_prompts(GENEVAL)[:4]
    layout = layout_for("geneval", tmp_path, n_per_prompt=2)
    assert layout.pending(entries) == entries
    _write_all(layout, entries[:2])
    layout.prepare(entries[2])
    save_image(_img(), layout.image_path(entries[2], 0))  # one of two samples: not complete
    assert [e.index for e in layout.pending(entries)] == [2, 3]
    (tmp_path / "00001" / "metadata.jsonl").unlink()  # metadata lost: sample it again
    assert [e.index for e in layout.pending(entries)] == [1, 2, 3]
    assert [e.index for e in layout_for("geneval", tmp_path, n_per_prompt=1).pending(entries)] == [1, 3]


@pytest.mark.parametrize("path, fmt", [(GENEVAL, "geneval"), (GENAI, "genaibench"), (DRAW_TSV, "drawbench"),
                                       (DATA / "geneval" / "generation_prompts.txt", "text")])
def test_processes_with_disjoint_shares_never_collide(tmp_path, path, fmt):
    entries = read_prompts(path)[:10]
    shares = [entries[0::3], entries[1::3], entries[2::3]]  # as accelerate would interleave them
    paths = [p for share in shares for e in share for p in layout_for(fmt, tmp_path, 2).image_paths(e)]
    assert len(set(paths)) == len(paths) == 20


def test_genaibench_drawbench_and_generic_names(tmp_path):
    genai = read_prompts(GENAI)[:3]
    one = layout_for("genaibench", tmp_path / "g1", 1)
    assert one.image_path(genai[2], 0) == tmp_path / "g1" / "00002.png"
    two = layout_for("genaibench", tmp_path / "g2", 2)
    assert [p.name for p in two.image_paths(genai[1])] == ["00001_0.png", "00001_1.png"]
    index = [json.loads(l) for l in one.write_index(genai).read_text().splitlines()]
    assert index[2] == {"id": "00002", "index": 2, "prompt": genai[2].text, "files": ["00002.png"]}

    draw = read_prompts(DRAW_TSV)
    layout = layout_for("drawbench", tmp_path / "d", 1)
    assert layout.image_path(draw[142], 0).name == "00142_0.png"
    index = [json.loads(l) for l in layout.write_index(draw).read_text(encoding="utf-8").splitlines()]
    assert len(index) == 200 and index[142]["category"] == draw[142].record["category"]
    assert index[142]["prompt"] == draw[142].text and index[142]["files"] == ["00142_0.png"]

    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a cat", "seed": 3}\n\n{"prompt": "a dog"}\n')
    entries = read_prompts(p)
    layout = layout_for("jsonl", tmp_path / "j", 2)
    assert [q.name for q in layout.image_paths(entries[1])] == ["00001_0.png", "00001_1.png"]
    first = json.loads(layout.write_index(entries).read_text().splitlines()[0])
    assert first == {"index": 0, "name": "00000", "prompt": "a cat", "metadata": {"prompt": "a cat", "seed": 3},
                     "files": ["00000_0.png", "00000_1.png"]}
    assert entries[1].line == 3


def test_plain_text(tmp_path):
    p = tmp_path / "p.txt"
    p.write_bytes("\ufeffa red cube\r\n\n  \nthe moon, at night \r\n".encode())
    entries = read_prompts(p)
    assert [(e.index, e.text, e.line) for e in entries] == [(0, "a red cube", 1), (1, "the moon, at night", 4)]


@pytest.mark.parametrize("name, content, fmt, match", [
    ("a.jsonl", '{"prompt": "x"}\n{"prompt": "y"\n', None, r"a\.jsonl:2: malformed JSON"),
    ("b.jsonl", '{"prompt": "x"}\n\n{"text": "y"}\n', None, r"b\.jsonl:3: record has no 'prompt'"),
    ("c.jsonl", '{"prompt": "x"}\n[1, 2]\n', None, r"c\.jsonl:2: expected a JSON object record, got a list"),
    ("d.jsonl", '{"tag": "t", "include": [], "prompt": "x"}\n{"tag": "t", "prompt": "y"}\n', None,
     r"d\.jsonl:2: GenEval record has no 'include'"),
    ("e.jsonl", '{"prompt": "x"}\n', "geneval", r"e\.jsonl:1: GenEval record has no 'tag'"),
    ("f.json", '{\n  "0": {"id": "0", "prompt": "x"},\n  "1": {"id": "1", "prompt": ""}\n}', None,
     r"f\.json:3: entry '1''s 'prompt' must be a non-empty string"),
    ("g.json", '{\n  "0": {"id": "../evil", "prompt": "x"}\n}', None,
     r"g\.json:2: id '\.\./evil' cannot be a file name"),
    ("h.json", '{\n  "0": {"id": "a", "prompt": "x"},\n  "1": {"id": "a", "prompt": "y"}\n}', None,
     r"h\.json:3: duplicate id 'a' \(first on line 2\)"),
    ("i.tsv", "Prompts\tCategory\na\tX\n\tY\n", None, r"i\.tsv:3: row has no prompt"),
    ("j.tsv", "Prompt\tCategory\na\tX\n", "drawbench", r"j\.tsv:1: expected a DrawBench header"),
    ("k.json", '["a", "b"]', None, r"k\.json: a JSON array is not a supported prompt file"),
    ("l.txt", "\n \n", None, r"l\.txt: the prompt file is empty"),
    ("m.txt", "x\n", "csv", r"unknown prompt-file format 'csv'"),
])
def test_bad_input_names_file_and_line(tmp_path, name, content, fmt, match):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(PromptFileError, match=match):
        read_prompts(p, format=fmt)


def test_invalid_utf8_and_missing_file(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"fine\nbad \xff byte\n")
    with pytest.raises(PromptFileError, match=r"bad\.txt:2: invalid UTF-8"):
        read_prompts(p)
    with pytest.raises(PromptFileError, match="cannot read prompt file"):
        read_prompts(tmp_path / "nope.txt")


def test_geneval_layout_needs_metadata(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("a cat\n")
    with pytest.raises(PromptFileError, match="GenEval layout needs a GenEval-format prompt file"):
        layout_for("geneval", tmp_path / "out").prepare(read_prompts(p)[0])
    with pytest.raises(ValueError, match="unknown prompt-file format"):
        layout_for("coco", tmp_path)
