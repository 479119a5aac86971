#!/usr/bin/env bash
# The runtime tests on a CUDA artifact (real CUDA graphs); the runtime's figures come from
# bench/e2e_bench.py (scripts/gpu_perf_check.sh). Log under $OUT. The real-tokenizer tests take Qwen's
# tokenizer from the dashscope wheel, which the GPU machine cannot download: bring it in a folder
# (QWEN3_AOT_WHEELS, default ./.whl).
#     bash scripts/gpu_runtime_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/qwen3_aot_out}; mkdir -p "$OUT"
export PYTHONPATH=src TRITON_INTERPRET=0 QWEN3_AOT_RUNTIME_DEVICE=cuda QWEN3_AOT_WHEELS=${QWEN3_AOT_WHEELS:-$PWD/.whl}
python3 -m pytest -q -n 0 -p no:cacheprovider tests/runtime 2>&1 | tee "$OUT/runtime_tests.txt" | tail -8
exit "${PIPESTATUS[0]}"
