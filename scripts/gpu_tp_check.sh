#!/usr/bin/env bash
# Tensor parallel on a multi-GPU machine (issue 17): Qwen3-8B and 32B shapes (seeded random
# bf16 checkpoints, bench/family_bench.py's shapes) built at --tensor-parallel 1, 2, 4, then per
# artifact: build time, load time, decode tok/s at batch 1 and 64, and the all-reduce time per
# step (torch.profiler in each rank is future work; here: the step time at tp N against tp 1
# is what is printed). UNMEASURED: this script has never run; no multi-GPU machine was lent.
# Disk: a TP artifact copies its weights (shards), so 32B needs about 130 GB (the x4 and x8 machines have 235).
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0   # NVLink multicast off, as these machines require
PY=${PY:-python3}  # the GPU machines run the tree with their own python3 (PYTHONPATH=src)
OUT=${OUT:-/tmp/qwen3-aot-tp}
mkdir -p "$OUT"
for shape in 8B 32B; do
  ckpt="$OUT/ckpt-$shape"
  [ -d "$ckpt" ] || PYTHONPATH=src:bench $PY -c "
from pathlib import Path
import torch
from family import config, write_checkpoint
write_checkpoint(Path('$ckpt'), config('$shape', 'bfloat16'), torch.device('cuda'))"
  for tp in 1 2 4; do
    art="$OUT/art-$shape-tp$tp"
    /usr/bin/time -f "build $shape tp$tp: %e s" $PY scripts/export.py "$ckpt" -o "$art" --force \
      --tensor-parallel "$tp" --max-num-seqs 64
    PYTHONPATH=src $PY - "$art" <<'PYEOF'
import sys, time
from qwen3_aot import runtime
from qwen3_aot.runtime import SamplingParams
if __name__ == "__main__":
    t0 = time.perf_counter()
    engine = runtime.load(sys.argv[1], kv_cache_tokens=64 * 1024)
    print(f"load {sys.argv[1]}: {time.perf_counter() - t0:.1f} s", flush=True)
    params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    for batch in (1, 64):
        prompts = [[1 + i, 2, 3, 4] for i in range(batch)]
        engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm
        t = time.perf_counter()
        engine.generate(prompts, params)
        print(f"decode batch {batch}: {batch * 128 / (time.perf_counter() - t):.0f} tok/s", flush=True)
    engine.close()
PYEOF
  done
done
