#!/usr/bin/env bash
# The Qwen3 family on the H200 (issue 15, item 3), one GPU call per part, each under 10 minutes:
#   small: 1.7B and 4B        mid: 8B        14B: 14B
#   32b-checkpoint, 32b-build, 32b-measure: 32B in three calls that must run back to back
#   or any comma-separated shapes that fit one call, e.g. 1.7B,8B
#   (files survive between calls only while the machine stays warm, 30 s after a call)
# Each part writes $OUT/family_PART.log and $OUT/family_PART.json and prints the table last.
#     bash scripts/gpu_family_check.sh small
set -uo pipefail
OUT=${OUT:-/tmp/qwen3_aot_out}; mkdir -p "$OUT"
export PYTHONPATH=src TRITON_INTERPRET=0
part=${1:?usage: gpu_family_check.sh small|mid|14B|32b-checkpoint|32b-build|32b-measure|SHAPE,SHAPE...}
case $part in
    small) args=(--shapes 1.7B,4B) ;;
    mid) args=(--shapes 8B) ;;
    14B) args=(--shapes 14B) ;;
    32b-checkpoint) args=(--shapes 32B --stage checkpoint) ;;
    32b-build) args=(--shapes 32B --stage build) ;;
    32b-measure) args=(--shapes 32B --stage measure) ;;
    *) args=(--shapes "$part") ;;  # bench/family_bench.py names the shapes it knows
esac
df -h /tmp | tail -1; free -g | head -2; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
name=${part//,/_}  # a comma in a file name keeps it from coming back from the GPU machine
timeout ${FAMILY_TIMEOUT_S:-590} python3 bench/family_bench.py "${args[@]}" --json "$OUT/family_$name.json" > "$OUT/family_$name.log" 2>&1
rc=$?
grep -E "^\\[|^shape|^[0-9.]+B[ :]|error|Error" "$OUT/family_$name.log" | grep -v "^\[.*\] \.\.\.$" | tail -40
df -h /tmp | tail -1; du -sh /tmp/torchinductor_* 2>/dev/null  # what the disk kept (32B leaves ~3 GiB)
echo "family $part exit code: $rc"
exit $rc
