"""``--out`` of both encoders never deletes what semroute did not write: an existing folder that is not a
cache of the command's kind (or the current directory, or a file) is refused, with or without
``--overwrite``, and keeps every byte; a cache of the right kind is still replaced by ``--overwrite``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from testkit import CLI, write_manifest, write_square_images
from typer.testing import CliRunner

from semroute.cli import app
from semroute.shared.errors import SemrouteError


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_llama_dir) -> dict:
    root = tmp_path_factory.mktemp("outputs")
    manifest = write_manifest(root / "data.jsonl", write_square_images(root / "img", 6))
    return {"manifest": manifest, "llm": tiny_llama_dir}


def _encode(kind: str, inputs: dict, out, *extra: str):
    if kind == "text":
        args = ["encode-text", str(inputs["manifest"]), "--llm", str(inputs["llm"]), "--dtype", "float32"]
    else:
        args = ["encode-images", str(inputs["manifest"]), "--vae", "pixel", "--resolution", "32", "--workers", "0"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--device", "cpu", "--no-progress", *extra])
    if result.exit_code != 0:  # what `semroute` prints for a SemrouteError (cli.main), or a raw exception
        assert isinstance(result.exception, SemrouteError), f"not a clean error: {result.exception!r}"
        result.message = str(result.exception)
    return result


def _user_folder(path: Path) -> dict[str, bytes]:
    (path / "sub").mkdir(parents=True)
    files = {"notes.txt": b"my thesis", "sub/data.bin": os.urandom(64)}
    for name, data in files.items():
        (path / name).write_bytes(data)
    return files


def _assert_intact(path: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (path / name).read_bytes() == data, f"{name} was changed or deleted"
    assert not (path / "zarr.json").exists()


@pytest.mark.parametrize("kind", ["text", "images"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_existing_user_folder_is_refused_and_kept(tmp_path, inputs, kind, overwrite):
    files = _user_folder(tmp_path / "results")
    result = _encode(kind, inputs, tmp_path / "results", *(["--overwrite"] if overwrite else []))
    assert result.exit_code != 0
    assert "refusing to replace it" in result.message and "not a semroute cache" in result.message
    _assert_intact(tmp_path / "results", files)


@pytest.mark.parametrize("kind", ["text", "images"])
def test_out_dot_never_empties_the_current_directory(tmp_path, inputs, kind, monkeypatch):
    files = _user_folder(tmp_path / "cwd")
    monkeypatch.chdir(tmp_path / "cwd")
    result = _encode(kind, inputs, ".", "--overwrite")
    assert result.exit_code != 0 and "refusing to replace it" in result.message
    _assert_intact(tmp_path / "cwd", files)


def test_cli_prints_one_line_and_exits_1(tmp_path, inputs):
    files = _user_folder(tmp_path / "cwd")
    proc = subprocess.run([sys.executable, str(CLI), "encode-images", str(inputs["manifest"]), "--vae", "pixel",
                           "--resolution", "32", "--workers", "0", "--out", ".", "--no-progress"],
                          cwd=tmp_path / "cwd", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: --out . already exists") and "Traceback" not in proc.stderr
    _assert_intact(tmp_path / "cwd", files)


@pytest.mark.parametrize("kind", ["text", "images"])
def test_out_that_is_a_file_is_refused(tmp_path, inputs, kind):
    target = tmp_path / "cache.zarr"
    target.write_bytes(b"not a folder")
    result = _encode(kind, inputs, target, "--overwrite")
    assert result.exit_code != 0 and "is a file" in result.message
    assert target.read_bytes() == b"not a folder"


def test_overwrite_replaces_a_cache_of_its_kind_but_not_of_the_other(tmp_path, inputs):
    text, latents = tmp_path / "d.text.zarr", tmp_path / "d.latents.zarr"
    assert _encode("text", inputs, text).exit_code == 0
    assert _encode("images", inputs, latents).exit_code == 0
    assert _encode("text", inputs, text, "--overwrite").exit_code == 0  # same kind: replaced
    wrong = _encode("text", inputs, latents, "--overwrite")
    assert wrong.exit_code != 0 and "latent-cache store, not a semroute.text-cache" in wrong.message
    assert (latents / "index.parquet").exists()


def test_empty_existing_folder_is_used(tmp_path, inputs):
    (tmp_path / "empty.text.zarr").mkdir()
    assert _encode("text", inputs, tmp_path / "empty.text.zarr").exit_code == 0
    assert (tmp_path / "empty.text.zarr" / "zarr.json").exists()
