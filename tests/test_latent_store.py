"""Latent cache writer/reader: exact storage per dtype, buckets, sampling, completeness, workers."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch

from semroute.shared.errors import SemrouteError
from semroute.shared.latent_store import (
    OK,
    STATUS_CODE,
    Bucket,
    LatentCacheReader,
    LatentCacheWriter,
    LatentStorage,
    ShardPayload,
)

SHAPES = {"32x32": (4, 4, 4), "64x32": (4, 4, 8)}  # bucket -> latent (C, h, w)


def _index(assign: list[str | None], statuses: list[str]) -> pa.Table:
    rows, used = [], {}
    for b in assign:
        rows.append(used.setdefault(b, 0) if b else -1)
        if b:
            used[b] += 1
    n = len(assign)
    return pa.table({
        "sample_id": [f"id{i}" for i in range(n)], "line": list(range(1, n + 1)), "path": [f"{i}.png" for i in range(n)],
        "bucket": pa.array(assign, pa.string()), "row": rows, "status": statuses,
        "reason": pa.array([None if s == "pending" else "because" for s in statuses], pa.string()),
    })


def _make(tmp_path, stored_dtype="float32", arrays=("mean", "logvar"), shard_rows=2):
    # Records 0..6: 3 in bucket 32x32, 3 in 64x32, one skipped at planning (missing).
    assign = ["32x32", "64x32", None, "32x32", "64x32", "32x32", "64x32"]
    statuses = ["pending" if b else "missing" for b in assign]
    itemsize = LatentStorage(stored_dtype).numpy_dtype.itemsize
    buckets = []
    for name, shape in SHAPES.items():
        w, h = map(int, name.split("x"))
        row_bytes = int(np.prod(shape)) * itemsize
        buckets.append(Bucket.plan(w, h, shape, 3, row_bytes, shard_bytes=shard_rows * row_bytes, chunk_bytes=row_bytes))
    writer = LatentCacheWriter.create(
        tmp_path / "c.latents.zarr", buckets=buckets, arrays=list(arrays), stored_dtype=stored_dtype,
        index=_index(assign, statuses), fingerprint={"vae": "test", "resolution": 32}, input_sha256="x",
        skipped=[{"path": "m.jsonl", "line": 9, "reason": "malformed JSON"}],
        vae={"scaling_factor": 0.5, "shift_factor": 0.25, "latent_channels": 4, "downsample": 8},
    )
    return writer


def _payload(writer, unit, gen, bad_rows=()):
    bucket = writer.buckets[unit[0]]
    a, b = writer.unit_rows(unit)
    arrays = {}
    for name in writer.arrays:
        if writer.storage.stored_dtype == "uint8":
            t = torch.randint(0, 256, (b - a, *bucket.latent_shape), generator=gen, dtype=torch.uint8)
        else:
            t = torch.randn((b - a, *bucket.latent_shape), generator=gen).to(getattr(torch, writer.storage.stored_dtype))
        arrays[name] = t
    status = np.full(b - a, OK, np.uint8)
    for r in bad_rows:
        status[r] = STATUS_CODE["truncated"]
        for t in arrays.values():
            t[r] = 0
    return arrays, ShardPayload({n: writer.storage.to_numpy(t) for n, t in arrays.items()}, status)


def _fill(writer, bad=None):
    """Write every unit; ``bad``: {(bucket_index, row): ...} rows that failed to decode."""
    gen = torch.Generator().manual_seed(0)
    truth = {}
    for unit in writer.units():
        a, _ = writer.unit_rows(unit)
        bad_rows = [r - a for (k, r) in (bad or {}) if k == unit[0] and a <= r < a + 2]
        arrays, payload = _payload(writer, unit, gen, bad_rows)
        writer.write_shard(unit, payload)
        for j in range(payload.status.shape[0]):
            truth[(unit[0], a + j)] = {n: t[j] for n, t in arrays.items()}
    return truth


@pytest.mark.parametrize("stored_dtype, arrays", [("float32", ("mean", "logvar")), ("bfloat16", ("mean", "logvar")),
                                                  ("float16", ("mean", "logvar")), ("uint8", ("latent",))])
def test_roundtrip_is_exact(tmp_path, stored_dtype, arrays):
    writer = _make(tmp_path, stored_dtype, arrays)
    truth = _fill(writer)
    writer.finish()
    reader = LatentCacheReader(writer.location)
    assert len(reader) == 6
    # Store order: bucket by bucket, manifest order inside a bucket.
    assert reader.sample_ids == ["id0", "id3", "id5", "id1", "id4", "id6"]
    for i in range(len(reader)):
        k, row = int(reader._bucket[i]), int(reader._row[i])
        got = reader.stored(i)
        for name in arrays:
            want = truth[(k, row)][name]
            want = want.float() / 127.5 - 1 if stored_dtype == "uint8" else want.float()
            assert torch.equal(got[name], want), (stored_dtype, name, i)
        assert got[arrays[0]].shape == SHAPES[reader.bucket_of(i).name]


def test_sampling_uses_the_generator_and_the_factors(tmp_path):
    writer = _make(tmp_path)
    _fill(writer)
    writer.finish()
    reader = LatentCacheReader(writer.location)
    mean, logvar = reader.posterior(0)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    raw = mean + torch.exp(0.5 * logvar) * eps
    got = reader.latent(0, torch.Generator().manual_seed(7))
    assert torch.allclose(got, (raw - 0.25) * 0.5)
    assert torch.allclose(reader.latent(0, torch.Generator().manual_seed(7), scaled=False), raw)
    assert torch.equal(reader.latent(0, mode="mean", scaled=False), mean)
    assert not torch.equal(reader.latent(0, torch.Generator().manual_seed(8)), got)
    assert torch.allclose(reader.denormalize(reader.normalize(raw)), raw)


def test_buckets_and_batches(tmp_path):
    writer = _make(tmp_path)
    _fill(writer)
    writer.finish()
    reader = LatentCacheReader(writer.location)
    groups = reader.by_bucket()
    assert {k: v.tolist() for k, v in groups.items()} == {"32x32": [0, 1, 2], "64x32": [3, 4, 5]}
    batch = reader.batch(groups["64x32"], torch.Generator().manual_seed(0))
    assert batch.shape == (3, 4, 4, 8)
    with pytest.raises(SemrouteError, match="different buckets"):
        reader.batch([0, 3])
    assert reader.position("id4") == 4
    with pytest.raises(KeyError):
        reader.position("id2")  # skipped at planning


def test_decode_failures_are_left_out_and_reported(tmp_path):
    writer = _make(tmp_path)
    _fill(writer, bad={(1, 1): True})  # bucket 64x32, row 1 = record 4
    counts = writer.finish()
    assert counts == {"n_encoded": 5, "n_skipped_images": 2, "n_bad_records": 1}
    reader = LatentCacheReader(writer.location)
    assert "id4" not in reader.sample_ids and len(reader) == 5
    status = dict(zip(reader.index.column("sample_id").to_pylist(), reader.index.column("status").to_pylist()))
    assert status["id4"] == "truncated" and status["id2"] == "missing" and status["id0"] == "ok"
    report = (tmp_path / "c.latents.zarr" / "skipped.jsonl").read_text().splitlines()
    assert len(report) == 3 and "malformed JSON" in report[0] and '"id2"' in report[1] and '"id4"' in report[2]


def test_incomplete_cache_is_refused_unless_asked(tmp_path):
    writer = _make(tmp_path)
    gen = torch.Generator().manual_seed(0)
    writer.write_shard((0, 0), _payload(writer, (0, 0), gen)[1])
    with pytest.raises(SemrouteError, match="--resume"):
        writer.finish()
    with pytest.raises(SemrouteError, match="not complete"):
        LatentCacheReader(writer.location)
    partial = LatentCacheReader(writer.location, allow_incomplete=True)
    assert partial.sample_ids == ["id0", "id3"]  # only the rows of the one written shard
    assert writer.pending(writer.units()) == [(0, 1), (1, 0), (1, 1)]
    assert writer.split(0, 2) == [(0, 0), (0, 1)] and writer.split(1, 2) == [(1, 0), (1, 1)]


def test_reader_pickles_into_workers(tmp_path):
    writer = _make(tmp_path)
    _fill(writer)
    writer.finish()
    reader = LatentCacheReader(writer.location)
    first = reader.latent(2, mode="mean")
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._files is None and torch.equal(clone.latent(2, mode="mean"), first)


@pytest.mark.parametrize("rows, per_shard, per_chunk", [(11, 8, 2), (5, 4, 4), (3, 8, 1)])
def test_shard_file_writer_writes_zarrs_bytes(tmp_path, rows, per_shard, per_chunk):
    import zarr

    from semroute.shared.store import ShardFileWriter, ShardLayout, create_sharded_array

    layout = ShardLayout(rows, per_shard, per_chunk)
    data = np.random.default_rng(0).standard_normal((rows, 3, 2)).astype(np.float32)
    paths = {}
    for how in ("zarr", "ours"):
        group = zarr.open_group(str(tmp_path / how), mode="w", zarr_format=3)
        arr = create_sharded_array(group, "x", data.shape, np.float32, layout)
        writer = ShardFileWriter(tmp_path / how, "x")
        for s in range(layout.n_shards):
            a, b = layout.shard_rows(s)
            if how == "zarr":
                arr[a:b] = data[a:b]
            else:
                writer.write(s, data[a:b])
        paths[how] = sorted(p for p in (tmp_path / how / "x" / "c").rglob("*") if p.is_file())
        assert np.array_equal(zarr.open_array(str(tmp_path / how / "x"), mode="r")[...], data)
    assert [p.relative_to(tmp_path / "zarr") for p in paths["zarr"]] == [p.relative_to(tmp_path / "ours") for p in paths["ours"]]
    for z, o in zip(paths["zarr"], paths["ours"]):
        assert z.read_bytes() == o.read_bytes()


def test_a_damaged_stored_dtype_is_named_with_the_cache(tmp_path):
    from semroute.shared.errors import CacheDamaged
    from semroute.shared.store import open_group, update_attrs

    location = _make(tmp_path).location
    update_attrs(open_group(location, mode="r+"), stored_dtype="abs")
    for open_ in (LatentCacheWriter.open, lambda loc: LatentCacheReader(loc, allow_incomplete=True)):
        with pytest.raises(CacheDamaged, match=f"{location}/zarr.json: stored_dtype is 'abs', not a dtype"):
            open_(location)
