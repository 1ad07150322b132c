"""The on-disk format is a contract between semroute versions: a text cache laid out here with zarr's own API
and the attributes written out literally (format version 1, as caches were written before the store was
split into shared/store.py and shared/text_store.py, and before seals existed) reads back exactly, and
`verify` finds nothing wrong with it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from semroute.shared.inspect import describe
from semroute.shared.verify import verify_store
from semroute.shared.text_store import TextCacheReader

L, D = 2, 4
LENGTHS = [3, 5, 2, 7]  # tokens per caption


def _old_cache(root) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import zarr
    from zarr.codecs import Crc32cCodec

    rng = np.random.default_rng(0)
    offsets = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int64)
    total = int(offsets[-1])
    features = rng.standard_normal((total, L, D)).astype(np.float32)
    null = rng.standard_normal((2, L, D)).astype(np.float32)
    group = zarr.open_group(str(root), mode="w", zarr_format=3)
    plain = dict(compressors=[Crc32cCodec()], fill_value=0, config={"write_empty_chunks": True})
    # features: sharded along rows, 8 rows a shard, 4 a chunk, each chunk with its crc32c
    arr = group.create_array("features", shape=features.shape, dtype="float32", chunks=(4, L, D), shards=(8, L, D),
                             **plain)
    arr[...] = features
    group.create_array("offsets", shape=offsets.shape, dtype="int64", chunks=offsets.shape, **plain)[...] = offsets
    group.create_array("null_features", shape=null.shape, dtype="float32", chunks=null.shape, **plain)[...] = null
    flags = group.create_array("progress/features", shape=(3,), dtype="uint8", chunks=(1,),
                               compressors=[Crc32cCodec()], fill_value=0)
    flags[...] = 1
    group.attrs.update({"semroute": {
        "kind": "semroute.text-cache", "format_version": 1,
        "fingerprint": {"compute_dtype": "float32", "layers": [3, 7], "storage": "exact", "stored_dtype": "float32"},
        "layers": [3, 7], "hidden_size": D, "storage": "exact", "n_captions": len(LENGTHS), "total_tokens": total,
        "layout": {"rows": total, "rows_per_shard": 8, "rows_per_chunk": 4}, "input_sha256": "-", "complete": True,
        "n_truncated": 0, "null_text": "", "null_n_tokens": 2,
    }})
    pq.write_table(pa.table({
        "caption": pa.array(np.arange(len(LENGTHS), dtype=np.int64)),
        "sample_id": pa.array([f"s{i}" for i in range(len(LENGTHS))]),
        "text": pa.array([f"caption {i}" for i in range(len(LENGTHS))]),
        "start": pa.array(offsets[:-1]),
        "n_tokens": pa.array(np.asarray(LENGTHS, dtype=np.int32)),
    }), root / "index.parquet")
    return features, offsets, null


def test_a_version_1_text_cache_reads_back_exactly_and_verifies(tmp_path):
    root = tmp_path / "old.text.zarr"
    features, offsets, null = _old_cache(root)
    reader = TextCacheReader(root)
    for i in range(len(LENGTHS)):  # captions inside a chunk, across chunks and across the shard boundary (row 8)
        assert torch.equal(reader.caption(i), torch.from_numpy(features[offsets[i]:offsets[i + 1]]))
    assert torch.equal(reader.null(), torch.from_numpy(null))
    assert reader.index.column("sample_id").to_pylist() == ["s0", "s1", "s2", "s3"]
    narrowed = TextCacheReader(root, layers=[7])
    assert torch.equal(narrowed.caption(3), torch.from_numpy(features[offsets[3]:offsets[4], 1:]))
    checked, problems, notes = verify_store(str(root))
    assert problems == [] and checked > 5
    assert any("older semroute" in n for n in notes)  # no seal: said, not failed
    assert describe(str(root))["shards written"] == "3 / 3"


def test_verify_names_the_shard_file_of_a_flipped_byte_in_a_version_1_cache(tmp_path):
    root = tmp_path / "old.text.zarr"
    _old_cache(root)
    shard = root / "features" / "c" / "1" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[5] ^= 0xFF  # inside the first chunk's data
    shard.write_bytes(bytes(raw))
    _, problems, _ = verify_store(str(root))
    assert len(problems) == 1 and str(shard) in problems[0] and "crc32c" in problems[0]


def test_a_damaged_compute_dtype_is_named_with_the_cache(tmp_path):
    """An unsealed cache (an older semroute's, or one being written) whose attributes name no dtype semroute writes."""
    import zarr

    from semroute.shared.errors import CacheDamaged
    from semroute.shared.text_store import TextCacheWriter

    root = tmp_path / "old.text.zarr"
    _old_cache(root)
    group = zarr.open_group(str(root), mode="r+")
    for name in ("abs", "nope", "float64"):
        attrs = dict(group.attrs["semroute"])
        attrs["fingerprint"] = {**attrs["fingerprint"], "compute_dtype": name}
        group.attrs["semroute"] = attrs
        for open_ in (TextCacheReader, TextCacheWriter.open):
            with pytest.raises(CacheDamaged, match=f"{root}/zarr.json: fingerprint.compute_dtype is '{name}'"):
                open_(root)


def test_the_remains_of_an_interrupted_create_are_the_entries_the_stores_name(tmp_path):
    """A create killed before its attributes were written leaves a group and entries its store names (the file
    names' owners: shared/integrity.py, shared/text_store.py, shared/latent_store.py): a new create may replace
    them; any other entry stops it."""
    import zarr

    from semroute.shared.errors import SemrouteError
    from semroute.shared.integrity import INDEX
    from semroute.shared.latent_store import LATENT_KIND, SKIPPED_FILE
    from semroute.shared.store import check_replaceable
    from semroute.shared.text_store import BAD_RECORDS_FILE, TEXT_KIND, TEXT_SMALL_ARRAYS

    for kind, files, folders in ((TEXT_KIND, [INDEX, BAD_RECORDS_FILE], ["features", "scales", *TEXT_SMALL_ARRAYS]),
                                 (LATENT_KIND, [INDEX, SKIPPED_FILE], ["buckets"])):
        root = tmp_path / kind
        zarr.open_group(str(root), mode="w", zarr_format=3)
        for name in files:
            (root / name).write_bytes(b"")
        for name in [*folders, "progress"]:
            (root / name).mkdir()
        check_replaceable(root, kind)
        (root / "notes.txt").write_text("mine")
        with pytest.raises(SemrouteError, match="is not a semroute cache"):
            check_replaceable(root, kind)


def test_the_store_entries_written_out_below_the_stores_are_theirs():
    """shared/store.py lists them itself (the stores import it, not the reverse): kept equal to the owners' lists."""
    from semroute.shared.integrity import INDEX
    from semroute.shared.latent_store import LATENT_ENTRIES
    from semroute.shared.store import STORE_ENTRIES
    from semroute.shared.text_store import TEXT_ENTRIES

    assert STORE_ENTRIES == {"zarr.json", "progress", INDEX} | TEXT_ENTRIES | LATENT_ENTRIES
