"""The training feed: threaded/process loaders give the batches of the plan, resume stays exact, reader
failures surface as themselves, text decodes the same after the copy, compiled blocks match eager ones,
captions are read straight into the loader's reused buffers."""

from __future__ import annotations

import copy
import itertools
import json
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from semroute.shared.errors import SemrouteError
from semroute.shared.store import ChecksumError
from semroute.shared.text_store import TextCacheReader
from semroute.stage1_encode.text import EncodeTextConfig, encode_text
from semroute.stage2_train.config import TrainConfig
from semroute.stage2_train.data import BatchLoader, EpochBatches, HostSlot, PairedCaches, TextBuckets
from semroute.stage2_train.dit import SemrouteDiT
from semroute.stage2_train.feed import DeviceFeed
from semroute.stage2_train.objective import flow_loss
from semroute.stage2_train.perf import compile_blocks, dit_train_flops
from semroute.stage2_train.train import train


def _plan(ds: PairedCaches, batch: int = 8) -> EpochBatches:
    return EpochBatches(ds.bucket_ids(), ds.text_lengths(), batch, seed=0)


def _first(loader, n: int, reader) -> list:
    feed = DeviceFeed(loader, "cpu", reader)
    out = [next(feed) for _ in range(n)]
    feed.close()
    return out


@pytest.mark.parametrize("workers,n", [("thread", 1), ("thread", 3), ("process", 2)])
def test_loaders_give_the_plans_batches_in_order_from_any_position(square_caches, workers, n):
    text, latents, _ = square_caches
    ds = PairedCaches(text, latents, text_layers=None, seed=5, caption_dropout=0.3)
    plan = _plan(ds)
    per_epoch = plan.per_epoch()
    start = (1, per_epoch - 2)  # crosses into the next epoch
    ref = _first(BatchLoader(ds, plan, num_workers=0, start_epoch=start[0], start_index=start[1]), 5, ds.text)
    got = _first(BatchLoader(ds, plan, num_workers=n, workers=workers, start_epoch=start[0], start_index=start[1]),
                 5, ds.text)
    assert [(b.epoch, b.index) for b in got] == [(1, per_epoch - 2), (1, per_epoch - 1), (2, 0), (2, 1), (2, 2)]
    for a, b in zip(ref, got):
        assert a.sample_ids == b.sample_ids and a.captions == b.captions
        assert torch.equal(a.text, b.text) and torch.equal(a.text_mask, b.text_mask)
        assert torch.equal(a.latents, b.latents)
    # and the batches are what the dataset's own per-sample draws give (decoded on the host)
    b = got[0]
    for row, (sample, sid) in enumerate(zip(plan.epoch(1)[per_epoch - 2], b.sample_ids)):
        item = ds[(int(sample), 1)]
        n_tok = item["text"].shape[0]
        assert item["sample_id"] == sid and torch.equal(item["latent"], b.latents[row])
        assert torch.equal(item["text"], b.text[row, :n_tok]) and int(b.text_mask[row].sum()) == n_tok


def test_text_buckets_pad_with_masked_zeros_and_leave_the_loss_unchanged(square_caches):
    text, latents, _ = square_caches
    ds = PairedCaches(text, latents, text_layers=None, seed=0, caption_dropout=0.0)
    plan = _plan(ds)
    plain = _first(BatchLoader(ds, plan, num_workers=0), 2, ds.text)
    padded = _first(BatchLoader(ds, plan, num_workers=1, buckets=TextBuckets(16)), 2, ds.text)
    assert [TextBuckets("pow2")(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
    assert [TextBuckets(24)(n) for n in (1, 24, 25)] == [24, 24, 48]
    torch.manual_seed(0)
    model = SemrouteDiT.from_preset("tiny", fusion="depth", in_channels=12, text_dim=ds.text.hidden_size,
                                    llm_num_layers=4, text_layers=ds.text.layers)
    for a, b in zip(plain, padded):
        T = a.text.shape[1]
        assert b.text.shape[1] == -(-T // 16) * 16
        assert torch.equal(b.text[:, :T], a.text) and not b.text[:, T:].any() and not b.text_mask[:, T:].any()
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        l1 = flow_loss(model, a.latents, a.text, a.text_mask, shift=3.0, generator=g1)
        l2 = flow_loss(model, b.latents, b.text, b.text_mask, shift=3.0, generator=g2)
        assert torch.allclose(l1, l2, rtol=1e-5, atol=1e-6)


def test_fp8_text_moved_as_codes_decodes_to_the_readers_features(square_caches, tmp_path, tiny_llama_dir):
    _, _, manifest = square_caches
    out = tmp_path / "fp8.text.zarr"
    encode_text(EncodeTextConfig(data=str(manifest), out=str(out), llm=str(tiny_llama_dir), dtype="float32",
                                 device="cpu", progress=False, storage="fp8"))
    reader = TextCacheReader(out, layers=[1, 3])
    bits, scales = reader.caption_bits(5)
    assert bits.dtype == torch.uint8 and scales.dtype == torch.float32 and scales.shape == bits.shape[:2]
    assert torch.equal(reader.decode_bits(bits, scales), reader.caption(5))
    null_bits, null_scales = reader.null_bits()
    assert torch.equal(reader.decode_bits(null_bits, null_scales), reader.null())


def _corrupt_copy(text_cache: str, tmp_path: Path) -> str:
    """The text cache with bytes flipped all over its feature shards (their indexes left intact)."""
    bad = tmp_path / "bad.text.zarr"
    shutil.copytree(text_cache, bad)
    for shard in (bad / "features" / "c").rglob("*"):
        if shard.is_file():
            data = bytearray(shard.read_bytes())
            for pos in range(0, int(len(data) * 0.8), 512):
                data[pos] ^= 0x01
            shard.write_bytes(bytes(data))
    return str(bad)


def _raises_within(fn, seconds: float) -> BaseException | None:
    """Run ``fn`` in a thread; the exception it raised, failing the test if it neither returns nor raises in time."""
    box: dict = {}

    def run():
        try:
            fn()
        except BaseException as err:
            box["error"] = err

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s: the loader hangs"
    return box.get("error")


@pytest.mark.parametrize("workers", ["thread", "process"])
def test_a_reader_failure_in_the_loader_is_raised_as_itself(square_caches, tmp_path, workers):
    text, latents, _ = square_caches
    ds = PairedCaches(_corrupt_copy(text, tmp_path), latents, text_layers=None, seed=0, caption_dropout=0.0)
    loader = BatchLoader(ds, _plan(ds), num_workers=2, workers=workers)
    err = _raises_within(lambda: _first(loader, 3, ds.text), 120)
    assert isinstance(err, ChecksumError) and "crc32c" in str(err), repr(err)


@pytest.mark.parametrize("workers", ["thread", "process"])
def test_an_os_error_in_the_loader_is_raised_as_itself(square_caches, tmp_path, workers):
    """An OSError reading the cache (here a shard file replaced by a folder; an I/O error of a disk alike) reaches
    the caller as an error naming the shard file, which `semroute` prints as one line: not a bare errno (``pread``
    names no file), nor torch's wrapper holding a worker's traceback."""
    text, latents, _ = square_caches
    bad = tmp_path / "bad.text.zarr"
    shutil.copytree(text, bad)
    ds = PairedCaches(str(bad), latents, text_layers=None, seed=0, caption_dropout=0.0)
    for shard in [p for p in (bad / "features" / "c").rglob("*") if p.is_file()]:
        shard.unlink()
        shard.mkdir()
    loader = BatchLoader(ds, _plan(ds), num_workers=2, workers=workers)
    err = _raises_within(lambda: _first(loader, 3, ds.text), 120)
    assert isinstance(err, SemrouteError) and re.search(r"cannot read shard file .*bad\.text\.zarr/features/c/\S+: "
                                                        r"Is a directory \(errno 21\)", str(err)), repr(err)
    assert "worker" not in str(err)


def test_training_on_a_corrupt_cache_stops_with_the_readers_error(square_caches, tmp_path):
    text, latents, _ = square_caches
    cfg = TrainConfig(text_cache=_corrupt_copy(text, tmp_path), latent_cache=latents, out=str(tmp_path / "run"),
                      preset="tiny", batch_size=8, num_workers=2, loader="thread", tensorboard=False, max_steps=5)
    err = _raises_within(lambda: train(cfg, progress=False), 120)
    assert isinstance(err, ChecksumError), repr(err)


# A process that exits while its loader thread is inside torch calls (here: building a slow batch).
_EXIT_WHILE_BUILDING = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("semroute", sys.argv[1] + "/__init__.py",
                                              submodule_search_locations=[sys.argv[1]])
sys.modules["semroute"] = module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
import torch
from semroute.stage2_train.data import BatchLoader, EpochBatches, PairedCaches
from semroute.stage2_train.feed import DeviceFeed

class SlowLoader(BatchLoader):  # a large batch: the builder spends its time inside torch's C++
    def build(self, *args, **kwargs):
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            torch.rand(256, 256)
        return super().build(*args, **kwargs)

ds = PairedCaches(sys.argv[2], sys.argv[3], text_layers=None, seed=0)
plan = EpochBatches(ds.bucket_ids(), ds.text_lengths(), 8, seed=0)
feed = DeviceFeed(SlowLoader(ds, plan, num_workers=2), "cpu", ds.text)
next(feed)
if sys.argv[4] == "close":
    feed.close()
print("exiting", flush=True)
"""


@pytest.mark.parametrize("how", ["close", "exit"])
def test_a_process_exits_cleanly_while_its_loader_threads_build(square_caches, tmp_path, how):
    """Daemon loader threads left inside torch calls at interpreter exit made it abort ("terminate called
    without an active exception", exit status 134, after the run's output): closing the feed (the trainer's
    ``finally``) or just exiting (an unclosed loader) waits for them instead."""
    import subprocess
    import sys

    text, latents, _ = square_caches
    script = tmp_path / "exit_while_building.py"
    script.write_text(_EXIT_WHILE_BUILDING)
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, str(script), root, text, latents, how], capture_output=True, text=True,
                          timeout=120)
    assert "exiting" in proc.stdout, proc.stderr
    assert proc.returncode == 0 and "terminate called" not in proc.stderr, (proc.returncode, proc.stderr[-2000:])


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_resume_is_exact_with_the_threaded_loader(square_caches, tmp_path):
    text, latents, _ = square_caches
    base = dict(text_cache=text, latent_cache=latents, preset="tiny", batch_size=8, tensorboard=False, log_every=1,
                lr=1e-3, fusion="static", max_steps=16)
    inline = TrainConfig(**base, out=str(tmp_path / "inline"), num_workers=0, checkpoint_every=1000)
    threaded = TrainConfig(**base, out=str(tmp_path / "threaded"), num_workers=2, loader="thread", checkpoint_every=8)
    train(inline, progress=False)
    train(threaded, progress=False)
    a, b = _losses(Path(inline.out)), _losses(Path(threaded.out))
    assert [b[s] for s in range(1, 17)] == [a[s] for s in range(1, 17)]  # (16 steps cross an epoch of 12)
    # drop the last checkpoint and resume from step 8: the same losses again
    shutil.rmtree(Path(threaded.out) / "checkpoints" / "step-0000016")
    train(threaded, resume="latest", progress=False)
    c = _losses(Path(threaded.out))
    assert [c[s] for s in range(9, 17)] == [a[s] for s in range(9, 17)]
    row = json.loads((Path(threaded.out) / "logs" / "metrics.jsonl").read_text().splitlines()[-2])
    assert row["loader_wait_s"] >= 0 and row["mfu"] is None and row["tflops_per_s"] > 0  # no peak known on CPUs


@pytest.mark.slow  # inductor's first C++ compilation: ~45 s of CPU on a cold cache, ~9 s warm
def test_compiled_blocks_give_the_eager_losses(square_caches):
    text, latents, _ = square_caches
    ds = PairedCaches(text, latents, text_layers=None, seed=0, caption_dropout=0.0)
    batches = _first(BatchLoader(ds, _plan(ds), num_workers=0, buckets=TextBuckets("pow2")), 3, ds.text)
    torch.manual_seed(0)
    eager = SemrouteDiT.from_preset("tiny", fusion="depth", in_channels=12, text_dim=ds.text.hidden_size,
                                    llm_num_layers=4, text_layers=ds.text.layers, num_blocks=1)
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled) == 1
    losses = []
    for model in (eager, compiled):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        run = []
        for k, b in enumerate(batches):
            loss = flow_loss(model, b.latents, b.text, b.text_mask, shift=3.0, generator=torch.Generator().manual_seed(k))
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses.append(run)
    assert np.allclose(losses[0], losses[1], rtol=1e-4, atol=1e-6), losses
    assert len({b.text.shape[1] for b in batches}) == 1  # pow2 buckets: one text shape for these captions


def test_model_flops_are_counted_from_the_config():
    config = SemrouteDiT.from_preset("tiny", fusion="depth").config
    flops = dit_train_flops(config, image_tokens=64, text_tokens=10, batch=2)
    # by hand for the tiny preset (2 blocks, hidden 64, 4/2 heads of 16, MLP 128, patch 2, 4 channels, text 32, depth)
    d, q, kv, N, T = 64, 64, 32, 64, 10
    block = 2 * N * d * (2 * q + 2 * kv) + 4 * N * N * q + 2 * N * d * 2 * q + 2 * T * d * 2 * kv + 4 * N * T * q \
        + 2 * N * d * 3 * 128
    forward = 2 * block + 2 * N * 16 * d * 2 + 2 * 2 * T * 32 * d
    assert flops == 3 * forward * 2
    deep = {"fusion": "deep", "num_blocks": 2}
    assert dit_train_flops(deep, 64, 10) is None


@pytest.mark.parametrize("layers", [None, [1, 3]])
def test_the_loader_reads_captions_straight_into_its_reused_host_buffer(square_caches, layers):
    text, latents, _ = square_caches
    ds = PairedCaches(text, latents, text_layers=layers, seed=3, caption_dropout=0.3)
    plan = _plan(ds)
    loader = BatchLoader(ds, plan, num_workers=0, buckets=TextBuckets(16))
    slot = HostSlot(pin=False)
    calls, read = [], ds.text.captions_bits

    def spy(indices, into=None):
        out = read(indices, into=into)
        calls.append((into, out))
        return out

    ds.text.captions_bits = spy
    dropped = 0
    for epoch, index, samples in itertools.islice(plan.iterate(0), 4):
        fresh = loader.build(epoch, index, samples)
        got = loader.build(epoch, index, samples, slot)
        assert got.sample_ids == fresh.sample_ids and got.captions == fresh.captions
        assert torch.equal(got.text, fresh.text) and torch.equal(got.text_mask, fresh.text_mask)
        assert torch.equal(got.latents, fresh.latents)
        buf = slot.buffers["text"]
        assert got.text.data_ptr() == buf.data_ptr()  # the batch is the slot's buffer
        into, out = calls[-1]
        if layers is None:  # every stored caption was read into its row of the buffer, not copied there
            assert len(into) == len(out) == sum(c >= 0 for c in got.captions)
            rows = [got.text[row, :n] for row, n in enumerate(got.text_mask.sum(1).tolist())
                    if got.captions[row] >= 0]
            assert [t.data_ptr() for t in into] == [r.data_ptr() for r in rows] == [f.data_ptr() for f, _ in out]
        else:  # a subset of the stored layers is picked after reading: nothing read in place
            assert into is not None and all(f.data_ptr() != t.data_ptr() for (f, _), t in zip(out, into))
        dropped += sum(c < 0 for c in got.captions)
    assert dropped  # the null caption was copied into its rows as well


def test_local_reads_reuse_one_buffer_per_thread(square_caches, monkeypatch):
    import zarr

    text, _, _ = square_caches
    reader = TextCacheReader(text)
    features = reader._arrays()["features"]
    stored = zarr.open_group(text, mode="r")["features"]
    spans = [(int(reader.offsets[i]), int(reader.offsets[i] + reader.lengths[i])) for i in (3, 40, 7, 90)]
    features.read_many(spans)  # shard indexes read (and kept) here
    monkeypatch.setattr("os.pread", lambda *a: pytest.fail("a chunk read allocated a new bytes object (os.pread)"))
    got = features.read_many(spans)
    buf = features._scratch.buf
    again = features.read_many(spans[::-1])
    assert features._scratch.buf is buf  # grown once, then reused
    for (a, b), x, y in zip(spans, got, again[::-1]):
        assert np.array_equal(x, stored[a:b]) and np.array_equal(y, stored[a:b])
    other = {}
    t = threading.Thread(target=lambda: (features.read_many(spans), other.update(buf=features._scratch.buf)))
    t.start()
    t.join()
    assert other["buf"] is not buf  # loader threads never share one


def _many_shard_text_cache(path: Path, n: int = 40) -> TextCacheReader:
    """A text cache of random bf16 rows cut into many small shards (about 4 captions each)."""
    import pyarrow as pa

    from semroute.shared.text_store import TextCacheWriter

    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 9, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    index = pa.table({"caption": np.arange(n), "sample_id": [str(i) for i in range(n)], "start": offsets[:-1],
                      "n_tokens": lengths.astype(np.int32)})
    w = TextCacheWriter.create(path, offsets=offsets, index=index, fingerprint={"compute_dtype": "bfloat16",
                               "layers": [1, 2]}, n_layers=2, hidden_size=16, storage="exact",
                               shard_bytes=20 * 64, chunk_bytes=4 * 64, input_sha256="t")
    g = torch.Generator().manual_seed(0)
    for s in range(w.layout.n_shards):
        a, b = w.layout.shard_rows(s)
        w.write_shard(s, torch.randn((b - a, 2, 16), generator=g).to(torch.bfloat16))
    w.write_null(torch.zeros((2, 2, 16), dtype=torch.bfloat16), text="")
    w.finish()
    return TextCacheReader(path)


def test_reads_touching_more_shards_than_files_kept_open(tmp_path):
    import zarr

    reader = _many_shard_text_cache(tmp_path / "many.text.zarr")
    features = reader._arrays()["features"]
    stored = zarr.open_group(str(tmp_path / "many.text.zarr"), mode="r")["features"]
    assert features.meta.layout.n_shards >= 8
    spans = [(int(reader.offsets[i]), int(reader.offsets[i] + reader.lengths[i])) for i in range(reader.n_captions)]
    features._max_open = 2  # one call needs far more shards than stay open
    for got, (a, b) in zip(features.read_many(spans[::-1])[::-1], spans):
        assert np.array_equal(got, stored[a:b])

    # Loader threads each keep their own open files: one never closes a file another is reading.
    features._max_open = 1
    errors, tables = [], []

    def reads(order):
        try:
            for _ in range(20):
                for got, (a, b) in zip(features.read_many([spans[i] for i in order]), (spans[i] for i in order)):
                    assert np.array_equal(got, stored[a:b])
            tables.append(features._fds)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=reads, args=(order,)) for order in (range(0, 40, 3), range(39, 0, -2))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == [] and len(tables) == 2 and tables[0] is not tables[1]
    features.close()
    assert not any(len(t) for t in tables)
