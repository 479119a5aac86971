#!/usr/bin/env bash
# Create .venv and install qwen3-aot with its test extra, on a machine with or without a GPU.
# torch==2.13.0 is pinned first: on the project's machines pip's find-links hold a CPU build
# of it on local disk, installed in seconds. Elsewhere pip takes PyPI's Linux wheel of 2.13.0,
# which is the CUDA build (several GB of CUDA libraries; it runs on a CPU-only machine too).
# Any torch >= 2.11 works (the GPU machine has 2.11).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" triton
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -c "import torch, triton, qwen3_aot; print('torch', torch.__version__, 'triton', triton.__version__)"
