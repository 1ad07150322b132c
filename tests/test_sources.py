"""DATA inputs (shared/sources.py): manifests, image folders, Parquet/CSV, WebDataset tars; stable sample
ids; bad members reported with shard and key; both encoders give the same caches from every kind."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from images_testutil import random_rgb, write_images, write_manifest

from semroute.shared.errors import ManifestError, SemrouteError
from semroute.shared.latent_store import LatentCacheReader
from semroute.shared.sources import detect_kind, read_image_bytes, read_source
from semroute.shared.store import read_parquet
from semroute.shared.text_store import TextCacheReader
from semroute.stage1_encode.images import EncodeImagesConfig, encode_images
from semroute.stage1_encode.text import EncodeTextConfig, encode_text
from testkit import write_tar


def _jpeg(i: int, size=(40, 48)) -> bytes:
    buf = io.BytesIO()
    random_rgb(*size, seed=i).save(buf, format="JPEG")
    return buf.getvalue()


def write_shards(folder: Path, n_shards: int = 3, per_shard: int = 4) -> list[Path]:
    """Shards ``data-000000.tar`` ... holding keys ``k{shard}{j}`` with a .jpg and a .txt (or .json) caption."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for s in range(n_shards):
        members = []
        for j in range(per_shard):
            key, i = f"k{s}{j}", s * per_shard + j
            members.append((f"{key}.jpg", _jpeg(i)))
            if j % 2:
                members.append((f"{key}.json", json.dumps({"text": [f"caption {i} a", f"caption {i} b"]}).encode()))
            else:
                members.append((f"{key}.txt", f"caption {i}".encode()))
        out.append(write_tar(folder / f"data-{s:06d}.tar", members))
    return out


def test_webdataset_brace_range_keys_and_captions(tmp_path):
    write_shards(tmp_path / "wds")
    spec = str(tmp_path / "wds" / "data-{000000..000002}.tar")
    assert detect_kind(spec)[0] == "webdataset"
    src = read_source(spec, need_text=True, need_image=True)
    assert [r.sample_id for r in src.records] == [f"k{s}{j}" for s in range(3) for j in range(4)]
    assert src.records[1].texts == ("caption 1 a", "caption 1 b") and src.records[0].texts == ("caption 0",)
    # The image bytes come back by byte range, identical to what was packed.
    k = 5
    data = read_image_bytes(src.records[k].image, src.image_range(k))
    assert data == _jpeg(k) and src.records[k].image.endswith("data-000001.tar::k11.jpg")
    # A folder of shards is the same data.
    assert [r.sample_id for r in read_source(tmp_path / "wds", need_text=True).records] == \
        [r.sample_id for r in src.records]


def test_webdataset_bad_members_are_reported_with_shard_and_key(tmp_path):
    shard = write_tar(tmp_path / "bad.tar", [
        ("ok.jpg", _jpeg(0)), ("ok.txt", b"fine"),
        ("nocap.jpg", _jpeg(1)),
        ("noimg.txt", b"a caption alone"),
        ("latin.jpg", _jpeg(2)), ("latin.txt", "caf\xe9".encode("latin-1")),
        ("junk.jpg", b"not an image"), ("junk.txt", b"junk"),
    ])
    src = read_source(str(shard), need_text=True, need_image=True)
    assert [r.sample_id for r in src.records] == ["ok", "junk"]  # junk's bytes fail only when decoded
    reasons = {str(p) for p in src.problems}
    assert any("bad.tar" in r and "'nocap'" in r and "no caption" in r for r in reasons), reasons
    assert any("'noimg'" in r and "no image" in r for r in reasons), reasons
    assert any("'latin'" in r and "UTF-8" in r for r in reasons), reasons
    # Text encoding needs no image: the image-less sample is fine there.
    assert "noimg" in [r.sample_id for r in read_source(str(shard), need_text=True).records]


def test_duplicate_ids_name_both_sources(tmp_path):
    write_tar(tmp_path / "a.tar", [("x.jpg", _jpeg(0)), ("x.txt", b"one")])
    write_tar(tmp_path / "b.tar", [("x.jpg", _jpeg(1)), ("x.txt", b"two")])
    spec = f"{tmp_path}/a.tar::{tmp_path}/b.tar"
    with pytest.raises(ManifestError, match=r"duplicate sample id 'x': in a\.tar::x and in b\.tar::x"):
        read_source(spec, need_text=True)
    src = read_source(spec, need_text=True, skip_bad=True)
    assert [r.texts for r in src.records] == [("one",)] and "duplicate" in str(src.problems[0])


def test_folder_recursive_with_txt_captions(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    for name in ("a", "sub/b", "sub/c"):
        random_rgb(40, 40, seed=len(name)).save(root / f"{name}.png")
    (root / "a.txt").write_text("first\n")
    (root / "sub" / "b.txt").write_text("second")
    (root / "orphan.txt").write_text("no image")
    src = read_source(root, need_text=True, need_image=True)
    assert [(r.sample_id, r.texts) for r in src.records] == [("a", ("first",)), ("sub/b", ("second",))]
    assert {p.path.rsplit("/", 1)[-1] for p in src.problems} == {"c.png", "orphan.txt"}
    # Images alone need no captions.
    assert [r.sample_id for r in read_source(root, need_image=True, need_text=False).records] == ["a", "sub/b", "sub/c"]


def test_a_folder_named_like_a_caption_file_is_a_bad_member(tmp_path):
    """It was read as the caption: "dirc.txt: Is a directory" stopped the run, --skip-bad or not."""
    root = tmp_path / "imgs"
    root.mkdir()
    for name in ("a", "b"):
        random_rgb(40, 40, seed=len(name)).save(root / f"{name}.png")
    (root / "a.txt").write_text("first")
    (root / "b.txt").mkdir()
    src = read_source(root, need_text=True, need_image=True)
    assert [r.sample_id for r in src.records] == ["a"]
    assert [(p.path.rsplit("/", 1)[-1], p.reason) for p in src.problems] == [
        ("b.txt", "cannot read the caption file: Is a directory")]

def test_parquet_bytes_paths_and_csv(tmp_path):
    images = [_jpeg(i) for i in range(4)]
    pq.write_table(pa.table({"key": ["p0", "p1", "p2", "p3"], "jpg": images,
                             "caption": [["x", "y"], ["z"], ["w"], [""]]}), tmp_path / "t.parquet")
    keys = dict(text_key="caption", image_key="jpg", id_key="key", need_image=True)
    with pytest.raises(ManifestError, match=r"t\.parquet: row 3: 'caption' is empty \(or pass --skip-bad"):
        read_source(tmp_path / "t.parquet", **keys)  # a bad row stops the run, as a bad manifest record does
    src = read_source(tmp_path / "t.parquet", skip_bad=True, **keys)
    assert [r.sample_id for r in src.records] == ["p0", "p1", "p2"] and src.records[0].texts == ("x", "y")
    assert "row 3" in str(src.problems[0]) and "empty" in str(src.problems[0])
    assert read_image_bytes(src.records[2].image) == images[2]
    # Hugging Face datasets' Image column: a {bytes, path} struct.
    pq.write_table(pa.table({"image": [{"bytes": images[1], "path": "x.jpg"}], "text": ["hf"]}), tmp_path / "hf.parquet")
    src = read_source(tmp_path / "hf.parquet", need_image=True)
    assert src.records[0].sample_id == "0" and read_image_bytes(src.records[0].image) == images[1]
    # CSV with a path column; no id column: the row's position.
    (tmp_path / "t.csv").write_text("image,text\na.jpg,hello\nb.jpg,world\n")
    src = read_source(tmp_path / "t.csv", need_image=True)
    assert [(r.sample_id, r.image, r.texts) for r in src.records] == [("0", "a.jpg", ("hello",)), ("1", "b.jpg", ("world",))]
    with pytest.raises(SemrouteError, match="no column 'caption'"):
        read_source(tmp_path / "t.csv", text_key="caption")


def test_manifest_keeps_its_errors(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: missing key 'text'"):
        read_source(tmp_path / "m.jsonl")


def test_encoders_give_the_same_caches_from_tars_and_from_files(tmp_path, tiny_llama_dir):
    # The same 8 images and captions as files + manifest and as WebDataset shards.
    records = write_images(tmp_path / "imgs", 8, captions=1)
    write_manifest(tmp_path / "m.jsonl", [{**r, "image": str(tmp_path / "imgs" / r["image"])} for r in records])
    (tmp_path / "wds").mkdir()
    for s in range(2):
        write_tar(tmp_path / "wds" / f"d-{s}.tar", [
            m for r in records[4 * s: 4 * s + 4]
            for m in ((f"{r['id']}.jpg", (tmp_path / "imgs" / r["image"]).read_bytes()),
                      (f"{r['id']}.txt", r["text"][0].encode()))])
    # One member is damaged: reported with its shard and key, left out.
    write_tar(tmp_path / "wds" / "d-2.tar", [("bad.jpg", b"\xff\xd8 not really"), ("bad.txt", b"broken")])
    spec = str(tmp_path / "wds" / "d-{0..2}.tar")
    common = dict(vae="pixel", resolution=32, device="cpu", workers=0, progress=False, shard_mb=0.01)
    encode_images(EncodeImagesConfig(data=str(tmp_path / "m.jsonl"), out=str(tmp_path / "files.zarr"), **common))
    summary = encode_images(EncodeImagesConfig(data=spec, out=str(tmp_path / "tars.zarr"), **common))
    assert [s["path"] for s in summary["skipped"]] == [str(tmp_path / "wds" / "d-2.tar::bad.jpg")]
    a, b = LatentCacheReader(tmp_path / "files.zarr"), LatentCacheReader(tmp_path / "tars.zarr")
    assert a.sample_ids == b.sample_ids == [f"s{i}" for i in range(8)]
    for k in range(8):
        assert np.array_equal(a.latent(k).numpy(), b.latent(k).numpy())
    # Text from the tars joins the latents by the tar key.
    text_cfg = dict(llm=str(tiny_llama_dir), dtype="float32", device="cpu", progress=False)
    encode_text(EncodeTextConfig(data=spec, out=str(tmp_path / "t.zarr"), **text_cfg))
    encode_text(EncodeTextConfig(data=str(tmp_path / "m.jsonl"), out=str(tmp_path / "m.zarr"), **text_cfg))
    ta, tb = TextCacheReader(tmp_path / "t.zarr"), TextCacheReader(tmp_path / "m.zarr")
    assert ta.index.column("sample_id").to_pylist()[:8] == [f"s{i}" for i in range(8)]
    for c in range(8):
        assert np.array_equal(ta.caption(c).numpy(), tb.caption(c).numpy())
    assert read_parquet(tmp_path / "t.zarr", "index.parquet").num_rows == 9  # bad.jpg's caption is fine text


def test_a_missing_local_input_is_named_before_the_model_loads(tmp_path):
    from testkit import run_cli

    (tmp_path / "d-000.tar").write_bytes(b"")
    for data in ("nope.jsonl", "imgs/", "d-{000..001}.tar"):
        # The model does not exist either: the error must be about the data, found first.
        proc = run_cli("encode-text", str(tmp_path / data), "--llm", str(tmp_path / "no-model"), "--out",
                       str(tmp_path / "t.text.zarr"), "--no-progress", check=False)
        missing = "d-001.tar" if data.startswith("d-") else data
        assert proc.returncode != 0 and f"cannot read {tmp_path / missing}: no such file or folder" in proc.stderr, \
            proc.stderr
    proc = run_cli("encode-images", str(tmp_path / "nope.jsonl"), "--vae", str(tmp_path / "no-vae"), "--out",
                   str(tmp_path / "l.latents.zarr"), "--no-progress", check=False)
    assert "cannot read" in proc.stderr and "nope.jsonl" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "t.text.zarr").exists() and not (tmp_path / "l.latents.zarr").exists()


def test_plain_inputs_need_no_webdataset(tmp_path, monkeypatch):
    """The GPU image the device check runs on has no webdataset (nor obstore, s3fs): a manifest, a folder or a
    single file must read without it; only brace ranges and ``::`` lists use webdataset's expansion."""
    import sys

    from semroute.shared.sources import expand, read_source

    manifest = write_manifest(tmp_path / "m.jsonl", write_images(tmp_path / "img", 2))
    for name in ("webdataset", "webdataset.shardlists"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails, as where it is not installed
    assert expand(str(manifest)) == [str(manifest)]
    assert len(read_source(str(manifest)).records) == 2
    with pytest.raises(ImportError):
        expand(str(tmp_path / "d-{0..1}.tar"))


# -- sample ids from tables: the text as written, never a float's "1.0" or "nan" -----------------------------------
def test_table_ids_are_the_text_written_and_integers_stay_as_before(tmp_path):
    (tmp_path / "t.csv").write_text("id,text\n001,a\n002,b\n1.50,c\nNA,d\n")
    (tmp_path / "t.tsv").write_text("id\ttext\n007\ta\n")
    assert [r.sample_id for r in read_source(tmp_path / "t.csv").records] == ["001", "002", "1.50", "NA"]
    assert [r.sample_id for r in read_source(tmp_path / "t.tsv").records] == ["007"]
    # Integer and string columns give the ids they gave before (existing caches join on them).
    pq.write_table(pa.table({"id": pa.array([3, 10**12], pa.int64()), "text": ["a", "b"]}), tmp_path / "i.parquet")
    pq.write_table(pa.table({"id": pa.array(["x", "001"]).dictionary_encode(), "text": ["a", "b"]}),
                   tmp_path / "s.parquet")
    assert [r.sample_id for r in read_source(tmp_path / "i.parquet").records] == ["3", "1000000000000"]
    assert [r.sample_id for r in read_source(tmp_path / "s.parquet").records] == ["x", "001"]
    (tmp_path / "n.csv").write_text("id,text\n1,a\n2,b\n")
    assert [r.sample_id for r in read_source(tmp_path / "n.csv").records] == ["1", "2"]


@pytest.mark.parametrize("ids, message", [
    (pa.array([1.0, float("nan"), 3.0]), r"f\.parquet: the id column 'id' is of type double, row 1 holds nan; .*"
                                         r"cast the column to integer or string"),
    (pa.array([1.0, None, 3.0]), r"type double, row 1 holds None"),
    (pa.array([True, False, True]), r"type bool, row 0 holds True"),
])
def test_a_float_or_bool_id_column_is_refused_naming_file_column_and_row(tmp_path, ids, message):
    pq.write_table(pa.table({"id": ids, "text": ["a", "b", "c"]}), tmp_path / "f.parquet")
    for skip_bad in (False, True):  # the whole column is wrong: no row can be kept
        with pytest.raises(SemrouteError, match=message):
            read_source(tmp_path / "f.parquet", skip_bad=skip_bad)


def test_a_null_or_empty_id_is_refused_naming_the_row(tmp_path):
    pq.write_table(pa.table({"id": pa.array([1, None, 3], pa.int64()), "text": ["a", "b", "c"]}),
                   tmp_path / "n.parquet")
    with pytest.raises(ManifestError, match=r"n\.parquet: row 1: the id column 'id' is null; give every row an id"):
        read_source(tmp_path / "n.parquet")
    src = read_source(tmp_path / "n.parquet", skip_bad=True)
    assert [r.sample_id for r in src.records] == ["1", "3"] and "row 1" in str(src.problems[0]), src.problems
    (tmp_path / "e.csv").write_text('id,text\na,x\n"",y\n')
    with pytest.raises(ManifestError, match=r"e\.csv: row 1: the id column 'id' is empty"):
        read_source(tmp_path / "e.csv")


def test_the_three_readers_agree_on_numeric_ids(tmp_path):
    (tmp_path / "ok.jsonl").write_text('{"id": 1, "text": "a"}\n{"id": "001", "text": "b"}\n')
    pq.write_table(pa.table({"id": pa.array([1], pa.int32()), "text": ["a"]}), tmp_path / "ok.parquet")
    (tmp_path / "ok.csv").write_text("id,text\n1,a\n001,b\n")
    assert [r.sample_id for r in read_source(tmp_path / "ok.jsonl").records] == ["1", "001"]
    assert [r.sample_id for r in read_source(tmp_path / "ok.csv").records] == ["1", "001"]
    assert [r.sample_id for r in read_source(tmp_path / "ok.parquet").records] == ["1"]
    for value in ("1.0", "true"):
        (tmp_path / "bad.jsonl").write_text(f'{{"id": 0, "text": "a"}}\n{{"id": {value}, "text": "b"}}\n')
        with pytest.raises(ManifestError, match=rf"bad\.jsonl:2: 'id' is {value}; an id must be a non-empty string "
                                                r"or an integer .*write it as one"):
            read_source(tmp_path / "bad.jsonl")


# -- concatenated tars (cat a.tar b.tar > c.tar) --------------------------------------------------------------------
def test_a_concatenated_tar_is_read_to_its_end(tmp_path):
    a = write_tar(tmp_path / "a.tar", [("k0.jpg", _jpeg(0)), ("k0.txt", b"zero"), ("k1.jpg", _jpeg(1)),
                                       ("k1.txt", b"one")])
    b = write_tar(tmp_path / "b.tar", [("k2.jpg", _jpeg(2)), ("k2.txt", b"two")])
    (tmp_path / "c.tar").write_bytes(a.read_bytes() + b.read_bytes())
    src = read_source(str(tmp_path / "c.tar"), need_text=True, need_image=True)
    assert [(r.sample_id, r.texts) for r in src.records] == [("k0", ("zero",)), ("k1", ("one",)), ("k2", ("two",))]
    assert not src.problems
    # Byte ranges in the second part are exact.
    assert [read_image_bytes(r.image, src.image_range(k)) for k, r in enumerate(src.records)] == \
        [_jpeg(0), _jpeg(1), _jpeg(2)]
    # A tar padded with more zeros at its end (a tape's record size) is a normal end.
    (tmp_path / "p.tar").write_bytes(a.read_bytes() + bytes(20 * 512))
    src = read_source(str(tmp_path / "p.tar"), need_text=True)
    assert [r.sample_id for r in src.records] == ["k0", "k1"] and not src.problems
    # The same key in both parts is still named.
    (tmp_path / "d.tar").write_bytes(a.read_bytes() + a.read_bytes())
    with pytest.raises(ManifestError, match=r"duplicate key 'k0' in .*d\.tar: members 'k0\.jpg' and 'k0\.jpg'"):
        read_source(str(tmp_path / "d.tar"), need_text=True, need_image=True)


def test_data_after_the_end_of_a_tar_or_a_zeroed_header_is_named_with_its_byte(tmp_path):
    a = write_tar(tmp_path / "a.tar", [(f"k{i}.txt", f"caption {i}".encode()) for i in range(3)])
    size = len(a.read_bytes())
    (tmp_path / "junk.tar").write_bytes(a.read_bytes() + b"not a tar header" * 64)
    src = read_source(str(tmp_path / "junk.tar"), need_text=True)
    assert [r.sample_id for r in src.records] == ["k0", "k1", "k2"]
    assert len(src.problems) == 1 and f"byte {size} is damaged" in str(src.problems[0]), src.problems
    # A header overwritten with zeros looks like tar's end: what follows it is named, not dropped.
    raw = bytearray(a.read_bytes())
    raw[1024:1536] = bytes(512)  # k1's header; its data block follows at 1536
    (tmp_path / "zeroed.tar").write_bytes(bytes(raw))
    src = read_source(str(tmp_path / "zeroed.tar"), need_text=True)
    assert [r.sample_id for r in src.records] == ["k0"]
    assert len(src.problems) == 1 and "byte 1536 is damaged" in str(src.problems[0]), src.problems


def test_unpaired_braces_are_named():
    from semroute.shared.sources import expand

    with pytest.raises(SemrouteError, match=r"x-\{0\.\.2\}\}\.tar: its braces do not pair up"):
        expand("x-{0..2}}.tar")
    assert expand("x-{0..2}.tar") == ["x-0.tar", "x-1.tar", "x-2.tar"]


def test_a_json_caption_giving_a_key_twice_is_a_bad_member(tmp_path):
    shard = write_tar(tmp_path / "s.tar", [("ok.jpg", _jpeg(0)), ("ok.txt", b"fine"), ("two.jpg", _jpeg(1)),
                                           ("two.json", b'{"text": "a dog", "text": "a cat"}')])
    src = read_source(str(shard), need_text=True, need_image=True)
    assert [r.sample_id for r in src.records] == ["ok"]
    assert any("'two'" in str(p) and 'the key "text" is given twice' in str(p) for p in src.problems), \
        [str(p) for p in src.problems]

@pytest.mark.parametrize("body", [b'{"text": "x", "n": ' + b"9" * 5000 + b"}", b'{"text": ' + b"[" * 100000 + b"]" * 100000 + b"}"])
def test_a_json_caption_python_cannot_read_is_a_bad_member(tmp_path, body):
    """Valid JSON Python's reader refuses (an integer of more than 4300 digits, deep nesting): named with shard and
    key like any bad member, not a ValueError/RecursionError traceback."""
    shard = write_tar(tmp_path / "s.tar", [("ok.jpg", _jpeg(0)), ("ok.txt", b"fine"), ("big.jpg", _jpeg(1)),
                                           ("big.json", body)])
    src = read_source(str(shard), need_text=True, need_image=True)
    assert [r.sample_id for r in src.records] == ["ok"]
    assert any("s.tar" in str(p) and "'big'" in str(p) for p in src.problems), [str(p) for p in src.problems]
