"""Growing a text cache: `encode-text --append` writes new shards only (no shard file of the old cache changes),
the result reads like one cache encoded from all the data, a different model is refused naming what differs,
duplicate ids are refused naming both sources, an interrupted append continues, and a training run started
on the old cache refuses to resume on the grown one unless --allow-new-data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from semroute.shared.errors import FingerprintMismatch, SemrouteError
from semroute.shared.inspect import verify
from semroute.shared.store import read_attrs
from semroute.shared.text_store import TextCacheReader, TextCacheWriter
from semroute.stage1_encode.text import EncodeTextConfig, encode_text
from testkit import die_on_call, random_captions, write_manifest


def _files(cache: Path) -> dict[str, str]:
    return {str(p.relative_to(cache)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in (cache / "features" / "c").rglob("*") if p.is_file()}  # the shard files


def _cfg(llm, data, out, **kw):
    return EncodeTextConfig(data=str(data), out=str(out), llm=str(llm), dtype="float32", device="cpu", progress=False,
                            shard_mb=0.02, **kw)


def test_append_grows_by_new_shards_and_reads_like_one_cache(tmp_path, tiny_llama_dir, tiny_qwen_dir, monkeypatch):
    records = [{**r, "id": f"s{i}"} for i, r in enumerate(random_captions(30, seed=5))]
    old, new = write_manifest(tmp_path / "old.jsonl", records[:24]), write_manifest(tmp_path / "new.jsonl", records[24:])
    full = write_manifest(tmp_path / "all.jsonl", records)
    cache = tmp_path / "c.text.zarr"
    encode_text(_cfg(tiny_llama_dir, old, cache))
    before = _files(cache)
    n_shards = TextCacheWriter.open(cache).layout.n_shards
    assert read_attrs(cache)["format_version"] == 1

    # An interrupted append (after its first new shard) continues when run again with the same data.
    die_on_call(monkeypatch, TextCacheWriter, "write_shard", 2)
    with pytest.raises(RuntimeError, match="killed"):
        encode_text(_cfg(tiny_llama_dir, new, cache, append=True))
    monkeypatch.undo()
    with pytest.raises(SemrouteError, match="not complete"):
        TextCacheReader(cache)
    summary = encode_text(_cfg(tiny_llama_dir, new, cache, append=True))
    assert summary["shards_done_before"] == n_shards + 1

    after = _files(cache)
    assert {k: after[k] for k in before} == before  # no old shard file was rewritten
    attrs = read_attrs(cache)
    assert attrs["format_version"] == 2 and attrs["complete"]
    assert [s["source"] for s in attrs["segments"]] == [str(old), str(new)]
    # Reads like one cache made from all the captions.
    encode_text(_cfg(tiny_llama_dir, full, tmp_path / "full.text.zarr"))
    a, b = TextCacheReader(cache), TextCacheReader(tmp_path / "full.text.zarr")
    assert a.index.column("sample_id").to_pylist() == b.index.column("sample_id").to_pylist()
    assert a.n_captions == b.n_captions > 30  # several captions per record
    assert a.lengths.tolist() == b.lengths.tolist() and a.attrs["total_tokens"] == b.attrs["total_tokens"]
    for i in range(a.n_captions):
        assert torch.equal(a.caption(i), b.caption(i))
    assert verify(str(cache))[1] == []

    # Refusals: the same ids again (both sources named), another model (what differs named).
    again = tmp_path / "again.jsonl"  # (new.jsonl itself again: "nothing to append", test_encode_safety.py)
    again.write_text(new.read_text() + '{"id": "zz", "text": "one more"}\n')
    with pytest.raises(SemrouteError, match=r"sample id 's24' \(line 1\) is already in the cache, from .*new\.jsonl"):
        encode_text(_cfg(tiny_llama_dir, again, cache, append=True))
    more = write_manifest(tmp_path / "more.jsonl", [{"id": "x", "text": "a red circle"}])
    with pytest.raises(FingerprintMismatch, match="cannot append"):
        encode_text(_cfg(tiny_qwen_dir, more, cache, append=True))
    with pytest.raises(SemrouteError, match="no cache there"):
        encode_text(_cfg(tiny_llama_dir, more, tmp_path / "none.zarr", append=True))


def test_a_run_refuses_a_grown_cache_unless_allowed(tmp_path, tiny_llama_dir):
    from semroute.stage1_encode.images import EncodeImagesConfig, encode_images
    from semroute.stage2_train.config import TrainConfig
    from semroute.stage2_train.train import train
    from testkit import write_square_images

    records = [{**r, "id": f"q{i}"} for i, r in enumerate(write_square_images(tmp_path / "img", 24))]
    old, new = write_manifest(tmp_path / "old.jsonl", records[:16]), write_manifest(tmp_path / "new.jsonl", records[16:])
    text, latents = tmp_path / "t.zarr", tmp_path / "l.zarr"
    encode_text(_cfg(tiny_llama_dir, old, text))
    encode_images(EncodeImagesConfig(data=str(write_manifest(
        tmp_path / "all.jsonl", records)), out=str(latents), vae="pixel", resolution=32, device="cpu", workers=0,
        progress=False))
    cfg = dict(text_cache=str(text), latent_cache=str(latents), fusion="static", preset="tiny", batch_size=8,
               num_workers=0, tensorboard=False, out=str(tmp_path / "run"))
    train(TrainConfig(max_steps=2, **cfg), progress=False)
    encode_text(_cfg(tiny_llama_dir, new, text, append=True))
    with pytest.raises(SemrouteError, match=r"caches changed size.*text cache captions: \d+ -> \d+.*--allow-new-data"):
        train(TrainConfig(max_steps=3, **cfg), resume="latest", progress=False)
    summary = train(TrainConfig(max_steps=3, allow_new_data=True, **cfg), resume="latest", progress=False)
    assert summary["step"] == 3
    # A new run sees the union: all 24 images have captions now.
    from semroute.stage2_train.data import PairedCaches

    assert len(PairedCaches(str(text), str(latents), text_layers=None)) == 24


def test_encode_images_append_new_shards_and_new_buckets(tmp_path):
    from images_testutil import write_images

    from semroute.shared.latent_store import LatentCacheReader
    from semroute.stage1_encode.images import EncodeImagesConfig, encode_images

    # Sizes cycle through 3 aspect ratios: with auto buckets the first part fills some buckets, the second
    # adds rows to them (and one image of a new shape makes a new bucket).
    records = [{**r, "image": str(tmp_path / "imgs" / r["image"])} for r in write_images(tmp_path / "imgs", 14)]
    from images_testutil import random_rgb

    random_rgb(96, 40, seed=99).save(tmp_path / "imgs" / "wide.jpg")
    records.append({"id": "wide", "image": str(tmp_path / "imgs" / "wide.jpg")})
    old, new = write_manifest(tmp_path / "old.jsonl", records[:10]), write_manifest(tmp_path / "new.jsonl", records[10:])
    full = write_manifest(tmp_path / "all.jsonl", records)
    common = dict(vae="pixel", resolution=32, buckets="auto:3", device="cpu", workers=0, progress=False, shard_mb=0.005)
    cache = tmp_path / "l.zarr"
    encode_images(EncodeImagesConfig(data=str(old), out=str(cache), **common))
    before = {str(p.relative_to(cache)): hashlib.sha256(p.read_bytes()).hexdigest()
              for p in (cache / "buckets").rglob("c/*") if p.is_file()}
    n_buckets = len(LatentCacheReader(cache).buckets)
    encode_images(EncodeImagesConfig(data=str(new), out=str(cache), append=True, **common))
    after = {str(p.relative_to(cache)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in (cache / "buckets").rglob("c/*") if p.is_file()}
    assert {k: after[k] for k in before} == before  # no written shard file changed
    encode_images(EncodeImagesConfig(data=str(full), out=str(tmp_path / "full.zarr"), **common))
    a, b = LatentCacheReader(cache), LatentCacheReader(tmp_path / "full.zarr")
    assert len(a.buckets) > n_buckets and sorted(a.sample_ids) == sorted(b.sample_ids)
    for sid in b.sample_ids:
        assert torch.equal(a.stored(a.position(sid))["latent"], b.stored(b.position(sid))["latent"])
    assert verify(str(cache))[1] == []
    again = tmp_path / "again.jsonl"  # (new.jsonl itself again: "nothing to append", test_encode_safety.py)
    first = json.loads(new.read_text().splitlines()[0])
    again.write_text(new.read_text() + json.dumps({**first, "id": "zz"}) + "\n")
    with pytest.raises(SemrouteError, match=r"sample id 's10' \(line 1\) is already in the cache, from .*new\.jsonl"):
        encode_images(EncodeImagesConfig(data=str(again), out=str(cache), append=True, **common))
