#!/usr/bin/env bash
# The runtime's GPU command (issue 5): the runtime tests on a CUDA artifact (real CUDA graphs)
# while a Qwen3-0.6B-shaped bf16 artifact builds in the background, then bench/gpu_runtime.py
# on it (first token from a new process, decode tok/s against transformers). Logs under $OUT.
#     bash scripts/gpu_runtime_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/qwen3_aot_out}; mkdir -p "$OUT"
export PYTHONPATH=src TRITON_INTERPRET=0 QWEN3_AOT_RUNTIME_DEVICE=cuda
WORK=/tmp/qwen3_aot_gpu_artifact
(python3 bench/random_checkpoint.py $WORK/checkpoint && python3 scripts/export.py $WORK/checkpoint -o $WORK/artifact \
    --device cuda --dtype bfloat16 --no-verify --force) > "$OUT/build.log" 2>&1 &
build=$!
python3 -m pytest -q -p no:cacheprovider tests/runtime 2>&1 | tee "$OUT/runtime_tests.txt" | tail -8
tests_rc=${PIPESTATUS[0]}
wait $build; tail -3 "$OUT/build.log"
python3 bench/gpu_runtime.py --work $WORK --json "$OUT/runtime.json" 2>&1 | tee "$OUT/runtime.log" | tail -20
echo "runtime tests exit code: $tests_rc"
exit "$tests_rc"
