#!/usr/bin/env bash
# Structured outputs on the GPU (issue 30), one call: the overlap tests on a CUDA artifact (real
# CUDA graphs: constrained steps queued ahead, their sampling held back; outputs equal to
# overlap off), then bench/grammar_bench.py at the 0.6B shape. xgrammar, jsonschema and
# dashscope (Qwen's tokenizer) come as wheels in QWEN3_AOT_WHEELS (default ./.whl).
#     bash scripts/gpu_grammar_check.sh
#     GRAMMAR_TESTS=tests/runtime/core/test_grammar_overlap.py GRAMMAR_TIMEOUT_S=250 bash scripts/gpu_grammar_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/qwen3_aot_out}; mkdir -p "$OUT"
WHEELS=${QWEN3_AOT_WHEELS:-$PWD/.whl}
SITE=/tmp/qwen3-aot-site
source "$(dirname "$0")/gpu_grammar_site.sh"
export PYTHONPATH=src:$SITE TRITON_INTERPRET=0 QWEN3_AOT_WHEELS=$WHEELS
nvidia-smi --query-gpu=name --format=csv,noheader
QWEN3_AOT_RUNTIME_DEVICE=cuda timeout 240 python3 -m pytest -q -n 0 -p no:cacheprovider \
    ${GRAMMAR_TESTS:-tests/runtime/core/test_grammar_overlap.py tests/runtime/service/test_engine.py} \
    > "$OUT/grammar_tests.txt" 2>&1
tests_rc=$?
tail -5 "$OUT/grammar_tests.txt"
timeout ${GRAMMAR_TIMEOUT_S:-330} python3 bench/grammar_bench.py --dashscope-wheel "$WHEELS"/dashscope-2.0.2-py3-none-any.whl \
    --json "$OUT/grammar.json" > "$OUT/grammar.log" 2>&1
bench_rc=$?
grep -v "^\[\(export\|compile\|package\|verify\|done\)" "$OUT/grammar.log" | tail -30
echo "grammar tests exit code: $tests_rc, bench exit code: $bench_rc"
(( tests_rc || bench_rc )) && exit 1 || exit 0
