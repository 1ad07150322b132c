"""Encoders and cache stores lose nothing and seal nothing wrong: a resume or append never empties a cache that
holds encoded data, an append or a null caption killed at any point is redone exactly, a finished cache that
no longer matches its seal is refused before it is sealed again, kill-during-create remains are started again,
and WebDataset shards with duplicate members or a cut are reported, not silently merged or ended."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from semroute.shared import store as store_mod
from semroute.shared import text_store
from semroute.shared.errors import CacheDamaged, ManifestError, SemrouteError
from semroute.shared.inspect import verify
from semroute.shared.latent_store import LatentCacheReader
from semroute.shared.sources import read_source
from semroute.shared.text_store import TextCacheReader
from semroute.stage1_encode.images import EncodeImagesConfig, encode_images
from semroute.stage1_encode.text import EncodeTextConfig, encode_text
from testkit import hold_lock, random_captions, write_manifest, write_square_images, write_tar


def _text(llm, data, out, **kw) -> EncodeTextConfig:
    return EncodeTextConfig(data=str(data), out=str(out), llm=str(llm), dtype="float32", device="cpu",
                            progress=False, shard_mb=0.02, **kw)


def _images(data, out, **kw) -> EncodeImagesConfig:
    return EncodeImagesConfig(data=str(data), out=str(out), vae="pixel", resolution=32, device="cpu", workers=0,
                              progress=False, shard_mb=0.005, **kw)


def _hashes(cache: Path) -> dict[str, str]:
    return {str(p.relative_to(cache)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in cache.rglob("*") if p.is_file() and p.name != "index.parquet"}


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    """Old, new and all captions (ids unique), as manifests."""
    root = tmp_path_factory.mktemp("captions")
    records = [{**r, "id": f"s{i}"} for i, r in enumerate(random_captions(30, seed=5))]
    return (write_manifest(root / "old.jsonl", records[:24]), write_manifest(root / "new.jsonl", records[24:]),
            write_manifest(root / "all.jsonl", records))


@pytest.fixture(scope="module")
def text_full(tmp_path_factory, captions, tiny_llama_dir):
    """A clean encode of all the captions: what every repaired cache must read like."""
    out = tmp_path_factory.mktemp("full") / "full.text.zarr"
    encode_text(_text(tiny_llama_dir, captions[2], out))
    return out


def _same_captions(cache, reference) -> None:
    a, b = TextCacheReader(cache), TextCacheReader(reference)
    assert a.index.column("sample_id").to_pylist() == b.index.column("sample_id").to_pylist()
    assert a.lengths.tolist() == b.lengths.tolist()
    for i in range(a.n_captions):
        assert torch.equal(a.caption(i), b.caption(i)), i
    assert torch.equal(a.null(), b.null())
    assert verify(str(cache))[1] == []


# -- A2: a resume without index.parquet never empties the cache -------------------------------------------------
def test_encode_images_resume_without_index_keeps_every_part(tmp_path):
    records = [{**r, "id": f"q{i}"} for i, r in enumerate(write_square_images(tmp_path / "img", 12))]
    old, new = write_manifest(tmp_path / "old.jsonl", records[:8]), write_manifest(tmp_path / "new.jsonl", records[8:])
    cache = tmp_path / "l.zarr"
    encode_images(_images(old, cache))
    encode_images(_images(new, cache, append=True))
    (cache / "index.parquet").unlink()
    before = _hashes(cache)
    for cfg in (_images(new, cache, resume=True), _images(new, cache, append=True)):
        with pytest.raises(SemrouteError, match=r"index\.parquet is missing.*--overwrite"):
            encode_images(cfg)
        assert _hashes(cache) == before  # nothing deleted or rewritten


def test_encode_text_resume_without_index_is_refused_by_name(tmp_path, captions, tiny_llama_dir):
    cache = tmp_path / "t.zarr"
    encode_text(_text(tiny_llama_dir, captions[0], cache))
    (cache / "index.parquet").unlink()
    before = _hashes(cache)
    with pytest.raises(SemrouteError, match=r"index\.parquet is missing.*--overwrite"):
        encode_text(_text(tiny_llama_dir, captions[0], cache, resume=True))
    assert _hashes(cache) == before


# -- A9 (and the A2 exception): a create killed early is started again by --resume -------------------------------
@pytest.mark.parametrize("killed", ["index", "flags"])
def test_a_text_create_killed_early_is_restarted_by_resume(tmp_path, captions, tiny_llama_dir, text_full,
                                                           monkeypatch, killed):
    target = {"index": "write_parquet", "flags": "DoneFlags"}[killed]

    def dying(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(text_store, target, dying)
    cache = tmp_path / "t.zarr"
    with pytest.raises(RuntimeError, match="killed"):
        encode_text(_text(tiny_llama_dir, captions[2], cache))
    monkeypatch.undo()
    with pytest.raises(SemrouteError, match="stopped before it was set up.*--resume"):  # finish it first
        encode_text(_text(tiny_llama_dir, captions[1], cache, append=True))
    encode_text(_text(tiny_llama_dir, captions[2], cache, resume=True))
    _same_captions(cache, text_full)


def test_a_latent_create_killed_before_its_attributes_is_restarted_by_resume(tmp_path, monkeypatch):
    from semroute.shared import latent_store

    manifest = write_manifest(tmp_path / "m.jsonl", write_square_images(tmp_path / "img", 6))
    ref, cache = tmp_path / "ref.zarr", tmp_path / "l.zarr"
    encode_images(_images(manifest, ref))
    # Killed while making the first bucket's flags: the group and arrays exist, the attributes not yet.
    monkeypatch.setattr(latent_store, "DoneFlags", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):
        encode_images(_images(manifest, cache))
    monkeypatch.undo()
    assert "semroute" not in (cache / "zarr.json").read_text()
    encode_images(_images(manifest, cache, resume=True))
    a, b = LatentCacheReader(cache), LatentCacheReader(ref)
    assert a.sample_ids == b.sample_ids
    for i in range(len(a)):
        assert torch.equal(a.stored(i)["latent"], b.stored(i)["latent"])


def test_a_store_without_its_flags_is_a_named_error(tmp_path, captions, tiny_llama_dir):
    import shutil

    cache = tmp_path / "t.zarr"
    encode_text(_text(tiny_llama_dir, captions[0], cache))
    shutil.rmtree(cache / "progress" / "features")
    with pytest.raises(CacheDamaged, match=r"progress/features is missing.*--overwrite"):
        text_store.TextCacheWriter.open(cache)


# -- A1: an append killed while rewriting offsets/lengths is redone exactly ------------------------------------
@pytest.mark.parametrize("kill", ["inside offsets", "after offsets", "inside lengths"])
def test_an_append_killed_while_rewriting_offsets_reruns_exactly(tmp_path, captions, tiny_llama_dir, text_full,
                                                                 monkeypatch, kill):
    cache = tmp_path / "t.zarr"
    encode_text(_text(tiny_llama_dir, captions[0], cache))
    real = text_store.create_plain_array
    name, whole = {"inside offsets": ("offsets", False), "after offsets": ("lengths", None),
                   "inside lengths": ("lengths", False)}[kill]

    def dying(group, array, data):
        if array == name:
            if whole is False:  # the array made again (create_plain_array overwrites in place), its data not yet
                real(group, array, np.zeros_like(data))
            raise RuntimeError("killed")
        return real(group, array, data)

    monkeypatch.setattr(text_store, "create_plain_array", dying)
    with pytest.raises(RuntimeError, match="killed"):
        encode_text(_text(tiny_llama_dir, captions[1], cache, append=True))
    monkeypatch.undo()
    encode_text(_text(tiny_llama_dir, captions[1], cache, append=True))
    ref = TextCacheReader(text_full)
    got = TextCacheReader(cache)
    assert got.lengths.tolist() == ref.lengths.tolist()
    for i in range(ref.n_captions):
        assert torch.equal(got.caption(i), ref.caption(i)), i
    assert verify(str(cache))[1] == []


# -- A3: a finished cache that no longer matches its seal is not sealed again ---------------------------------
def _tamper_index(cache: Path) -> None:
    table = pq.read_table(cache / "index.parquet")
    ids = table.column("sample_id").to_pylist()
    ids[0] = ids[-1]  # the first caption re-paired with another sample's image
    pq.write_table(table.set_column(table.schema.get_field_index("sample_id"), "sample_id", pa.array(ids)),
                   cache / "index.parquet")


def test_resume_or_append_refuses_a_tampered_finished_cache(tmp_path, captions, tiny_llama_dir):
    cache = tmp_path / "t.zarr"
    encode_text(_text(tiny_llama_dir, captions[0], cache))
    _tamper_index(cache)
    for cfg in (_text(tiny_llama_dir, captions[0], cache, resume=True),
                _text(tiny_llama_dir, captions[1], cache, append=True)):
        with pytest.raises(CacheDamaged, match=r"index\.parquet differs"):
            encode_text(cfg)
    with pytest.raises(CacheDamaged, match=r"index\.parquet differs"):  # the old seal still stands
        TextCacheReader(cache).index


def test_resume_refuses_a_finished_latent_cache_with_a_tampered_index(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", write_square_images(tmp_path / "img", 6))
    cache = tmp_path / "l.zarr"
    encode_images(_images(manifest, cache))
    _tamper_index(cache)
    with pytest.raises(CacheDamaged, match=r"index\.parquet differs"):
        encode_images(_images(manifest, cache, resume=True))
    with pytest.raises(CacheDamaged, match=r"index\.parquet differs"):
        LatentCacheReader(cache)


# -- A4: a null caption killed mid-write is written again --------------------------------------------------
def test_a_null_caption_killed_mid_write_is_rewritten_on_resume(tmp_path, captions, tiny_llama_dir, text_full,
                                                               monkeypatch):
    real = text_store.create_plain_array

    def dying(group, array, data):
        if array == "null_features":
            real(group, array, np.zeros_like(data))  # the array exists, its bytes not yet written
            raise RuntimeError("killed")
        return real(group, array, data)

    monkeypatch.setattr(text_store, "create_plain_array", dying)
    cache = tmp_path / "t.zarr"
    with pytest.raises(RuntimeError, match="killed"):
        encode_text(_text(tiny_llama_dir, captions[2], cache))
    monkeypatch.undo()
    encode_text(_text(tiny_llama_dir, captions[2], cache, resume=True))
    assert TextCacheReader(cache).null().abs().sum() > 0
    _same_captions(cache, text_full)


# -- A8: a damaged zarr.json on --resume is a named error ------------------------------------------------
def test_a_damaged_zarr_json_on_resume_is_named(tmp_path, captions, tiny_llama_dir):
    cache = tmp_path / "t.zarr"
    encode_text(_text(tiny_llama_dir, captions[0], cache))
    meta = cache / "zarr.json"
    meta.write_bytes(meta.read_bytes()[: len(meta.read_bytes()) // 2])
    for cfg in (_text(tiny_llama_dir, captions[0], cache, resume=True),
                _text(tiny_llama_dir, captions[1], cache, append=True)):
        with pytest.raises(CacheDamaged, match=r"zarr\.json is damaged.*--overwrite"):
            encode_text(cfg)


# -- A5, A6: WebDataset shards --------------------------------------------------------------------------
def test_a_duplicate_member_in_a_shard_is_an_error_naming_both(tmp_path):
    shard = write_tar(tmp_path / "dup.tar", [("a.txt", b"first"), ("b.txt", b"other"), ("dir/a.txt", b"fine"),
                                        ("a.txt", b"second")])
    with pytest.raises(ManifestError, match=r"duplicate key 'a' in .*dup\.tar: members 'a\.txt' and 'a\.txt'"):
        read_source(str(shard), need_text=True)
    src = read_source(str(shard), need_text=True, skip_bad=True)
    assert [r.sample_id for r in src.records] == ["b", "dir/a"]  # neither 'a' is guessed
    assert any("dup.tar" in str(p) and "duplicate key 'a'" in str(p) for p in src.problems), src.problems


def _header_offsets(shard: Path) -> list[int]:
    with tarfile.open(shard) as tf:
        return [m.offset for m in tf.getmembers()]


@pytest.mark.parametrize("fault", ["cut in a header", "cut between members", "damaged header"])
def test_a_cut_or_damaged_shard_is_reported_with_where(tmp_path, fault):
    shard = write_tar(tmp_path / "s.tar", [(f"k{i}.txt", f"caption {i}".encode()) for i in range(4)])
    third = _header_offsets(shard)[2]
    raw = bytearray(shard.read_bytes())
    if fault == "cut in a header":
        raw = raw[: third + 100]
    elif fault == "cut between members":
        raw = raw[:third]
    else:
        raw[third + 148: third + 156] = b"garbage!"  # the header's checksum field
    shard.write_bytes(bytes(raw))
    src = read_source(str(shard), need_text=True)
    assert [r.sample_id for r in src.records] == ["k0", "k1"]
    assert len(src.problems) == 1 and str(shard) in str(src.problems[0]), src.problems
    assert f"byte {third}" in str(src.problems[0]), src.problems


# -- A11: an append's bad records are listed and counted --------------------------------------------------
def test_append_skip_bad_lists_and_counts_the_new_bad_records(tmp_path, captions, tiny_llama_dir, monkeypatch):
    import json

    cache, old, new = tmp_path / "t.zarr", tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    old.write_text(captions[0].read_text() + '{"id": "bad0", "txt": "no text key"}\n')
    encode_text(_text(tiny_llama_dir, old, cache, skip_bad=True))
    new.write_text(captions[1].read_text() + '{"id": "bad1", "txt": "no text key"}\n')
    # Killed while growing (after the report was written), then run again: nothing listed or counted twice.
    monkeypatch.setattr(text_store, "write_parquet", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):
        encode_text(_text(tiny_llama_dir, new, cache, append=True, skip_bad=True))
    monkeypatch.undo()
    summary = encode_text(_text(tiny_llama_dir, new, cache, append=True, skip_bad=True))
    entries = [json.loads(line) for line in (cache / "bad_records.jsonl").read_text().splitlines()]
    assert [(e["path"], e["line"]) for e in entries] == [(str(old), 25), (str(new), 7)]
    assert summary["bad_records"] == 2 == store_mod.read_attrs(cache)["n_bad_records"]
    # a report cut by a crash of an older version: named, and the cache is left as it was
    report = cache / "bad_records.jsonl"
    report.write_bytes(report.read_bytes()[:-9])
    before = _hashes(cache)
    more = write_manifest(tmp_path / "more.jsonl", [{"id": "z0", "text": "a red square"}, {"id": "bad2", "txt": "x"}])
    with pytest.raises(CacheDamaged, match=r"bad_records\.jsonl: line 2 is damaged .*restore the file, or delete it"):
        encode_text(_text(tiny_llama_dir, more, cache, append=True, skip_bad=True))
    assert _hashes(cache) == before


# -- A12: a Hugging Face Image struct without bytes is read from its path -----------------------------------
def test_an_image_struct_without_bytes_is_read_from_its_path(tmp_path):
    from images_testutil import random_rgb

    (tmp_path / "imgs").mkdir()
    for i in range(2):
        random_rgb(32, 32, seed=i).save(tmp_path / "imgs" / f"{i}.png")
    packed = io.BytesIO()
    random_rgb(32, 32, seed=0).save(packed, format="PNG")
    table = pa.table({"id": ["inline", "by-path", "none"], "text": ["a", "b", "c"],
                      "image": [{"bytes": packed.getvalue(), "path": "0.png"}, {"bytes": None, "path": "1.png"},
                                {"bytes": None, "path": None}]})
    pq.write_table(table, tmp_path / "hf.parquet")
    src = read_source(tmp_path / "hf.parquet", need_image=True, skip_bad=True)
    assert [(r.sample_id, r.image) for r in src.records] == [("inline", f"{tmp_path / 'hf.parquet'}::image[0]"),
                                                            ("by-path", "1.png")]
    assert "row 2" in str(src.problems[0]) and "neither bytes nor a path" in str(src.problems[0])
    cache = tmp_path / "l.zarr"
    encode_images(_images(tmp_path / "hf.parquet", cache, image_root=str(tmp_path / "imgs"), skip_bad=True))
    reader = LatentCacheReader(cache)
    assert reader.sample_ids == ["inline", "by-path"]
    ref = tmp_path / "ref.zarr"
    write_manifest(tmp_path / "m.jsonl", [{"id": "by-path", "image": str(tmp_path / "imgs" / "1.png")}])
    encode_images(_images(tmp_path / "m.jsonl", ref))
    assert torch.equal(reader.stored(1)["latent"], LatentCacheReader(ref).stored(0)["latent"])


def test_the_summary_of_an_append_says_appended_not_resumed(tmp_path, tiny_llama_dir):
    from typer.testing import CliRunner

    from semroute.cli import app

    old = write_manifest(tmp_path / "old.jsonl", [{**r, "id": f"a{i}"} for i, r in enumerate(random_captions(40, seed=1))])
    new = write_manifest(tmp_path / "new.jsonl", [{**r, "id": f"b{i}"} for i, r in enumerate(random_captions(20, seed=2))])
    out = tmp_path / "c.text.zarr"
    common = ["--llm", str(tiny_llama_dir), "--out", str(out), "--dtype", "float32", "--device", "cpu",
              "--shard-mb", "0.02", "--no-progress"]
    first = CliRunner().invoke(app, ["encode-text", str(old), *common])
    assert first.exit_code == 0, first.output
    shards_before = text_store.TextCacheWriter.open(out).layout.n_shards
    grown = CliRunner().invoke(app, ["encode-text", "--append", str(new), *common])
    assert grown.exit_code == 0, grown.output
    total = text_store.TextCacheWriter.open(out).layout.n_shards
    assert f"appended: {total - shards_before} new shard(s) written; {shards_before} of {total} were there before" \
        in grown.output
    assert "resumed:" not in grown.output


def test_a_second_encode_into_the_same_out_is_refused_while_the_first_runs(tmp_path, tiny_llama_dir):
    from semroute.shared.lock import OutputBusy

    data = write_manifest(tmp_path / "m.jsonl", [{**r, "id": f"a{i}"} for i, r in enumerate(random_captions(12))])
    out = tmp_path / "c.text.zarr"
    holder = hold_lock("from semroute.shared.lock import OutputLock", f"OutputLock({str(out)!r})")
    try:
        for flags in ({}, {"resume": True}, {"overwrite": True}):
            with pytest.raises(OutputBusy, match=rf"--out {out} is being written by another encode process "
                                                 rf"\(pid {holder.pid} on "):
                encode_text(_text(tiny_llama_dir, data, out, **flags))
            assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    encode_text(_text(tiny_llama_dir, data, out))  # a killed holder's lock is gone with it
    assert verify(str(out))[1] == [] and TextCacheReader(out).n_captions >= 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.text.zarr", "m.jsonl"]  # no lock file left beside it


def test_a_busy_out_is_refused_before_the_llm_loads(tmp_path, tiny_llama_dir, monkeypatch):
    """The refusal comes in seconds, not after minutes of loading a 4B LLM; nothing is created."""
    import semroute.stage1_encode.text as text_mod
    from semroute.shared.lock import OutputBusy

    def never(*args, **kwargs):
        raise AssertionError("the LLM was loaded")

    monkeypatch.setattr(text_mod, "load_llm", never)
    data = write_manifest(tmp_path / "m.jsonl", random_captions(4))
    out = tmp_path / "c.text.zarr"
    holder = hold_lock("from semroute.shared.lock import OutputLock", f"OutputLock({str(out)!r})")
    try:
        with pytest.raises(OutputBusy, match=rf"--out {out} is being written by another encode process"):
            encode_text(_text(tiny_llama_dir, data, out))
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()


@pytest.mark.parametrize("flags, said", [
    ({"overwrite": True, "resume": True}, r"--overwrite deletes .* --resume keeps what it holds: give one of them"),
    ({"overwrite": True, "append": True}, r"--overwrite deletes .* --append keeps what it holds: give one of them"),
    ({"resume": True, "append": True}, r"--append continues an interrupted append by itself .* drop --resume"),
])
def test_contradictory_encode_flags_are_refused_before_anything_is_touched(tmp_path, flags, said):
    data = write_manifest(tmp_path / "m.jsonl", write_square_images(tmp_path / "img", 4))
    cache = tmp_path / "l.zarr"
    encode_images(_images(data, cache))
    before = _hashes(cache)
    with pytest.raises(SemrouteError, match=said):
        encode_images(_images(data, cache, **flags))
    assert _hashes(cache) == before


# -- lone surrogates (an unpaired \u escape, a file or member name that is not UTF-8) are named, not a traceback --
def test_a_lone_surrogate_in_a_manifest_is_named_with_its_line(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": "bad \\ud800 here"}\n'
                        '{"id": "c\\udcff", "text": "ok"}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: 'text' holds a lone surrogate '\\ud800' at character 5"):
        read_source(str(manifest), need_text=True)
    src = read_source(str(manifest), need_text=True, skip_bad=True)
    assert [r.sample_id for r in src.records] == ["a"]
    assert [(p.line, "lone surrogate" in p.reason) for p in src.problems] == [(2, True), (3, True)]


def test_a_file_or_member_name_that_is_not_utf8_is_named(tmp_path):
    import os

    folder = tmp_path / "imgs"
    folder.mkdir()
    good = folder / "good.png"
    write_square_images(tmp_path / "src", 1)
    good.write_bytes((tmp_path / "src" / "0000.png").read_bytes())
    good.with_suffix(".txt").write_text("a caption")
    bad = os.fsdecode(bytes(folder) + b"/bad\xff.png")
    Path(bad).write_bytes(good.read_bytes())
    Path(bad).with_suffix(".txt").write_text("another caption")
    with pytest.raises(ManifestError, match=r"bad\\udcff\.png: the sample id holds a lone surrogate .*--skip-bad"):
        read_source(str(folder), need_text=True, need_image=True)
    src = read_source(str(folder), need_text=True, need_image=True, skip_bad=True)
    assert [r.sample_id for r in src.records] == ["good"]
    assert len(src.problems) == 1 and str(src.problems[0]).encode("utf-8")  # printable
    shard = write_tar(tmp_path / "s.tar", [("k0.txt", b"fine"), (os.fsdecode(b"k\xff1.txt"), b"named badly")])
    with pytest.raises(ManifestError, match=r"s\.tar::k\\udcff1: the sample id holds a lone surrogate"):
        read_source(str(shard), need_text=True)


# -- the encoder lock: one file for every spelling of --out; never a lock on a removed file ----------------------
def test_every_spelling_of_one_out_takes_the_same_lock(tmp_path, monkeypatch):
    from semroute.shared.lock import OutputBusy, OutputLock

    cache = tmp_path / "c.zarr"
    cache.mkdir()
    (tmp_path / "link").symlink_to(cache)
    monkeypatch.chdir(tmp_path)
    held = OutputLock(str(cache)).acquire()
    try:
        for spelling in ("c.zarr", "./c.zarr/", "c.zarr/.", f"{tmp_path}/sub/../c.zarr", "link", "link/"):
            with pytest.raises(OutputBusy, match="being written by another encode process"):
                OutputLock(spelling).acquire()
        monkeypatch.chdir(cache)
        with pytest.raises(OutputBusy):
            OutputLock(".").acquire()
    finally:
        held.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.zarr", "link"]  # the lock file is gone with it


def test_a_lock_file_removed_between_open_and_flock_is_not_taken(tmp_path, monkeypatch):
    """A holder releasing (and removing NAME.lock) just after a second process opened it: the second must not lock
    the removed file while a third locks the new one."""
    from semroute.shared import lock as lock_mod
    from semroute.shared.lock import OutputBusy, OutputLock

    out = str(tmp_path / "c.zarr")
    first = OutputLock(out).acquire()
    stale = open(first.path, "a+")  # the second process's open, before the release
    first.release()
    third = OutputLock(out).acquire()  # makes and locks a new NAME.lock
    opened = iter([stale])
    monkeypatch.setattr(lock_mod, "open", lambda *a, **k: next(opened, None) or open(*a, **k), raising=False)
    try:
        with pytest.raises(OutputBusy):
            OutputLock(out).acquire()
    finally:
        third.release()


# -- an array's zarr.json edited (shape, data type) reads as other values that pass every checksum: refused ----
def _edit_json(path: Path, **changes) -> None:
    import json

    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("edit", [{"data_type": "float16"}, {"shape": "grown"}])
def test_an_edited_text_array_zarr_json_is_refused_by_reader_and_verify(tmp_path, text_full, edit):
    import json
    import shutil

    cache = tmp_path / "t.zarr"
    shutil.copytree(text_full, cache)
    meta = cache / "features" / "zarr.json"
    if edit.get("shape") == "grown":
        shape = json.loads(meta.read_text())["shape"]
        edit = {"shape": [shape[0] + 7, *shape[1:]]}
    _edit_json(meta, **edit)
    with pytest.raises(CacheDamaged, match=r"features/zarr\.json says .* but the cache's attributes say"):
        TextCacheReader(cache).caption(0)
    problems = verify(str(cache))[1]
    assert len(problems) == 1 and "features/zarr.json" in problems[0], problems


def test_an_edited_latent_array_zarr_json_is_refused_by_reader_and_verify(tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", write_square_images(tmp_path / "img", 4))
    cache = tmp_path / "l.zarr"
    encode_images(_images(manifest, cache))
    (bucket,) = [p for p in (cache / "buckets").iterdir() if p.is_dir()]
    _edit_json(bucket / "latent" / "zarr.json", data_type="int8")
    with pytest.raises(CacheDamaged, match=r"latent/zarr\.json says .*int8.* attributes say .*uint8"):
        LatentCacheReader(cache).stored(0)
    problems = verify(str(cache))[1]
    assert len(problems) == 1 and "latent/zarr.json" in problems[0], problems


# -- `info` on a cache with a damaged done flag: one message naming the flags, and a quiet exit --------------------
def test_info_on_a_damaged_flag_names_it_and_exits_without_zarr_noise(tmp_path, text_full):
    import shutil

    from testkit import run_cli

    cache = tmp_path / "t.zarr"
    shutil.copytree(text_full, cache)
    (cache / "progress" / "features" / "c" / "1").write_bytes(b"")  # one flag chunk cut to nothing
    proc = run_cli("info", str(cache), check=False)
    assert proc.returncode == 1, proc.stderr
    # zarr's other flag reads, left running by the failed one, must end before its exit hook closes their loop
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert f"{cache}/progress/features: the done flags are damaged" in proc.stderr, proc.stderr


# -- a grown cache with a lost shard: the refusal of --resume with the first data names the data that resumes it ----
def test_resume_of_a_grown_cache_names_the_data_that_resumes_it(tmp_path):
    import shutil

    records = [{**r, "id": f"q{i}"} for i, r in enumerate(write_square_images(tmp_path / "img", 10))]
    old, new = write_manifest(tmp_path / "old.jsonl", records[:6]), write_manifest(tmp_path / "new.jsonl", records[6:])
    ref, cache = tmp_path / "ref.zarr", tmp_path / "l.zarr"
    encode_images(_images(old, cache))
    encode_images(_images(new, cache, append=True))
    shutil.copytree(cache, ref)
    (bucket,) = [p for p in (cache / "buckets").iterdir() if p.is_dir()]
    shutil.rmtree(bucket / "latent" / "c" / "1")  # a shard of the first part, lost
    assert verify(str(cache))[1]
    with pytest.raises(SemrouteError, match=rf"last grown by --append of {new}: a --resume .* takes that data"):
        encode_images(_images(old, cache, resume=True))
    encode_images(_images(new, cache, resume=True))
    assert verify(str(cache))[1] == []
    a, b = LatentCacheReader(cache), LatentCacheReader(ref)
    assert a.sample_ids == b.sample_ids
    for i in range(len(a)):
        assert torch.equal(a.stored(i)["latent"], b.stored(i)["latent"])


# -- the bad-record reports an append rewrites are replaced whole: a kill mid-write loses no earlier entry ---------
def _dies_on_rename(monkeypatch):
    import os

    def dying(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(os, "replace", dying)


def test_the_text_bad_records_report_is_never_cut(tmp_path, monkeypatch):
    from semroute.shared.manifest import Problem, write_problem_report

    report = tmp_path / "bad_records.jsonl"
    write_problem_report([Problem("old.jsonl", 3, "no text")], report)
    before = report.read_bytes()
    _dies_on_rename(monkeypatch)  # killed after writing, before the new report takes the old one's place
    with pytest.raises(RuntimeError, match="killed"):
        write_problem_report([Problem("old.jsonl", 3, "no text"), Problem("new.jsonl", 9, "no text")], report)
    assert report.read_bytes() == before


def test_the_latent_skipped_list_is_never_cut_and_a_damaged_one_is_named(tmp_path, monkeypatch):
    from semroute.shared.latent_store import read_skipped, write_skipped

    write_skipped(tmp_path, [{"path": "m.jsonl", "line": 2, "reason": "no image"}])
    before = (tmp_path / "skipped.jsonl").read_bytes()
    _dies_on_rename(monkeypatch)
    with pytest.raises(RuntimeError, match="killed"):
        write_skipped(tmp_path, [{"path": "m.jsonl", "line": 2, "reason": "no image"}, {"path": "n", "line": 1}])
    monkeypatch.undo()
    assert (tmp_path / "skipped.jsonl").read_bytes() == before
    (tmp_path / "skipped.jsonl").write_bytes(before + b'{"path": "n", "li')  # cut by an older semroute
    with pytest.raises(CacheDamaged, match=r"skipped\.jsonl: line 2 is damaged .*restore the file, or delete it"):
        read_skipped(tmp_path)


def test_appending_data_the_cache_already_holds_says_so(tmp_path, captions, tiny_llama_dir):
    cache = tmp_path / "t.zarr"
    encode_text(_text(tiny_llama_dir, captions[0], cache))
    encode_text(_text(tiny_llama_dir, captions[1], cache, append=True))
    before = _hashes(cache)
    for data, part in ((captions[1], 2), (captions[0], 1)):  # the rerun of a finished append; the first data again
        with pytest.raises(SemrouteError, match=rf"nothing to append: {cache} already holds these captions \(part "
                                                rf"{part} of 2, from {data}\), and it is complete"):
            encode_text(_text(tiny_llama_dir, data, cache, append=True))
    assert _hashes(cache) == before


def test_verify_names_a_damaged_list_of_records_left_out(tmp_path, tiny_llama_dir):
    text_data = write_manifest(tmp_path / "t.jsonl", [{"id": "a", "text": "a red square"}, {"id": "b", "txt": "x"}])
    text = tmp_path / "t.zarr"
    encode_text(_text(tiny_llama_dir, text_data, text, skip_bad=True))
    images = tmp_path / "l.zarr"
    records = write_square_images(tmp_path / "img", 4) + [{"id": "gone", "image": "img/missing.png", "text": "x"}]
    encode_images(_images(write_manifest(tmp_path / "i.jsonl", records), images, skip_bad=True))
    for cache, name in ((text, "bad_records.jsonl"), (images, "skipped.jsonl")):
        assert verify(str(cache))[1] == []
        report = cache / name
        report.write_bytes(report.read_bytes()[:-9])  # cut short
        problems = verify(str(cache))[1]
        assert len(problems) == 1 and f"{report}: line 1 is damaged" in problems[0], problems


@pytest.mark.parametrize("flags, said", [
    ({"overwrite": True, "resume": True}, r"--overwrite deletes .* give one of them"),
    ({"storage": "fp16"}, r"--storage 'fp16' is not supported; use exact, bf16, fp8"),
])
def test_encode_text_refuses_bad_flags_before_it_loads_the_llm(tmp_path, captions, monkeypatch, flags, said):
    import semroute.stage1_encode.text as text_mod

    def no_llm(*args, **kwargs):
        raise AssertionError("the LLM was loaded before the flags were checked")

    monkeypatch.setattr(text_mod, "load_llm", no_llm)
    with pytest.raises(SemrouteError, match=said):
        encode_text(EncodeTextConfig(data=str(captions[0]), out=str(tmp_path / "t.zarr"), llm="unused", **flags))
    assert not (tmp_path / "t.zarr").exists()
