"""Training from caches on object storage under faults, against the loopback S3 server (tests/s3_testutil.py):
shards deleted or overwritten while a job runs, the server gone, transient errors while an array is opened,
damaged node-local shard copies (``--cache-dir``). Every fault ends as an error naming the URL, raised in the
training process by either loader, or (a damaged local copy: a cache, not the data) is read from the store."""

from __future__ import annotations

import itertools
import os
import re
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest
import torch
from s3_testutil import LoopbackS3

from semroute.shared import remote
from semroute.shared.errors import CacheDamaged, SemrouteError
from semroute.shared.text_store import TextCacheReader
from semroute.stage1_encode.images import EncodeImagesConfig, encode_images
from semroute.stage1_encode.text import EncodeTextConfig, encode_text
from testkit import write_manifest, write_square_images

_copies = itertools.count()


@pytest.fixture(scope="module")
def local_caches(tiny_llama_dir, tmp_path_factory):
    """32 squares encoded locally in small shards (several per array): ``(text, latents)``."""
    root = tmp_path_factory.mktemp("faults")
    manifest = write_manifest(root / "m.jsonl", write_square_images(root / "img", 32))
    encode_text(EncodeTextConfig(out=str(root / "t.zarr"), data=str(manifest), llm=str(tiny_llama_dir),
                                 dtype="float32", device="cpu", progress=False, shard_mb=0.04))
    encode_images(EncodeImagesConfig(out=str(root / "l.zarr"), data=str(manifest), vae="pixel", resolution=32,
                                     device="cpu", workers=0, progress=False, shard_mb=0.05))
    return str(root / "t.zarr"), str(root / "l.zarr")


@pytest.fixture
def fast_backoff(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.001)


def upload(local_caches) -> tuple[str, str]:
    """A fresh copy of both caches on the current server (tests damage theirs): ``(text_url, latent_url)``."""
    fs, _ = remote.filesystem("s3://bkt")
    n = next(_copies)
    urls = []
    for src, kind in zip(local_caches, ("text", "latents")):
        fs.put(src, f"bkt/c{n}.{kind}.zarr", recursive=True)
        urls.append(f"s3://bkt/c{n}.{kind}.zarr")
    fs.invalidate_cache()
    return urls[0], urls[1]


def shard_keys(url: str, name: str = "features") -> list[str]:
    fs, _ = remote.filesystem(url)
    return sorted(p.split("/", 1)[1] for p in fs.find(url.split("://", 1)[1] + f"/{name}/c/"))


def train_on(text: str, latents: str, out, **kw):
    from semroute.stage2_train.config import TrainConfig
    from semroute.stage2_train.train import train

    base = dict(text_cache=text, latent_cache=latents, out=str(out), fusion="static", preset="tiny", batch_size=4,
                num_workers=1, report_to="none", checkpoint_every=100, max_steps=12)
    return train(TrainConfig(**{**base, **kw}), progress=False)


SHARD_GET = r"^GET .*/(features|latent)/c/"


def when_requests(server: LoopbackS3, n: int, fault) -> None:
    """Run ``fault()`` in this process once the server has seen ``n`` more shard reads (a job is reading)."""
    seen = len(server.requests)

    def watch():
        while sum(bool(re.match(SHARD_GET, r)) for r in server.requests[seen:]) < n:
            time.sleep(0.005)
        fault()

    threading.Thread(target=watch, daemon=True).start()


@pytest.mark.parametrize("loader", ["thread", "process"])
@pytest.mark.parametrize("change", ["deleted", "overwritten"])
def test_a_shard_changed_under_a_training_job_stops_it_naming_the_url(s3, local_caches, tmp_path, loader, change):
    text, latents = upload(local_caches)
    keys = shard_keys(text)
    client = boto3.client("s3", endpoint_url=s3.endpoint)

    def fault():
        for key in keys:
            if change == "deleted":
                client.delete_object(Bucket="bkt", Key=key)
            else:
                size = client.head_object(Bucket="bkt", Key=key)["ContentLength"]
                client.put_object(Bucket="bkt", Key=key, Body=os.urandom(size))

    when_requests(s3, 4, fault)
    want = r"does not exist \(was it deleted" if change == "deleted" else r"(checksum|changed while this job ran)"
    with pytest.raises(SemrouteError, match=rf"s3://bkt/c\d+\.text\.zarr/features/c/\d+/0/0.*{want}"):
        train_on(text, latents, tmp_path / "run", loader=loader)


@pytest.mark.parametrize("loader", ["thread", "process"])
def test_the_server_gone_mid_run_is_retried_then_named(local_caches, tmp_path, fast_backoff, loader):
    with LoopbackS3() as server:
        server.make_bucket("bkt")
        text, latents = upload(local_caches)
        when_requests(server, 6, lambda: server.fail_next(10 ** 6, r"/(features|latent)/c/", kind="reset"))
        retries = remote.STATS.retries
        with pytest.raises(SemrouteError, match=r"cannot reach the object store for s3://bkt/c\d+\..*after 6 tries"):
            train_on(text, latents, tmp_path / "run", loader=loader)
        assert remote.STATS.retries - retries >= 5  # counted in shared memory, from the worker process too
        server.fail_next(0)


def test_opening_an_array_retries_transient_errors_and_never_calls_them_damage(s3, local_caches, fast_backoff,
                                                                             monkeypatch):
    """An array's zarr.json is read when the array is first used (a latent bucket's, mid-run): a 503 there is
    retried and counted, and a store that stays unreachable is named as such, not as a damaged cache."""
    from s3fs import S3FileSystem

    from semroute.shared.store import ShardedArrayMeta

    monkeypatch.setattr(S3FileSystem, "retries", 1)  # zarr reads through s3fs: one try each, ours retry

    text, _ = upload(local_caches)
    retries = remote.STATS.retries
    failed = s3.failed
    s3.fail_next(2, r"/features/zarr\.json$")
    assert ShardedArrayMeta(text, "features").rows > 0
    assert remote.STATS.retries - retries == 2 and s3.failed - failed == 2
    s3.fail_next(10 ** 6, r"/features/zarr\.json$")
    try:
        with pytest.raises(SemrouteError, match=rf"cannot reach the object store for {text}/features/zarr\.json") as e:
            ShardedArrayMeta(text, "features")
        assert not isinstance(e.value, CacheDamaged)
    finally:
        s3.fail_next(0)


def _raw(t):
    return None if t is None else t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("damage", ["flipped", "truncated", "cut to a few bytes"])
def test_a_damaged_node_local_copy_is_dropped_and_read_from_the_store(s3, local_caches, tmp_path, damage):
    from semroute.shared.remote import ShardCache

    text, _ = upload(local_caches)
    everything = list(range(TextCacheReader(local_caches[0]).n_captions))
    want = [(_raw(f), _raw(s)) for f, s in TextCacheReader(local_caches[0]).captions_bits(everything)]
    cache = ShardCache(tmp_path / "shards", 1 << 30)
    TextCacheReader(text, shard_cache=cache).captions_bits(everything)  # queues every shard's download
    cache.wait()
    copies = {copy: copy.read_bytes() for copy in cache.files()}
    assert copies
    for copy in copies:
        data = bytearray(copy.read_bytes())
        if damage == "flipped":
            data[::97] = bytes(b ^ 0xFF for b in data[::97])
        else:
            data = data[: len(data) // 2 if damage == "truncated" else 10]
        copy.write_bytes(bytes(data))
    reader = TextCacheReader(text, shard_cache=cache)
    assert all(reader._arrays()["features"]._local_copy(s) is not None
               for s in range(reader._arrays()["features"].meta.layout.n_shards))  # the damaged copies are used
    assert [(_raw(f), _raw(s)) for f, s in reader.captions_bits(everything)] == want
    assert any("node-local copy" in e and "failed its checksum" in e for e in cache.errors)
    cache.wait()  # each damaged copy deleted, or downloaded again whole
    assert all(not copy.exists() or copy.read_bytes() == good for copy, good in copies.items())


def test_an_object_damaged_on_the_store_still_fails_with_a_shard_cache(s3, local_caches, tmp_path):
    """The copy downloaded from a damaged object fails its checksum too: dropped, the object read, and it fails
    as itself, naming the URL (a shard cache never hides damage)."""
    from semroute.shared.remote import ShardCache

    text, _ = upload(local_caches)
    client = boto3.client("s3", endpoint_url=s3.endpoint)
    key = shard_keys(text)[0]
    body = bytearray(client.get_object(Bucket="bkt", Key=key)["Body"].read())
    body[:64] = bytes(b ^ 0xFF for b in body[:64])  # the first chunk's bytes: the index still checks out
    client.put_object(Bucket="bkt", Key=key, Body=bytes(body))
    cache = ShardCache(tmp_path / "shards", 1 << 30)
    TextCacheReader(text, shard_cache=cache)._arrays()["features"]._local_copy(0)
    cache.wait()
    assert cache.files()
    with pytest.raises(SemrouteError, match=rf"s3://bkt/{key}: chunk 0 fails its crc32c checksum"):
        TextCacheReader(text, shard_cache=cache).captions_bits([0])





def test_a_worker_forked_after_the_shard_cache_was_used_downloads_shards(s3, local_caches, tmp_path, monkeypatch):
    """The training process reads a few shards through the cache before the DataLoader forks its workers
    (``loader=process``): a worker's downloads then run in threads of its own, and a shard that was in
    flight in the parent at the fork is not left pending there for good."""
    import multiprocessing
    import queue

    from semroute.shared.remote import RemoteFile, ShardCache

    text, _ = upload(local_caches)
    cache = ShardCache(tmp_path / "shards", 1 << 30)
    features = TextCacheReader(text, shard_cache=cache)._arrays()["features"]
    release = threading.Event()
    download = RemoteFile.download

    def held(self, local):
        release.wait(10)
        download(self, local)

    monkeypatch.setattr(RemoteFile, "download", held)
    ctx = multiprocessing.get_context("fork")
    done = ctx.Queue()

    def worker():
        release.set()  # this process's own downloads do not wait
        for shard in (0, 1):
            cache.get(features._remote(shard))
        cache.wait()
        done.put(sorted(p.name for p in cache.files()))

    try:
        assert cache.get(features._remote(0)) is None  # shard 0 in flight in the parent while the worker forks
        child = ctx.Process(target=worker, daemon=True)
        child.start()
        try:
            got = done.get(timeout=15)
        except queue.Empty:
            got = "the worker's downloads never ran"
        child.join(5)
    finally:
        release.set()
        cache.wait()
    assert len(got) == 2, got  # shards 0 and 1, downloaded by the worker


def test_reading_a_small_array_retries_transient_errors_and_never_calls_them_damage(s3, local_caches, fast_backoff,
                                                                                    monkeypatch):
    """offsets (read whole when a reader first needs them): a 503 is retried, an unreachable store named as such."""
    from s3fs import S3FileSystem

    monkeypatch.setattr(S3FileSystem, "retries", 1)
    text, _ = upload(local_caches)
    retries = remote.STATS.retries
    s3.fail_next(2, r"/offsets/c/")
    assert TextCacheReader(text).offsets.tolist() == TextCacheReader(local_caches[0]).offsets.tolist()
    assert remote.STATS.retries - retries == 2
    s3.fail_next(10 ** 6, r"/offsets/c/")
    try:
        with pytest.raises(SemrouteError, match=rf"cannot reach the object store for {text}/offsets") as e:
            TextCacheReader(text).offsets
        assert not isinstance(e.value, CacheDamaged)
    finally:
        s3.fail_next(0)


# -- an object replaced under a reader (a re-encode into the cache being read) ----------------------------
def replace_shard(server: LoopbackS3, local_text: str, url: str, tmp_path, shard: int = 0):
    """Overwrite ``features`` shard ``shard`` of the cache at ``url`` with a valid re-encode of the same layout:
    every byte of its rows changed, every chunk's crc32c and the index's valid, the index itself unchanged (so
    a reader holding the old index would pass every check on the new bytes). Returns the object's key and the
    local cache the new shard comes from."""
    import shutil

    import numpy as np

    from semroute.shared.store import _CRC, _INDEX_ENTRY, ShardedArrayFile, ShardFileWriter

    copy = tmp_path / f"reencoded-{next(_copies)}.zarr"
    shutil.copytree(local_text, copy)
    old = ShardedArrayFile(copy, "features")
    a = shard * old.rows_per_shard
    rows = old.read_rows(a, min(a + old.rows_per_shard, old.shape[0]))
    ShardFileWriter(copy, "features").write(shard, (rows.view(np.uint8) ^ 0x01).view(rows.dtype))
    before, after = (ShardedArrayFile(root, "features").shard_path(shard).read_bytes() for root in (local_text, copy))
    n = old.chunks_per_shard * _INDEX_ENTRY + _CRC  # the index and its crc32c
    assert len(after) == len(before) and after[-n:] == before[-n:] and after[:-n] != before[:-n]
    key = ShardedArrayFile(url, "features").shard_path(shard).split("/", 3)[3]
    boto3.client("s3", endpoint_url=server.endpoint).put_object(Bucket="bkt", Key=key, Body=after)
    return key, copy


@pytest.mark.parametrize("client", ["s3fs", "obstore"])
def test_a_shard_replaced_under_a_reader_is_named_not_read(s3, local_caches, tmp_path, monkeypatch, client):
    """A reader keeps each shard's index; a later batch's ranged GETs are If-Match the ETag its first read saw,
    so a same-layout re-encode of the object stops the reader with an error naming the URL, not a checksum
    error and not the new bytes read through the old index. The batch costs no extra request."""
    monkeypatch.setenv(remote.ENV_CLIENT, client)
    text, _ = upload(local_caches)
    reader = TextCacheReader(text)
    features = reader._arrays()["features"]
    assert features._remote(0).client == ("obstore" if client == "obstore" else "fsspec")
    batch = [i for i in range(reader.n_captions) if int(reader.offsets[i]) < features.rows_per_shard][:3]
    want = [(_raw(f), _raw(s)) for f, s in TextCacheReader(local_caches[0]).captions_bits(batch)]
    assert [(_raw(f), _raw(s)) for f, s in reader.captions_bits(batch)] == want
    seen = len(s3.requests)
    assert [(_raw(f), _raw(s)) for f, s in reader.captions_bits(batch)] == want
    per_batch = len(s3.requests) - seen
    key, _ = replace_shard(s3, local_caches[0], text, tmp_path)
    seen = len(s3.requests)
    with pytest.raises(SemrouteError, match=rf"s3://bkt/{re.escape(key)} changed while this job ran.*Let the "
                                            r"writer finish, then run again.*--resume latest") as e:
        reader.captions_bits(batch)
    assert not isinstance(e.value, CacheDamaged)
    assert len(s3.requests) - seen == per_batch  # the same GETs, made conditional


@pytest.mark.parametrize("client", ["s3fs", "obstore"])
def test_a_shard_index_read_again_is_read_from_the_object_first_seen(s3, local_caches, tmp_path, monkeypatch,
                                                                     client):
    """An index dropped from the reader's bounded index cache is fetched again If-Match the ETag first seen: the
    reader never pairs a new object's index with what it read from the old one."""
    monkeypatch.setenv(remote.ENV_CLIENT, client)
    text, _ = upload(local_caches)
    reader = TextCacheReader(text)
    features = reader._arrays()["features"]
    features.index_cache_bytes = 1  # less than one index: none is kept
    reader.captions_bits([0])
    assert not features._index and features._remote(0).pinned
    key, _ = replace_shard(s3, local_caches[0], text, tmp_path)
    with pytest.raises(SemrouteError, match=rf"s3://bkt/{re.escape(key)} changed while this job ran"):
        reader.captions_bits([0])


@pytest.mark.parametrize("client", ["s3fs", "obstore"])
def test_a_replaced_shard_is_never_kept_as_the_old_ones_local_copy(s3, local_caches, tmp_path, monkeypatch, client):
    """The node-local shard cache keys copies by URL and ETag. A download for a reader that has seen the old
    ETag (it keeps the old index) is If-Match it: the new object is not stored as the old one's copy (where
    that reader would read it through its old index). A new reader sees the new ETag and reads the new bytes,
    never a copy of the old object."""
    from semroute.shared.remote import ShardCache

    monkeypatch.setenv(remote.ENV_CLIENT, client)
    text, _ = upload(local_caches)
    cache = ShardCache(tmp_path / "shards", 1 << 30)
    old = TextCacheReader(text, shard_cache=cache)._arrays()["features"]._remote(0)
    old_copy = cache.local_path(old)  # the old ETag, seen (HEAD) before the download is queued
    key, reencoded = replace_shard(s3, local_caches[0], text, tmp_path)
    assert cache.get(old) is None
    cache.wait()
    assert not old_copy.exists()
    assert any(e.startswith(f"s3://bkt/{key}: s3://bkt/{key} changed while this job ran") for e in cache.errors)
    fresh = TextCacheReader(text, shard_cache=cache)
    new = fresh._arrays()["features"]._remote(0)
    assert cache.local_path(new) != old_copy
    everything = list(range(fresh.n_captions))
    want = [(_raw(f), _raw(s)) for f, s in TextCacheReader(reencoded).captions_bits(everything)]
    assert [(_raw(f), _raw(s)) for f, s in fresh.captions_bits(everything)] == want
    cache.wait()
    assert cache.local_path(new).read_bytes() == remote.RemoteFile(new.url).read(0, new.size)


def test_a_shard_object_forgotten_by_the_reader_takes_its_index_with_it(s3, local_caches, tmp_path):
    """A reader keeps at most 4096 shard objects per array (each with the ETag it pinned): one dropped takes
    its shard's index along, so the shard is read again as a whole, index and bytes from the same object."""
    text, _ = upload(local_caches)
    reader = TextCacheReader(text)
    features = reader._arrays()["features"]
    reader.captions_bits([0])
    assert 0 in features._index and features._remote(0).pinned
    key, reencoded = replace_shard(s3, local_caches[0], text, tmp_path)
    for n in range(1, 4098):  # other shards' objects (none is read)
        features._remote(10 ** 6 + n)
    assert 0 not in features._remotes and 0 not in features._index
    assert features._index_bytes == sum(ix.nbytes for ix in features._index.values())
    want = [(_raw(f), _raw(s)) for f, s in TextCacheReader(reencoded).captions_bits([0])]
    assert [(_raw(f), _raw(s)) for f, s in reader.captions_bits([0])] == want


def test_a_client_that_cannot_connect_when_made_is_named_with_the_url():
    """fsspec's ftp client connects in its constructor: a refused connection was a bare ConnectionRefusedError."""
    from semroute.shared.remote import filesystem

    with pytest.raises(SemrouteError, match=r"ftp://127\.0\.0\.1:1/x\.zarr: cannot connect \(ConnectionRefusedError"):
        filesystem("ftp://127.0.0.1:1/x.zarr")


class _FailingDownload:
    """A remote shard whose download writes part of the file, then fails (a reset connection)."""
    url, etag, size = "s3://bkt/x.shard", '"e1"', 1000

    def download(self, path):
        Path(path).write_bytes(b"x" * 300)
        raise ConnectionResetError("connection reset by peer")


def test_a_failed_download_leaves_no_partial_file(tmp_path):
    from semroute.shared.remote import ShardCache

    cache = ShardCache(tmp_path / "shards", 1 << 30, threads=1)
    assert cache.get(_FailingDownload()) is None  # queued
    cache.wait()
    assert "connection reset by peer" in cache.errors[0]
    assert [p for p in (tmp_path / "shards").rglob("*") if p.is_file()] == []


def test_partial_downloads_of_processes_that_are_gone_are_removed(tmp_path):
    """They are invisible to the size bound (which counts whole shards): a killed job's would fill the disk."""
    import subprocess

    from semroute.shared.remote import ShardCache

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "shards" / "ab").mkdir(parents=True)
    dead = tmp_path / "shards" / "ab" / f".abcd.shard.{gone.pid}.140.tmp"
    alive = tmp_path / "shards" / "ab" / f".abce.shard.{os.getpid()}.140.tmp"
    for f in (dead, alive):
        f.write_bytes(b"partial")
    ShardCache(tmp_path / "shards", 1 << 30)
    assert not dead.exists() and alive.exists()  # a running process's download is left to it
