import json

import pytest

from semroute.shared.errors import ManifestError
from semroute.shared.layers import parse_layers
from semroute.shared.errors import SemrouteError
from semroute.shared.manifest import read_manifest, write_problem_report


def _jsonl(tmp_path, lines, name="m.jsonl"):
    p = tmp_path / name
    p.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines))
    return p


def test_jsonl_strings_lists_ids_and_positions(tmp_path):
    p = _jsonl(tmp_path, [
        json.dumps({"image": "a.png", "text": "one"}),
        "",
        json.dumps({"image": "b.png", "text": ["two", "three"], "id": 7}),
        json.dumps({"image": "c.png", "text": "four", "id": "x"}),
    ])
    m = read_manifest(p, need_image=True)
    assert [r.sample_id for r in m.records] == ["0", "7", "x"]
    assert [r.line for r in m.records] == [1, 3, 4]
    assert m.records[1].texts == ("two", "three")
    assert m.n_captions == 4
    assert m.records[0].image == "a.png"


def test_json_array_with_line_numbers_and_custom_keys(tmp_path):
    p = tmp_path / "m.json"
    p.write_text('[\n {"file": "a.png", "caption": "x"},\n\n {"file": "b.png", "caption": ["y", "z"]}\n]\n')
    m = read_manifest(p, text_key="caption", image_key="file", need_image=True)
    assert [r.line for r in m.records] == [2, 4]
    assert [r.image for r in m.records] == ["a.png", "b.png"]
    with pytest.raises(ManifestError, match=r"m\.json:2: missing key 'text'"):
        read_manifest(p)


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"image": "a.png", "text": "ok"', r"m\.jsonl:2: malformed JSON"),
        (b'{"image": "a.png"}', r"m\.jsonl:2: missing key 'text'"),
        (b'{"image": "a.png", "text": 5}', r"m\.jsonl:2: 'text' is int, expected a string"),
        (b'{"image": "a.png", "text": ["a", 3]}', r"m\.jsonl:2: caption 1 of 'text' is int"),
        (b'{"image": "a.png", "text": "   "}', r"m\.jsonl:2: 'text' is empty"),
        (b'{"image": "a.png", "text": []}', r"m\.jsonl:2: 'text' is an empty list"),
        (b'{"image": "a.png", "text": "caf\xe9"}', r"m\.jsonl:2: invalid UTF-8"),
        (b'["not", "an", "object"]', r"m\.jsonl:2: record is list"),
        (b'{"image": "b.png", "text": "dup", "id": "0"}', r"m\.jsonl:2: duplicate id '0' \(first seen on line 1\)"),
        # ids as a Parquet/CSV id column gives them: a float or a boolean is no stable id
        (b'{"image": "b.png", "text": "x", "id": 1.0}', r"m\.jsonl:2: 'id' is 1\.0; an id must be a non-empty string or "
                                                      r"an integer \(7 or \"7\", not 7\.0, true or null\): write it as one"),
        (b'{"image": "b.png", "text": "x", "id": true}', r"m\.jsonl:2: 'id' is true; an id must be"),
        (b'{"image": "b.png", "text": "x", "id": null}', r"m\.jsonl:2: 'id' is null; an id must be"),
        (b'{"image": "b.png", "text": "x", "id": ""}', r"m\.jsonl:2: 'id' is \"\"; an id must be"),
        # valid JSON that Python's reader refuses (more than 4300 digits)
        (b'{"image": "b.png", "text": "x", "id": ' + b"9" * 5000 + b"}", r"m\.jsonl:2: unreadable JSON: Exceeds the limit"),
        (b'{"image": "b.png", "text": ' + b"[" * 100000 + b"]" * 100000 + b"}", r"m\.jsonl:2: unreadable JSON: maximum "
                                                                                r"recursion depth"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, line, message):
    p = _jsonl(tmp_path, [b'{"image": "a.png", "text": "fine", "id": "0"}', line, b'{"image": "c.png", "text": "z"}'])
    with pytest.raises(ManifestError, match=message):
        read_manifest(p)
    # With --skip-bad the same record is left out and reported, and nothing else changes.
    m = read_manifest(p, skip_bad=True)
    assert [r.line for r in m.records] == [1, 3]
    assert len(m.problems) == 1 and m.problems[0].line == 2
    # ids stay the record positions, so skipping a record does not shift the others' ids
    assert m.records[1].sample_id == "2"
    report = tmp_path / "bad.jsonl"
    write_problem_report(m.problems, report)
    assert json.loads(report.read_text())["line"] == 2


def test_an_integer_too_long_for_python_in_a_json_array_names_line(tmp_path):
    p = tmp_path / "m.json"
    p.write_bytes(b'[\n{"text": "a"},\n{"text": "b", "id": ' + b"9" * 5000 + b"}\n]")
    with pytest.raises(ManifestError, match=r"m\.json:3: unreadable JSON: Exceeds the limit"):
        read_manifest(p)


def test_invalid_utf8_in_json_array_names_line(tmp_path):
    p = tmp_path / "m.json"
    p.write_bytes(b'[\n{"text": "a"},\n{"text": "\xff"}\n]')
    with pytest.raises(ManifestError, match=r"m\.json:3: invalid UTF-8"):
        read_manifest(p)


def test_missing_image_key_only_when_needed(tmp_path):
    p = _jsonl(tmp_path, [json.dumps({"text": "a"})])
    assert read_manifest(p).records[0].image is None
    with pytest.raises(ManifestError, match="missing key 'image'"):
        read_manifest(p, need_image=True)


def test_empty_or_missing_file(tmp_path):
    with pytest.raises(ManifestError, match="cannot read manifest"):
        read_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(ManifestError, match="no usable records"):
        read_manifest(_jsonl(tmp_path, [""]))


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("all", [1, 2, 3, 4, 5, 6]),
        ("last:2", [5, 6]),
        ("every:2", [2, 4, 6]),
        ("every:4", [2, 6]),
        ("penultimate", [5]),
        ("0,3,-1", [0, 3, 6]),
        ("2-4", [2, 3, 4]),
        ([1, 6], [1, 6]),
    ],
)
def test_layer_specs(spec, expected):
    assert parse_layers(spec, 6) == expected


@pytest.mark.parametrize("spec, message", [("7", "out of range"), ("last:9", "only 6"), ("1,1", "twice"),
                                            ("every:x", "integer"), ("foo", "cannot read"), ("", "selects no")])
def test_bad_layer_specs(spec, message):
    with pytest.raises(SemrouteError, match=message):
        parse_layers(spec, 6)
