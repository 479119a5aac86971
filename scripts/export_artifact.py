"""Turn a Qwen3 checkpoint directory into a deployable artifact (same as `qwen3-aot export`).

    python scripts/export_artifact.py CHECKPOINT -o ARTIFACT [--device cuda|cpu] [--dtype bfloat16|float16|float32]

The build ends by comparing the compiled graph and the eager model with the same weights in
float64. `qwen3-aot check ARTIFACT` verifies a copied artifact byte for byte (a load checks
sizes and headers and hashes large weight files once per host).
"""

import sys

from qwen3_aot.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
