#!/usr/bin/env bash
# Long context with YaRN (issue 33), one GPU call per part, each under 10 minutes:
#   0.6B: the long-context tests on CUDA (YaRN logits and greedy tokens against transformers
#         through the Triton kernels), then bench/long_context_bench.py at the 0.6B shape;
#   8B:   bench/long_context_bench.py at the 8B shape.
# Each part writes $OUT/long_context_PART.log and .json and prints the table last.
#     bash scripts/gpu_long_context_check.sh 0.6B
#     bash scripts/gpu_long_context_check.sh 8B
set -uo pipefail
OUT=${OUT:-/tmp/qwen3_aot_out}; mkdir -p "$OUT"
export PYTHONPATH=src TRITON_INTERPRET=0
part=${1:?usage: gpu_long_context_check.sh 0.6B|8B}
rc=0
df -h /tmp | tail -1; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
if [[ $part == 0.6B ]]; then
    timeout 150 python3 -m pytest -q -n 0 -p no:cacheprovider tests/test_long_context.py \
        > "$OUT/long_context_tests.txt" 2>&1
    tests_rc=$?
    tail -3 "$OUT/long_context_tests.txt"
    echo "long-context tests exit code: $tests_rc"
    (( tests_rc )) && rc=1
fi
budget=420; [[ $part == 8B ]] && budget=570  # 8B: checkpoint ~1 min, build ~3-4 min, measures ~1-2 min
timeout ${LONG_CONTEXT_TIMEOUT_S:-$budget} python3 bench/long_context_bench.py --shape "$part" \
    --json "$OUT/long_context_$part.json" > "$OUT/long_context_$part.log" 2>&1
bench_rc=$?
grep -E "^\[(checkpoint|done|prefill|decode)|^\||^[A-Z].*torch|Error|error" "$OUT/long_context_$part.log" | tail -40
echo "long-context bench $part exit code: $bench_rc"
(( bench_rc )) && rc=1
exit $rc
