"""Object storage (``s3://`` and any other fsspec URL): options, retries, clear errors, a node-local shard cache.

- Options: credentials and endpoint come from the standard AWS environment variables (``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_PROFILE`` ...), which s3fs/botocore read, plus
  ``--storage-options`` JSON (e.g. ``{"endpoint_url": ..., "key": ..., "secret": ...}``).
  :func:`set_storage_options` also puts them in the environment so DataLoader workers and
  ``accelerate`` processes see the same ones.
- Retries: transient failures (connection reset or refused, timeouts, HTTP 500/503 "SlowDown") are
  retried here with exponential backoff and counted in :data:`STATS` (shown in progress lines); the
  client's own retries are turned off so each one is counted once. Permanent failures become a
  :class:`~semroute.shared.errors.SemrouteError` naming the URL and what to do.
- :class:`ShardCache`: a size-bounded folder of whole shard files on local disk (``--cache-dir``);
  reads fall back to ranged requests while a shard is being downloaded in the background.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from semroute.shared.errors import SemrouteError

ENV_OPTIONS = "SEMROUTE_STORAGE_OPTIONS"
MAX_TRIES = 6
BACKOFF_S = 0.2
BACKOFF_MAX_S = 5.0


def is_url(location) -> bool:
    return "://" in str(location)


def set_storage_options(options: dict | None) -> None:
    """Options for every fsspec filesystem this process (and its children) opens."""
    if options:
        os.environ[ENV_OPTIONS] = json.dumps(options)
    else:
        os.environ.pop(ENV_OPTIONS, None)


def storage_options(protocol: str | None = None) -> dict:
    raw = os.environ.get(ENV_OPTIONS)
    options = json.loads(raw) if raw else {}
    if protocol in ("s3", "s3a"):
        # One attempt per call inside the client: our loop retries, so retries are counted and bounded.
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
        config.setdefault("connect_timeout", 5)
        config.setdefault("read_timeout", 60)
        # A batch read sends its ranged GETs together (read_ranges); botocore's default pool holds 10 connections.
        config.setdefault("max_pool_connections", 64)
        options = {**options, "config_kwargs": config}
    return options


def filesystem(url: str):
    """``(fs, path)`` for a URL, with the configured options."""
    import fsspec

    protocol = url.split("://", 1)[0]
    fs, path = fsspec.core.url_to_fs(url, **storage_options(protocol))
    if hasattr(fs, "retries"):
        fs.retries = 1  # s3fs's own retry loop (see storage_options)
    return fs, path


class Stats:
    """Counters of remote requests. ``retries`` lives in shared memory, so retries made in forked
    DataLoader workers show in the training process's progress line."""

    def __init__(self):
        import multiprocessing

        self._retries = multiprocessing.RawValue("q", 0)
        self.requests = 0
        self.bytes = 0

    @property
    def retries(self) -> int:
        return int(self._retries.value)

    def add_retry(self) -> None:
        self._retries.value += 1  # a lost update under a race only undercounts a progress-line number


STATS = Stats()


def _transient(err: BaseException) -> bool:
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(err, (TimeoutError, ConnectionError)):
        return True
    if isinstance(err, OSError) and err.errno in (errno.EBUSY, errno.EREMOTEIO, errno.ECONNRESET, errno.ETIMEDOUT,
                                                  errno.EAGAIN, errno.ECONNREFUSED, errno.ECONNABORTED):
        return True
    name = type(err).__module__ + "." + type(err).__name__
    # botocore's ConnectionError family (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError ...),
    # its HTTPClientError, aiohttp's client errors: network trouble, worth another try.
    if name.startswith(("botocore.exceptions.", "aiohttp.", "urllib3.exceptions.")):
        return any(k in type(err).__name__ for k in ("Connection", "Timeout", "HTTPClient", "Payload", "Disconnected",
                                                     "IncompleteRead", "ProtocolError"))
    text = str(err)
    return any(k in text for k in ("SlowDown", "ServiceUnavailable", "503", "Connection reset", "InternalError"))


def _bucket_missing(url: str) -> bool:
    try:
        fs, _ = filesystem(url)
        return not fs.exists(url.split("://", 1)[-1].split("/", 1)[0])
    except Exception:  # noqa: BLE001 - only refines a message
        return False


def describe_failure(url: str, err: BaseException, tries: int = 1, missing: str | None = None) -> SemrouteError:
    """A permanent storage failure as a message naming the URL and the fix (``missing``: the message for a
    missing object, when the caller knows better than 'deleted while this job ran')."""
    text = str(err) or type(err).__name__
    bucket = url.split("://", 1)[-1].split("/", 1)[0]
    if isinstance(err, PermissionError) or "AccessDenied" in text or "Forbidden" in text or "InvalidAccessKeyId" in text:
        return SemrouteError(f"{url}: access denied ({text}). Check the credentials (AWS_ACCESS_KEY_ID / "
                             "AWS_SECRET_ACCESS_KEY / AWS_PROFILE, or key/secret in --storage-options) and that they "
                             f"may read and write bucket {bucket!r}.")
    if isinstance(err, FileNotFoundError) and ("bucket does not exist" in text.lower() or _bucket_missing(url)):
        return SemrouteError(f"{url}: the bucket {bucket!r} does not exist. Check the URL and the endpoint, or "
                             "create the bucket first.")
    if isinstance(err, FileNotFoundError) and missing:
        return SemrouteError(missing)
    if isinstance(err, FileNotFoundError):
        return SemrouteError(f"{url} does not exist (was it deleted while this job ran?). Run `semroute verify` on "
                             "the cache; an encoding run repairs missing shards with --resume.")
    if _transient(err):
        return SemrouteError(f"cannot reach the object store for {url} after {tries} tries ({type(err).__name__}: "
                             f"{text}). Check the endpoint (AWS_ENDPOINT_URL or endpoint_url in --storage-options) "
                             "and the network, then run again (finished shards are kept).")
    return SemrouteError(f"{url}: {type(err).__name__}: {text}")


def call(url: str, fn, *args, tries: int = MAX_TRIES, missing: str | None = None, **kwargs):
    """``fn(*args, **kwargs)`` with transient failures retried (exponential backoff with jitter); other
    failures raised as :func:`describe_failure` messages."""
    for attempt in range(1, tries + 1):
        try:
            out = fn(*args, **kwargs)
            STATS.requests += 1
            return out
        except SemrouteError:
            raise
        except Exception as err:  # noqa: BLE001 - classified below
            if not _transient(err) or attempt == tries:
                raise describe_failure(url, err, attempt, missing) from err
            STATS.add_retry()
            time.sleep(min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (attempt - 1)) * (0.5 + random.random()))
    raise AssertionError("unreachable")


class RemoteFile:
    """One object: its size and ranged reads, each retried as above."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.path = filesystem(url)
        self._info: dict | None = None

    def info(self) -> dict:
        if self._info is None:
            self._info = call(self.url, self.fs.info, self.path)
        return self._info

    @property
    def size(self) -> int:
        return int(self.info()["size"])

    @property
    def etag(self) -> str:
        info = self.info()
        return str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or "")

    def read(self, start: int, end: int | None) -> bytes:
        """Bytes ``start:end`` (``start < 0``, ``end`` None: the last ``-start`` bytes, however long the object)."""
        return self._checked(call(self.url, self.fs.cat_file, self.path, start=start, end=end), start, end)

    def _checked(self, data: bytes, start: int, end: int | None) -> bytes:
        if end is not None and len(data) != end - start:
            raise SemrouteError(f"{self.url}: asked for bytes {start}..{end}, got {len(data)} (the object changed "
                                "while this job ran?); run `semroute verify` on the cache")
        STATS.bytes += len(data)
        return data

    def download(self, local: Path) -> None:
        call(self.url, self.fs.get_file, self.path, str(local))


def read_ranges(files: list[RemoteFile], starts: list[int], ends: list[int | None]) -> list[bytes]:
    """``files[j].read(starts[j], ends[j])`` for every ``j``, the requests sent together.

    fsspec's ``cat_ranges`` on one filesystem: s3fs (async) issues every ranged GET at once from its event
    loop, which is what makes a training batch's reads cost about one request's latency instead of one per
    caption; other filesystems read them in turn. A range that fails transiently is retried alone as
    :meth:`RemoteFile.read` is (counted in :data:`STATS`); any other failure raises its
    :func:`describe_failure` message.
    """
    out: list = [None] * len(files)
    groups: dict[int, list[int]] = {}
    for j, f in enumerate(files):
        groups.setdefault(id(f.fs), []).append(j)
    for js in groups.values():
        fs = files[js[0]].fs
        try:
            got = fs.cat_ranges([files[j].path for j in js], [starts[j] for j in js], [ends[j] for j in js],
                                on_error="return")
        except Exception as err:  # noqa: BLE001 - the call as a whole failed: every range is retried below
            got = [err] * len(js)
        for j, data in zip(js, got):
            f = files[j]
            if isinstance(data, BaseException):
                if not _transient(data):
                    raise describe_failure(f.url, data) from data
                STATS.add_retry()
                data = call(f.url, f.fs.cat_file, f.path, start=starts[j], end=ends[j], tries=MAX_TRIES - 1)
            else:
                STATS.requests += 1
            out[j] = f._checked(data, starts[j], ends[j])
    return out


def write_bytes(url: str, data) -> None:
    """Upload one whole object. A PUT is atomic: readers see the whole object or none."""
    fs, path = filesystem(url)
    call(url, fs.pipe_file, path, bytes(data))


class ShardCache:
    """Whole shard files kept on local disk, at most ``max_bytes`` in total (least recently used go first).

    Shared by every process on the node: files are written to a temporary name and renamed, so a
    reader never sees half a file; keys include the object's ETag, so a re-encoded cache at the same
    URL never reads stale shards. Checksums are verified on every read as for local caches.
    """

    def __init__(self, folder: str | os.PathLike, max_bytes: int, *, threads: int = 2):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._threads = threads
        self.errors: list[str] = []

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_pending=set(), _lock=None, _pool=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def local_path(self, remote: RemoteFile) -> Path:
        key = hashlib.sha256(f"{remote.url}\n{remote.etag}".encode()).hexdigest()[:32]
        return self.folder / key[:2] / f"{key}.shard"

    def get(self, remote: RemoteFile) -> Path | None:
        """The local copy if present (else None, and a background download is started)."""
        path = self.local_path(remote)
        if path.exists():
            return path
        with self._lock:
            if str(path) in self._pending:
                return None
            self._pending.add(str(path))
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="shard-cache")
        self._pool.submit(self._download, remote, path)
        return None

    def _download(self, remote: RemoteFile, path: Path) -> None:
        try:
            if remote.size > self.max_bytes:
                return
            self.make_room(remote.size)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            remote.download(tmp)
            if tmp.stat().st_size != remote.size:
                tmp.unlink(missing_ok=True)
                return
            os.replace(tmp, path)
        except Exception as err:  # noqa: BLE001 - a failed download only means reads stay remote
            self.errors.append(f"{remote.url}: {err}")
        finally:
            with self._lock:
                self._pending.discard(str(path))

    def files(self) -> list[Path]:
        return [p for p in self.folder.glob("*/*.shard")]

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.files())

    def make_room(self, incoming: int) -> None:
        files = []
        for p in self.files():
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(s for _, s, _ in files)
        for _, size, p in sorted(files):
            if total + incoming <= self.max_bytes:
                break
            p.unlink(missing_ok=True)  # readers holding it open keep reading (POSIX)
            total -= size

    def wait(self) -> None:
        """Block until queued downloads are done (benchmarks and tests)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def parse_size(text: str) -> int:
    """``20G``, ``512M``, ``1.5T``, ``1000000`` -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = str(text).strip().lower().removesuffix("ib").removesuffix("b")
    try:
        return int(float(s[:-1]) * units[s[-1]]) if s and s[-1] in units else int(s)
    except (ValueError, KeyError):
        raise SemrouteError(f"size {text!r} is not a size like 20G, 512M or 1000000") from None
