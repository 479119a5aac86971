#!/usr/bin/env bash
# The performance command (issues 3 and 7): the attention tests on CUDA (every dtype, the
# default launch parameters), the attention benchmark, then the end-to-end benchmark with
# its decode-step profile. Logs, JSON and the chart under $OUT; the tables last.
#     bash scripts/gpu_perf_check.sh
#     E2E_SKIP= bash scripts/gpu_perf_check.sh    # transformers on the nano-vllm workload too (~1 min)
set -uo pipefail
OUT=${OUT:-/tmp/qwen3_aot_out}; mkdir -p "$OUT"
export PYTHONPATH=src TRITON_INTERPRET=0
python3 -m pytest -q -p no:cacheprovider tests/custom_ops/test_paged_attention.py > "$OUT/attention_tests.txt" 2>&1
tests_rc=$?
timeout 200 python3 bench/attention.py --json "$OUT/attention.json" > "$OUT/attention.txt" 2>&1
python3 bench/e2e.py --profile --skip "${E2E_SKIP-transformers-workload}" --json "$OUT/e2e.json" \
    --png "$OUT/e2e_decode.png" > "$OUT/e2e.log" 2>&1
e2e_rc=$?
tail -1 "$OUT/attention_tests.txt"; grep -v Warning "$OUT/attention.txt" | tail -22
grep -v "^\[\|Loading\|^  ours\|^  transformers" "$OUT/e2e.log" | tail -60
echo "attention tests exit code: $tests_rc, e2e exit code: $e2e_rc"
