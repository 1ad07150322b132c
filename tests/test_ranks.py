"""One rank failing under multi-process training ends the job: bounded time, exit code 1, the failing rank's
error printed once and no traceback (stage2_train/ranks.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from semroute.stage1_encode.images import EncodeImagesConfig, encode_images
from semroute.stage1_encode.text import EncodeTextConfig, encode_text
from testkit import CLI, REPO, write_manifest, write_square_images

BATCH = 4


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_llama_dir):
    """48 captioned squares; the text cache in small shards (one or two captions each)."""
    root = tmp_path_factory.mktemp("ranks")
    records = [{**r, "id": f"s{i}"} for i, r in enumerate(write_square_images(root / "img", 48))]
    manifest = write_manifest(root / "m.jsonl", records)
    text, latents = root / "t.zarr", root / "l.zarr"
    encode_text(EncodeTextConfig(data=str(manifest), out=str(text), llm=str(tiny_llama_dir), dtype="float32",
                                 device="cpu", shard_mb=0.01, progress=False))
    encode_images(EncodeImagesConfig(data=str(manifest), out=str(latents), vae="pixel", resolution=32, workers=0,
                                     device="cpu", progress=False))
    return text, latents


def shard_only_rank_1_reads(text: Path, latents: Path) -> Path:
    """A text shard file that rank 1 of 2 reads for its first batch and rank 0 never reads in the epoch."""
    from semroute.stage2_train.data import EpochBatches, PairedCaches

    ds = PairedCaches(str(text), str(latents), text_layers=None)
    features = ds.text._arrays()["features"]

    def shards(sample: int) -> set[int]:
        out = set()
        for c in ds.caption_idx[ds.caption_ptr[sample]: ds.caption_ptr[sample + 1]]:
            first, n = int(ds.text.offsets[c]), int(ds.text.lengths[c])
            out |= set(range(first // features.rows_per_shard, (first + n - 1) // features.rows_per_shard + 1))
        return out

    def batches(rank: int) -> list[np.ndarray]:
        plan = EpochBatches(ds.bucket_ids(), ds.text_lengths(), BATCH, seed=0, rank=rank, world_size=2)
        it = plan.iterate()
        return [next(it)[2] for _ in range(plan.per_epoch())]

    rank0 = set().union(*(shards(int(s)) for b in batches(0) for s in b))
    only1 = sorted(set().union(*(shards(int(s)) for s in batches(1)[0])) - rank0)
    assert only1, "no shard is read by rank 1 alone; change the fixture's shard size"
    return Path(features.shard_path(only1[0]))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_a_rank_failing_on_a_damaged_shard_ends_every_rank(caches, tmp_path):
    import shutil

    text, latents = caches
    copy = tmp_path / "t.zarr"
    shutil.copytree(text, copy)
    shard = shard_only_rank_1_reads(copy, latents)
    shard.unlink()
    run = tmp_path / "run"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no",
         "--dynamo_backend", "no", str(CLI), "train", "--text-cache", str(copy), "--latent-cache", str(latents),
         "--fusion", "static", "--preset", "tiny", "--batch-size", str(BATCH), "--max-steps", "3", "--no-progress",
         "--set", "tensorboard=false", "--out", str(run)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    seconds = time.perf_counter() - t0
    print(f"2-process failure ended in {seconds:.1f}s (exit {proc.returncode})")
    err = proc.stderr
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    assert proc.returncode != 0, err[-3000:]
    assert err.count(f"error: shard file {shard} is missing") == 1, err[-3000:]  # rank 1's error, once
    assert "rank 0 stopped: rank 1 failed" in err, err[-3000:]
    assert "Traceback" not in err and "Connection closed" not in err, err[-3000:]
    # Nothing half-written: every checkpoint folder there is complete (here: none was written).
    checkpoints = run / "checkpoints"
    for folder in (checkpoints.iterdir() if checkpoints.exists() else ()):
        assert (folder / "complete.json").exists(), f"{folder} has no complete.json"


# A rank that fails and cannot exit (a non-daemon thread that never ends, as a shard download stuck on a
# dead endpoint would be) while the other rank waits in a collective: without fail_together both wait for
# the process group's timeout. Launched as plain processes (no elastic agent to kill the others), as a
# multi-node job's ranks are to each other.
SCRIPT = textwrap.dedent("""
    import datetime, importlib.util, sys, threading, time
    spec = importlib.util.spec_from_file_location("semroute", {init!r}, submodule_search_locations=[{repo!r}])
    sys.modules["semroute"] = module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # this checkout as `semroute`, as cli.py does
    import torch.distributed as dist
    from semroute.shared.errors import SemrouteError
    from semroute.stage2_train import ranks

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    with ranks.fail_together():
        if dist.get_rank() == 1:
            threading.Thread(target=time.sleep, args=(3600,)).start()  # keeps the interpreter from exiting
            raise SemrouteError("rank 1 met bad data")
        dist.barrier()  # rank 1 never joins
""")


def test_a_failed_rank_that_cannot_exit_does_not_hold_the_others(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(init=str(REPO / "__init__.py"), repo=str(REPO)))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "SEMROUTE_PEER_GRACE_S": "2", "SEMROUTE_EXIT_GRACE_S": "3", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            p.kill()
    seconds = time.perf_counter() - t0
    assert seconds < 60, f"ended after {seconds:.0f}s"
    assert [p.returncode for p in procs] == [1, 1], outs
    assert "rank 0: stopping, rank 1 failed" in outs[0][1], outs[0][1]
    assert "SemrouteError: rank 1 met bad data" in outs[1][1] and "ending it" in outs[1][1], outs[1][1]
