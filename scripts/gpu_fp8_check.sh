#!/usr/bin/env bash
# FP8 weights on one GPU (issue 32), one call per part, each under 10 minutes:
#   tests: the FP8 tests on CUDA (kernels against float64, the ops' schemas, checkpoints, refusals)
#   probe: bench/fp8_scaled_mm_probe.py, torch's block-scaled _scaled_mm (cuBLASLt) against bf16 and
#          through AOTInductor (the next step for the GEMM above 64 rows)
#   cublas: the op's cuBLAS path (QWEN3_AOT_FP8_GEMM=cublas) in one short call: its tests on sm_90
#          (against float64, through AOTInductor), then the probe's timings without its AOTI part
#   (QWEN3_AOT_FP8_GEMM=cublas before 8b-fp8 / 8b-measure builds and checks the cuBLAS path)
#   kernels: the op's tests as cublas runs them, then bench/fp8_bench.py --stage kernels for 0.6B and 8B:
#          every FP8 kernel against float64 and timed against bf16, the weight-only tiles kernel at
#          several launch parameters (with QWEN3_AOT_FP8_GEMM=cublas: cuBLAS's GEMM in place of ours)
#   0.6B: bench/fp8_bench.py --shapes 0.6B (kernels, both builds, measures, accuracy) in one call
#   8b-bf16, 8b-fp8, 8b-measure: 8B in three calls that must run back to back (14b-...: 14B likewise)
#   8b-build, 8b-measure: the same in two calls, both builds at once (their build times shared;
#   14b-build holds both 14B models on the GPU at once: on an 80 GB H100 prefer 14b-bf16, 14b-fp8)
#   32b-build, 32b-measure: 32B from an FP8 checkpoint, FP8 only, back to back (no build verify: the
#   eager model and the artifact together may not fit an 80 GB H100)
#   (files survive between calls only while the machine stays warm, 30 s after a call;
#   FP8_NO_KERNEL_CHECKS=1 skips the measure stage's kernel checks, FP8_BUILDS=fp8 measures that
#   artifact alone, FP8_TIMEOUT_S bounds the bench)
# Qwen's tokenizer is made from the dashscope wheel: QWEN3_AOT_WHEELS=.whl (see tests/qwen_checkpoint.py).
# Each part writes $OUT/fp8_PART.log (and .json) and prints the tables last.
#     QWEN3_AOT_WHEELS=.whl bash scripts/gpu_fp8_check.sh 0.6B
set -uo pipefail
OUT=${OUT:-/tmp/qwen3_aot_out}; mkdir -p "$OUT"
export PYTHONPATH=src TRITON_INTERPRET=0
op_tests() {  # the op's tests on this GPU (against float64, through AOTInductor); the verbose log kept
    timeout 200 python3 -X faulthandler -m pytest -n 0 -v -p no:cacheprovider tests/custom_ops/test_fp8_linear.py \
        > "$OUT/fp8_op_tests.log" 2>&1
    local rc=$?
    grep -E "PASSED|FAILED|SKIPPED|ERROR|Error|Fatal|passed|failed" "$OUT/fp8_op_tests.log" | grep -v "^  File" | tail -40
    return $rc
}
part=${1:?usage: gpu_fp8_check.sh tests|probe|cublas|kernels|0.6B|8b-bf16|8b-fp8|8b-build|8b-measure|14b-bf16|14b-fp8|14b-build|14b-measure|32b-build|32b-measure}
case $part in
    tests) timeout 590 python3 -m pytest -n 0 -q tests/custom_ops/test_fp8_linear.py tests/custom_ops/test_opcheck.py \
               tests/build/test_fp8_export.py tests/test_quantization.py 2>&1 | tail -30; exit "${PIPESTATUS[0]}" ;;
    probe) timeout 590 python3 bench/fp8_scaled_mm_probe.py 2>&1 | tail -60; exit "${PIPESTATUS[0]}" ;;
    cublas) op_tests; rc=$?
            SKIP_AOTI=1 MS=1,64,512,2048 timeout 240 python3 bench/fp8_scaled_mm_probe.py > "$OUT/fp8_cublas_probe.log" 2>&1
            grep -E '^\{"shape' "$OUT/fp8_cublas_probe.log" | python3 -c "import json, sys
for r in map(json.loads, sys.stdin):
    print(r['shape'], r['M'], {k: r.get(k) for k in ('ours_cublas_us', 'triton_us', 'bf16_us', 'v1_relerr', 'v1_err')})"
            exit "$rc" ;;
    kernels) op_tests; tests_rc=$?; args=(--shapes 0.6B,8B --stage kernels) ;;
    0.6B) args=(--shapes 0.6B) ;;
    8b-bf16|14b-bf16) args=(--shapes "${part%%b-*}B" --stage build --builds bf16) ;;
    8b-build|14b-build) args=(--shapes "${part%%b-*}B" --stage build --parallel-builds) ;;
    8b-fp8|14b-fp8) args=(--shapes "${part%%b-*}B" --stage build --builds fp8) ;;
    8b-measure|14b-measure) args=(--shapes "${part%%b-*}B" --stage measure ${FP8_NO_KERNEL_CHECKS:+--no-kernel-checks} ${FP8_BUILDS:+--builds "$FP8_BUILDS"}) ;;
    32b-build) args=(--shapes 32B --fp8-checkpoint --no-fp8-verify --stage build) ;;
    32b-measure) args=(--shapes 32B --fp8-checkpoint --stage measure) ;;
    *) echo "unknown part $part"; exit 2 ;;
esac
df -h /tmp | tail -1; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
timeout ${FP8_TIMEOUT_S:-590} python3 bench/fp8_bench.py "${args[@]}" --json "$OUT/fp8_$part.json" > "$OUT/fp8_$part.log" 2>&1
rc=$?
grep -E "^\\{|^\\[|^  |^kernel|^shape|^ *[0-9.]+B |^[0-9.]+B[ :]|^tiny|error|Error|FAILED" "$OUT/fp8_$part.log" \
    | grep -v "^\[.*\] \.\.\.\( [0-9]* s\)\?$" | tail -70
if [ "${tests_rc:-0}" != 0 ]; then
    echo "the op's tests failed: $OUT/fp8_op_tests.log"
    [ "$rc" = 0 ] && rc=$tests_rc
fi
echo "fp8 $part exit code: $rc"
exit $rc
