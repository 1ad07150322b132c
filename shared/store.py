"""The cache store's generic part: sharded Zarr v3 arrays written whole shard by whole shard, with done
flags and a completion record. Both stages import it; the text cache (``shared/text_store.py``) and the
latent cache (``shared/latent_store.py``) are built from these pieces:

- opening stores by path or URL, their attributes (the reader's and the writer's checks of a store's kind,
  version and completeness), the parquet files beside the arrays, the seal, and the guard that ``--out``
  never empties a folder that is not a cache (``check_replaceable``);
- ``ShardLayout``: rows -> shards -> inner chunks; ``DoneFlags``: one flag per shard, set only after the
  shard is fully written; ``shards_present``: which shard files still exist;
- ``ShardedArrayMeta``: the one parser of a sharded array's zarr metadata, used by the shard file writer
  (``ShardFileWriter``) and the fast reader (``ShardedArrayFile``) alike;
- ``verify_array``: every inner chunk's crc32c and every shard index checked, problems named by shard file.

Every shard is written whole by exactly one process (zarr-python does not support concurrent partial
shard writes), then its flag is set. Each inner chunk and each shard index carries a crc32c checksum,
which ``verify`` and the fast reader check.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import math
import os
import struct
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semroute.shared import integrity
from semroute.shared.errors import CacheDamaged, SemrouteError
from semroute.shared.files import write_atomic
from semroute.shared.remote import call, filesystem, is_url, transient

FORMAT_VERSION = 1
# Version 2: a text cache grown by `encode-text --append`. Each appended segment starts at a shard boundary
# (so no written shard file is ever rewritten), which leaves unused rows after the last caption of the
# previous segment: offsets[i] is still caption i's first row, its row count comes from the `lengths` array
# (diff(offsets) in version 1). Readers take both versions; fresh caches are still written as version 1.
APPENDED_VERSION = 2
READ_VERSIONS = (FORMAT_VERSION, APPENDED_VERSION)
ATTR_KEY = "semroute"

DEFAULT_SHARD_BYTES = 128 << 20
DEFAULT_CHUNK_BYTES = 1 << 20
_INDEX_ENTRY = 16  # uint64 offset + uint64 nbytes per inner chunk
_CRC = 4
_EMPTY = np.uint64(2**64 - 1)
# Shard indexes a reader keeps (bytes; least recently used dropped first). A shard's index never changes once the
# shard is written, so each is fetched once per reader: 64 MiB holds ~32k indexes of 128 inner chunks.
INDEX_CACHE_BYTES = 64 << 20
# Byte ranges of one shard closer than this are fetched as one request: on object storage a request costs
# about what reading this many more bytes does (tens of ms of latency against ~100 MB/s per stream).
MERGE_GAP = 1 << 20


# ---------------------------------------------------------------------------------------------
# Opening stores by path or URL
# ---------------------------------------------------------------------------------------------
def join(location: str | os.PathLike, name: str) -> str:
    """``location/name`` for a local path or a URL (``Path`` would collapse ``s3://`` to ``s3:/``)."""
    return f"{str(location).rstrip('/')}/{name}" if is_url(location) else str(Path(location) / name)


def _zarr_options(location) -> dict:
    from semroute.shared.remote import storage_options

    return {"storage_options": storage_options(str(location).split("://", 1)[0])} if is_url(location) else {}


def _settle_zarr_io() -> None:
    """At exit, before zarr's own atexit hook (``zarr.core.sync.cleanup_resources``, registered earlier, so run
    later): let the reads zarr still runs on its event-loop thread end. A zarr read of many chunks that fails on
    one (a damaged done flag) raises at once and leaves its other chunk reads running; zarr's hook then shuts
    its thread pool under them and closes the loop, and they die at interpreter exit printing "Task was destroyed
    but it is pending!" from a daemon thread, which can abort the process (SIGABRT) after a clean message."""
    import asyncio

    async def others() -> None:
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if pending:
            await asyncio.wait(pending, timeout=10)

    try:
        from zarr.core import sync  # (zarr's internals: anything unexpected there skips this, silently)

        loop = sync.loop[0]
        if loop is None or loop.is_closed() or not loop.is_running():
            return
        asyncio.run_coroutine_threadsafe(others(), loop).result(timeout=15)
    except Exception:  # noqa: BLE001 - exiting anyway: zarr's hook closes what is left
        pass


_SETTLE_AT_EXIT: list = []


def _zarr():
    """The ``zarr`` module, with ``_settle_zarr_io`` registered to run at exit before zarr's own cleanup."""
    import atexit

    import zarr

    if not _SETTLE_AT_EXIT:
        _SETTLE_AT_EXIT.append(atexit.register(_settle_zarr_io))
    return zarr


def open_group(location: str | os.PathLike, mode: str = "r"):
    """Open a Zarr v3 group by local path or fsspec URL (``s3://``, ``gs://``, ``file://`` ...)."""
    zarr = _zarr()

    from semroute.shared.remote import call

    if is_url(location):
        # Through our retry loop, so a missing bucket or denied access reads as such, naming the URL.
        return call(str(location), zarr.open_group, str(location), mode=mode, zarr_format=3, **_zarr_options(location),
                    missing=f"no cache at {location}")
    try:
        return zarr.open_group(str(location), mode=mode, zarr_format=3)
    except FileNotFoundError:
        raise SemrouteError(f"no cache at {location}") from None


# What a semroute create may find in a folder it is allowed to replace: the entries its own stores write (text and
# latent caches), so that an interrupted create (group written, attributes not yet) can be redone. Written out here,
# below the stores that own them (they import this module); tests/test_store_format.py keeps it equal to
# text_store.TEXT_ENTRIES | latent_store.LATENT_ENTRIES.
STORE_ENTRIES = frozenset({"zarr.json", "progress", integrity.INDEX, "features", "scales", "offsets", "lengths",
                           "null_features", "null_scales", "bad_records.jsonl", "buckets", "skipped.jsonl"})


def _store_listing(location: str) -> tuple[bool, list[str], bytes | None]:
    """(exists, top-level entry names, bytes of zarr.json or None) of a folder or URL."""
    if is_url(location):
        # The options, protocol check and retries of every other access to object storage (shared/remote.py).
        fs, path = filesystem(location)
        path = path.rstrip("/")
        if not call(location, fs.exists, path):
            return False, [], None
        if call(location, fs.isfile, path):
            raise SemrouteError(f"--out {location} is a file, not a folder; choose a new --out")
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in call(location, fs.ls, path, detail=False)]
        meta = call(join(location, "zarr.json"), fs.cat_file, f"{path}/zarr.json") if "zarr.json" in names else None
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
        elif isinstance(doc, dict) and doc.get("node_type") == "group" and set(names) <= STORE_ENTRIES:
            return  # an interrupted create: only entries a semroute store writes, no attributes yet
    if what is None:
        shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
        what = f"not a semroute cache ({len(names)} entries: {shown})"
    raise SemrouteError(f"--out {location} already exists and is {what}; refusing to replace it, since that would "
                        "delete its contents. Choose a new --out (or remove that folder yourself).")


def interrupted_create(location: str | os.PathLike, kind: str) -> bool:
    """Whether ``location`` provably holds only what a create of ``kind`` killed before its end leaves, so that a
    ``--resume`` may start it again without losing anything: a group whose attributes are missing or say a first
    run of ``kind`` (not complete, never grown), no ``index.parquet`` (a create writes it last) and no shard
    counted done. Anything else missing its index is a damaged cache, never restarted."""
    import json

    location = str(location)
    exists, names, meta = _store_listing(location)
    if not exists or meta is None or integrity.INDEX in names:
        return False
    try:
        doc = json.loads(meta)
        attrs = (doc.get("attributes") or {}).get(ATTR_KEY)
        if doc.get("node_type") != "group":
            return False
        if attrs is None:
            if not set(names) <= STORE_ENTRIES:
                return False
        elif attrs.get("kind") != kind or attrs.get("complete") or attrs.get("segments") or attrs.get("appending"):
            return False
        group = open_group(location)
        flags = [arr for _, arr in group["progress"].arrays()] if "progress" in group else []
        return not any(np.asarray(arr[...]).any() for arr in flags)
    except Exception:  # noqa: BLE001 - anything unreadable is not provably an interrupted create
        return False


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


def write_file(location, name: str, data: bytes) -> None:
    """Replace the plain file ``name`` beside a store's arrays whole: a temporary name then a rename (locally), one
    PUT (object storage), so a run killed while writing it leaves the old file or the new one, never a cut one."""
    if is_url(location):
        from semroute.shared.remote import write_bytes

        write_bytes(join(location, name), data)
        return
    final = Path(location) / name
    final.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(final, data)


def write_parquet(location, name: str, table) -> None:
    import pyarrow.parquet as pq

    import pyarrow as pa

    # Whole or not at all (write_file): a crash never leaves a half-written index behind.
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=65536)
    write_file(location, name, sink.getvalue().to_pybytes())


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


def check_seal(location, group, attrs: dict) -> None:
    """Before a writer continues a finished store (``--resume``, ``--append``: both end by sealing it again),
    check it against its seal, so that an edited or damaged attribute, index or small array is refused
    (``CacheDamaged`` naming the file) rather than sealed as if it had been written so."""
    record = integrity.sealed(attrs)
    if record is None:
        return
    integrity.check_attrs(location, attrs)
    read_index(location, attrs, columns=[])
    for name in record.get("arrays_sha256") or {}:
        integrity.read_small_array(location, group, name, attrs)


def file_exists(location, name: str) -> bool:
    """Whether the plain file ``name`` (e.g. ``index.parquet``) lies beside the arrays of a store."""
    if is_url(location):
        from semroute.shared.remote import call, filesystem

        url = join(location, name)
        fs, path = filesystem(url)
        return bool(call(url, fs.exists, path))
    return (Path(location) / name).is_file()


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


def read_cache_attrs(location, kind: str, what: str, command: str, allow_incomplete: bool = False) -> dict:
    """A reader's ``read_attrs``: refuses another kind of store (``what``: "text cache", ...) and, unless
    ``allow_incomplete``, one whose encoding run (``command``) has not finished."""
    attrs = read_attrs(location)
    if attrs.get("kind") != kind:
        raise SemrouteError(f"{location} is a {attrs.get('kind')}, not a {what}")
    if not attrs.get("complete") and not allow_incomplete:
        raise SemrouteError(f"{location} is not complete (the encoding run stopped early); "
                            f"finish it with `semroute {command} ... --resume`")
    return attrs


def open_for_writing(location, kind: str, what: str, versions=(FORMAT_VERSION,), hint: str = ""):
    """A writer's ``(group, attrs)`` of an existing store: refuses another kind of store (``what``: "text
    cache", ...; ``hint`` is added to that message) and a format version it cannot continue."""
    try:
        group = open_group(location, mode="r+")
        attrs = dict(group.attrs).get(ATTR_KEY)
    except SemrouteError:
        raise
    except Exception as err:  # noqa: BLE001 - zarr raises JSON/Unicode/Value errors for a damaged zarr.json
        raise CacheDamaged(f"{location}/zarr.json is damaged ({type(err).__name__}: {err}); restore it, or pass "
                           "--overwrite to encode the cache again") from None
    if attrs is not None and not isinstance(attrs, dict):
        raise CacheDamaged(f"{location}/zarr.json: the '{ATTR_KEY}' attributes are not a mapping; restore it, or pass "
                           "--overwrite to encode the cache again")
    if not attrs or attrs.get("kind") != kind:
        raise SemrouteError(f"{location} exists but is not a semroute {what}{hint}")
    if attrs.get("format_version") not in versions:
        raise SemrouteError(f"{location} has format version {attrs.get('format_version')}, this semroute "
                            f"writes {', '.join(map(str, versions))}; start a new cache")
    return group, attrs


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


def open_flags(location, group, names: list[str]) -> dict[str, DoneFlags]:
    """A writer's done flags ``progress/<name>`` of ``names``; a missing one is ``CacheDamaged`` naming it (a
    create killed before it made them, which a --resume starts again, or a deleted folder)."""
    try:
        return {name: DoneFlags(group, name) for name in names}
    except KeyError as err:
        raise CacheDamaged(f"{join(location, str(err.args[0]) if err.args else 'progress')} is missing (the run that "
                           "created the cache stopped early, or it was deleted); pass --overwrite to encode the "
                           "cache again") from None


def describe_header(kind: str, path: str, attrs: dict, flag_names: list[str]) -> dict:
    """The first lines of ``info`` for any cache: its kind, path, completeness and the shards written (the
    done flags ``progress/<name>`` of ``flag_names``, summed)."""
    group = open_group(path)
    flags = []
    for name in flag_names:
        try:
            flags.append(DoneFlags(group, name).done())
        except Exception as err:  # noqa: BLE001 - zarr: a missing, cut or altered flag chunk or metadata
            raise CacheDamaged(f"{join(path, 'progress/' + name)}: the done flags are damaged ({type(err).__name__}: "
                               f"{err}); {integrity.verify_hint(path)}") from None
    return {"kind": kind, "path": path, "complete": bool(attrs.get("complete")),
            "shards written": f"{sum(int(f.sum()) for f in flags)} / {sum(len(f) for f in flags)}"}


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


class ShardedArrayMeta:
    """One sharded array's geometry and file naming, parsed from its zarr metadata: the single parser that
    the shard file writer and the fast reader share.

    The arrays semroute creates (``create_sharded_array``) use zarr's ``sharding_indexed`` codec with plain
    little-endian inner chunks followed by a crc32c, and the ``[chunks, 2]`` uint64 (offset, nbytes) index
    plus its crc32c at the end of the shard file; anything else is refused. A missing or unreadable
    ``zarr.json`` of the array is ``CacheDamaged``.
    """

    def __init__(self, root: str | Path, name: str):
        zarr = _zarr()

        def open_array():
            try:
                return zarr.open_array(join(root, name), mode="r", **_zarr_options(root))
            except Exception as err:  # noqa: BLE001 - a missing or damaged zarr.json of the array
                if is_url(root) and transient(err):
                    raise  # the network, not the cache: retried by ``call``
                raise CacheDamaged(f"{root}/{name}/zarr.json is missing or damaged ({type(err).__name__}: {err}); "
                                   f"{integrity.verify_hint(root)}") from None

        # Opened lazily, mid-run for a latent bucket's arrays: an unreachable store is retried, then named as such.
        arr = call(f"{str(root).rstrip('/')}/{name}/zarr.json", open_array) if is_url(root) else open_array()
        meta = arr.metadata
        codecs = meta.to_dict()["codecs"]

        def plain(chain) -> bool:  # little-endian bytes (no endianness for 1-byte types), then crc32c
            return [c["name"] for c in chain] == ["bytes", "crc32c"] and \
                (chain[0].get("configuration") or {}).get("endian", "little") == "little"

        cfg = (codecs[0].get("configuration") or {}) if len(codecs) == 1 else {}
        if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed" or not plain(cfg.get("codecs", [])) \
                or not plain(cfg.get("index_codecs", [])) or cfg.get("index_location") != "end":
            raise SemrouteError(f"{root}/{name}: not a sharded array as semroute creates them")
        self.remote = is_url(root)
        self.root: str | Path = str(root).rstrip("/") if self.remote else Path(root)
        self.name = name
        self.shape = tuple(int(n) for n in arr.shape)
        self.dtype = np.dtype(str(arr.dtype)).newbyteorder("<")
        self.fill_value = meta.fill_value
        self.rows_per_shard = int(meta.chunk_grid.chunk_shape[0])
        self.rows_per_chunk = int(cfg["chunk_shape"][0])
        self.chunks_per_shard = self.rows_per_shard // self.rows_per_chunk
        self._key = meta.encode_chunk_key

    def check_geometry(self, shape: tuple[int, ...], dtype, layout: ShardLayout) -> None:
        """Refuse an array whose zarr.json no longer says what the cache's attributes do (``shape``, ``dtype``,
        ``layout``): the chunks' crc32c cannot tell, so an edited shape or data type would read as wrong
        values (other rows, bytes taken as another type) that pass every checksum."""
        want = (tuple(int(n) for n in shape), np.dtype(dtype).newbyteorder("<"), layout.rows_per_shard,
                layout.rows_per_chunk)
        got = (self.shape, self.dtype, self.rows_per_shard, self.rows_per_chunk)
        if got != want:
            def say(g) -> str:
                return f"shape {g[0]}, {g[1].name}, shards of {g[2]} rows in chunks of {g[3]}"

            raise CacheDamaged(f"{self.root}/{self.name}/zarr.json says {say(got)}, but the cache's attributes say "
                               f"{say(want)} (edited or damaged); {integrity.verify_hint(self.root)}")

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def layout(self) -> ShardLayout:
        return ShardLayout(self.rows, self.rows_per_shard, self.rows_per_chunk)

    def shard_path(self, shard: int) -> Path | str:
        """The shard's file (local) or object URL (remote)."""
        key = self._key((shard,) + (0,) * len(self.row_shape))
        return f"{self.root}/{self.name}/{key}" if self.remote else self.root / self.name / key


class _FdTable(OrderedDict):
    """One thread's open shard files (shard -> descriptor), closed with it when the thread's storage goes."""

    __hash__ = object.__hash__  # by identity: kept in a WeakSet

    def close(self) -> None:
        while self:
            os.close(self.popitem()[1])

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _in_shard(shard: int, err: ChecksumError) -> ChecksumError:
    """``err``, marked with the shard it is about (``ShardedArrayFile._drop_local_copy``)."""
    err.shard = shard
    return err


class ShardedArrayFile:
    """Reads rows of one sharded array straight from its shard files (local) or objects (remote).

    zarr-python spends a few milliseconds of Python/async overhead on every small read; a training
    loader reads thousands of short captions per second, so we read the shard index once and ``pread``
    (locally) or fetch by ranged GET (remotely, ``shared/remote.py``) the inner chunks we need, checking
    each chunk's crc32c as zarr would.
    """

    def __init__(self, root: str | Path, name: str, *, check_crc: bool = True, max_open: int = 64,
                 shard_cache=None, index_cache_bytes: int = INDEX_CACHE_BYTES):
        self.meta = meta = ShardedArrayMeta(root, name)
        self.remote, self.root, self.name = meta.remote, meta.root, name
        self.shard_cache = shard_cache  # shared.remote.ShardCache: whole remote shards kept on local disk
        self.shape, self.dtype, self.row_shape, self.row_bytes = meta.shape, meta.dtype, meta.row_shape, meta.row_bytes
        self.rows_per_shard, self.rows_per_chunk = meta.rows_per_shard, meta.rows_per_chunk
        self.chunks_per_shard = meta.chunks_per_shard
        self.check_crc = check_crc
        self._max_open = max_open
        # Shard indexes read so far (one suffix read each, the first time a shard is touched), least recently used first.
        self._index: OrderedDict[int, np.ndarray] = OrderedDict()
        self._index_bytes, self.index_cache_bytes = 0, index_cache_bytes
        self._remotes: OrderedDict[int, object] = OrderedDict()
        # Per thread: the open shard files (``_fds``) and _pread_into_scratch's buffer. Loader threads share this
        # object; a descriptor table shared between them let one thread close a file another was about to read.
        self._scratch = threading.local()
        self._fd_tables: weakref.WeakSet = weakref.WeakSet()

    def __getstate__(self):
        # File descriptors do not cross process boundaries (DataLoader workers reopen them).
        state = dict(self.__dict__)
        state["_index"], state["_index_bytes"] = OrderedDict(), 0
        state["_remotes"] = OrderedDict()
        state["_scratch"], state["_fd_tables"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._scratch, self._fd_tables = threading.local(), weakref.WeakSet()

    @property
    def _fds(self) -> "_FdTable":
        """This thread's open shard files, least recently used first (at most ``max_open``)."""
        fds = getattr(self._scratch, "fds", None)
        if fds is None:
            fds = self._scratch.fds = _FdTable()
            self._fd_tables.add(fds)
        return fds

    def close(self) -> None:
        for table in list(self._fd_tables):
            table.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def shard_path(self, shard: int) -> Path | str:
        return self.meta.shard_path(shard)

    def _remote(self, shard: int):
        """The shard's object (remote stores): its size and ranged reads, with retries, and the ETag its first
        read saw (``RemoteFile.pinned``: the object the shard's kept index came from), which later reads require."""
        from semroute.shared.remote import RemoteFile

        obj = self._remotes.get(shard)
        if obj is None:
            obj = self._remotes[shard] = RemoteFile(self.shard_path(shard))
            if len(self._remotes) > 4096:
                # Its index goes with it: a new RemoteFile pins whatever version the object has by then.
                gone, _ = self._remotes.popitem(last=False)
                if gone in self._index:
                    self._index_bytes -= self._index.pop(gone).nbytes
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

    def _fetch(self, ranges: list[tuple[int, int, int]]) -> list[bytes]:
        """The bytes of ``(shard, begin, end)`` ranges (``begin < 0``, ``end`` None: the shard's last ``-begin``
        bytes): ``pread`` from local files and node-local copies of remote shards, the rest from the object
        store all at once (``remote.read_ranges``: concurrent ranged GETs, each retried alone)."""
        out: list = [None] * len(ranges)
        remote = []
        for j, (shard, begin, end) in enumerate(ranges):
            fd = self._local_copy(shard) if self.remote else self._fd(shard)
            if fd is None:
                remote.append(j)
                continue
            try:
                if begin < 0:  # a suffix: clamped to the file, a short file then shows as a short read
                    begin, end = max(0, os.fstat(fd).st_size + begin), os.fstat(fd).st_size
                out[j] = os.pread(fd, end - begin, begin)
            except OSError as err:
                raise self._unreadable(shard, err) from None
        if remote:
            from semroute.shared.remote import read_ranges

            got = read_ranges([self._remote(ranges[j][0]) for j in remote], [ranges[j][1] for j in remote],
                              [ranges[j][2] for j in remote])
            for j, data in zip(remote, got):
                out[j] = data
        return out

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            path = self.shard_path(shard)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise CacheDamaged(f"shard file {path} is missing; {integrity.verify_hint(self.root)}") from None
            except OSError as err:
                raise self._unreadable(shard, err) from None
            self._fds[shard] = fd
            if len(self._fds) > self._max_open:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(shard)
        return fd

    def _load_indexes(self, shards) -> dict[int, np.ndarray]:
        """The ``[chunks_per_shard, 2]`` (offset, nbytes) index of every shard in ``shards``: kept from an earlier
        call, else read (its last bytes, one suffix read each, all fetched together) and its crc32c checked."""
        wanted = sorted({int(s) for s in shards})
        out = {}
        for s in wanted:
            if s in self._index:
                self._index.move_to_end(s)
                out[s] = self._index[s]
        missing = [s for s in wanted if s not in out]
        n = self.chunks_per_shard * _INDEX_ENTRY + _CRC
        for shard, raw in zip(missing, self._fetch([(s, -n, None) for s in missing])):
            raw = memoryview(raw)  # bytes, or obstore's Bytes (remote.read_ranges)
            if len(raw) != n or struct.unpack("<I", raw[-_CRC:])[0] != _crc32c(raw[:-_CRC]):
                raise _in_shard(shard, ChecksumError(f"{self.shard_path(shard)}: the shard index is corrupt (checksum "
                                                     f"mismatch); {integrity.verify_hint(self.root)}"))
            out[shard] = self._index[shard] = np.frombuffer(raw[:-_CRC], dtype="<u8").reshape(-1, 2)
            self._index_bytes += out[shard].nbytes
        while self._index_bytes > self.index_cache_bytes and self._index:  # this call's indexes live on in ``out``
            self._index_bytes -= self._index.popitem(last=False)[1].nbytes
        return out

    def _shard_index(self, shard: int) -> np.ndarray:
        return self._load_indexes([shard])[shard]

    def _drop_local_copy(self, shard: int | None) -> bool:
        """Forget and delete the node-local copy of a remote shard that failed a check; False when the shard
        was not read from one (the object itself is damaged, or the store is local)."""
        fd = self._fds.pop(shard, None) if self.remote and self.shard_cache is not None else None
        if fd is None:
            return False
        os.close(fd)
        path = self.shard_cache.local_path(self._remote(shard))
        path.unlink(missing_ok=True)  # the next ``ShardCache.get`` downloads it again
        if shard in self._index:
            self._index_bytes -= self._index.pop(shard).nbytes
        self.shard_cache.errors.append(f"{path}: the node-local copy of {self.shard_path(shard)} failed its "
                                       "checksum; deleted, read from the object store instead")
        return True

    def _from_store_if_copy_damaged(self, read, *args):
        """``read(*args)``, again when a node-local copy of a remote shard failed a checksum: that copy is a
        cache (damaged on this node's disk, or cut short), the object store holds the data; the second read
        goes there and checks its checksums in turn. A damaged object still raises."""
        dropped: set[int] = set()  # each shard's copy at most once: a fresh copy failing again is raised
        while True:
            try:
                return read(*args)
            except ChecksumError as err:
                shard = getattr(err, "shard", None)
                if shard in dropped or not self._drop_local_copy(shard):
                    raise
                dropped.add(shard)

    def read_chunk(self, chunk: int) -> np.ndarray:
        """Inner chunk ``chunk`` (global number) as ``[rows_per_chunk, *row_shape]``."""
        return self._from_store_if_copy_damaged(self._read_chunk, chunk)

    def _read_chunk(self, chunk: int) -> np.ndarray:
        shard, inner = divmod(chunk, self.chunks_per_shard)
        offset, nbytes = (int(v) for v in self._shard_index(shard)[inner])
        if offset == int(_EMPTY):
            raise CacheDamaged(f"{self.shard_path(shard)}: chunk {inner} was never written; "
                               f"{integrity.verify_hint(self.root)}")
        (raw,) = self._fetch([(shard, offset, offset + nbytes)])
        if len(raw) != nbytes:
            raise _in_shard(shard, ChecksumError(f"{self.shard_path(shard)}: chunk {inner} is truncated; "
                                                 f"{integrity.verify_hint(self.root)}"))
        return self._check_chunk(memoryview(raw), shard, inner)

    def read_rows(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop`` as a new array (or into ``out``)."""
        return self.read_many([(start, stop)], None if out is None else [out])[0]

    def read_many(self, spans: list[tuple[int, int]], outs: list[np.ndarray] | None = None) -> list[np.ndarray]:
        return self._from_store_if_copy_damaged(self._read_many, spans, outs)

    def _read_many(self, spans: list[tuple[int, int]], outs: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """Rows ``start:stop`` of every ``(start, stop)`` in ``spans`` (new arrays, or into ``outs``), read together.

        The inner chunks a span needs lie back to back in their shard file (written in order), so a span's
        part of a shard is one byte range. Every range of the call is planned first; the ranges of a shard read
        from object storage that lie within ``MERGE_GAP`` bytes of each other are merged and all fetched at once
        (``_fetch``), while a range on a local file (or a node-local copy) is read into this thread's reused
        buffer just before its rows are copied out. Every inner chunk's crc32c is checked before its rows are
        copied out, into ``outs`` when given (a loader's batch buffer: ``TextCacheReader.captions_bits(into=)``).
        """
        c, per = self.rows_per_chunk, self.chunks_per_shard
        outs = outs or [np.empty((b - a, *self.row_shape), dtype=self.dtype) for a, b in spans]
        # 1. Pieces: the chunks [first, last] (global numbers) of span k in one shard.
        pieces: list[tuple[int, int, int, int]] = []
        for k, (start, stop) in enumerate(spans):
            chunk = start // c
            while chunk * c < stop:
                shard = chunk // per
                last = min((stop - 1) // c, (shard + 1) * per - 1)
                pieces.append((k, shard, chunk, last))
                chunk = last + 1
        index = self._load_indexes({p[1] for p in pieces})
        # 2. Their byte ranges, merged per shard, fetched together.
        wanted: dict[int, list[tuple[int, int]]] = {}
        for _, shard, first, last in pieces:
            entries = index[shard][first - shard * per: last - shard * per + 1]
            if (entries[:, 0] == _EMPTY).any():
                raise CacheDamaged(f"{self.shard_path(shard)}: a chunk was never written; {integrity.verify_hint(self.root)}")
            begin, end = int(entries[:, 0].min()), int((entries[:, 0] + entries[:, 1]).max())
            wanted.setdefault(shard, []).append((begin, end))
        # Ranges on object storage are fetched all at once (merged within MERGE_GAP: a request costs a round
        # trip); a piece on a local file or node-local copy is read when its rows are copied out (step 3).
        local = {shard for shard in wanted if not self.remote or self._local_copy(shard) is not None}
        merged = [(shard, a, b) for shard in sorted(set(wanted) - local)
                  for a, b in merge_ranges(wanted[shard], MERGE_GAP)]
        fetched: dict[int, list[tuple[int, bytes]]] = {}
        for (shard, a, _), raw in zip(merged, self._fetch(merged)):
            fetched.setdefault(shard, []).append((a, raw))
        # 3. Each chunk checked and its rows copied out.
        for k, shard, first, last in pieces:
            start, stop = spans[k]
            if shard in local:
                # Into this thread's reused buffer, not a new bytes object: at the `paper` preset's row size
                # (36 x 2560 bf16, 184 kB a token) faulting in fresh pages for every read cost as much CPU as
                # the copy itself (bench/RESULTS.md, "Reads of paper-sized captions").
                entries = index[shard][first - shard * per: last - shard * per + 1]
                a, b = int(entries[:, 0].min()), int((entries[:, 0] + entries[:, 1]).max())
                # The descriptor taken just before the read: one kept from the plan could be closed by now
                # (more shards in this call than max_open).
                fd = self._local_copy(shard) if self.remote else self._fd(shard)
                try:
                    got = self._pread_into_scratch(fd, a, b - a) if fd is not None else None
                except OSError as err:
                    raise self._unreadable(shard, err) from None
                if got is None:
                    got = self._fetch([(shard, a, b)])[0]
                chunks, starts = [(a, got)], [a]
            else:
                chunks = fetched[shard]
                starts = [a for a, _ in chunks]
            for chunk in range(first, last + 1):
                inner = chunk - shard * per
                offset, nbytes = (int(v) for v in index[shard][inner])
                a, raw = chunks[bisect.bisect_right(starts, offset) - 1]
                data = memoryview(raw)[offset - a: offset - a + nbytes]
                if len(data) != nbytes:
                    raise _in_shard(shard, ChecksumError(f"{self.shard_path(shard)}: the shard file is truncated; "
                                                         f"{integrity.verify_hint(self.root)}"))
                rows = self._check_chunk(data, shard, inner)
                lo, hi = max(start, chunk * c), min(stop, (chunk + 1) * c)
                outs[k][lo - start: hi - start] = rows[lo - chunk * c: hi - chunk * c]
        return outs

    def _unreadable(self, shard: int, err: OSError) -> SemrouteError:
        """An error reading a shard's file (an I/O error of the disk, a folder in its place): ``pread`` names no
        file, and a raw traceback would leave the user to guess which of thousands it was."""
        where = (f"the node-local copy of {self.shard_path(shard)} (in --cache-dir)" if self.remote
                 else f"shard file {self.shard_path(shard)}")
        return SemrouteError(f"cannot read {where}: {err.strerror or err} (errno {err.errno}); the disk or file "
                             f"system refused its bytes, not a checksum: check it, then "
                             f"{integrity.verify_hint(self.root)}")

    def _pread_into_scratch(self, fd: int, begin: int, n: int) -> memoryview:
        """Bytes ``begin:begin + n`` of ``fd`` in this thread's scratch buffer (valid until its next call; a
        short file gives a shorter view). The buffer is per thread: loader threads share this object."""
        buf = getattr(self._scratch, "buf", None)
        if buf is None or len(buf) < n:
            buf = self._scratch.buf = bytearray(-(-n // (1 << 20)) << 20)  # whole MiB: few regrowths
        view = memoryview(buf)[:n]
        got = 0
        while got < n:  # preadv may return short on large reads; 0 is the end of the file
            k = os.preadv(fd, [view[got:]], begin + got)
            if k == 0:
                break
            got += k
        return view[:got]

    def _check_chunk(self, raw, shard: int, inner: int) -> np.ndarray:
        if self.check_crc and struct.unpack("<I", raw[-_CRC:])[0] != _crc32c(raw[:-_CRC]):
            raise _in_shard(shard, ChecksumError(f"{self.shard_path(shard)}: chunk {inner} fails its crc32c "
                                                 f"checksum; {integrity.verify_hint(self.root)}"))
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
        self.meta = meta = ShardedArrayMeta(root, name)
        if meta.fill_value != 0:  # a short last chunk is padded with zeros below
            raise SemrouteError(f"{root}/{name}: not a sharded array as semroute creates them (fill value "
                                f"{meta.fill_value})")
        self.remote, self.root, self.name = meta.remote, meta.root, name
        self.rows, self.row_shape, self.dtype = meta.rows, meta.row_shape, meta.dtype
        self.rows_per_shard, self.rows_per_chunk = meta.rows_per_shard, meta.rows_per_chunk
        self.chunks_per_shard = meta.chunks_per_shard

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
        index_bytes = self.chunks_per_shard * _INDEX_ENTRY
        buf = np.empty(n_chunks * (chunk + _CRC) + index_bytes + _CRC, dtype=np.uint8)
        # 1. Inner chunks: [n_chunks, chunk bytes + crc32c], one vectorized copy, then each chunk's checksum.
        body = buf[: n_chunks * (chunk + _CRC)].reshape(n_chunks, chunk + _CRC)
        body[:, :chunk] = flat.reshape(n_chunks, chunk)
        crcs = np.fromiter((crc32c.crc32c(row) for row in body[:, :chunk]), dtype="<u4", count=n_chunks)
        body[:, chunk:] = crcs.view(np.uint8).reshape(n_chunks, _CRC)
        # 2. The index: (offset, nbytes) per inner chunk, empty (2^64 - 1) past the array's end; its crc32c.
        index = np.full((self.chunks_per_shard, 2), _EMPTY, dtype="<u8")
        index[:n_chunks, 0] = np.arange(n_chunks, dtype=np.uint64) * (chunk + _CRC)
        index[:n_chunks, 1] = chunk + _CRC
        tail = n_chunks * (chunk + _CRC)
        buf[tail:tail + index_bytes] = index.view(np.uint8).reshape(-1)
        buf[tail + index_bytes:] = np.frombuffer(
            int(crc32c.crc32c(buf[tail:tail + index_bytes])).to_bytes(_CRC, "little"), np.uint8)
        if self.remote:  # one PUT of the whole shard: atomic, so no reader ever sees part of it
            from semroute.shared.remote import write_bytes

            write_bytes(self.meta.shard_path(shard), buf.data)
            return
        path = self.meta.shard_path(shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed run; this shard is ours
            stale.unlink(missing_ok=True)
        write_atomic(path, buf.data)


NOT_COMPLETED = "shard not completed"


def merge_ranges(ranges: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """``[begin, end)`` byte ranges sorted and merged where they overlap or lie less than ``gap`` bytes apart."""
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def verify_array(root: str | Path, name: str, done: np.ndarray | None = None,
                 expect: tuple | None = None) -> tuple[int, list[tuple[str, str]]]:
    """Check a sharded array (local or remote) shard by shard: its index's and every inner chunk's crc32c.

    Returns ``(chunks checked, problems)``; a problem is ``(shard file, what is wrong)``, at most one per
    shard. A shard whose done flag in ``done`` is unset is not read: its problem is ``NOT_COMPLETED``.
    Raises (``CacheDamaged``, ``SemrouteError``) only when the array's own metadata is missing, not
    an array semroute writes, or (``expect``: ``check_geometry``'s arguments) not what the attributes say."""
    reader = ShardedArrayFile(root, name)
    if expect is not None:
        reader.meta.check_geometry(*expect)
    layout = reader.meta.layout
    problems: list[tuple[str, str]] = []
    checked = 0
    try:
        for shard in range(layout.n_shards):
            where = str(reader.shard_path(shard))
            if done is not None and shard < len(done) and not done[shard]:
                problems.append((where, NOT_COMPLETED))
                continue
            a, b = layout.shard_rows(shard)
            try:
                reader._shard_index(shard)
                for chunk in range(a // reader.rows_per_chunk, math.ceil(b / reader.rows_per_chunk)):
                    reader.read_chunk(chunk)
                    checked += 1
            except SemrouteError as err:  # the message without its file (given apart) and `verify` hint
                problems.append((where, str(err).split("; run `semroute verify")[0].removeprefix(f"{where}: ")))
            except Exception as err:  # noqa: BLE001 - e.g. an index pointing past the end of the file
                problems.append((where, f"unreadable ({type(err).__name__}: {err})"))
    finally:
        reader.close()
    return checked, problems
