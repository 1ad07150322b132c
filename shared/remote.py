"""Object storage (``s3://`` and any other fsspec URL): options, retries, clear errors, a node-local shard cache.

- Clients: reads of ``s3://`` objects (:class:`RemoteFile`, :func:`read_ranges`: what a training batch costs)
  go through ``obstore`` (Rust; a ranged GET costs a fraction of the CPU of s3fs/aiobotocore's, see
  bench/RESULTS.md); writes, listings, zarr metadata and every other protocol go through fsspec/s3fs.
  ``SEMROUTE_S3_CLIENT=s3fs`` reads through s3fs instead (benchmarks compare the two); so does a storage
  option obstore has no equivalent for, and a process forked after this one used obstore (its runtime's
  threads do not survive a fork: reads there would hang).
- Options: credentials and endpoint come from the standard AWS environment variables (``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_PROFILE`` ...),
  which both clients read, plus ``--storage-options`` JSON in s3fs's terms (e.g. ``{"endpoint_url": ...,
  "key": ..., "secret": ...}``), mapped to obstore's by :func:`obstore_config`.
  :func:`set_storage_options` also puts them in the environment so DataLoader workers and
  ``accelerate`` processes see the same ones.
- Retries: transient failures (connection reset or refused, timeouts, HTTP 500/503 "SlowDown") are
  retried here with exponential backoff and counted in :data:`STATS` (shown in progress lines); the
  client's own retries are turned off so each one is counted once. Permanent failures become a
  :class:`~semroute.shared.errors.SemrouteError` naming the URL and what to do.
- Objects replaced under a reader: a :class:`RemoteFile` pins the ETag its first request saw, and its later
  reads and downloads are If-Match it; a 412 is a :func:`changed` error naming the URL.
- :class:`ShardCache`: a size-bounded folder of whole shard files on local disk (``--cache-dir``);
  reads fall back to ranged requests while a shard is being downloaded in the background.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import math
import os
import random
import re
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

from semroute.shared.errors import SemrouteError

ENV_OPTIONS = "SEMROUTE_STORAGE_OPTIONS"
ENV_CLIENT = "SEMROUTE_S3_CLIENT"  # obstore (default) or s3fs: which client reads s3:// objects
MAX_TRIES = 6
BACKOFF_S = 0.2
BACKOFF_MAX_S = 5.0


# URL schemes of object storage and servers, as fsspec names them: a local path that starts with one and a colon but
# not "://" (``s3:/bkt/x``) is a mistyped URL (see is_url).
URL_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "oci", "hf", "http", "https", "ftp",
               "sftp", "ssh", "hdfs", "webhdfs", "file")
_SCHEME_NO_SLASHES = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(?!//)")


def is_url(location) -> bool:
    """Whether ``location`` is a URL (``s3://bkt/x``) rather than a local path. Every location that may be a URL
    (DATA, caches) is asked here, so a local path that starts like a URL with a slash missing (``s3:/bkt/x.zarr``,
    ``gs:bkt``) is refused: it would read or write a local folder named ``s3:`` without a word."""
    text = str(location)
    if "://" in text:
        return True
    if (m := _SCHEME_NO_SLASHES.match(text)) and m.group(1).lower() in URL_SCHEMES:
        scheme, rest = m.group(1), text[m.end():].lstrip("/")
        raise SemrouteError(f"{text}: not a URL ({scheme}: needs two slashes), and as a local path it names a folder "
                            f"'{text.split('/')[0]}' here; write {scheme}://{rest} (or ./{text} for such a local path)")
    return False


def set_storage_options(options: dict | None) -> None:
    """Options for every fsspec filesystem this process (and its children) opens."""
    if options:
        os.environ[ENV_OPTIONS] = json.dumps(options)
    else:
        os.environ.pop(ENV_OPTIONS, None)


def storage_options(protocol: str | None = None, options: dict | None = None) -> dict:
    """``options`` (default: those :func:`set_storage_options` set) with this module's client settings."""
    if options is None:
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


def filesystem(url: str, options: dict | None = None):
    """``(fs, path)`` for a URL, with ``options`` (default: the configured ones) and the client settings."""
    import fsspec

    if unknown := unknown_protocol(url):
        raise unknown
    protocol = url.split("://", 1)[0]
    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options(protocol, options))
    except OSError as err:  # a client that connects when made (ftp, sftp): refused, unreachable, timed out
        raise SemrouteError(f"{url}: cannot connect ({type(err).__name__}: {err}); check the address and that the "
                            "server runs") from None
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


def transient(err: BaseException) -> bool:
    """Whether ``err`` is worth another try (network trouble, an overloaded server)."""
    if isinstance(err, FileNotFoundError) and err.__cause__ is not None and transient(err.__cause__):
        return True  # fsspec's HTTP filesystem raises a refused connection as a missing file (its ``_info``)
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if _object_changed(err):
        return False
    if isinstance(err, (TimeoutError, ConnectionError)):
        return True
    if isinstance(err, OSError) and err.errno in (errno.EBUSY, errno.EREMOTEIO, errno.ECONNRESET, errno.ETIMEDOUT,
                                                  errno.EAGAIN, errno.ECONNREFUSED, errno.ECONNABORTED):
        return True
    name = type(err).__module__ + "." + type(err).__name__
    if name.startswith("obstore."):
        # obstore's GenericError carries the HTTP status, or an "HTTP error" (connect, timeout, a body cut off).
        status = _status(err)
        if status is not None:
            return status >= 500 or status in (408, 429)
        head = _brief(err).lower()
        return "http error" in head or "timed out" in head or "connection" in head
    # botocore's ConnectionError family (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError ...),
    # its HTTPClientError, aiohttp's client errors: network trouble, worth another try.
    if name.startswith(("botocore.exceptions.", "aiohttp.", "urllib3.exceptions.")):
        return any(k in type(err).__name__ for k in ("Connection", "Timeout", "HTTPClient", "Payload", "Disconnected",
                                                     "IncompleteRead", "ProtocolError"))
    text = str(err)
    return any(k in text for k in ("SlowDown", "ServiceUnavailable", "503", "Connection reset", "InternalError"))


def _brief(err: BaseException) -> str:
    """The error's message; for obstore's, on one line, without its debug dump of the request and with the
    server's XML error body reduced to its code and message."""
    text = str(err)
    if type(err).__module__.startswith("obstore"):
        text = text.split("\n\nDebug source:", 1)[0]
        body = re.search(r"(<\?xml[^>]*>\s*)?<Error>.*?</Error>", text, re.S)
        if body:
            code, message = (re.search(f"<{t}>(.*?)</{t}>", body.group(0), re.S) for t in ("Code", "Message"))
            text = text[:body.start()] + " ".join(m.group(1) for m in (code, message) if m) + text[body.end():]
        text = " ".join(text.split())
    return text.strip() or type(err).__name__


def _status(err: BaseException) -> int | None:
    """The HTTP status an obstore error reports, if any."""
    m = re.search(r"status code: (\d{3})", _brief(err))
    return int(m.group(1)) if m else None


# Protocols whose URLs start with a bucket (or container), which may not exist.
BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss", "oci")


def _bucket_missing(url: str) -> bool:
    try:
        fs, _ = filesystem(url)
        return not fs.exists(url.split("://", 1)[-1].split("/", 1)[0])
    except Exception:  # noqa: BLE001 - only refines a message
        return False


def _object_changed(err: BaseException) -> bool:
    """Whether ``err`` is an HTTP 412 Precondition Failed answering a read's If-Match (:attr:`RemoteFile.pinned`):
    obstore's ``PreconditionError``, or botocore's ``PreconditionFailed`` (s3fs raises it as an ``OSError``
    caused by it; an If-None-Match write's becomes a ``FileExistsError``)."""
    if type(err).__name__ == "PreconditionError" and type(err).__module__.startswith("obstore"):
        return True
    if isinstance(err, FileExistsError):
        return False
    response = getattr(err.__cause__ if isinstance(err, OSError) else err, "response", None)
    return isinstance(response, dict) and (response.get("Error") or {}).get("Code") == "PreconditionFailed"


def changed(url: str) -> SemrouteError:
    """The error for an object whose pinned ETag (:attr:`RemoteFile.pinned`) no longer holds."""
    return SemrouteError(f"{url} changed while this job ran: the object was replaced after this job first read it "
                         "(a re-encode, or an append, into the cache being read), and reading on would mix the two "
                         "versions. Let the writer finish, then run again (a training resumes from its last "
                         "checkpoint with --resume latest).")


def describe_failure(url: str, err: BaseException, tries: int = 1, missing: str | None = None) -> SemrouteError:
    """A permanent storage failure as a message naming the URL and the fix (``missing``: the message for a
    missing object, when the caller knows better than 'deleted while this job ran')."""
    if _object_changed(err):
        return changed(url)
    if isinstance(err, ValueError) and "://" in str(url) and (unknown := unknown_protocol(url)):
        return unknown
    if isinstance(err, FileNotFoundError) and transient(err):
        err = err.__cause__  # the connection failure it stands for
    text = _brief(err)
    bucket = url.split("://", 1)[-1].split("/", 1)[0]
    protocol = url.split("://", 1)[0] if "://" in url else ""
    s3 = protocol in ("s3", "s3a")
    if type(err).__name__ == "NoCredentialsError":  # botocore's: no key in --storage-options, environment or profile
        return SemrouteError(f"{url}: no credentials for the object store ({text}). Set AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or give key and secret in --storage-options; "
                             'for a public bucket pass --storage-options \'{"anon": true}\'.')
    denied = isinstance(err, PermissionError) or type(err).__name__ in ("PermissionDeniedError", "UnauthenticatedError")
    if denied or "AccessDenied" in text or "Forbidden" in text or "InvalidAccessKeyId" in text:
        return SemrouteError(f"{url}: access denied ({text}). Check the credentials (AWS_ACCESS_KEY_ID / "
                             "AWS_SECRET_ACCESS_KEY / AWS_PROFILE, or key/secret in --storage-options) and that they "
                             f"may read and write bucket {bucket!r}.")
    if isinstance(err, FileNotFoundError) and protocol in BUCKET_PROTOCOLS and (
            "bucket does not exist" in text.lower() or "NoSuchBucket" in text or _bucket_missing(url)):
        return SemrouteError(f"{url}: the bucket {bucket!r} does not exist. Check the URL and the endpoint, or "
                             "create the bucket first.")
    if isinstance(err, FileNotFoundError) and missing:
        return SemrouteError(missing)
    if isinstance(err, FileNotFoundError):
        return SemrouteError(f"{url} does not exist (was it deleted while this job ran?). Run `semroute verify` on "
                             "the cache; an encoding run repairs missing shards with --resume.")
    if transient(err):
        check = ("the endpoint (AWS_ENDPOINT_URL or endpoint_url in --storage-options)" if s3 else
                 "the address, that the server runs")
        return SemrouteError(f"cannot reach the {'object store' if s3 else 'server'} for {url} after {tries} tries "
                             f"({type(err).__name__}: {text}). Check {check} and the network, then run again (an "
                             "encode keeps its finished shards; a training resumes from its last checkpoint with "
                             "--resume latest).")
    return SemrouteError(f"{url}: {type(err).__name__}: {text}")


def unknown_protocol(url: str) -> SemrouteError | None:
    """The error for a URL whose protocol no installed fsspec filesystem reads (a typo, mostly), else None."""
    import fsspec

    protocol = str(url).split("://", 1)[0]
    if protocol in fsspec.available_protocols():
        return None
    return SemrouteError(f"{url}: unknown protocol {protocol!r}; caches and data are read from local paths, s3:// "
                         "URLs and the other fsspec protocols")


def call(url: str, fn, *args, tries: int = MAX_TRIES, missing: str | None = None, tried: int = 0, **kwargs):
    """``fn(*args, **kwargs)`` with transient failures retried (exponential backoff with jitter); other
    failures raised as :func:`describe_failure` messages (``tried``: attempts made before this call, counted
    in the message)."""
    for attempt in range(1, tries + 1):
        try:
            out = fn(*args, **kwargs)
            STATS.requests += 1
            return out
        except SemrouteError:
            raise
        except Exception as err:  # noqa: BLE001 - classified below
            if not transient(err) or attempt == tries:
                raise describe_failure(url, err, tried + attempt, missing) from err
            STATS.add_retry()
            _backoff(tried + attempt)
    raise AssertionError("unreachable")


def _backoff(attempt: int) -> None:
    """Sleep before try ``attempt + 1``: exponential, with jitter."""
    time.sleep(min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (attempt - 1)) * (0.5 + random.random()))


# -- reads of s3:// objects through obstore -------------------------------------------------------------
# s3fs options that only tune s3fs itself (caching, listing, uploads, botocore's pool and retries): nothing a
# read through obstore needs. Any other option obstore has no equivalent for sends reads through s3fs.
_S3FS_ONLY = {"config_kwargs", "default_block_size", "default_fill_cache", "default_cache_type", "cache_regions",
              "skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths", "max_concurrency",
              "fixed_upload_size", "use_ssl", "asynchronous", "loop", "session", "version_aware"}
_AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT",
            "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE", "AWS_ALLOW_HTTP")


def obstore_config(options: dict) -> dict | None:
    """``obstore.store.S3Store`` keyword arguments for s3fs-style storage options (the environment's AWS
    variables fill in the rest, read by obstore itself), or None when an option has no obstore equivalent.

    Mapped: ``endpoint_url`` (also in ``client_kwargs``; an ``http://`` endpoint allows plain HTTP), ``key``,
    ``secret``, ``token``, ``client_kwargs.region_name``, ``anon``, ``requester_pays``, ``profile`` (and
    ``AWS_PROFILE`` or a shared credentials file when no key is given: botocore's credential chain),
    ``client_kwargs.verify`` (False, or a CA bundle's path) and ``config_kwargs.s3.addressing_style``.
    """
    options = dict(options)
    client_kwargs = dict(options.pop("client_kwargs", None) or {})
    config: dict = {}
    endpoint = options.pop("endpoint_url", None) or client_kwargs.pop("endpoint_url", None)
    region = client_kwargs.pop("region_name", None)
    verify = client_kwargs.pop("verify", None)
    if client_kwargs:
        return None
    for ours, theirs in (("key", "access_key_id"), ("secret", "secret_access_key"), ("token", "session_token")):
        if options.get(ours):
            config[theirs] = options.pop(ours)
        options.pop(ours, None)
    if endpoint:
        config["endpoint"] = endpoint
    if region:
        config["region"] = region
    if options.pop("anon", False):
        config["skip_signature"] = True
    if options.pop("requester_pays", False):
        config["request_payer"] = True
    style = ((options.get("config_kwargs") or {}).get("s3") or {}).get("addressing_style")
    if style == "virtual":
        config["virtual_hosted_style_request"] = True
    profile = options.pop("profile", None)
    if any(k not in _S3FS_ONLY for k in options):
        return None
    endpoint = config.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT") or ""
    client = {"connect_timeout": timedelta(seconds=5), "read_timeout": timedelta(seconds=60),
              # A whole request, a shard downloaded for the shard cache included (the default is 30 s).
              "timeout": timedelta(minutes=30), "allow_http": endpoint.startswith("http://")}
    if verify is False:
        client["allow_invalid_certificates"] = True
    elif isinstance(verify, str):
        client["root_certificate"] = Path(verify).read_text()
    out = {"config": config, "client_options": client,
           # One attempt per call inside the client: our loop (`call`) retries, so each retry is counted.
           "retry_config": {"max_retries": 0}}
    keyed = "access_key_id" in config or os.environ.get("AWS_ACCESS_KEY_ID")
    if not keyed and not config.get("skip_signature") and (profile or _shared_credentials()):
        out["credential_provider"] = _BotocoreCredentials(profile)
    return out


def _shared_credentials() -> bool:
    """Whether botocore would find a profile (``AWS_PROFILE`` or the shared credentials/config files)."""
    if os.environ.get("AWS_PROFILE"):
        return True
    files = (os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
             os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"))
    return any(os.path.isfile(os.path.expanduser(f)) and os.path.getsize(os.path.expanduser(f)) > 0 for f in files)


class _BotocoreCredentials:
    """obstore credentials from botocore's chain (profiles, SSO, assumed roles: what s3fs would use), for
    when no key is given; obstore reads only the environment's keys and instance/container metadata."""

    def __init__(self, profile: str | None):
        import botocore.session

        self.credentials = botocore.session.Session(profile=profile).get_credentials()

    def __call__(self) -> dict:
        if self.credentials is None:
            raise PermissionError("no AWS credentials found (environment, profile or shared credentials file)")
        frozen = self.credentials.get_frozen_credentials()
        # Refreshable ones (SSO, assumed roles) are asked again every few minutes; static ones are kept.
        refreshable = hasattr(self.credentials, "refresh_needed")
        return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key, "token": frozen.token,
                "expires_at": datetime.now(timezone.utc) + timedelta(minutes=5) if refreshable else None}


class _Obstore:
    """This process's ``S3Store`` per (bucket, options, AWS environment), made on first use, and an event loop
    (its own thread) on which a batch's requests are awaited together.

    obstore's runtime does not survive a fork once it has made a request (the child hangs on its first
    one), so a process forked after that reads through s3fs (:meth:`usable`)."""

    def __init__(self):
        self.stores: dict = {}
        self.lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.used = False  # a request was made in this process (or, inherited, in the one forked from)
        self.forked_after_use = False
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        self.stores, self.lock, self.loop = {}, threading.Lock(), None
        self.forked_after_use = self.forked_after_use or self.used

    def usable(self) -> bool:
        if self.forked_after_use or os.environ.get(ENV_CLIENT, "obstore") == "s3fs":
            return False
        try:
            import obstore  # noqa: F401
        except ImportError:
            return False
        return True

    def store(self, bucket: str):
        """The bucket's store, or None when reads of it go through s3fs."""
        if not self.usable():
            return None
        key = (bucket, os.environ.get(ENV_OPTIONS), tuple(os.environ.get(k) for k in _AWS_ENV))
        with self.lock:
            if key not in self.stores:
                kwargs = obstore_config(storage_options("s3"))
                if kwargs is None:
                    self.stores[key] = None
                else:
                    from obstore.store import S3Store

                    self.stores[key] = S3Store(bucket, **kwargs)
            return self.stores[key]

    def run(self, coro):
        """Await ``coro`` on this process's loop thread (the caller may be in a thread with its own loop)."""
        with self.lock:
            if self.loop is None:
                self.loop = asyncio.new_event_loop()
                threading.Thread(target=self.loop.run_forever, daemon=True, name="semroute-obstore").start()
            loop = self.loop
        return asyncio.run_coroutine_threadsafe(coro, loop).result()


OBSTORE = _Obstore()


class RemoteFile:
    """One object: its size and ranged reads, each retried as above (through obstore for ``s3://``, else fsspec)."""

    def __init__(self, url: str):
        self.url = url
        self._info: dict | None = None
        self._fs = None
        protocol, _, rest = url.partition("://")
        self.bucket, _, self.key = rest.partition("/")
        self._s3 = protocol in ("s3", "s3a")

    @property
    def store(self):
        """The obstore ``S3Store`` reading this object, or None (read through fsspec)."""
        return OBSTORE.store(self.bucket) if self._s3 else None

    @property
    def client(self) -> str:
        return "obstore" if self.store is not None else "fsspec"

    @property
    def fs(self):
        if self._fs is None:
            self._fs, self._path = filesystem(self.url)
        return self._fs

    @property
    def path(self) -> str:
        self.fs
        return self._path

    def info(self) -> dict:
        if self._info is None:
            store = self.store
            if store is None:
                self._info = call(self.url, self.fs.info, self.path)
            else:
                import obstore

                OBSTORE.used = True
                meta = call(self.url, obstore.head, store, self.key)
                self._info = {"size": meta["size"], "ETag": meta["e_tag"], "LastModified": meta["last_modified"]}
        return self._info

    @property
    def size(self) -> int:
        return int(self.info()["size"])

    @property
    def etag(self) -> str:
        info = self.info()
        return str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or "")

    @property
    def pinned(self) -> str | None:
        """The ETag that later GETs of an ``s3://`` object require (If-Match; a 412 is :func:`changed`): the one
        its first HEAD or GET through this object saw. A reader keeps what it learnt from the object (a shard's
        index) and reads the rest later; were the object replaced in between, those reads would pair the old
        index with the new bytes, every chunk's crc32c passing when the layout is the same."""
        if not self._s3 or self._info is None:
            return None
        return self._info.get("ETag") or None

    def _saw(self, etag: str | None, size: int | None, last_modified) -> None:
        """Record what the first answer to a GET says of the object (as :meth:`info` would): its ETag is pinned."""
        if self._info is None:
            self._info = {"size": size, "ETag": etag, "LastModified": last_modified}

    def _saw_meta(self, meta: dict) -> None:
        """:meth:`_saw` for an obstore ``GetResult.meta``."""
        self._saw(meta["e_tag"], meta["size"], meta["last_modified"])

    def read(self, start: int, end: int | None) -> bytes:
        """Bytes ``start:end`` (``start < 0``, ``end`` None: the last ``-start`` bytes, however long the object)."""
        return self._checked(call(self.url, self._read_once, start, end), start, end)

    def _read_once(self, start: int, end: int | None) -> bytes:
        store = self.store
        if store is None:
            if self._s3:
                from fsspec.asyn import sync

                return sync(self.fs.loop, self._read_s3fs, start, end)
            return self.fs.cat_file(self.path, start=start, end=end)
        import obstore

        OBSTORE.used = True
        if end is not None and end <= start:
            return b""
        try:
            result = obstore.get(store, self.key, options=self._get_options(start, end))
            if self._info is None:
                self._saw_meta(result.meta)
            return bytes(result.bytes())
        except Exception as err:  # noqa: BLE001 - one case is a short read, the rest go to `call`
            return _past_the_end(err)

    def _get_options(self, start: int | None, end: int | None) -> dict:
        """obstore's GetOptions: the range (``start`` None: the whole object), If-Match the pinned ETag."""
        options: dict = {} if start is None else {"range": _open_range(start) if end is None else (start, end)}
        if pinned := self.pinned:
            options["if_match"] = pinned
        return options

    async def _read_async(self, store, start: int, end: int | None):
        """The bytes as obstore returns them (``obstore.Bytes``: a buffer, sliceable, not copied into a Python
        ``bytes``: at the `paper` preset's caption size that copy into fresh memory was most of the client's
        CPU, bench/RESULTS.md "Reads of paper-sized captions").

        Every GET is a ``get_async`` If-Match the pinned ETag (``get_range_async`` takes no conditions): ~0.1 ms
        more client CPU a request than ``get_range_async`` (``bench/bench_data.py --only requests``)."""
        import obstore

        if end is not None and end <= start:
            return b""
        try:
            result = await obstore.get_async(store, self.key, options=self._get_options(start, end))
            if self._info is None:
                self._saw_meta(result.meta)
            return await result.bytes_async()
        except Exception as err:  # noqa: BLE001 - as in _read_once
            return _past_the_end(err)

    async def _get_s3fs(self, start: int | None, end: int | None) -> dict:
        """s3fs's GetObject of bytes ``start:end`` (``start`` None: the whole object), If-Match the pinned ETag
        (s3fs's ``cat_file`` and ``get_file`` take no conditions), its answer recorded as :meth:`_saw` does."""
        kw = {}
        if start is not None:
            kw["Range"] = f"bytes={start}" if start < 0 else f"bytes={start}-" + ("" if end is None else str(end - 1))
        if pinned := self.pinned:
            kw["IfMatch"] = pinned
        bucket, key, _ = self.fs.split_path(self.path)
        resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key, **kw)
        total = (resp.get("ContentRange") or "").rpartition("/")[2]  # bytes A-B/TOTAL
        self._saw(resp.get("ETag"), int(total) if total.isdigit() else resp.get("ContentLength"),
                  resp.get("LastModified"))
        return resp

    async def _read_s3fs(self, start: int, end: int | None) -> bytes:
        if end is not None and end <= start:
            return b""
        resp = await self._get_s3fs(start, end)
        try:
            return await resp["Body"].read()
        finally:
            resp["Body"].close()

    def _checked(self, data: bytes, start: int, end: int | None) -> bytes:
        if end is not None and len(data) != end - start:
            raise SemrouteError(f"{self.url}: asked for bytes {start}..{end}, got {len(data)} (the object changed "
                                "while this job ran?); run `semroute verify` on the cache")
        STATS.bytes += len(data)
        return data

    def download(self, local: Path) -> None:
        """The whole object into ``local``, If-Match the pinned ETag (a shard cache keys its copies by it)."""
        store = self.store
        if store is None and not self._s3:
            call(self.url, self.fs.get_file, self.path, str(local))
            return
        if store is None:
            from fsspec.asyn import sync

            async def fetch_s3fs():
                resp = await self._get_s3fs(None, None)
                try:
                    with open(local, "wb") as fh:  # a retry starts the file again
                        while piece := await resp["Body"].read(8 << 20):
                            fh.write(piece)
                finally:
                    resp["Body"].close()

            call(self.url, sync, self.fs.loop, fetch_s3fs)
            return
        import obstore

        def fetch():
            result = obstore.get(store, self.key, options=self._get_options(None, None))
            if self._info is None:
                self._saw_meta(result.meta)
            with open(local, "wb") as fh:  # a retry starts the file again
                for piece in result.stream(min_chunk_size=8 << 20):
                    fh.write(piece)

        OBSTORE.used = True
        call(self.url, fetch)


def _open_range(start: int) -> dict:
    """obstore's range for ``start:`` (``start >= 0``) or the last ``-start`` bytes (``start < 0``)."""
    return {"suffix": -start} if start < 0 else {"offset": start}


def _past_the_end(err: BaseException) -> bytes:
    """A range starting past the object's end (HTTP 416) reads as no bytes, which ``_checked`` reports as a
    short read (the object shrank under the job); any other error is raised for ``call`` to judge."""
    if type(err).__module__.startswith("obstore") and _status(err) == 416:
        return b""
    raise err


def read_ranges(files: list[RemoteFile], starts: list[int], ends: list[int | None]) -> list:
    """``files[j].read(starts[j], ends[j])`` for every ``j``, the requests sent together, each as a bytes-like
    object (``bytes``, or obstore's ``Bytes`` uncopied: use it as a buffer, e.g. through ``memoryview``).

    Through obstore, every ranged GET is awaited at once on one event loop: a training batch's reads cost
    about one request's latency instead of one per caption, and little CPU each. (The callers already merge
    near ranges of a shard, so obstore's ``get_ranges`` coalescing would add nothing; one request per range
    keeps one retry counted per failed request.) Other clients: fsspec's ``cat_ranges`` per filesystem
    (s3fs issues its GETs together from its event loop; others read them in turn). A range that fails
    transiently is retried alone as :meth:`RemoteFile.read` is (counted in :data:`STATS`); any other failure
    raises its :func:`describe_failure` message.
    """
    out: list = [None] * len(files)
    stores = [f.store for f in files]
    fast = [j for j, store in enumerate(stores) if store is not None]
    got_fast: list = []
    if fast:
        OBSTORE.used = True

        async def together():
            return await asyncio.gather(*(files[j]._read_async(stores[j], starts[j], ends[j]) for j in fast),
                                        return_exceptions=True)

        got_fast = OBSTORE.run(together())
    results = dict(zip(fast, got_fast))
    groups: dict[int, list[int]] = {}
    for j, f in enumerate(files):
        if j not in results:
            groups.setdefault(id(f.fs), []).append(j)
    for js in groups.values():
        fs = files[js[0]].fs
        try:
            if files[js[0]]._s3:  # s3fs: its GETs If-Match the pinned ETags, sent together from its event loop
                from fsspec.asyn import sync

                async def together_s3fs(js=js):
                    return await asyncio.gather(*(files[j]._read_s3fs(starts[j], ends[j]) for j in js),
                                                return_exceptions=True)

                got = sync(fs.loop, together_s3fs)
            else:
                got = fs.cat_ranges([files[j].path for j in js], [starts[j] for j in js], [ends[j] for j in js],
                                    on_error="return")
        except Exception as err:  # noqa: BLE001 - the call as a whole failed: every range is retried below
            got = [err] * len(js)
        results.update(zip(js, got))
    failed = [j for j in range(len(files)) if isinstance(results[j], BaseException)]
    for j in failed:
        if not transient(results[j]):
            raise describe_failure(files[j].url, results[j]) from results[j]
    if failed:
        _backoff(1)  # once for the batch, then each failed range alone, as `call` goes on
    for j, f in enumerate(files):
        data = results[j]
        if j in failed:
            STATS.add_retry()
            data = call(f.url, f._read_once, starts[j], ends[j], tries=MAX_TRIES - 1, tried=1)
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
    URL never reads stale shards. Checksums are verified on every read as for local caches; a copy that fails
    one is deleted and the object read instead (``ShardedArrayFile._from_store_if_copy_damaged``, shared/store.py).
    """

    def __init__(self, folder: str | os.PathLike, max_bytes: int, *, threads: int = 2, max_queued: int | None = None):
        # ``max_queued``: downloads waiting or running at once (default twice the threads). Beyond it a shard
        # is read by ranged requests and not queued: under a full shuffle of a cache much larger than the
        # node's disk, a batch touches a new shard per caption, and an unbounded queue would download shards
        # long after anyone reads them.
        self.max_queued = max_queued if max_queued is not None else 2 * threads
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._threads = threads
        self.errors: list[str] = []
        _CACHES.add(self)
        self._remove_orphans()

    def _remove_orphans(self) -> None:
        """Delete partial downloads left by processes of this node that are gone (killed, or ended with
        ``os._exit``, shared/processes.py, while a download ran): the size bound counts only whole shards, so
        they would fill the disk unseen. A partial download of a process still running is left to it."""
        for tmp in self.folder.glob("*/.*.tmp"):
            try:
                pid = int(tmp.name.rsplit(".", 3)[-3])
                os.kill(pid, 0)
            except ProcessLookupError:
                tmp.unlink(missing_ok=True)
            except (ValueError, IndexError, OSError):
                continue  # not one of ours, or a process we may not signal (alive): kept

    def _after_fork(self) -> None:
        """In a forked process (a DataLoader worker): the parent's download threads do not exist here, so its
        pool would queue downloads that never run, its in-flight shards would stay pending for good, and a lock
        held by one of its threads at the fork would never be released."""
        self._pending, self._lock, self._pool = set(), threading.Lock(), None

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_pending=set(), _lock=None, _pool=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        _CACHES.add(self)

    def local_path(self, remote: RemoteFile) -> Path:
        key = hashlib.sha256(f"{remote.url}\n{remote.etag}".encode()).hexdigest()[:32]
        return self.folder / key[:2] / f"{key}.shard"

    def get(self, remote: RemoteFile) -> Path | None:
        """The local copy if present (else None, and a background download is started)."""
        path = self.local_path(remote)
        if path.exists():
            return path
        with self._lock:
            if str(path) in self._pending or len(self._pending) >= self.max_queued:
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
            try:
                remote.download(tmp)
                if tmp.stat().st_size != remote.size:
                    return
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)  # (gone already once renamed)
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


_CACHES: weakref.WeakSet[ShardCache] = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [cache._after_fork() for cache in list(_CACHES)])


def parse_size(text: str) -> int:
    """``20G``, ``512M``, ``1.5T``, ``1000000`` -> bytes; at least one byte (``-5G``, ``0``, ``infG`` are refused)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = str(text).strip().lower().removesuffix("ib").removesuffix("b")
    try:
        value = float(s[:-1]) * units[s[-1]] if s and s[-1] in units else int(s)
    except (ValueError, KeyError):
        raise SemrouteError(f"size {text!r} is not a size like 20G, 512M or 1000000") from None
    if not math.isfinite(value) or int(value) < 1:
        raise SemrouteError(f"size {text!r} is not a size: give more than 0 bytes, like 20G, 512M or 1000000")
    return int(value)
