"""Turn a Qwen3 checkpoint directory into a deployable artifact (same as `qwen3-aot export`).

    python scripts/export.py CHECKPOINT -o ARTIFACT [--device cuda|cpu] [--dtype bfloat16|float16|float32]
"""

import sys

from qwen3_aot.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
