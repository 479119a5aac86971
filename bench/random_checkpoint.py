"""Write a Qwen3-shaped checkpoint directory with seeded random weights (no transformers).

The default shape is Qwen3-0.6B's. k_norm weights are Qwen3-0.6B-like (|N(3.6, 9.1)|
with one 96.5 per layer); q_norm small, so that attention is not saturated.

    python bench/random_checkpoint.py /tmp/qwen3-0.6b-random
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwen3_aot.config import Qwen3Config
from qwen3_aot.weights import hf_shapes

QWEN3_0_6B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=1024,
                  intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, hidden_act="silu", attention_bias=False, bos_token_id=151643,
                  eos_token_id=151645, dtype="bfloat16")


def write(path: Path, seed: int = 0, **overrides) -> Path:
    hf = {**QWEN3_0_6B, **overrides}
    cfg = Qwen3Config.from_hf_dict(hf)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in hf_shapes(cfg).items():
        if name.endswith("k_norm.weight"):
            t = (torch.randn(shape, generator=g) * 9.1 + 3.6).abs()
            t[int(torch.randint(0, shape[0], (1,), generator=g))] = 96.5
        elif name.endswith("q_norm.weight"):
            t = torch.rand(shape, generator=g) * 0.2 + 0.1
        elif name.endswith("norm.weight"):
            t = 1 + 0.2 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / shape[-1] ** 0.5
        tensors[name] = t.to(getattr(torch, hf["dtype"]))
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf, indent=1))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"]}))
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("path", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers, for a quick run")
    a = ap.parse_args()
    print(write(a.path, a.seed, **({"num_hidden_layers": a.layers} if a.layers else {})))
