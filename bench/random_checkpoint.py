"""Write a Qwen3-shaped checkpoint directory with seeded random weights (no transformers):
qwen3_aot.random_checkpoint's recipe, at Qwen3-0.6B's shape unless told otherwise.

    python bench/random_checkpoint.py /tmp/qwen3-0.6b-random
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qwen3_aot.random_checkpoint import write  # noqa: F401  (the bench scripts call random_checkpoint.write)

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("path", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers, for a quick run")
    a = ap.parse_args()
    print(write(a.path, seed=a.seed, **({"num_hidden_layers": a.layers} if a.layers else {})))
