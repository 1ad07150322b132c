"""Caches on object storage, against a real S3-compatible server on 127.0.0.1 (moto's server mode): both
encoders write s3:// caches, our reader reads them by ranged requests (and from the node-local shard cache),
info/verify/train work on URLs, faults give errors naming the URL, transient 503s are retried and counted."""

from __future__ import annotations

import re

import pytest
import torch

from semroute.shared import remote
from semroute.shared.errors import SemrouteError
from semroute.shared.inspect import describe, verify
from semroute.shared.latent_store import LatentCacheReader
from semroute.shared.text_store import TextCacheReader, TextCacheWriter
from semroute.stage1_encode.images import EncodeImagesConfig, encode_images
from semroute.stage1_encode.text import EncodeTextConfig, encode_text
from testkit import die_on_call, random_captions, write_manifest, write_square_images


@pytest.fixture(scope="module")
def caches(s3, tiny_llama_dir, tmp_path_factory):
    """The same squares encoded to a local folder and to s3://bkt: ``(local_text, url_text, local_lat, url_lat)``."""
    root = tmp_path_factory.mktemp("remote")
    manifest = write_manifest(root / "m.jsonl", write_square_images(root / "img", 32))
    text = dict(data=str(manifest), llm=str(tiny_llama_dir), dtype="float32", device="cpu", progress=False,
                shard_mb=0.04)
    lat = dict(data=str(manifest), vae="pixel", resolution=32, device="cpu", workers=0, progress=False, shard_mb=0.05)
    encode_text(EncodeTextConfig(out=str(root / "t.zarr"), **text))
    encode_text(EncodeTextConfig(out="s3://bkt/sq.text.zarr", **text))
    encode_images(EncodeImagesConfig(out=str(root / "l.zarr"), **lat))
    encode_images(EncodeImagesConfig(out="s3://bkt/sq.latents.zarr", **lat))
    return str(root / "t.zarr"), "s3://bkt/sq.text.zarr", str(root / "l.zarr"), "s3://bkt/sq.latents.zarr"


def test_s3_caches_read_like_local_ones(caches):
    local_t, url_t, local_l, url_l = caches
    a, b = TextCacheReader(local_t), TextCacheReader(url_t)
    assert a.n_captions == b.n_captions >= 32 and b._arrays()["features"].remote  # our reader, not zarr's
    for i in range(a.n_captions):
        assert torch.equal(a.caption(i), b.caption(i))
    assert torch.equal(a.null(), b.null())
    la, lb = LatentCacheReader(local_l), LatentCacheReader(url_l)
    assert la.sample_ids == lb.sample_ids
    for i in range(len(la)):
        assert torch.equal(la.stored(i)["latent"], lb.stored(i)["latent"])
    # info and verify on URLs
    assert describe(url_t)["complete"] and describe(url_l)
    for url in (url_t, url_l):
        checked, problems, _ = verify(url)
        assert checked > 0 and problems == []


def _raw(t: torch.Tensor | None) -> bytes | None:
    return None if t is None else t.contiguous().view(torch.uint8).numpy().tobytes()


def test_a_batch_read_from_s3_is_the_local_read_in_fewer_requests(caches, s3):
    """A batch's captions come from object storage in one round of concurrent ranged GETs (the shard indexes
    first, then the chunk ranges, near ones of a shard merged): byte for byte what the local reader reads,
    in fewer requests than captions, counted by the server. The training loader reads its batches this way."""
    from semroute.stage2_train.data import PairedCaches

    local_t, url_t, local_l, url_l = caches
    a, b = TextCacheReader(local_t), TextCacheReader(url_t)
    b.offsets, b.lengths, b._arrays()  # metadata read before counting: a once-per-run cost
    batch = [int(i) for i in torch.randperm(a.n_captions, generator=torch.Generator().manual_seed(0))[:24]]
    seen = len(s3.requests)
    got = b.captions_bits(batch)
    gets = [r for r in s3.requests[seen:] if r.startswith("GET ") and "/features/c/" in r]
    assert len(s3.requests) - seen == len(gets) and 0 < len(gets) < len(batch), s3.requests[seen:]
    for (fa, sa), (fb, sb) in zip(a.captions_bits(batch), got):
        assert _raw(fa) == _raw(fb) and _raw(sa) == _raw(sb)
    # Read straight into a loader's batch buffer (obstore's buffers copied once, into the rows).
    from semroute.stage2_train.data import HostSlot, text_rows

    rows = text_rows(HostSlot(pin=False), [int(b.lengths[i]) for i in batch], *b.bits_row())
    for (fa, _), (fb, _), row in zip(a.captions_bits(batch), b.captions_bits(batch, into=rows), rows):
        assert _raw(fa) == _raw(fb) and fb.data_ptr() == row.data_ptr()
    # The loader's batch: the same draws as reading sample by sample from the local caches.
    local, remote_ds = (PairedCaches(t, lat, text_layers=None, seed=5, caption_dropout=0.25)
                        for t, lat in ((local_t, local_l), (url_t, url_l)))
    samples = list(range(min(16, len(local))))
    for x, y in zip((local.item(s, 2, bits=True) for s in samples), remote_ds.items(samples, 2, bits=True)):
        assert x["caption"] == y["caption"] and x["sample_id"] == y["sample_id"]
        assert _raw(x["text"]) == _raw(y["text"]) and torch.equal(x["latent"], y["latent"])


def test_shard_indexes_are_fetched_once_per_reader(caches, s3):
    """A shard's index (its last bytes, a suffix GET) is read the first time a batch touches the shard and kept:
    a second batch over the same shards sends only chunk ranges. With the index cache bounded below one
    index, every batch fetches them again and still reads the same bytes."""
    local_t, url_t, _, _ = caches
    a = TextCacheReader(local_t)
    batch = [int(i) for i in torch.randperm(a.n_captions, generator=torch.Generator().manual_seed(1))[:12]]
    want = [(_raw(f), _raw(s)) for f, s in a.captions_bits(batch)]

    def read(reader, indices):
        seen = len(s3.requests)
        got = reader.captions_bits(indices)
        new = s3.requests[seen:]
        suffix = [r for r in new if r.startswith("GET ") and " bytes=-" in r]
        return got, suffix, len(new) - len(suffix)

    b = TextCacheReader(url_t)
    b.offsets, b.lengths, b._arrays()
    shards = sum(f.meta.layout.n_shards for f in b._arrays().values())
    assert shards >= 3
    _, suffix, ranges = read(b, list(range(b.n_captions)))  # touches every shard of every array
    assert len(suffix) == len(set(suffix)) == shards and ranges > 0, suffix
    got, suffix, ranges = read(b, batch)
    assert suffix == [] and 0 < ranges < len(batch)
    assert [(_raw(f), _raw(s)) for f, s in got] == want
    for f in b._arrays().values():
        assert f._index_bytes == sum(ix.nbytes for ix in f._index.values()) <= f.index_cache_bytes

    c = TextCacheReader(url_t)
    c.offsets, c.lengths, c._arrays()
    for f in c._arrays().values():
        f.index_cache_bytes = 1  # less than one index: none is kept
    for _ in range(2):
        got, suffix, _ = read(c, batch)
        assert suffix and [(_raw(f), _raw(s)) for f, s in got] == want
        assert all(f._index_bytes == 0 and not f._index for f in c._arrays().values())


def test_shard_cache_serves_reads_and_stays_under_its_bound(caches, tmp_path):
    local_t, url_t, _, _ = caches
    a = TextCacheReader(local_t)
    shards = TextCacheReader(url_t)._arrays()["features"]
    shard_bytes = shards._remote(0).size
    cache = remote.ShardCache(tmp_path / "c", max_bytes=100 * shard_bytes)
    b = TextCacheReader(url_t, shard_cache=cache)
    for i in range(b.n_captions):  # cold: ranged reads while the shards download in the background
        assert torch.equal(a.caption(i), b.caption(i))
    cache.wait()
    assert len(cache.files()) == TextCacheWriter.open(local_t).layout.n_shards
    requests = remote.STATS.requests
    for i in range(b.n_captions):  # warm: local files, no request
        assert torch.equal(a.caption(i), b.caption(i))
    assert remote.STATS.requests == requests
    small = remote.ShardCache(tmp_path / "s", max_bytes=2 * shard_bytes + 10)
    c = TextCacheReader(url_t, shard_cache=small)
    for i in range(c.n_captions):
        c.caption(i)
        small.wait()
        assert small.size() <= small.max_bytes


def test_transient_503s_are_retried_and_counted(caches, s3):
    local_t, url_t, _, _ = caches
    before = remote.STATS.retries
    reader = TextCacheReader(url_t)
    s3.fail_next(3, r"/features/c/")
    assert torch.equal(reader.caption(5), TextCacheReader(local_t).caption(5))
    assert s3.failed >= 3 and remote.STATS.retries - before == 3


def test_faults_name_the_url_and_the_fix(caches, s3, monkeypatch):
    _, url_t, _, _ = caches
    with pytest.raises(SemrouteError, match=r"s3://nobucket/x\.text\.zarr.*bucket 'nobucket' does not exist"):
        TextCacheReader("s3://nobucket/x.text.zarr")
    # Access denied: the server starts checking credentials, and ours are not an IAM user's.
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    with pytest.raises(SemrouteError, match=r"s3://bkt/sq\.text\.zarr.*access denied.*AWS_ACCESS_KEY_ID"):
        TextCacheReader(url_t)
    monkeypatch.undo()
    # Unreachable endpoint: a closed port on loopback, tried a few times with backoff.
    monkeypatch.setattr(remote, "MAX_TRIES", 2)
    remote.set_storage_options({"endpoint_url": "http://127.0.0.1:9"})
    try:
        with pytest.raises(SemrouteError, match=r"cannot reach the object store for s3://bkt/sq\.text\.zarr.*endpoint"):
            TextCacheReader(url_t)
    finally:
        remote.set_storage_options(None)


def test_a_shard_deleted_under_a_running_reader(s3, tiny_llama_dir, tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", random_captions(12, seed=3))
    url = "s3://bkt/del.text.zarr"
    encode_text(EncodeTextConfig(data=str(manifest), out=url, llm=str(tiny_llama_dir), dtype="float32",
                                 device="cpu", progress=False, shard_mb=0.03))
    reader = TextCacheReader(url)
    reader.caption(0)
    last = reader.n_captions - 1
    fs, _ = remote.filesystem(url)
    features = reader._arrays()["features"]
    fs.rm(features.shard_path(int(reader.offsets[last]) // features.rows_per_shard))
    with pytest.raises(SemrouteError, match=r"does not exist \(was it deleted while this job ran\?\).*verify"):
        reader.caption(last)
    checked, problems, _ = verify(url)
    assert any("del.text.zarr/features" in p for p in problems)
    # --resume rewrites shards whose objects are gone, though their done flags are set.
    encode_text(EncodeTextConfig(data=str(manifest), out=url, llm=str(tiny_llama_dir), dtype="float32",
                                 device="cpu", progress=False, shard_mb=0.03, resume=True))
    assert verify(url)[1] == []


def test_crash_mid_run_on_s3_leaves_nothing_marked_done_and_resume_finishes(s3, tiny_llama_dir, tmp_path, monkeypatch):
    manifest = write_manifest(tmp_path / "m.jsonl", random_captions(16, seed=4))
    cfg = dict(data=str(manifest), llm=str(tiny_llama_dir), dtype="float32", device="cpu", progress=False,
               shard_mb=0.02)
    encode_text(EncodeTextConfig(out=str(tmp_path / "ref.zarr"), **cfg))
    url = "s3://bkt/crash.text.zarr"
    die_on_call(monkeypatch, TextCacheWriter, "write_shard", 3)
    with pytest.raises(RuntimeError, match="killed"):
        encode_text(EncodeTextConfig(out=url, **cfg))
    monkeypatch.undo()
    writer = TextCacheWriter.open(url)
    done = writer.layout.n_shards - len(writer.pending(range(writer.layout.n_shards)))
    assert done == 2 and not writer.attrs["complete"]
    summary = encode_text(EncodeTextConfig(out=url, resume=True, **cfg))
    assert summary["shards_done_before"] == 2
    a, b = TextCacheReader(tmp_path / "ref.zarr"), TextCacheReader(url)
    for i in range(a.n_captions):
        assert torch.equal(a.caption(i), b.caption(i))


def test_train_from_s3_caches_with_a_shard_cache(caches, tmp_path):
    _, url_t, _, url_l = caches
    from semroute.stage2_train.config import TrainConfig
    from semroute.stage2_train.train import train

    train(TrainConfig(text_cache=url_t, latent_cache=url_l, fusion="static", preset="tiny", batch_size=8,
                      num_workers=1, tensorboard=False, max_steps=3, out=str(tmp_path / "run"),
                      cache_dir=str(tmp_path / "shards"), cache_size="1G"), progress=False)
    assert (tmp_path / "run" / "checkpoints" / "step-0000003").exists()
    assert list((tmp_path / "shards").glob("*/*.shard"))


def test_encode_images_from_webdataset_shards_on_s3(s3, tmp_path):
    import io
    import tarfile

    from images_testutil import random_rgb

    fs, _ = remote.filesystem("s3://bkt/wds/x")
    for s in range(2):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for j in range(3):
                for name, data in ((f"k{s}{j}.png", _png(random_rgb(40, 40, seed=10 * s + j))),
                                   (f"k{s}{j}.txt", f"caption {s}{j}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        fs.pipe_file(f"bkt/wds/d-{s}.tar", buf.getvalue())
    out = tmp_path / "l.zarr"
    encode_images(EncodeImagesConfig(data="s3://bkt/wds/d-{0..1}.tar", out=str(out), vae="pixel", resolution=32,
                                     device="cpu", workers=0, progress=False))
    reader = LatentCacheReader(out)
    assert reader.sample_ids == [f"k{s}{j}" for s in range(2) for j in range(3)]


def _png(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# -- the two clients: obstore reads s3:// objects, s3fs the rest ----------------------------------------
def test_reads_go_through_obstore_and_equal_s3fs_reads(caches, s3, monkeypatch):
    """A batch read through obstore (the default client for s3:// reads) and through s3fs
    (``SEMROUTE_S3_CLIENT=s3fs``) gives the local reader's bytes, the obstore one in as few requests."""
    local_t, url_t, _, _ = caches
    a = TextCacheReader(local_t)
    batch = [int(i) for i in torch.randperm(a.n_captions, generator=torch.Generator().manual_seed(2))[:16]]
    want = [(_raw(f), _raw(s)) for f, s in a.captions_bits(batch)]
    counts = {}
    for client in ("obstore", "s3fs"):
        monkeypatch.setenv(remote.ENV_CLIENT, client)
        b = TextCacheReader(url_t)
        b.offsets, b.lengths, b._arrays()
        assert b._arrays()["features"]._remote(0).client == ("obstore" if client == "obstore" else "fsspec")
        seen = len(s3.requests)
        assert [(_raw(f), _raw(s)) for f, s in b.captions_bits(batch)] == want
        counts[client] = len(s3.requests) - seen
    assert 0 < counts["obstore"] == counts["s3fs"] < 2 * len(batch)


def test_obstore_reads_name_the_url_and_the_fix(caches, s3, monkeypatch):
    """RemoteFile's faults through obstore: the same messages as through s3fs, transient ones retried and counted."""
    _, url_t, _, _ = caches
    shard = TextCacheReader(url_t)._arrays()["features"].shard_path(0)
    f = remote.RemoteFile(shard)
    assert f.client == "obstore" and f.size > 100
    with pytest.raises(SemrouteError, match=r"asked for bytes .* got 0 \(the object changed"):
        f.read(f.size + 10, f.size + 20)  # starts past the end: HTTP 416
    with pytest.raises(SemrouteError, match=r"asked for bytes .* got 10 "):
        f.read(f.size - 10, f.size + 20)  # ends past it
    with pytest.raises(SemrouteError, match=r"s3://nobkt/x.*bucket 'nobkt' does not exist"):
        remote.RemoteFile("s3://nobkt/x").read(0, 10)
    with pytest.raises(SemrouteError, match=r"s3://bkt/none does not exist \(was it deleted"):
        remote.read_ranges([remote.RemoteFile("s3://bkt/none")], [0], [10])
    for kind in ("503", "reset"):
        s3.fail_next(2, re.escape(f.key), kind)
        before = remote.STATS.retries
        assert len(remote.read_ranges([f, f], [0, 50], [10, 60])[1]) == 10
        assert remote.STATS.retries - before == 2 and s3._fail[0] == 0, kind
        s3.fail_next(1, re.escape(f.key), kind)
        assert len(f.read(5, 25)) == 20 and remote.STATS.retries - before == 3, kind
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    with pytest.raises(SemrouteError, match=r"access denied.*AWS_ACCESS_KEY_ID"):
        remote.RemoteFile(shard).read(0, 10)
    monkeypatch.undo()
    # Options from --storage-options (s3fs's keys), the environment's endpoint gone; then a dead endpoint.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setattr(remote, "MAX_TRIES", 2)
    try:
        remote.set_storage_options({"endpoint_url": s3.endpoint, "key": "testing", "secret": "testing"})
        assert remote.RemoteFile(shard).read(0, 10) == f.read(0, 10)
        remote.set_storage_options({"endpoint_url": "http://127.0.0.1:9"})
        before = remote.STATS.retries
        with pytest.raises(SemrouteError, match=r"cannot reach the object store for s3://bkt/.* after 2 tries.*endpoint"):
            remote.read_ranges([remote.RemoteFile(shard)], [0], [10])
        assert remote.STATS.retries - before == 1
    finally:
        remote.set_storage_options(None)


def _read_in_child(reader, batch, conn):
    conn.send([(_raw(f), _raw(s)) for f, s in reader.captions_bits(batch)])


def test_a_process_forked_after_obstore_reads_through_s3fs(caches):
    """obstore's runtime does not survive a fork once used (the child's first request would hang): a child
    forked after the parent read (a DataLoader worker, say) reads the same bytes through s3fs."""
    import multiprocessing

    local_t, url_t, _, _ = caches
    b = TextCacheReader(url_t)
    batch = [0, 3, 7]
    want = [(_raw(f), _raw(s)) for f, s in b.captions_bits(batch)]
    assert remote.OBSTORE.used and b._arrays()["features"]._remote(0).client == "obstore"
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_read_in_child, args=(b, batch, theirs))
    child.start()
    try:
        assert ours.poll(60), "the forked reader hung"
        assert ours.recv() == want
    finally:
        child.kill()
        child.join()


def test_storage_options_map_to_obstore(tmp_path, monkeypatch):
    cfg = remote.obstore_config({"endpoint_url": "http://minio:9000", "key": "k", "secret": "s", "token": "t",
                                 "client_kwargs": {"region_name": "eu-west-1"}, "config_kwargs": {"read_timeout": 9}})
    assert cfg["config"] == {"endpoint": "http://minio:9000", "access_key_id": "k", "secret_access_key": "s",
                             "session_token": "t", "region": "eu-west-1"}
    assert cfg["client_options"]["allow_http"] and cfg["retry_config"] == {"max_retries": 0}
    assert remote.obstore_config({"anon": True})["config"] == {"skip_signature": True}
    # An option obstore has no equivalent for (customer-supplied encryption keys): reads stay with s3fs.
    assert remote.obstore_config({"s3_additional_kwargs": {"SSECustomerKey": "x"}}) is None
    monkeypatch.setenv(remote.ENV_OPTIONS, '{"s3_additional_kwargs": {"SSECustomerKey": "x"}}')
    assert remote.RemoteFile("s3://b/k").client == "fsspec"
    # No key given: a profile's keys, through botocore's chain as s3fs would find them.
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = AKPROFILE\naws_secret_access_key = SECRET\n")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    provider = remote.obstore_config({})["credential_provider"]
    assert provider()["access_key_id"] == "AKPROFILE" and provider()["secret_access_key"] == "SECRET"


def test_a_url_of_an_unknown_protocol_is_named_as_such(tmp_path):
    from semroute.shared.store import open_group
    from semroute.stage2_train.data import PairedCaches

    for location in ("s3x://bkt/d.text.zarr", "htps://host/d.text.zarr"):
        scheme = location.split(":")[0]
        with pytest.raises(SemrouteError, match=f"{re.escape(location)}: unknown protocol '{scheme}'"):
            open_group(location)
        with pytest.raises(SemrouteError, match=f"unknown protocol '{scheme}'"):
            PairedCaches(location, location, text_layers=None)
    with pytest.raises(SemrouteError, match="unknown protocol 's3x'"):
        verify("s3x://bkt/d.text.zarr")
    with pytest.raises(SemrouteError, match="unknown protocol 'htps'"):
        encode_text(EncodeTextConfig(data="htps://host/m.jsonl", out=str(tmp_path / "t.text.zarr"), llm="no-such-model",
                                     progress=False))
    assert remote.unknown_protocol("s3://bkt/x") is None and remote.unknown_protocol("file:///tmp/x") is None


def test_the_shard_cache_queues_a_bounded_number_of_downloads(caches, tmp_path, monkeypatch):
    """Reads beyond ``max_queued`` pending downloads stay ranged and queue nothing (a full shuffle of a large
    cache would otherwise queue a whole-shard download per caption read)."""
    import threading

    _, url_t, _, _ = caches
    arr = TextCacheReader(url_t)._arrays()["features"]
    n = arr.meta.layout.n_shards
    assert n >= 4
    release, started = threading.Event(), []
    real = remote.ShardCache._download

    def held(self, remote_file, path):
        started.append(remote_file.url)
        release.wait(30)
        real(self, remote_file, path)

    monkeypatch.setattr(remote.ShardCache, "_download", held)
    cache = remote.ShardCache(tmp_path / "c", max_bytes=1 << 30, threads=1, max_queued=2)
    for s in range(n):
        assert cache.get(arr._remote(s)) is None
    assert len(cache._pending) == 2  # shards 0 and 1; the others were not queued
    release.set()
    cache.wait()
    assert started == [arr._remote(0).url, arr._remote(1).url] and len(cache.files()) == 2
    assert cache.get(arr._remote(0)) is not None and cache.get(arr._remote(n - 1)) is None  # queued now
    cache.wait()
    assert len(cache.files()) == 3


def test_a_shard_cache_that_cannot_store_shards_is_reported_and_training_goes_on(caches, tmp_path, monkeypatch,
                                                                                  capsys):
    _, url_t, _, url_l = caches
    from semroute.stage2_train.config import TrainConfig
    from semroute.stage2_train.train import train

    def disk_full(self, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(remote.RemoteFile, "download", disk_full)
    train(TrainConfig(text_cache=url_t, latent_cache=url_l, fusion="static", preset="tiny", batch_size=8,
                      num_workers=0, tensorboard=False, max_steps=2, out=str(tmp_path / "run"),
                      cache_dir=str(tmp_path / "shards"), cache_size="1G"), progress=False)
    assert (tmp_path / "run" / "checkpoints" / "step-0000002").exists()  # every read went to the object store
    err = capsys.readouterr().err
    assert f"warning: the node-local shard cache {tmp_path / 'shards'} had" in err and "No space left on device" in err


@pytest.fixture
def options_only(s3, monkeypatch):
    """The loopback server's endpoint and keys given only as storage options: none in the environment (the other
    tests' AWS_ENDPOINT_URL would reach the server whether the options are used or not)."""
    from s3fs import S3FileSystem

    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setattr(remote, "MAX_TRIES", 2)  # a request sent elsewhere fails fast
    S3FileSystem.clear_instance_cache()  # instances made with the environment's endpoint
    yield {"endpoint_url": s3.endpoint, "key": "testing", "secret": "testing"}
    remote.set_storage_options(None)
    S3FileSystem.clear_instance_cache()


def test_the_out_folder_is_checked_with_the_storage_options(s3, options_only):
    """``--storage-options`` (set as the CLI sets them) reach the checks of an ``--out`` folder before a create."""
    from semroute.shared.store import check_replaceable, interrupted_create
    from semroute.shared.text_store import TEXT_KIND

    remote.set_storage_options(options_only)
    remote.write_bytes("s3://bkt/plain/a.txt", b"x")
    with pytest.raises(SemrouteError, match=r"--out s3://bkt/plain already exists and is not a semroute cache "
                                            r"\(1 entries: 'a.txt'\)"):
        check_replaceable("s3://bkt/plain", TEXT_KIND)
    remote.write_bytes("s3://bkt/half/zarr.json", b'{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    check_replaceable("s3://bkt/half", TEXT_KIND)  # the remains of an interrupted create: may be replaced
    assert interrupted_create("s3://bkt/half", TEXT_KIND)
    check_replaceable("s3://bkt/none", TEXT_KIND)


def test_an_encode_config_s_storage_options_reach_its_out_folder(s3, options_only, tiny_llama_dir, tmp_path):
    """Storage options given to an encode run (not through the CLI) are used for ``--out`` as for the inputs."""
    manifest = write_manifest(tmp_path / "m.jsonl", random_captions(6, seed=5))
    url = "s3://bkt/opts.text.zarr"
    summary = encode_text(EncodeTextConfig(data=str(manifest), out=url, llm=str(tiny_llama_dir), dtype="float32",
                                           device="cpu", progress=False, storage_options=options_only))
    assert summary["captions"] >= 6 and TextCacheReader(url).n_captions == summary["captions"]


def test_a_source_read_with_explicit_storage_options_is_retried_and_counted(s3, options_only):
    """A reader given its own options (shared/sources.py) uses this module's client settings: transient failures
    are retried by our loop (counted), not by the client's own."""
    from semroute.shared.sources import _open_binary

    remote.set_storage_options(options_only)
    remote.write_bytes("s3://bkt/src/m.csv", b"id,text\n1,a\n")
    remote.set_storage_options(None)  # only the reader's own options from here on
    before = remote.STATS.retries
    s3.fail_next(1, r"/src/m\.csv")
    with _open_binary("s3://bkt/src/m.csv", options_only) as fh:
        assert fh.read() == b"id,text\n1,a\n"
    assert s3._fail[0] == 0 and remote.STATS.retries - before == 1
