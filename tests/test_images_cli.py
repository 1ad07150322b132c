"""``encode-images`` as real processes: resume after ``kill -9``, and two processes equal one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from images_testutil import CLI, tiny_vae, write_images, write_manifest

from semroute.shared.store import ShardLayout, read_parquet

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Object at .* is not recognized")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    # Wider than the other tests' VAE so that a run lasts long enough to be killed in the middle.
    vae = tiny_vae(root / "vae", block_out_channels=(32, 64), norm_num_groups=8)
    recs = write_images(root / "imgs", 96, sizes=((80, 64), (64, 80), (72, 72)))
    recs.insert(5, {"id": "gone", "image": "missing.jpg", "text": "x"})
    data = write_manifest(root / "data.jsonl", recs)
    return root, vae, data


def _args(setup, out: Path) -> list[str]:
    root, vae, data = setup
    return ["encode-images", str(data), "--vae", str(vae), "--out", str(out), "--resolution", "64",
            "--image-root", str(root / "imgs"), "--shard-mb", "0.1", "--batch-size", "2", "--workers", "1",
            "--no-progress"]


def _cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, CLI, *args], capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _flags(out: Path) -> int:
    """Done flags set: their chunk files, not zarr's temporary ``*.partial`` one of a flag being written (a kill
    then leaves that flag unset, and the resume rightly rewrites its shard)."""
    return sum(1 for p in (out / "progress").rglob("c/*") if p.is_file() and not p.name.endswith(".partial"))


def _assert_same_store(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    names = sorted(name for name, node in ga.members(max_depth=None) if isinstance(node, zarr.Array))
    assert names == sorted(name for name, node in gb.members(max_depth=None) if isinstance(node, zarr.Array))
    assert any(n.endswith("/mean") for n in names)
    for name in names:
        assert np.array_equal(ga[name][...], gb[name][...]), name
    assert read_parquet(a, "index.parquet").equals(read_parquet(b, "index.parquet"))
    assert (a / "skipped.jsonl").read_text() == (b / "skipped.jsonl").read_text()
    # Byte for byte: every file but the root attributes (which hold the run's time and world size).
    files = {p.relative_to(a) for p in a.rglob("*") if p.is_file()} - {Path("zarr.json")}
    assert files == {p.relative_to(b) for p in b.rglob("*") if p.is_file()} - {Path("zarr.json")}
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    skip = {"encode_seconds", "world_size", "integrity"}  # the seal's attrs sha256 covers the two volatile ones
    attrs_a, attrs_b = ({k: v for k, v in g.attrs["semroute"].items() if k not in skip} for g in (ga, gb))
    assert attrs_a == attrs_b
    seal_a, seal_b = (g.attrs["semroute"]["integrity"] for g in (ga, gb))
    assert seal_a["index_sha256"] == seal_b["index_sha256"] and seal_a["arrays_sha256"] == seal_b["arrays_sha256"]


@pytest.fixture(scope="module")
def reference(setup):
    out = setup[0] / "reference.latents.zarr"
    _cli(_args(setup, out))
    return out


def test_resume_after_kill_9_equals_an_uninterrupted_run(setup, reference, tmp_path):
    out = tmp_path / "killed.latents.zarr"
    buckets = zarr.open_group(str(reference), mode="r").attrs["semroute"]["buckets"]
    n_shards = sum(ShardLayout(**b["layout"]).n_shards for b in buckets)
    proc = subprocess.Popen([sys.executable, CLI, *_args(setup, out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if (out / "progress").exists() and _flags(out) >= 1:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its decoding workers, mid-write
    proc.wait()
    done = _flags(out)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert 1 <= done < n_shards, f"{done} of {n_shards} shards were flagged when killed"
    assert not zarr.open_group(str(out), mode="r").attrs["semroute"]["complete"]
    resumed = _cli(_args(setup, out) + ["--resume"])
    assert f"resumed: {done} of {n_shards} shards were already written" in resumed.stdout
    _assert_same_store(out, reference)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(setup, reference, tmp_path):
    out = tmp_path / "two.latents.zarr"
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           CLI, *_args(setup, out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout
    assert zarr.open_group(str(out), mode="r").attrs["semroute"]["world_size"] == 2
    _assert_same_store(out, reference)
