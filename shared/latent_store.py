"""The latent cache: one VAE posterior (or exact latent) per image, in one sharded array set per bucket.

Layout of ``NAME.latents.zarr/``::

    zarr.json                     group attributes under "semroute": kind, format_version, fingerprint,
                                  posterior, arrays, stored dtype, scaling/shift factors, buckets, counts,
                                  "complete"
    buckets/<W>x<H>/mean          [rows, C, h, w]  posterior mean     } diagonal-Gaussian VAEs
    buckets/<W>x<H>/logvar        [rows, C, h, w]  log-variance       }
    buckets/<W>x<H>/latent        [rows, C, h, w]  exact latent (deterministic codecs; uint8 codes for pixel)
    buckets/<W>x<H>/status        [rows] uint8: 1 encoded, else why the image could not be decoded
    progress/<W>x<H>              one done flag per shard of that bucket
    index.parquet                 one row per manifest record: sample_id, line, image, path, file_bytes,
                                  orig_width, orig_height, orientation, mode, bucket, row, crop box, status,
                                  reason
    skipped.jsonl                 the images (and bad manifest records) left out, with path and reason

Without ``--buckets`` there is a single bucket ``<R>x<R>``. Every bucket is its own set of arrays
because latent shapes differ; a sample is located by ``(bucket, row)`` from the index. Rows of a
bucket follow manifest order. bf16 is stored as its uint16 bit pattern (Zarr v3 has no bfloat16).

Rows are planned from image headers, before decoding; an image whose data then fails to decode
(truncated, corrupt) keeps its row with a non-1 status and zeros that no reader ever returns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from semroute.shared import images as im
from semroute.shared.dtypes import BY_NAME, cache_dtype
from semroute.shared.errors import CacheDamaged, SemrouteError
from semroute.shared.integrity import INDEX
from semroute.shared.store import (
    ATTR_KEY,
    FORMAT_VERSION,
    DoneFlags,
    ShardedArrayFile,
    ShardFileWriter,
    ShardLayout,
    check_replaceable,
    create_sharded_array,
    describe_header,
    dir_size,
    join,
    open_flags,
    open_for_writing,
    open_group,
    read_cache_attrs,
    read_index,
    read_parquet,
    seal,
    shards_present,
    store_file,
    update_attrs,
    write_file,
    write_parquet,
)

LATENT_KIND = "semroute.latent-cache"
DEFAULT_LATENT_CHUNK_BYTES = 64 << 10  # a training read touches one sample: keep inner chunks small

# Per-row status codes (the ``status`` arrays); names match the index's ``status`` column.
STATUS_NAMES = ["pending", "ok", im.MISSING, im.ZERO_BYTE, im.NOT_AN_IMAGE, im.TOO_SMALL, im.BOMB,
                im.TRUNCATED, im.DECODE_ERROR, im.UNREADABLE]
STATUS_CODE = {name: code for code, name in enumerate(STATUS_NAMES)}
PENDING, OK = 0, 1
_FOUND_WHILE_DECODING = "found while decoding the image data (the run's console shows Pillow's message)"


# ---------------------------------------------------------------------------------------------
# How latents are stored
# ---------------------------------------------------------------------------------------------
class LatentStorage:
    """Exact storage of latents in the dtype they were computed in.

    ``float32`` / ``float16`` natively, ``bfloat16`` as uint16 bits, ``uint8`` for the pixel codec's
    codes (read back as ``u / 127.5 - 1``, the very values the codec's float path produces).
    """

    NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "uint8": np.uint8}

    def __init__(self, stored_dtype: str):
        if stored_dtype not in self.NUMPY:
            raise SemrouteError(f"latent dtype {stored_dtype!r} is not one of {', '.join(self.NUMPY)}")
        self.stored_dtype = stored_dtype
        self.numpy_dtype = np.dtype(self.NUMPY[stored_dtype])

    @classmethod
    def of_cache(cls, location, attrs: dict) -> "LatentStorage":
        """The storage of the latent cache at ``location``, from its attributes."""
        stored = attrs["stored_dtype"]
        cache_dtype(stored, location, "stored_dtype", cls.NUMPY)
        return cls(stored)

    def to_numpy(self, t: torch.Tensor) -> np.ndarray:
        t = t.contiguous().cpu()
        if self.stored_dtype == "bfloat16":
            return t.to(torch.bfloat16).view(torch.uint16).numpy()
        if self.stored_dtype == "uint8":
            if t.dtype != torch.uint8:
                raise ValueError("uint8 storage takes pixel codes (uint8 tensors)")
            return t.numpy()
        return t.to(BY_NAME[self.stored_dtype]).numpy()

    def to_tensor(self, a: np.ndarray, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.stored_dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        elif self.stored_dtype == "uint8":
            t = t.to(torch.float32) / 127.5 - 1.0  # == vae.pixels_to_unit
        return t.to(out_dtype)


@dataclass(frozen=True)
class Bucket:
    """One target size and its arrays. ``width``/``height`` in pixels; ``latent_shape`` = ``(C, h, w)``."""

    name: str
    width: int
    height: int
    latent_shape: tuple[int, int, int]
    rows: int
    layout: ShardLayout

    def to_attrs(self) -> dict:
        lay = self.layout
        return {"name": self.name, "width": self.width, "height": self.height, "latent_shape": list(self.latent_shape),
                "rows": self.rows, "layout": {"rows": lay.rows, "rows_per_shard": lay.rows_per_shard,
                                              "rows_per_chunk": lay.rows_per_chunk}}

    @classmethod
    def from_attrs(cls, d: dict) -> "Bucket":
        return cls(d["name"], d["width"], d["height"], tuple(d["latent_shape"]), d["rows"], ShardLayout(**d["layout"]))

    @classmethod
    def plan(cls, width: int, height: int, latent_shape, rows: int, row_bytes: int, shard_bytes: int,
             chunk_bytes: int) -> "Bucket":
        return cls(f"{width}x{height}", width, height, tuple(latent_shape), rows,
                   ShardLayout.plan(rows, row_bytes, shard_bytes, chunk_bytes))


def latent_array_geometry(attrs: dict, bucket: Bucket, name: str, location) -> tuple:
    """What array ``name`` (one of ``attrs["arrays"]``, or ``status``) of ``bucket`` of the latent cache at
    ``location`` must be: ``(shape, dtype, layout)`` (``ShardedArrayMeta.check_geometry``)."""
    if name == "status":
        return (bucket.rows,), np.uint8, ShardLayout(bucket.rows, bucket.layout.rows_per_shard,
                                                      bucket.layout.rows_per_shard)
    return (bucket.rows, *bucket.latent_shape), LatentStorage.of_cache(location, attrs).numpy_dtype, bucket.layout


def bucket_nbytes(bucket: Bucket, arrays: list[str], itemsize: int) -> int:
    """Exact bytes on disk of one bucket's latent and status arrays."""
    row_bytes = int(np.prod(bucket.latent_shape)) * itemsize
    status = ShardLayout(bucket.rows, bucket.layout.rows_per_shard, bucket.layout.rows_per_shard)
    return len(arrays) * bucket.layout.nbytes(row_bytes) + status.nbytes(1)


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------
@dataclass
class ShardPayload:
    """One shard's rows: ``arrays[name]`` ``[rows, C, h, w]`` in the stored numpy dtype, ``status`` ``[rows]``."""

    arrays: dict[str, np.ndarray]
    status: np.ndarray


class LatentCacheWriter:
    """Creates a latent cache and writes it whole shard by whole shard.

    A *unit* is ``(bucket_index, shard)``; units are ordered bucket by bucket, and processes split that
    list into contiguous ranges (:meth:`split`)::

        writer = LatentCacheWriter.create(url, buckets=..., index=..., ...)   # before any image is decoded
        for unit in writer.pending(writer.split(rank, world)):
            writer.write_shard(unit, payload)
        writer.finish()                                                      # rank 0, after all ranks
    """

    def __init__(self, location, group, attrs: dict):
        self.location = str(location)
        self.group = group
        self.attrs = attrs
        self.buckets = [Bucket.from_attrs(b) for b in attrs["buckets"]]
        self.arrays: list[str] = list(attrs["arrays"])
        self.storage = LatentStorage.of_cache(self.location, attrs)
        self.flags = open_flags(self.location, group, [b.name for b in self.buckets])
        self._files: dict[str, ShardFileWriter] = {}

    @classmethod
    def create(cls, location, *, buckets: list[Bucket], arrays: list[str], stored_dtype: str, index,
               fingerprint: dict, vae: dict, input_sha256: str, skipped: list[dict], extra: dict | None = None
               ) -> "LatentCacheWriter":
        """Create every array, flags, ``index.parquet`` and the attributes (``complete`` = False)."""
        storage = LatentStorage(stored_dtype)
        check_replaceable(location, LATENT_KIND)
        group = open_group(location, mode="w")
        for b in buckets:
            for name in arrays:
                create_sharded_array(group, f"buckets/{b.name}/{name}", (b.rows, *b.latent_shape),
                                     storage.numpy_dtype, b.layout)
            # Status: one inner chunk per shard (a byte per row), written with the shard's latents.
            create_sharded_array(group, f"buckets/{b.name}/status", (b.rows,), np.uint8,
                                 ShardLayout(b.rows, b.layout.rows_per_shard, b.layout.rows_per_shard))
            DoneFlags(group, b.name, b.layout.n_shards)
        attrs = {
            "kind": LATENT_KIND,
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "posterior": "gaussian" if "mean" in arrays else "exact",
            "arrays": list(arrays),
            "stored_dtype": stored_dtype,
            **vae,  # scaling_factor, shift_factor, latent_channels, downsample
            "buckets": [b.to_attrs() for b in buckets],
            "n_records": index.num_rows,
            "n_planned": sum(b.rows for b in buckets),
            "input_sha256": input_sha256,
            "complete": False,
            **(extra or {}),
        }
        group.attrs.update({ATTR_KEY: attrs})
        write_skipped(location, skipped)
        write_parquet(location, INDEX, index)  # last: its presence says the store was fully created
        return cls(location, group, attrs)

    @classmethod
    def open(cls, location) -> "LatentCacheWriter":
        group, attrs = open_for_writing(location, LATENT_KIND, "latent cache", hint=(
            " (if an encode-images run was interrupted while creating it, pass --overwrite)"))
        return cls(location, group, attrs)

    def append(self, *, buckets: list[Bucket], index, input_sha256: str, source: str, skipped: list[dict]) -> None:
        """Grow a finished cache by new images: ``buckets`` as planned for the new images alone (rows from 0),
        ``index`` their rows of index.parquet. In a bucket the cache has, the new rows start at its next
        shard boundary (no written shard file changes; the rows between are never referenced by the
        index); new buckets get new arrays. Marked incomplete first; encoding the new units and
        ``finish()`` complete it. Safe to run again after a crash (it starts over from the saved state)."""
        import pyarrow as pa

        marker = self.attrs.get("appending")
        if marker is None:
            marker = {"source": source, "input_sha256": input_sha256, "buckets_before": self.attrs["buckets"],
                      "n_records_before": self.attrs["n_records"], "segments_before": self.attrs.get("segments") or [
                          {"source": self.attrs.get("source"), "first_record": 0, "n_records": self.attrs["n_records"],
                           "input_sha256": self.attrs["input_sha256"]}]}
            update_attrs(self.group, complete=False, appending=marker)
        before = {b["name"]: Bucket.from_attrs(b) for b in marker["buckets_before"]}
        out = dict(before)
        shift: dict[str, int] = {}
        for new in buckets:
            old = before.get(new.name)
            if old is None:  # a bucket the cache did not have
                for name in self.arrays:
                    create_sharded_array(self.group, f"buckets/{new.name}/{name}", (new.rows, *new.latent_shape),
                                         self.storage.numpy_dtype, new.layout)
                create_sharded_array(self.group, f"buckets/{new.name}/status", (new.rows,), np.uint8,
                                     ShardLayout(new.rows, new.layout.rows_per_shard, new.layout.rows_per_shard))
                DoneFlags(self.group, new.name, new.layout.n_shards)
                out[new.name], shift[new.name] = new, 0
                continue
            start = old.layout.n_shards * old.layout.rows_per_shard
            rows = start + new.rows
            layout = ShardLayout(rows, old.layout.rows_per_shard, old.layout.rows_per_chunk)
            for name in [*self.arrays, "status"]:
                arr = self.group[f"buckets/{new.name}/{name}"]
                arr.resize((rows, *arr.shape[1:]))  # metadata only: existing shard files stay as they are
            self.group[f"progress/{new.name}"].resize((layout.n_shards,))
            out[new.name], shift[new.name] = Bucket(old.name, old.width, old.height, old.latent_shape, rows, layout), start
        n_before = int(marker["n_records_before"])
        rows_col = [None if b is None else int(r) + shift[b] for b, r in
                    zip(index.column("bucket").to_pylist(), index.column("row").to_pylist())]
        new_index = index.set_column(index.schema.get_field_index("row"), "row", pa.array(
            [-1 if r is None else r for r in rows_col], pa.int64()))
        old_index = read_parquet(self.location, INDEX).slice(0, n_before)
        have = read_skipped(self.location)
        write_skipped(self.location, have + [e for e in skipped if e not in have])  # a rerun adds nothing twice
        write_parquet(self.location, INDEX, pa.concat_tables([old_index, new_index.select(
            old_index.column_names)], promote_options="default"))
        segments = marker["segments_before"] + [{"source": source, "first_record": n_before,
                                                 "n_records": index.num_rows, "input_sha256": input_sha256}]
        update_attrs(self.group, buckets=[b.to_attrs() for b in out.values()], n_records=n_before + index.num_rows,
                     n_planned=sum(b.rows for b in out.values()), input_sha256=input_sha256, segments=segments,
                     appending=None, complete=False)
        self.__init__(self.location, self.group, dict(self.group.attrs)[ATTR_KEY])

    # -- work units ------------------------------------------------------------------------------
    def units(self) -> list[tuple[int, int]]:
        return [(k, s) for k, b in enumerate(self.buckets) for s in range(b.layout.n_shards)]

    def split(self, rank: int, world_size: int) -> list[tuple[int, int]]:
        """The contiguous range of units that process ``rank`` of ``world_size`` owns."""
        units = self.units()
        n = len(units)
        return units[n * rank // world_size: n * (rank + 1) // world_size]

    def pending(self, units) -> list[tuple[int, int]]:
        done = {b.name: f.done() for b, f in zip(self.buckets, self.flags.values())}
        for b in self.buckets:  # flagged and still there (see shards_present)
            for name in [*self.arrays, "status"]:
                present = shards_present(self.location, f"buckets/{b.name}/{name}")
                done[b.name] &= np.isin(np.arange(len(done[b.name])), list(present))
        return [(k, s) for k, s in units if not done[self.buckets[k].name][s]]

    def unit_rows(self, unit: tuple[int, int]) -> tuple[int, int]:
        return self.buckets[unit[0]].layout.shard_rows(unit[1])

    # -- writing ---------------------------------------------------------------------------------
    def write_shard(self, unit: tuple[int, int], payload: ShardPayload) -> None:
        """Write one unit whole: every latent array, the status, then the done flag."""
        bucket = self.buckets[unit[0]]
        a, b = bucket.layout.shard_rows(unit[1])
        if payload.status.shape != (b - a,):
            raise ValueError(f"unit {unit} has {b - a} rows, got {payload.status.shape}")
        for name, data in [*((n, payload.arrays[n]) for n in self.arrays), ("status", payload.status)]:
            self._write(f"buckets/{bucket.name}/{name}", unit[1], a, b, data)
        self.flags[bucket.name].set(unit[1])  # last: the unit counts only once all of it is on disk

    def _write(self, path: str, shard: int, a: int, b: int, data: np.ndarray) -> None:
        if path not in self._files:  # local or remote, the shard is written (uploaded) whole
            self._files[path] = ShardFileWriter(self.location, path)
        self._files[path].write(shard, data)

    def read_status(self) -> dict[str, np.ndarray]:
        return {b.name: np.asarray(self.group[f"buckets/{b.name}/status"][:]) for b in self.buckets}

    def finish(self, **summary) -> dict:
        """Check every flag, fold decode-time failures into ``index.parquet`` and ``skipped.jsonl``,
        mark complete. Returns the counts added to the attributes."""
        missing = self.pending(self.units())
        if missing:
            raise SemrouteError(f"{len(missing)} shards of {self.location} are not written yet "
                                f"(first: {missing[:5]}); run again with --resume")
        import pyarrow as pa

        index = read_parquet(self.location, INDEX)
        status = index.column("status").to_pylist()
        reason = index.column("reason").to_pylist()
        buckets = index.column("bucket").to_pylist()
        rows = index.column("row").to_numpy()
        codes = self.read_status()
        for i, (b, r) in enumerate(zip(buckets, rows)):
            if b is None:
                continue
            name = STATUS_NAMES[int(codes[b][r])]
            status[i] = name
            if name != "ok":
                reason[i] = _FOUND_WHILE_DECODING
        index = index.set_column(index.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
        index = index.set_column(index.schema.get_field_index("reason"), "reason", pa.array(reason, pa.string()))
        write_parquet(self.location, INDEX, index)
        skipped = read_skipped(self.location, manifest_only=True) + skipped_images(index)
        write_skipped(self.location, skipped)
        counts = {"n_encoded": status.count("ok"), "n_skipped_images": index.num_rows - status.count("ok"),
                  "n_bad_records": sum(1 for s in skipped if "sample_id" not in s)}
        update_attrs(self.group, complete=True, **counts, **summary)
        self.attrs = seal(self.group, self.location, [])
        return counts


# ---------------------------------------------------------------------------------------------
# The skipped-images report
# ---------------------------------------------------------------------------------------------
SKIPPED_FILE = "skipped.jsonl"
# The entries of a latent cache's folder besides the generic ones (shared/store.py _store_entries).
LATENT_ENTRIES = {"buckets", SKIPPED_FILE}


def skipped_images(index) -> list[dict]:
    """Rows of the index that were left out, as report entries."""
    out = []
    cols = index.select(["sample_id", "line", "path", "status", "reason"]).to_pylist()
    for row in cols:
        if row["status"] not in ("ok", "pending"):
            out.append(row)
    return out


def write_skipped(location, entries: list[dict]) -> None:
    """Replaced whole (``write_file``): an append rewrites it with the earlier parts' entries, which a run killed
    mid-write must not lose."""
    write_file(location, SKIPPED_FILE, "".join(json.dumps(e) + "\n" for e in entries).encode())


def read_skipped(location, manifest_only: bool = False) -> list[dict]:
    """Entries of ``skipped.jsonl``; ``manifest_only``: only bad manifest records (no ``sample_id``)."""
    try:
        with store_file(location, SKIPPED_FILE) as fh:
            raw = fh.read()
    except FileNotFoundError:
        return []
    entries = []
    for n, line in enumerate(raw.split(b"\n"), start=1):
        try:
            entry = json.loads(line) if line.strip() else None
        except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
            entry = err
        if entry is None:
            continue
        if not isinstance(entry, dict):
            raise CacheDamaged(f"{join(location, SKIPPED_FILE)}: line {n} is damaged "
                               f"({entry if isinstance(entry, Exception) else 'not a JSON object'}); restore the "
                               "file, or delete it (it only lists the records left out)")
        entries.append(entry)
    return [e for e in entries if "sample_id" not in e] if manifest_only else entries


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------
class LatentCacheReader:
    """Random access to a finished latent cache, for training.

    Samples are the successfully encoded images, numbered ``0 .. len-1`` in store order (bucket by
    bucket, manifest order within a bucket). ``sample_ids[i]`` joins the text cache.

    - ``latent(i, generator)`` -> ``[C, h, w]`` float32: a fresh draw ``mean + exp(logvar/2) * eps`` from
      the stored posterior (``mode="mean"`` for the mean), or the exact latent for deterministic codecs;
      normalized ``(z - shift_factor) * scaling_factor`` unless ``scaled=False``.
    - ``batch(indices, generator)`` -> ``[B, C, h, w]``; all indices must share a bucket
      (``bucket_of(i)``, ``by_bucket()``).
    - ``posterior(i)`` -> ``(mean, logvar)``; ``stored(i)`` -> every stored array.

    Safe to pickle into DataLoader workers: each process reopens the shard files itself.
    """

    def __init__(self, location, *, out_dtype: torch.dtype = torch.float32, allow_incomplete: bool = False,
                 shard_cache=None):
        self.location = str(location)
        self.shard_cache = shard_cache  # shared.remote.ShardCache for caches on object storage
        self.attrs = read_cache_attrs(location, LATENT_KIND, "latent cache", "encode-images", allow_incomplete)
        self.buckets = [Bucket.from_attrs(b) for b in self.attrs["buckets"]]
        self.arrays: list[str] = list(self.attrs["arrays"])
        self.posterior_kind: str = self.attrs["posterior"]
        self.storage = LatentStorage.of_cache(self.location, self.attrs)
        self.out_dtype = out_dtype
        self.scaling_factor = float(self.attrs["scaling_factor"])
        self.shift_factor = float(self.attrs["shift_factor"])
        self.latent_channels = int(self.attrs["latent_channels"])
        self._load_index(allow_incomplete and not self.attrs.get("complete"))
        self._files: dict | None = None
        self._positions: dict[str, int] | None = None

    def _load_index(self, from_status_arrays: bool) -> None:
        index = read_index(self.location, self.attrs, columns=["sample_id", "bucket", "row", "status"])
        names = {b.name: k for k, b in enumerate(self.buckets)}
        bucket = index.column("bucket").to_pylist()
        rows = index.column("row").to_numpy()
        if from_status_arrays:  # an unfinished cache: only rows whose shard is written and ok
            group = open_group(self.location)
            codes = {b.name: np.asarray(group[f"buckets/{b.name}/status"][:]) for b in self.buckets}
            keep = [b is not None and codes[b][r] == OK for b, r in zip(bucket, rows)]
        else:
            keep = [s == "ok" for s in index.column("status").to_pylist()]
        keep = np.asarray(keep, dtype=bool)
        ids = np.asarray(index.column("sample_id").to_pylist(), dtype=object)[keep]
        b_idx = np.asarray([names[b] for b, k in zip(bucket, keep) if k], dtype=np.int32)
        r_idx = rows[keep].astype(np.int64)
        order = np.lexsort((r_idx, b_idx))  # store order: bucket, then row
        self.sample_ids: list[str] = ids[order].tolist()
        self._bucket = b_idx[order]
        self._row = r_idx[order]

    # -- metadata --------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> dict:
        return self.attrs["fingerprint"]

    @property
    def index(self):
        """The full index (every manifest record, skipped ones included) as a pyarrow Table."""
        return read_index(self.location, self.attrs)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def position(self, sample_id: str) -> int:
        """The sample number of ``sample_id``; KeyError if it was skipped or never in the manifest."""
        if self._positions is None:
            self._positions = {s: i for i, s in enumerate(self.sample_ids)}
        return self._positions[str(sample_id)]

    def bucket_of(self, i: int) -> Bucket:
        return self.buckets[int(self._bucket[i])]

    def by_bucket(self) -> dict[str, np.ndarray]:
        """Sample numbers grouped by bucket name (for batching same-shape latents)."""
        return {b.name: np.flatnonzero(self._bucket == k) for k, b in enumerate(self.buckets)}

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent -> the DiT's space: ``(z - shift_factor) * scaling_factor``."""
        return (z - self.shift_factor) * self.scaling_factor

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """The DiT's space -> what the autoencoder's ``decode`` takes."""
        return z / self.scaling_factor + self.shift_factor

    # -- reading ---------------------------------------------------------------------------------
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = None
        state["_positions"] = None
        return state

    def _array(self, bucket: Bucket, name: str):
        if self._files is None:
            self._files = {}
        key = (bucket.name, name)
        if key not in self._files:
            path = f"buckets/{bucket.name}/{name}"
            reader = ShardedArrayFile(self.location, path, shard_cache=self.shard_cache)
            reader.meta.check_geometry(*latent_array_geometry(self.attrs, bucket, name, self.location))
            self._files[key] = reader
        return self._files[key]

    def stored(self, i: int) -> dict[str, torch.Tensor]:
        """Every stored array of sample ``i`` as ``[C, h, w]`` tensors in ``out_dtype``."""
        return self.stored_many([i])[0]

    def stored_many(self, indices) -> list[dict[str, torch.Tensor]]:
        """``stored`` of every sample in ``indices``, the rows of each bucket's arrays read together
        (``ShardedArrayFile.read_many``: one round of concurrent requests for a cache on object storage)."""
        indices = [int(i) for i in indices]
        for i in indices:
            if not 0 <= i < len(self):
                raise IndexError(f"sample {i} out of range 0..{len(self) - 1}")
        out: list[dict[str, torch.Tensor]] = [{} for _ in indices]
        for k in sorted({int(self._bucket[i]) for i in indices}):
            mine = [j for j, i in enumerate(indices) if int(self._bucket[i]) == k]
            spans = [(int(self._row[indices[j]]), int(self._row[indices[j]]) + 1) for j in mine]
            for name in self.arrays:
                for j, data in zip(mine, self._array(self.buckets[k], name).read_many(spans)):
                    out[j][name] = self.storage.to_tensor(data[0], self.out_dtype)
        return out

    def posterior(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, logvar)``, each ``[C, h, w]`` (diagonal-Gaussian caches only)."""
        if self.posterior_kind != "gaussian":
            raise SemrouteError(f"{self.location} stores exact latents ({self.fingerprint.get('vae')}), not a posterior")
        s = self.stored(i)
        return s["mean"], s["logvar"]

    def latent(self, i: int, generator: torch.Generator | None = None, *, mode: str = "sample",
               scaled: bool = True) -> torch.Tensor:
        """Sample ``i``'s latent ``[C, h, w]``: drawn from the posterior with ``generator`` (``mode="sample"``),
        or its mean (``mode="mean"``); exact caches ignore both. Normalized unless ``scaled=False``."""
        return self.batch([i], generator, mode=mode, scaled=scaled)[0]

    def batch(self, indices, generator: torch.Generator | None = None, *, mode: str = "sample",
              scaled: bool = True) -> torch.Tensor:
        """Latents ``[B, C, h, w]`` of samples that share a bucket; one ``randn`` draw for the batch."""
        indices = [int(i) for i in indices]
        if mode not in ("sample", "mean"):
            raise ValueError(f"mode must be 'sample' or 'mean', not {mode!r}")
        shapes = {int(self._bucket[i]) for i in indices}
        if len(shapes) != 1:
            raise SemrouteError(f"samples {indices[:8]} come from different buckets "
                                f"{[self.buckets[k].name for k in shapes]}; batch per bucket (by_bucket())")
        return self._draw(self.stored_many(indices), generator, mode, scaled)

    def latents(self, indices, generators: list[torch.Generator], *, mode: str = "sample",
                scaled: bool = True) -> list[torch.Tensor]:
        """``latent(i, g)`` for every ``i`` of ``indices`` and ``g`` of ``generators`` (the same draws), the stored
        rows read together (``stored_many``)."""
        if mode not in ("sample", "mean"):
            raise ValueError(f"mode must be 'sample' or 'mean', not {mode!r}")
        return [self._draw([p], g, mode, scaled)[0] for p, g in zip(self.stored_many(indices), generators)]

    def _draw(self, parts: list[dict[str, torch.Tensor]], generator, mode: str, scaled: bool) -> torch.Tensor:
        """Stored arrays of same-shape samples -> latents ``[B, C, h, w]``, one ``randn`` draw for them all."""
        if self.posterior_kind == "gaussian":
            mean = torch.stack([p["mean"] for p in parts]).float()
            z = mean
            if mode == "sample":
                logvar = torch.stack([p["logvar"] for p in parts]).float()
                eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
                z = mean + torch.exp(0.5 * logvar) * eps
        else:
            z = torch.stack([p["latent"] for p in parts]).float()
        if scaled:
            z = self.normalize(z)
        return z.to(self.out_dtype)


# ---------------------------------------------------------------------------------------------
# info / verify
# ---------------------------------------------------------------------------------------------
def describe_latent_cache(path: str, attrs: dict) -> dict:
    fp = attrs["fingerprint"]
    buckets = [Bucket.from_attrs(b) for b in attrs["buckets"]]
    itemsize = LatentStorage.of_cache(path, attrs).numpy_dtype.itemsize
    planned = max(1, attrs["n_planned"])
    data = sum(dir_size(join(path, f"buckets/{b.name}")) for b in buckets)
    raw = sum(b.rows * int(np.prod(b.latent_shape)) * itemsize for b in buckets)
    info = {
        **describe_header("latent cache", path, attrs, [b.name for b in buckets]),
        "manifest records": attrs["n_records"],
        "images encoded": attrs.get("n_encoded", "(not finished)"),
        "images skipped": attrs.get("n_skipped_images", attrs["n_records"] - attrs["n_planned"]),
        "stores": f"{attrs['posterior']}: {', '.join(attrs['arrays'])} in {attrs['stored_dtype']}",
        "autoencoder": f"{fp['vae']} ({fp.get('class', '')}), {attrs['latent_channels']} channels, /{attrs['downsample']}",
        "scaling / shift factor": f"{attrs['scaling_factor']} / {attrs['shift_factor']}",
        "buckets": {b.name: f"{b.rows} images, latent {'x'.join(map(str, b.latent_shape))}, "
                            f"{b.layout.n_shards} shards" for b in buckets},
        "size on disk": f"{dir_size(path) / 2**20:.2f} MiB",
        "bytes per image (data)": round(data / planned, 1) if data else None,
        "raw latent bytes per image": f"{raw / planned:.1f} per array ({', '.join(attrs['arrays'])})",
        "fingerprint": fp,
    }
    if skipped := read_skipped(path):
        reasons: dict[str, int] = {}
        for e in skipped:
            key = e.get("status", "bad manifest record")
            reasons[key] = reasons.get(key, 0) + 1
        info["skipped by reason"] = reasons
    return info


__all__ = ["LATENT_KIND", "LatentCacheWriter", "LatentCacheReader", "LatentStorage", "Bucket", "ShardPayload",
           "STATUS_NAMES", "STATUS_CODE"]
