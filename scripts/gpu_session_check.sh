#!/usr/bin/env bash
# One GPU call for the runtime's new shape and the features that landed with it: the runtime
# tests on a CUDA artifact (CUDA graphs, overlap, dependent launch, prefix caching, the device
# sampler, the grammar overlap rule), then the FP8, long-context and sampler kernel tests on CUDA.
# The wheels the GPU machine lacks come in QWEN3_AOT_WHEELS (default ./.whl): dashscope (Qwen's
# tokenizer, read as a zip), xgrammar + apache-tvm-ffi + pydantic and jsonschema's set (installed to a
# folder on PYTHONPATH here).
#     bash scripts/gpu_session_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/qwen3_aot_out}; mkdir -p "$OUT"
WHEELS=${QWEN3_AOT_WHEELS:-$PWD/.whl}
SITE=/tmp/qwen3-aot-site
source "$(dirname "$0")/gpu_grammar_site.sh"
export PYTHONPATH=src:$SITE TRITON_INTERPRET=0 QWEN3_AOT_RUNTIME_DEVICE=cuda QWEN3_AOT_WHEELS=$WHEELS
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 330 python3 -m pytest -q -n 0 -p no:cacheprovider tests/runtime > "$OUT/runtime_tests.txt" 2>&1
runtime_rc=$?
timeout 90 python3 -m pytest -q -n 0 -p no:cacheprovider tests/custom_ops/test_fp8_linear.py \
    tests/custom_ops/test_index_bounds.py > "$OUT/kernel_tests.txt" 2>&1
kernel_rc=$?
tail -15 "$OUT/runtime_tests.txt"; tail -5 "$OUT/kernel_tests.txt"
echo "runtime tests exit code: $runtime_rc, kernel tests exit code: $kernel_rc"
