"""The cache store: sharded Zarr v3 arrays written whole shard by whole shard, with a completion record.

Both stages import this module. It holds the generic machinery (shard layout, whole-shard writes,
done flags, a fast local reader, checksum verification) and the text cache's writer/reader pair;
the latent cache builds on the same pieces (``shared/latent_store.py``).

Layout of a text cache (``NAME.text.zarr/``)::

    zarr.json                 group attributes under "semroute": kind, format_version, fingerprint,
                              layers, hidden size, storage mode, counts, "complete"
    features/                 [total_tokens, n_layers, D]  token-major, ragged, no padding stored
                              (bf16 is stored as its uint16 bit pattern: Zarr v3 has no bfloat16)
    scales/                   [total_tokens, n_layers] float32, fp8 storage only
    offsets/                  [n_captions + 1] int64, CSR: caption i is rows offsets[i]:offsets[i+1]
    null_features/ (+ null_scales/)   the null caption (instruction alone)
    progress/<array>/         one uint8 flag per shard, set only after the shard is fully written
    progress/storage_error/   per-shard [sum sq. error, sum sq. value, max abs error] (bf16/fp8 storage)
    index.parquet             one row per caption: caption, sample_id, line, text, sha256,
                              start, n_tokens, n_tokens_full, truncated

Every shard is written whole by exactly one process (zarr-python does not support concurrent partial
shard writes), then its flag is set. Each inner chunk and each shard index carries a crc32c checksum,
which ``verify`` and the fast reader check.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from semroute.shared import integrity
from semroute.shared.errors import CacheDamaged, SemrouteError

FORMAT_VERSION = 1
# Version 2: a text cache grown by `encode-text --append`. Each appended segment starts at a shard boundary
# (so no written shard file is ever rewritten), which leaves unused rows after the last caption of the
# previous segment: offsets[i] is still caption i's first row, its row count comes from the `lengths` array
# (diff(offsets) in version 1). Readers take both versions; fresh caches are still written as version 1.
APPENDED_VERSION = 2
READ_VERSIONS = (FORMAT_VERSION, APPENDED_VERSION)
TEXT_KIND = "semroute.text-cache"
ATTR_KEY = "semroute"

DEFAULT_SHARD_BYTES = 128 << 20
DEFAULT_CHUNK_BYTES = 1 << 20
_INDEX_ENTRY = 16  # uint64 offset + uint64 nbytes per inner chunk
_CRC = 4
_EMPTY = np.uint64(2**64 - 1)


# ---------------------------------------------------------------------------------------------
# Opening stores by path or URL
# ---------------------------------------------------------------------------------------------
def is_url(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def join(location: str | os.PathLike, name: str) -> str:
    """``location/name`` for a local path or a URL (``Path`` would collapse ``s3://`` to ``s3:/``)."""
    return f"{str(location).rstrip('/')}/{name}" if is_url(location) else str(Path(location) / name)


def _zarr_options(location) -> dict:
    from semroute.shared.remote import storage_options

    return {"storage_options": storage_options(str(location).split("://", 1)[0])} if is_url(location) else {}


def open_group(location: str | os.PathLike, mode: str = "r"):
    """Open a Zarr v3 group by local path or fsspec URL (``s3://``, ``gs://``, ``file://`` ...)."""
    import zarr

    from semroute.shared.remote import call

    if is_url(location):
        # Through our retry loop, so a missing bucket or denied access reads as such, naming the URL.
        return call(str(location), zarr.open_group, str(location), mode=mode, zarr_format=3, **_zarr_options(location),
                    missing=f"no cache at {location}")
    try:
        return zarr.open_group(str(location), mode=mode, zarr_format=3)
    except FileNotFoundError:
        raise SemrouteError(f"no cache at {location}") from None


# What a semroute create may find in a folder it is allowed to replace: the entries its own stores write
# (text and latent caches), so that an interrupted create (group written, attributes not yet) can be redone.
_STORE_ENTRIES = {"zarr.json", "features", "scales", "offsets", "lengths", "null_features", "null_scales", "progress",
                  "buckets", "index.parquet", "bad_records.jsonl", "skipped.jsonl"}


def _store_listing(location: str) -> tuple[bool, list[str], bytes | None]:
    """(exists, top-level entry names, bytes of zarr.json or None) of a folder or URL."""
    if is_url(location):
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
        path = path.rstrip("/")
        if not fs.exists(path):
            return False, [], None
        if fs.isfile(path):
            raise SemrouteError(f"--out {location} is a file, not a folder; choose a new --out")
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
        meta = fs.cat_file(f"{path}/zarr.json") if "zarr.json" in names else None
        return True, names, meta
    path = Path(location)
    if not path.exists():
        return False, [], None
    if not path.is_dir():
        raise SemrouteError(f"--out {location} is a file, not a folder; choose a new --out")
    names = sorted(p.name for p in path.iterdir())
    meta = (path / "zarr.json").read_bytes() if "zarr.json" in names else None
    return True, names, meta


def check_replaceable(location: str | os.PathLike, kind: str) -> None:
    """Refuse to create a store of ``kind`` at ``location`` if that would delete anything but a semroute cache
    of the same kind (or the remains of an interrupted create). Creating a store empties its folder
    (zarr's ``mode="w"``), so a mistyped ``--out`` (an existing folder, ``.``) must stop here, before any
    byte is deleted."""
    location = str(location)
    exists, names, meta = _store_listing(location)
    if not exists or not names:
        return
    what = None
    if meta is not None:
        import json

        try:
            doc = json.loads(meta)
            attrs = (doc.get("attributes") or {}).get(ATTR_KEY) if isinstance(doc, dict) else None
        except (ValueError, UnicodeDecodeError):
            doc, attrs = None, None
        if isinstance(attrs, dict) and attrs.get("kind") == kind:
            return  # a cache of this kind: --overwrite replaces it
        if isinstance(attrs, dict) and attrs.get("kind"):
            what = f"a {attrs['kind']} store, not a {kind}"
        elif isinstance(doc, dict) and doc.get("node_type") == "group" and set(names) <= _STORE_ENTRIES:
            return  # an interrupted create: only entries a semroute store writes, no attributes yet
    if what is None:
        shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
        what = f"not a semroute cache ({len(names)} entries: {shown})"
    raise SemrouteError(f"--out {location} already exists and is {what}; refusing to replace it, since that would "
                        "delete its contents. Choose a new --out (or remove that folder yourself).")


def store_file(location: str | os.PathLike, name: str, mode: str = "rb"):
    """Open a plain file (e.g. ``index.parquet``) that lives beside the arrays of a store."""
    if is_url(location):
        from semroute.shared.remote import call, filesystem

        url = join(location, name)
        fs, path = filesystem(url)
        return call(url, fs.open, path, mode)
    path = Path(location) / name
    if "w" in mode:
        path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, mode)


def write_parquet(location, name: str, table) -> None:
    import pyarrow.parquet as pq

    # Written to a temporary name and renamed, so a crash never leaves a half-written index behind.
    if is_url(location):  # one PUT of the whole file: readers see the old index or the new one
        import pyarrow as pa

        from semroute.shared.remote import write_bytes

        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=65536)
        write_bytes(join(location, name), sink.getvalue().to_pybytes())
        return
    final = Path(location) / name
    tmp = final.with_name(f".{name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp, row_group_size=65536)
    os.replace(tmp, final)


def read_parquet(location, name: str, columns: list[str] | None = None):
    import pyarrow.parquet as pq

    try:
        with store_file(location, name) as fh:
            return pq.read_table(fh, columns=columns)
    except FileNotFoundError:
        raise SemrouteError(f"{location} has no {name}; is it a semroute cache?") from None


def seal(group, location, small_arrays: list[str]) -> dict:
    """Record the checksums of a finished store (call after its last write; shared/integrity.py). Returns the
    new attrs."""
    with store_file(location, integrity.INDEX) as fh:
        index_sha = hashlib.sha256(fh.read()).hexdigest()
    arrays = {name: integrity.array_sha256(np.asarray(group[name][...])) for name in small_arrays if name in group}
    update_attrs(group, **{integrity.SEAL_KEY: None})
    attrs = dict(group.attrs)[ATTR_KEY]
    record = {"index_sha256": index_sha, "arrays_sha256": arrays, "attrs_sha256": integrity.attrs_sha256(attrs)}
    update_attrs(group, **{integrity.SEAL_KEY: record})
    return dict(group.attrs)[ATTR_KEY]


def read_index(location, attrs: dict, columns: list[str] | None = None):
    """``index.parquet`` as a pyarrow Table, after checking it against the seal (shared/integrity.py)."""
    import pyarrow.parquet as pq

    try:
        with store_file(location, integrity.INDEX) as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise CacheDamaged(f"{location}/{integrity.INDEX} is missing; re-encode the cache") from None
    record = integrity.sealed(attrs)
    if record is not None and hashlib.sha256(raw).hexdigest() != record.get("index_sha256"):
        raise CacheDamaged(f"{location}/{integrity.INDEX} differs from the index the cache was written with (sha256 mismatch); "
                           "re-encode the cache")
    try:
        return pq.read_table(io.BytesIO(raw), columns=columns)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise CacheDamaged(f"{location}/{integrity.INDEX} is unreadable ({type(err).__name__}: {err}); re-encode the cache"
                           ) from None


def read_attrs(location) -> dict:
    """The store's semroute attributes, checked against the store's seal (shared/integrity.py)."""
    try:
        group = open_group(location)
        attrs = dict(group.attrs).get(ATTR_KEY)
    except SemrouteError:
        raise
    except Exception as err:  # noqa: BLE001 - zarr raises JSON/Unicode/Value errors for a damaged zarr.json
        raise CacheDamaged(f"{location}/zarr.json is damaged ({type(err).__name__}: {err}); re-encode the cache"
                           ) from None
    if attrs is not None and not isinstance(attrs, dict):
        raise CacheDamaged(f"{location}/zarr.json: the '{ATTR_KEY}' attributes are not a mapping; re-encode the cache")
    if attrs is None:
        raise SemrouteError(f"{location} is a Zarr group but not a semroute cache (no '{ATTR_KEY}' attributes)")
    version = attrs.get("format_version")
    if version not in READ_VERSIONS:
        raise SemrouteError(
            f"{location} has cache format version {version}; this semroute reads versions "
            f"{', '.join(map(str, READ_VERSIONS))}. Re-encode the data with this version."
        )
    integrity.check_attrs(location, attrs)
    return attrs


def update_attrs(group, **changes) -> None:
    attrs = dict(group.attrs.get(ATTR_KEY, {}))
    attrs.update(changes)
    group.attrs.update({ATTR_KEY: attrs})


def dir_size(location) -> int:
    """Bytes under a store (a listing of the prefix for URLs)."""
    if is_url(location):
        from semroute.shared.remote import call, filesystem

        fs, path = filesystem(str(location))
        return int(call(str(location), fs.du, path, total=True))
    return sum(p.stat().st_size for p in Path(location).rglob("*") if p.is_file())


def store_exists(location: str) -> bool:
    """Whether a zarr store already exists at ``location`` (folder or URL)."""
    if is_url(location):
        from semroute.shared.remote import call, filesystem

        fs, path = filesystem(location)
        return call(location, fs.exists, f"{path}/zarr.json")
    return (Path(location) / "zarr.json").exists()


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


# ---------------------------------------------------------------------------------------------
# Shard layout
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardLayout:
    """How ``rows`` rows of ``row_shape`` are cut into shards (the write unit) and inner chunks (the
    read unit). The last shard may be short; inner chunks past the end of the array are not stored."""

    rows: int
    rows_per_shard: int
    rows_per_chunk: int

    @classmethod
    def plan(cls, rows: int, row_bytes: int, shard_bytes: int = DEFAULT_SHARD_BYTES,
             chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> "ShardLayout":
        # Inner chunk: the largest power of two of rows that fits chunk_bytes (at least one row),
        # so reading one caption touches few bytes beyond it; shard: a whole number of chunks.
        chunk_bytes = min(chunk_bytes, shard_bytes)
        per_chunk = 1 << max(0, int(math.floor(math.log2(max(1, chunk_bytes // max(1, row_bytes))))))
        per_chunk = min(per_chunk, 1 << max(0, math.ceil(math.log2(max(1, rows)))))
        chunks_per_shard = max(1, shard_bytes // (per_chunk * row_bytes))
        per_shard = per_chunk * chunks_per_shard
        # Never plan a shard longer than the array (rounded up to whole chunks).
        per_shard = min(per_shard, per_chunk * math.ceil(rows / per_chunk))
        return cls(rows=rows, rows_per_shard=per_shard, rows_per_chunk=per_chunk)

    @property
    def n_shards(self) -> int:
        return math.ceil(self.rows / self.rows_per_shard)

    @property
    def chunks_per_shard(self) -> int:
        return self.rows_per_shard // self.rows_per_chunk

    def shard_rows(self, shard: int) -> tuple[int, int]:
        start = shard * self.rows_per_shard
        return start, min(start + self.rows_per_shard, self.rows)

    def shard_of_row(self, row: int) -> int:
        return row // self.rows_per_shard

    def split(self, rank: int, world_size: int) -> range:
        """The contiguous range of shards that process ``rank`` of ``world_size`` owns."""
        n = self.n_shards
        lo = n * rank // world_size
        hi = n * (rank + 1) // world_size
        return range(lo, hi)

    def nbytes(self, row_bytes: int) -> int:
        """Exact bytes on disk of an array with this layout (data, chunk checksums, shard indexes)."""
        total = 0
        for s in range(self.n_shards):
            a, b = self.shard_rows(s)
            n_chunks = math.ceil((b - a) / self.rows_per_chunk)
            total += n_chunks * (self.rows_per_chunk * row_bytes + _CRC)
            total += self.chunks_per_shard * _INDEX_ENTRY + _CRC
        return total


def create_sharded_array(group, name: str, shape: tuple[int, ...], dtype, layout: ShardLayout, attributes=None):
    """A Zarr v3 array sharded along its first axis by ``layout``, with crc32c on every chunk."""
    from zarr.codecs import Crc32cCodec

    rest = tuple(shape[1:])
    return group.create_array(
        name,
        shape=shape,
        dtype=dtype,
        chunks=(layout.rows_per_chunk, *rest),
        shards=(layout.rows_per_shard, *rest),
        compressors=[Crc32cCodec()],
        fill_value=0,
        # Every chunk is stored even if it happens to be all zeros, so sizes and checksums are exact.
        config={"write_empty_chunks": True},
        attributes=attributes or {},
        overwrite=True,
    )


def create_plain_array(group, name: str, data: np.ndarray):
    """A small array stored as one chunk (offsets, the null caption)."""
    from zarr.codecs import Crc32cCodec

    arr = group.create_array(
        name, shape=data.shape, dtype=data.dtype, chunks=data.shape or (1,), compressors=[Crc32cCodec()],
        fill_value=0, config={"write_empty_chunks": True}, overwrite=True,
    )
    arr[...] = data
    return arr


class DoneFlags:
    """One uint8 flag per shard, each its own chunk, so processes set their flags without racing.

    A flag is set only after its shard has been written completely; a crash mid-shard leaves it 0 and
    ``--resume`` rewrites that shard from scratch.
    """

    def __init__(self, group, name: str, n_shards: int | None = None):
        key = f"progress/{name}"
        if n_shards is not None:
            from zarr.codecs import Crc32cCodec

            self.array = group.create_array(
                key, shape=(n_shards,), dtype="uint8", chunks=(1,), fill_value=0,
                compressors=[Crc32cCodec()], overwrite=True,
            )
        else:
            self.array = group[key]

    def set(self, shard: int) -> None:
        self.array[shard] = 1

    def done(self) -> np.ndarray:
        return np.asarray(self.array[:], dtype=bool)

    def pending(self, shards) -> list[int]:
        flags = self.done()
        return [s for s in shards if not flags[s]]


def shards_present(location, name: str) -> set[int]:
    """Numbers of the shards of array ``name`` whose file (object) exists: one listing, not a request per shard.

    A done flag says a shard *was* written; this says it is still there. Writers take both, so a shard
    deleted after it was written (by a person, a lifecycle rule, a failed copy) is rewritten on --resume.
    """
    if is_url(location):
        from semroute.shared.remote import call, filesystem

        url = join(location, f"{name}/c")
        fs, path = filesystem(url)
        try:
            keys = [k[len(path):].strip("/") for k in call(url, fs.find, path)]
        except SemrouteError:
            keys = []
    else:
        base = Path(location) / name / "c"
        keys = [p.relative_to(base).as_posix() for p in base.rglob("*")
                if p.is_file() and not p.name.startswith(".")] if base.exists() else []
    out = set()
    for key in keys:
        parts = key.split("/")
        if parts and all(p.isdigit() for p in parts):
            out.add(int(parts[0]))
    return out


# ---------------------------------------------------------------------------------------------
# Fast local reads and checksum verification (the shard format is zarr's sharding_indexed codec)
# ---------------------------------------------------------------------------------------------
class ChecksumError(CacheDamaged):
    """A chunk or shard index whose bytes fail their crc32c, or are cut short."""


def _crc32c(data) -> int:
    # The `crc32c` package checksums memoryviews without a copy (google_crc32c, which zarr uses, wants
    # bytes); both compute the same Castagnoli CRC that zarr's codec writes.
    import crc32c

    return crc32c.crc32c(data)


class ShardedArrayFile:
    """Reads rows of one sharded array straight from its local shard files.

    zarr-python spends a few milliseconds of Python/async overhead on every small read; a training
    loader reads thousands of short captions per second, so for local stores we read the shard index
    once and ``pread`` the inner chunks we need, checking each chunk's crc32c as zarr would. Remote
    stores (URLs) go through zarr itself.
    """

    def __init__(self, root: str | Path, name: str, *, check_crc: bool = True, max_open: int = 64,
                 shard_cache=None):
        import zarr

        self.remote = is_url(root)
        try:
            arr = zarr.open_array(join(root, name), mode="r", **_zarr_options(root))
        except Exception as err:  # noqa: BLE001 - a missing or damaged zarr.json of the array
            raise CacheDamaged(f"{root}/{name}/zarr.json is missing or damaged ({type(err).__name__}: {err}); "
                               f"{integrity.verify_hint(root)}") from None
        meta = arr.metadata
        codecs = meta.to_dict()["codecs"]
        if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
            raise SemrouteError(f"{root}/{name} is not a sharded array written by semroute")
        cfg = codecs[0]["configuration"]
        self.root = str(root).rstrip("/") if self.remote else Path(root)
        self.shard_cache = shard_cache  # shared.remote.ShardCache: whole remote shards kept on local disk
        self.name = name
        self.shape = tuple(arr.shape)
        self.dtype = np.dtype(str(arr.dtype)).newbyteorder("<")
        self.rows_per_shard = int(meta.chunk_grid.chunk_shape[0])
        self.rows_per_chunk = int(cfg["chunk_shape"][0])
        self.chunks_per_shard = self.rows_per_shard // self.rows_per_chunk
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self._key = meta.encode_chunk_key
        self.check_crc = check_crc
        self._max_open = max_open
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._index: dict[int, np.ndarray] = {}
        self._remotes: OrderedDict[int, object] = OrderedDict()

    def __getstate__(self):
        # File descriptors do not cross process boundaries (DataLoader workers reopen them).
        state = dict(self.__dict__)
        state["_fds"] = OrderedDict()
        state["_index"] = {}
        state["_remotes"] = OrderedDict()
        return state

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def shard_path(self, shard: int) -> Path | str:
        key = self._key((shard,) + (0,) * len(self.row_shape))
        return f"{self.root}/{self.name}/{key}" if self.remote else self.root / self.name / key

    def _remote(self, shard: int):
        """The shard's object (remote stores): its size and ranged reads, with retries."""
        from semroute.shared.remote import RemoteFile

        obj = self._remotes.get(shard)
        if obj is None:
            obj = self._remotes[shard] = RemoteFile(self.shard_path(shard))
            if len(self._remotes) > 4096:
                self._remotes.popitem(last=False)
        return obj

    def _local_copy(self, shard: int) -> int | None:
        """A descriptor of the node-local copy of a remote shard, if the shard cache has it."""
        if self.shard_cache is None:
            return None
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        path = self.shard_cache.get(self._remote(shard))  # starts a background download when absent
        if path is None:
            return None
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # evicted just now
            return None
        self._fds[shard] = fd
        if len(self._fds) > self._max_open:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def _size(self, shard: int) -> int:
        if self.remote:
            return self._remote(shard).size
        return os.fstat(self._fd(shard)).st_size

    def _pread(self, shard: int, n: int, offset: int) -> bytes:
        """``n`` bytes of the shard from ``offset``: ``pread`` locally, a ranged GET (or the local copy) remotely."""
        if not self.remote:
            return os.pread(self._fd(shard), n, offset)
        fd = self._local_copy(shard)
        if fd is not None:
            return os.pread(fd, n, offset)
        return self._remote(shard).read(offset, offset + n)

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            path = self.shard_path(shard)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise CacheDamaged(f"shard file {path} is missing; {integrity.verify_hint(self.root)}") from None
            self._fds[shard] = fd
            if len(self._fds) > self._max_open:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(shard)
        return fd

    def _shard_index(self, shard: int) -> np.ndarray:
        index = self._index.get(shard)
        if index is None:
            size = self._size(shard)
            n = self.chunks_per_shard * _INDEX_ENTRY + _CRC
            raw = self._pread(shard, n, size - n)
            if len(raw) != n or struct.unpack("<I", raw[-_CRC:])[0] != _crc32c(raw[:-_CRC]):
                raise ChecksumError(f"{self.shard_path(shard)}: the shard index is corrupt (checksum mismatch); "
                                    f"{integrity.verify_hint(self.root)}")
            index = np.frombuffer(raw[:-_CRC], dtype="<u8").reshape(-1, 2)
            self._index[shard] = index
        return index

    def read_chunk(self, chunk: int) -> np.ndarray:
        """Inner chunk ``chunk`` (global number) as ``[rows_per_chunk, *row_shape]``."""
        shard, inner = divmod(chunk, self.chunks_per_shard)
        offset, nbytes = self._shard_index(shard)[inner]
        if offset == _EMPTY:
            raise CacheDamaged(f"{self.shard_path(shard)}: chunk {inner} was never written; "
                               f"{integrity.verify_hint(self.root)}")
        raw = self._pread(shard, int(nbytes), int(offset))
        if len(raw) != nbytes:
            raise ChecksumError(f"{self.shard_path(shard)}: chunk {inner} is truncated; {integrity.verify_hint(self.root)}")
        return self._check_chunk(memoryview(raw), shard, inner)

    def read_rows(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop`` as a new array (or into ``out``).

        The inner chunks a read needs lie back to back in their shard file (written in order), so each
        shard's part is fetched with one ``pread`` and its chunks checked and copied from memory.
        """
        if out is None:
            out = np.empty((stop - start, *self.row_shape), dtype=self.dtype)
        c = self.rows_per_chunk
        pos = start
        while pos < stop:
            shard = pos // self.rows_per_shard
            first = pos // c
            last = min((stop - 1) // c, (shard + 1) * self.chunks_per_shard - 1)
            index = self._shard_index(shard)
            lo_inner, hi_inner = first - shard * self.chunks_per_shard, last - shard * self.chunks_per_shard
            offsets, sizes = index[lo_inner: hi_inner + 1, 0], index[lo_inner: hi_inner + 1, 1]
            if (offsets == _EMPTY).any():
                raise CacheDamaged(f"{self.shard_path(shard)}: a chunk was never written; {integrity.verify_hint(self.root)}")
            begin = int(offsets[0])
            end = int(offsets[-1] + sizes[-1])
            contiguous = np.array_equal(offsets[1:], offsets[:-1] + sizes[:-1])
            raw = self._pread(shard, end - begin, begin) if contiguous else None
            if raw is not None and len(raw) != end - begin:
                raise ChecksumError(f"{self.shard_path(shard)}: the shard file is truncated; "
                                    f"{integrity.verify_hint(self.root)}")
            for k, chunk in enumerate(range(first, last + 1)):
                if raw is None:
                    data = self.read_chunk(chunk)
                else:
                    data = self._check_chunk(memoryview(raw)[int(offsets[k]) - begin: int(offsets[k] + sizes[k]) - begin],
                                             shard, chunk - shard * self.chunks_per_shard)
                lo = pos - chunk * c
                hi = min(stop - chunk * c, c)
                out[pos - start: pos - start + hi - lo] = data[lo:hi]
                pos += hi - lo
        return out

    def _check_chunk(self, raw, shard: int, inner: int) -> np.ndarray:
        if self.check_crc and struct.unpack("<I", raw[-_CRC:])[0] != _crc32c(raw[:-_CRC]):
            raise ChecksumError(f"{self.shard_path(shard)}: chunk {inner} fails its crc32c checksum; "
                                f"{integrity.verify_hint(self.root)}")
        return np.frombuffer(raw, dtype=self.dtype, count=(len(raw) - _CRC) // self.dtype.itemsize).reshape(
            -1, *self.row_shape
        )


class ShardFileWriter:
    """Writes one whole shard of a local array made by ``create_sharded_array`` as a single file.

    zarr-python encodes each inner chunk through its async codec pipeline, about 0.4 ms per 32 KiB
    latent on a slow CPU, mostly holding the GIL: on a GPU that is the writer thread starving the
    encoding loop. The shard format is simple (``sharding_indexed``: inner chunks in order, each its
    little-endian bytes plus a crc32c; then the ``[chunks, 2]`` uint64 (offset, nbytes) index plus its
    crc32c), so we build the file in numpy and write it at once (to a temporary name, then renamed).
    The bytes equal zarr's own (a test checks); reads still go through zarr or ``ShardedArrayFile``.
    """

    def __init__(self, root: str | Path, name: str):
        import zarr

        arr = zarr.open_array(join(root, name), mode="r", **_zarr_options(root))
        meta = arr.metadata
        (codec,) = meta.to_dict()["codecs"]
        cfg = codec["configuration"]

        def plain(codecs) -> bool:  # little-endian bytes (no endianness for 1-byte types), then crc32c
            return [c["name"] for c in codecs] == ["bytes", "crc32c"] and \
                (codecs[0].get("configuration") or {}).get("endian", "little") == "little"

        if codec["name"] != "sharding_indexed" or not plain(cfg["codecs"]) or not plain(cfg["index_codecs"]) \
                or cfg["index_location"] != "end" or meta.fill_value != 0:
            raise SemrouteError(f"{root}/{name}: not a sharded array as semroute creates them")
        self.remote = is_url(root)
        self.root, self.name = (str(root).rstrip("/") if self.remote else Path(root)), name
        self.rows = int(arr.shape[0])
        self.row_shape = tuple(arr.shape[1:])
        self.dtype = np.dtype(str(arr.dtype)).newbyteorder("<")
        self.rows_per_shard = int(meta.chunk_grid.chunk_shape[0])
        self.rows_per_chunk = int(cfg["chunk_shape"][0])
        self.chunks_per_shard = self.rows_per_shard // self.rows_per_chunk
        self._key = meta.encode_chunk_key

    def write(self, shard: int, data: np.ndarray) -> None:
        import crc32c

        a = shard * self.rows_per_shard
        b = min(a + self.rows_per_shard, self.rows)
        if data.shape != (b - a, *self.row_shape):
            raise ValueError(f"{self.name} shard {shard}: expected rows of shape {(b - a, *self.row_shape)}, got {data.shape}")
        flat = np.ascontiguousarray(data, dtype=self.dtype).reshape(-1).view(np.uint8)
        chunk = self.rows_per_chunk * int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        n_chunks = -(-(b - a) // self.rows_per_chunk)
        if flat.size < n_chunks * chunk:  # a short last chunk is padded with the fill value (0)
            flat = np.concatenate([flat, np.zeros(n_chunks * chunk - flat.size, np.uint8)])
        index_bytes = self.chunks_per_shard * 16
        buf = np.empty(n_chunks * (chunk + 4) + index_bytes + 4, dtype=np.uint8)
        # 1. Inner chunks: [n_chunks, chunk bytes + crc32c], one vectorized copy, then each chunk's checksum.
        body = buf[: n_chunks * (chunk + 4)].reshape(n_chunks, chunk + 4)
        body[:, :chunk] = flat.reshape(n_chunks, chunk)
        crcs = np.fromiter((crc32c.crc32c(row) for row in body[:, :chunk]), dtype="<u4", count=n_chunks)
        body[:, chunk:] = crcs.view(np.uint8).reshape(n_chunks, 4)
        # 2. The index: (offset, nbytes) per inner chunk, empty (2^64 - 1) past the array's end; its crc32c.
        index = np.full((self.chunks_per_shard, 2), np.iinfo(np.uint64).max, dtype="<u8")
        index[:n_chunks, 0] = np.arange(n_chunks, dtype=np.uint64) * (chunk + 4)
        index[:n_chunks, 1] = chunk + 4
        tail = n_chunks * (chunk + 4)
        buf[tail:tail + index_bytes] = index.view(np.uint8).reshape(-1)
        buf[tail + index_bytes:] = np.frombuffer(
            int(crc32c.crc32c(buf[tail:tail + index_bytes])).to_bytes(4, "little"), np.uint8)
        key = self._key((shard,) + (0,) * len(self.row_shape))
        if self.remote:  # one PUT of the whole shard: atomic, so no reader ever sees part of it
            from semroute.shared.remote import write_bytes

            write_bytes(f"{self.root}/{self.name}/{key}", buf.data)
            return
        path = self.root / self.name / key
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed run; this shard is ours
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(buf.data)
        os.replace(tmp, path)


def verify_array(root: str | Path, name: str, done: np.ndarray | None = None) -> tuple[int, list[str]]:
    """Check every chunk checksum of a local sharded array. Returns (chunks checked, problems), each
    problem naming the shard file and chunk."""
    reader = ShardedArrayFile(root, name)
    layout = ShardLayout(reader.shape[0], reader.rows_per_shard, reader.rows_per_chunk)
    problems: list[str] = []
    checked = 0
    for shard in range(layout.n_shards):
        if done is not None and not done[shard]:
            problems.append(f"{reader.shard_path(shard)}: shard not completed (resume the encoding run)")
            continue
        a, b = layout.shard_rows(shard)
        first = a // reader.rows_per_chunk
        last = math.ceil(b / reader.rows_per_chunk)
        try:
            reader._shard_index(shard)
        except SemrouteError as err:
            problems.append(str(err))
            continue
        for chunk in range(first, last):
            try:
                reader.read_chunk(chunk)
                checked += 1
            except SemrouteError as err:
                problems.append(str(err))
    reader.close()
    return checked, problems


# ---------------------------------------------------------------------------------------------
# Text cache: storage codecs
# ---------------------------------------------------------------------------------------------
FP8_MAX = 448.0  # largest finite float8_e4m3fn


class TextStorage:
    """How features of the compute dtype become stored arrays, and back.

    ``exact``: the model's own bits (bf16 as uint16 bit patterns, fp16/fp32 natively), lossless.
    ``bf16``: rounded to bfloat16 (2 bytes per value); for an fp32 compute dtype, e.g. on CPUs where
    bf16 matmuls are slow. Same as ``exact`` when the compute dtype is bf16.
    ``fp8``: float8 e4m3 with one float32 scale per token and layer (absmax / 448), about 1 byte per
    value. The lossy modes are opt-in; their error against exact is measured on every value while
    encoding and shown by ``info``.
    """

    MODES = ("exact", "bf16", "fp8")

    def __init__(self, mode: str, compute_dtype: torch.dtype):
        if mode not in self.MODES:
            raise SemrouteError(f"--storage {mode!r} is not supported; use exact, bf16 or fp8")
        if mode == "bf16" and compute_dtype == torch.bfloat16:
            mode = "exact"  # nothing to round
        self.mode = mode
        self.compute_dtype = compute_dtype

    @property
    def lossy(self) -> bool:
        return self.mode != "exact"

    @property
    def stored_torch_dtype(self) -> torch.dtype:
        return {"exact": self.compute_dtype, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[self.mode]

    @property
    def read_dtype(self) -> torch.dtype:
        """What a reader returns by default: the stored precision, widened only where needed (fp8)."""
        return self.compute_dtype if self.mode == "fp8" else self.stored_torch_dtype

    @property
    def feature_dtype(self) -> np.dtype:
        return {torch.bfloat16: np.dtype("uint16"), torch.float16: np.dtype("float16"),
                torch.float32: np.dtype("float32"), torch.float8_e4m3fn: np.dtype("uint8")}[self.stored_torch_dtype]

    @property
    def stored_dtype_name(self) -> str:
        return str(self.stored_torch_dtype).removeprefix("torch.")

    def row_bytes(self, n_layers: int, hidden: int) -> dict[str, int]:
        out = {"features": n_layers * hidden * self.feature_dtype.itemsize}
        if self.mode == "fp8":
            out["scales"] = n_layers * 4
        return out

    def encode(self, x: torch.Tensor) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """``x``: ``[T, L, D]`` in the compute dtype -> arrays to store, and for the lossy modes the error
        stats ``[sum squared error, sum squared value, max abs error]``."""
        if not torch.isfinite(x).all():
            raise SemrouteError("the LLM produced non-finite hidden states (inf/NaN); with --dtype float16 "
                                "this is an overflow: use bfloat16 or float32")
        x = x.to(self.compute_dtype).contiguous().cpu()
        if self.mode == "exact":
            return {"features": _bits(x)}, None
        xf = x.float()
        if self.mode == "bf16":
            q = x.to(torch.bfloat16)
            arrays, approx = {"features": _bits(q)}, q.float()
        else:
            amax = xf.abs().amax(dim=-1)  # [T, L]
            scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
            q = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            arrays, approx = {"features": q.view(torch.uint8).numpy(), "scales": scale.numpy()}, q.float() * scale[..., None]
        err = approx - xf
        stats = np.array([float((err**2).sum()), float((xf**2).sum()), float(err.abs().max()) if err.numel() else 0.0])
        return arrays, stats

    def decode(self, features: np.ndarray, scales: np.ndarray | None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        t, s = self.bits(features, scales)
        return self.decode_bits(t, s, out_dtype)

    @staticmethod
    def bits(features: np.ndarray, scales: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stored arrays as tensors of the same bytes: bf16 bit patterns viewed as bfloat16 (free), fp8 kept
        as uint8 codes beside its float32 scales. What a loader moves to the GPU before ``decode_bits``."""
        t = torch.from_numpy(np.ascontiguousarray(features))
        if t.dtype == torch.uint16:
            t = t.view(torch.bfloat16)
        return t, (torch.from_numpy(np.ascontiguousarray(scales)) if scales is not None else None)

    def decode_bits(self, features: torch.Tensor, scales: torch.Tensor | None,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``bits``' tensors (on any device) -> features in ``out_dtype``: a cast, or for fp8 codes x scale."""
        out_dtype = out_dtype or self.read_dtype
        if self.mode != "fp8":
            return features.to(out_dtype)
        return (features.view(torch.float8_e4m3fn).float() * scales[..., None]).to(out_dtype)

    def roundtrip(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x`` as a reader of this storage would return it: what the sampler feeds the DiT, so prompts
        at sampling time carry exactly the precision the training captions had."""
        arrays, _ = self.encode(x)
        return self.decode(arrays["features"], arrays.get("scales"), out_dtype)


def _bits(x: torch.Tensor) -> np.ndarray:
    """A CPU tensor as the numpy array to store (bf16 as its uint16 bit pattern: Zarr v3 has no bf16)."""
    return x.view(torch.uint16).numpy() if x.dtype == torch.bfloat16 else x.numpy()


# ---------------------------------------------------------------------------------------------
# Text cache writer
# ---------------------------------------------------------------------------------------------
class TextCacheWriter:
    """Creates a text cache and writes it whole shard by whole shard.

    Typical use (one process; several processes each call ``open`` and write their own shards)::

        writer = TextCacheWriter.create(url, offsets=..., index=..., ...)   # before any forward pass
        for shard in writer.pending(writer.layout.split(rank, world)):
            writer.write_shard(shard, features_of_rows)                     # [rows, L, D]
        writer.write_null(null_features)
        writer.finish()                                                     # checks every flag
    """

    def __init__(self, location, group, attrs: dict):
        self.location = location
        self.group = group
        self.attrs = attrs
        self.layout = ShardLayout(**attrs["layout"])
        self.storage = TextStorage(attrs["storage"], getattr(torch, attrs["fingerprint"]["compute_dtype"]))
        self.flags = {name: DoneFlags(group, name) for name in self.array_names}
        self._files: dict[str, ShardFileWriter] = {}

    @property
    def array_names(self) -> list[str]:
        return ["features", "scales"] if self.attrs["storage"] == "fp8" else ["features"]

    @classmethod
    def create(cls, location, *, offsets: np.ndarray, index, fingerprint: dict, n_layers: int, hidden_size: int,
               storage: str = "exact", shard_bytes: int = DEFAULT_SHARD_BYTES,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES, input_sha256: str, extra: dict | None = None
               ) -> "TextCacheWriter":
        """Create the store: arrays, offsets, index.parquet and attributes (``complete`` = False)."""
        compute = getattr(torch, fingerprint["compute_dtype"])
        codec = TextStorage(storage, compute)
        total = int(offsets[-1])
        row_bytes = codec.row_bytes(n_layers, hidden_size)
        layout = ShardLayout.plan(total, row_bytes["features"], shard_bytes, chunk_bytes)
        check_replaceable(location, TEXT_KIND)
        group = open_group(location, mode="w")
        create_sharded_array(group, "features", (total, n_layers, hidden_size), codec.feature_dtype, layout)
        if storage == "fp8":
            create_sharded_array(group, "scales", (total, n_layers), np.float32, layout)
        if codec.lossy:
            from zarr.codecs import Crc32cCodec

            group.create_array("progress/storage_error", shape=(layout.n_shards, 3), dtype="float64", chunks=(1, 3),
                               fill_value=0.0, compressors=[Crc32cCodec()], overwrite=True)
        create_plain_array(group, "offsets", np.asarray(offsets, dtype=np.int64))
        attrs = {
            "kind": TEXT_KIND,
            "format_version": FORMAT_VERSION,
            "fingerprint": {**fingerprint, "storage": storage, "stored_dtype": codec.stored_dtype_name},
            "layers": list(fingerprint["layers"]),
            "hidden_size": hidden_size,
            "storage": storage,
            "n_captions": len(offsets) - 1,
            "total_tokens": total,
            "layout": {"rows": layout.rows, "rows_per_shard": layout.rows_per_shard,
                       "rows_per_chunk": layout.rows_per_chunk},
            "input_sha256": input_sha256,
            "complete": False,
            **(extra or {}),
        }
        group.attrs.update({ATTR_KEY: attrs})
        for name in (["features", "scales"] if storage == "fp8" else ["features"]):
            DoneFlags(group, name, layout.n_shards)
        write_parquet(location, "index.parquet", index)
        return cls(location, group, attrs)

    @classmethod
    def open(cls, location) -> "TextCacheWriter":
        group = open_group(location, mode="r+")
        attrs = dict(group.attrs).get(ATTR_KEY)
        if not attrs or attrs.get("kind") != TEXT_KIND:
            raise SemrouteError(f"{location} exists but is not a semroute text cache")
        if attrs.get("format_version") not in READ_VERSIONS:
            raise SemrouteError(f"{location} has format version {attrs.get('format_version')}, this semroute "
                                f"writes {', '.join(map(str, READ_VERSIONS))}; start a new cache")
        return cls(location, group, attrs)

    def lengths(self, offsets: np.ndarray | None = None) -> np.ndarray:
        """Tokens per caption (the stored ``lengths`` of an appended cache, else ``diff(offsets)``)."""
        if "lengths" in self.group:
            return np.asarray(self.group["lengths"][:], dtype=np.int64)
        return np.diff(np.asarray(self.group["offsets"][:], dtype=np.int64) if offsets is None else offsets)

    def append(self, *, offsets: np.ndarray, index, input_sha256: str, source: str, extra: dict | None = None) -> None:
        """Grow a finished cache by new captions (``offsets``: their CSR offsets from 0; ``index``: their rows
        of index.parquet, numbered from 0). Their rows start at the next shard boundary: existing shard files
        are never rewritten; arrays are resized (metadata only), the done flags extended with zeros, offsets,
        lengths and the index rewritten whole. The cache is marked incomplete first, so no reader uses it
        half-grown; encoding the new shards and ``finish()`` complete it. Safe to run again after a crash
        (it starts over from the segment list)."""
        import pyarrow as pa

        attrs = self.attrs
        segments = list(attrs.get("segments") or [{"source": attrs.get("source"), "first_caption": 0,
                                                    "n_captions": attrs["n_captions"], "start_row": 0,
                                                    "input_sha256": attrs["input_sha256"]}])
        pending_seg = attrs.get("appending")
        if pending_seg is None:
            update_attrs(self.group, complete=False, appending={"source": source, "input_sha256": input_sha256,
                                                                "segments_before": segments,
                                                                "rows_before": self.layout.rows,
                                                                "n_truncated_before": attrs.get("n_truncated", 0)})
            pending_seg = dict(self.group.attrs)[ATTR_KEY]["appending"]
        else:
            segments = pending_seg["segments_before"]
        rows_before = pending_seg["rows_before"]
        n_before = sum(s["n_captions"] for s in segments)
        old = ShardLayout(rows_before, self.layout.rows_per_shard, self.layout.rows_per_chunk)
        start = old.n_shards * old.rows_per_shard
        new_lengths = np.diff(np.asarray(offsets, dtype=np.int64))
        all_offsets = np.asarray(self.group["offsets"][:n_before], dtype=np.int64)
        lengths = self.lengths()[:n_before] if "lengths" in self.group else np.diff(
            np.asarray(self.group["offsets"][:n_before + 1], dtype=np.int64))
        rows = start + int(offsets[-1])
        all_offsets = np.concatenate([all_offsets, start + np.asarray(offsets, dtype=np.int64)])
        lengths = np.concatenate([lengths, new_lengths])
        layout = ShardLayout(rows, old.rows_per_shard, old.rows_per_chunk)
        # 1. Arrays grow (zarr rewrites only their metadata), flags get zeros for the new shards.
        for name in self.array_names:
            arr = self.group[name]
            arr.resize((rows, *arr.shape[1:]))
            self.flags[name].array.resize((layout.n_shards,))
        if "progress/storage_error" in self.group:
            self.group["progress/storage_error"].resize((layout.n_shards, 3))
        # 2. Offsets, lengths and the index, whole.
        create_plain_array(self.group, "offsets", all_offsets)
        create_plain_array(self.group, "lengths", lengths)
        old_index = read_parquet(self.location, "index.parquet").slice(0, n_before)
        new_index = index.set_column(index.schema.get_field_index("caption"), "caption",
                                     pa.array(np.arange(n_before, n_before + index.num_rows, dtype=np.int64)))
        new_index = new_index.set_column(new_index.schema.get_field_index("start"), "start",
                                         pa.array(all_offsets[n_before:-1]))
        write_parquet(self.location, "index.parquet", pa.concat_tables([old_index, new_index.select(
            old_index.column_names)]))
        # 3. Attributes last: the new layout and counts, still incomplete until the new shards are written.
        segments = segments + [{"source": source, "first_caption": n_before, "n_captions": index.num_rows,
                                "start_row": start, "input_sha256": input_sha256}]
        extra = dict(extra or {})
        n_truncated = int(pending_seg.get("n_truncated_before") or 0)
        update_attrs(self.group, format_version=APPENDED_VERSION, n_captions=n_before + index.num_rows,
                     total_tokens=int(lengths.sum()), layout={"rows": layout.rows,
                                                              "rows_per_shard": layout.rows_per_shard,
                                                              "rows_per_chunk": layout.rows_per_chunk},
                     segments=segments, input_sha256=input_sha256, appending=None, complete=False,
                     n_truncated=n_truncated + int(extra.pop("n_truncated", 0)), **extra)
        self.attrs = dict(self.group.attrs)[ATTR_KEY]
        self.layout = layout

    def pending(self, shards) -> list[int]:
        done = np.ones(self.layout.n_shards, dtype=bool)
        for name, flags in self.flags.items():
            done &= flags.done()
            present = np.zeros_like(done)
            present[[s for s in shards_present(self.location, name) if s < len(present)]] = True
            done &= present
        return [s for s in shards if not done[s]]

    def write_shard(self, shard: int, rows: torch.Tensor) -> None:
        """Write shard ``shard`` whole from ``rows``: ``[rows_in_shard, L, D]`` in the compute dtype."""
        a, b = self.layout.shard_rows(shard)
        if rows.shape[0] != b - a:
            raise ValueError(f"shard {shard} has {b - a} rows, got {rows.shape[0]}")
        arrays, stats = self.storage.encode(rows)
        for name, data in arrays.items():
            # The shard file assembled in numpy (zarr's per-chunk pipeline holds the GIL), written or uploaded whole.
            if name not in self._files:
                self._files[name] = ShardFileWriter(self.location, name)
            self._files[name].write(shard, data)
        if stats is not None:
            self.group["progress/storage_error"][shard] = stats
        # Flags last: a shard only counts once every one of its arrays is on disk.
        for name in arrays:
            self.flags[name].set(shard)

    def write_null(self, features: torch.Tensor, text: str) -> None:
        arrays, _ = self.storage.encode(features)
        for name, data in arrays.items():
            create_plain_array(self.group, f"null_{name}", data)
        update_attrs(self.group, null_text=text, null_n_tokens=int(features.shape[0]))
        self.attrs = dict(self.group.attrs)[ATTR_KEY]

    def finish(self, **summary) -> None:
        missing = self.pending(range(self.layout.n_shards))
        if missing:
            raise SemrouteError(f"{len(missing)} shards of {self.location} are not written yet "
                                f"(first: {missing[:5]}); run again with --resume")
        if "null_features" not in self.group:
            raise SemrouteError(f"{self.location} has no null caption yet; run again with --resume")
        update_attrs(self.group, complete=True, **summary)
        self.attrs = seal(self.group, self.location, TEXT_SMALL_ARRAYS)


TEXT_SMALL_ARRAYS = ["offsets", "lengths", "null_features", "null_scales"]  # read whole; sealed by sha256


# ---------------------------------------------------------------------------------------------
# Text cache reader
# ---------------------------------------------------------------------------------------------
class TextCacheReader:
    """Random access to a finished text cache.

    ``caption(i)`` -> ``[n_tokens, n_layers, D]``; ``batch(indices)`` -> right-padded
    ``[B, T, n_layers, D]`` features and a ``[B, T]`` bool mask. ``layers`` selects a subset of the stored
    layers (hidden_states indices); asking for a layer the cache lacks is an error naming it.
    Safe to pickle into DataLoader workers: each process reopens the files itself.
    """

    def __init__(self, location, *, layers: list[int] | None = None, out_dtype: torch.dtype | None = None,
                 allow_incomplete: bool = False, shard_cache=None):
        self.location = str(location)
        self.shard_cache = shard_cache  # shared.remote.ShardCache for caches on object storage
        self.attrs = read_attrs(location)
        if self.attrs.get("kind") != TEXT_KIND:
            raise SemrouteError(f"{location} is a {self.attrs.get('kind')}, not a text cache")
        if not self.attrs.get("complete") and not allow_incomplete:
            raise SemrouteError(f"{location} is not complete (the encoding run stopped early); "
                                "finish it with `semroute encode-text ... --resume`")
        self.stored_layers: list[int] = list(self.attrs["layers"])
        if layers is None:
            layers = self.stored_layers
        missing = [i for i in layers if i not in self.stored_layers]
        if missing:
            raise SemrouteError(f"{location} stores layers {self.stored_layers} but {missing} were asked for; "
                                "re-encode with --layers covering them")
        self.layers = list(layers)
        self._pick = None if self.layers == self.stored_layers else [self.stored_layers.index(i) for i in self.layers]
        compute = getattr(torch, self.attrs["fingerprint"]["compute_dtype"])
        self.storage = TextStorage(self.attrs["storage"], compute)
        self.out_dtype = out_dtype or self.storage.read_dtype
        self.hidden_size = int(self.attrs["hidden_size"])
        self.n_captions = int(self.attrs["n_captions"])
        self._offsets: np.ndarray | None = None
        self._lengths: np.ndarray | None = None
        self._files: dict[str, object] | None = None
        self._index = None

    @property
    def fingerprint(self) -> dict:
        return self.attrs["fingerprint"]

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            offsets = integrity.read_small_array(self.location, open_group(self.location), "offsets", self.attrs)
            self._offsets = np.asarray(offsets, dtype=np.int64)
        return self._offsets

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per caption: the stored ``lengths`` (appended caches, format 2), else ``diff(offsets)``."""
        if self._lengths is None:
            group = open_group(self.location)
            self._lengths = (np.asarray(integrity.read_small_array(self.location, group, "lengths", self.attrs),
                                        dtype=np.int64) if "lengths" in group else np.diff(self.offsets))
        return self._lengths

    @property
    def index(self):
        """The caption index as a pyarrow Table (caption, sample_id, text, n_tokens, truncated, ...)."""
        if self._index is None:
            self._index = read_index(self.location, self.attrs)
        return self._index

    def __len__(self) -> int:
        return self.n_captions

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = None
        state["_index"] = None
        return state

    def _arrays(self) -> dict:
        if self._files is None:
            names = ["features", "scales"] if self.attrs["storage"] == "fp8" else ["features"]
            # Local files or remote objects alike: our reader, ranged reads of the inner chunks needed.
            self._files = {n: ShardedArrayFile(self.location, n, shard_cache=self.shard_cache) for n in names}
        return self._files

    def _rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        out = []
        for name, arr in self._arrays().items():
            out.append(arr.read_rows(start, stop) if isinstance(arr, ShardedArrayFile) else arr[start:stop])
        return out[0], (out[1] if len(out) > 1 else None)

    def _bits(self, features: np.ndarray, scales: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._pick is not None:
            features = features[:, self._pick]
            scales = scales[:, self._pick] if scales is not None else None
        return self.storage.bits(features, scales)

    def decode_bits(self, features: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        """What ``caption_bits`` returned (moved anywhere, e.g. to the GPU) -> ``caption``'s features."""
        return self.storage.decode_bits(features, scales, self.out_dtype)

    def caption_bits(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Caption ``i`` as stored: ``[n_tokens, n_layers, D]`` bits and, for fp8, ``[n_tokens, n_layers]``
        scales; ``decode_bits`` of them is ``caption(i)``."""
        if not 0 <= i < self.n_captions:
            raise IndexError(f"caption {i} out of range 0..{self.n_captions - 1}")
        start = int(self.offsets[i])
        return self._bits(*self._rows(start, start + int(self.lengths[i])))

    def caption(self, i: int) -> torch.Tensor:
        """Caption ``i``'s features ``[n_tokens, n_layers, D]``."""
        return self.decode_bits(*self.caption_bits(i))

    def null_bits(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        group = open_group(self.location)
        read = integrity.read_small_array
        scales = read(self.location, group, "null_scales", self.attrs) if self.attrs["storage"] == "fp8" else None
        return self._bits(read(self.location, group, "null_features", self.attrs), scales)

    def null(self) -> torch.Tensor:
        """The null caption's features ``[n_tokens, n_layers, D]``."""
        return self.decode_bits(*self.null_bits())

    def batch(self, indices, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions ``indices`` right-padded (zeros) to the longest: ``[B, T, L, D]`` and mask ``[B, T]``."""
        return pad_batch([self.caption(int(i)) for i in indices], pad_to=pad_to)


def pad_batch(items: list[torch.Tensor], pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``[n_i, ...]`` tensors with zeros to ``[B, T, ...]`` plus a ``[B, T]`` bool mask."""
    t_max = max(x.shape[0] for x in items)
    if pad_to is not None:
        t_max = max(t_max, pad_to)
    first = items[0]
    out = first.new_zeros((len(items), t_max, *first.shape[1:]))
    mask = torch.zeros((len(items), t_max), dtype=torch.bool)
    for row, x in enumerate(items):
        out[row, : x.shape[0]] = x
        mask[row, : x.shape[0]] = True
    return out, mask
