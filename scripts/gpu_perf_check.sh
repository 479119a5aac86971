#!/usr/bin/env bash
# The performance command (issues 3 and 7): the kernel tests on CUDA, the skinny_linear and
# attention launch sweeps, then the end-to-end benchmark with its decode-step profile.
# Logs, JSON and the chart under $OUT; the tables last.
#     bash scripts/gpu_perf_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/qwen3_aot_out}; mkdir -p "$OUT"
export PYTHONPATH=src TRITON_INTERPRET=0
python3 -m pytest -q -p no:cacheprovider tests/custom_ops > "$OUT/kernel_tests.txt" 2>&1
tests_rc=$?
timeout 150 python3 bench/kernels.py --skinny > "$OUT/skinny.txt" 2>&1
timeout 150 python3 bench/attention.py --sweep > "$OUT/attention_sweep.txt" 2>&1
python3 bench/e2e.py --profile --skip "${E2E_SKIP-transformers-workload}" --json "$OUT/e2e.json" \
    --png "$OUT/e2e_decode.png" > "$OUT/e2e.log" 2>&1
e2e_rc=$?
tail -3 "$OUT/kernel_tests.txt"; cat "$OUT/skinny.txt" "$OUT/attention_sweep.txt" | grep -v Warning
grep -v "^\[\|Loading\|^  ours\|^  transformers" "$OUT/e2e.log" | tail -60
echo "kernel tests exit code: $tests_rc, e2e exit code: $e2e_rc"
