"""Write faults lose nothing: an encode or a checkpoint that fails mid-write (the file-size limit, as a full
disk would) stops with one named error, and the run resumed afterwards ends with exactly what an
uninterrupted run writes."""

from __future__ import annotations

import resource
import subprocess
import sys

import numpy as np
import pytest

from semroute.shared.inspect import verify
from semroute.shared.store import open_group
from testkit import CLI, run_cli, write_manifest, write_square_images


def _run_limited(args: list[str], fsize: int) -> subprocess.CompletedProcess:
    """``python cli.py ARGS`` with every file it writes limited to ``fsize`` bytes (RLIMIT_FSIZE: writes past it
    fail with EFBIG, Python ignoring SIGXFSZ)."""
    import os

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))

    return subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True, preexec_fn=limit,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def _sizes(root) -> list[int]:
    return sorted({p.stat().st_size for p in root.rglob("*") if p.is_file()})


def _arrays(store) -> dict[str, bytes]:
    """Every array of a store, read whole, by name (sharded ones through the checked reader)."""
    group = open_group(str(store))
    out = {}
    for name, arr in group.arrays():
        out[name] = np.asarray(arr[...]).tobytes()
    for name, sub in group.groups():
        for inner, arr in sub.arrays():
            out[f"{name}/{inner}"] = np.asarray(arr[...]).tobytes()
        for inner, g2 in sub.groups():
            for leaf, arr in g2.arrays():
                out[f"{name}/{inner}/{leaf}"] = np.asarray(arr[...]).tobytes()
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("writes")
    records = [{**r, "id": f"s{i}"} for i, r in enumerate(write_square_images(root / "img", 24))]
    return write_manifest(root / "m.jsonl", records)


@pytest.mark.slow  # about ten encode subprocesses
@pytest.mark.parametrize("command", ["encode-text", "encode-images"])
def test_an_encode_that_fails_mid_write_resumes_to_the_same_store(tmp_path, data, tiny_llama_dir, command):
    args = (["--llm", str(tiny_llama_dir), "--dtype", "float32", "--device", "cpu", "--shard-mb", "0.01",
             "--storage", "fp8"] if command == "encode-text" else
            ["--vae", "pixel", "--resolution", "32", "--workers", "0", "--device", "cpu", "--shard-mb", "0.02"])
    ref = tmp_path / "ref.zarr"
    run_cli(command, str(data), "--out", str(ref), "--no-progress", *args)
    # (above 8 KiB: below that, the limit also stops the interpreter's own shared-memory arena at start-up)
    sizes = [n for n in _sizes(ref) if n > 8192]
    # limits just under files of several sizes: the write of the first file that large fails, at several points
    limits = sorted({sizes[int(q * (len(sizes) - 1))] - 1 for q in (0.4, 0.8, 1.0)} - {0, -1})
    failed = 0
    for limit in limits:
        out = tmp_path / f"cut-{limit}.zarr"
        proc = _run_limited([command, str(data), "--out", str(out), "--no-progress", *args], limit)
        if proc.returncode == 0:
            continue
        failed += 1
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "File too large" in proc.stderr and str(out) in proc.stderr, proc.stderr[-3000:]
        run_cli(command, str(data), "--out", str(out), "--no-progress", "--resume", *args)
        assert verify(str(out))[1] == []
        assert _arrays(out) == _arrays(ref), f"limit {limit}"
        a, b = (open_group(str(p)).attrs["semroute"]["integrity"]["index_sha256"] for p in (out, ref))
        assert a == b
    assert failed >= min(2, len(limits)), f"only {failed} of {limits} limits made the encode fail"


@pytest.mark.slow  # two training subprocesses
def test_a_checkpoint_that_fails_mid_write_is_named_and_the_resumed_run_equals_an_uninterrupted_one(
        square_caches, tmp_path):
    from semroute.stage2_train.config import TrainConfig
    from semroute.stage2_train.run_folder import RunFolder
    from semroute.stage2_train.train import train

    text, latents, _ = square_caches
    common = ["--text-cache", text, "--latent-cache", latents, "--fusion", "static", "--preset", "tiny",
              "--batch-size", "8", "--num-workers", "0", "--no-progress", "--set", "tensorboard=false",
              "--set", "log_every=1", "--set", "checkpoint_every=2", "--lr", "1e-3", "--max-steps", "4"]
    ref = tmp_path / "ref"
    train(TrainConfig(text_cache=text, latent_cache=latents, out=str(ref), fusion="static", preset="tiny",
                      batch_size=8, num_workers=0, tensorboard=False, log_every=1, checkpoint_every=2, lr=1e-3,
                      max_steps=4), progress=False)
    biggest = max(p.stat().st_size for p in (ref / "checkpoints" / "step-0000004").rglob("*") if p.is_file())
    run = tmp_path / "run"
    proc = _run_limited(["train", *common, "--out", str(run)], biggest - 1)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: writing checkpoint step-0000002" in proc.stderr and "nothing was published" in proc.stderr, \
        proc.stderr[-3000:]
    assert RunFolder(run).checkpoints() == []  # nothing half-written was published
    run_cli("train", "--out", str(run), "--resume", "latest", *common)
    losses = {r["step"]: r["loss"] for r in RunFolder(run).metrics() if "loss" in r}
    assert losses == {r["step"]: r["loss"] for r in RunFolder(ref).metrics() if "loss" in r}


def test_a_file_in_the_way_of_an_output_folder_is_one_clear_line(tmp_path):
    import errno

    from semroute.shared.errors import describe_path_error

    manifest = write_manifest(tmp_path / "m.jsonl", write_square_images(tmp_path / "img", 4))
    (tmp_path / "afile").write_text("mine\n")
    # (the second: the folder of --out, where its lock goes beside it, cannot be made: the file in the way named)
    for out, said, named in ((tmp_path / "afile", "is a file, not a folder", tmp_path / "afile"),
                             (tmp_path / "afile" / "x.latents.zarr", "a file is in the way of a folder this command "
                                                                     "creates", tmp_path / "afile")):
        proc = run_cli("encode-images", str(manifest), "--vae", "pixel", "--resolution", "32", "--out", str(out),
                       "--no-progress", check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith("error: ") and f"{named}" in proc.stderr and said in proc.stderr, proc.stderr
    assert (tmp_path / "afile").read_text() == "mine\n"
    # an OSError that names no path, or an unexpected kind, is not dressed up as the user's mistake
    assert describe_path_error(OSError(errno.EIO, "Input/output error", "x")) is None
    assert describe_path_error(OSError(errno.ENOENT, "No such file or directory")) is None
