#!/usr/bin/env bash
# The one GPU command: the test suite on CUDA (Triton kernels in bf16, fp16, fp32; the
# runtime tests on a CUDA artifact, with CUDA graphs), then the kernel benchmark. Run on the
# GPU machine from the repo root, e.g. through the device tool:
#     bash scripts/gpu_check.sh            (results under $OUT when it is set)
set -uo pipefail
OUT=${OUT:-/tmp/qwen3_aot_out}; mkdir -p "$OUT"
export PYTHONPATH=src TRITON_INTERPRET=0 QWEN3_AOT_RUNTIME_DEVICE=cuda
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -n 0 -p no:cacheprovider --durations=15 tests "$@" 2>&1 | tee "$OUT/pytest.txt" | tail -25
tests_rc=${PIPESTATUS[0]}
python3 bench/kernel_bench.py --json "$OUT/kernels.json" 2>&1 | tail -25
echo "pytest exit code: $tests_rc"
exit "$tests_rc"
