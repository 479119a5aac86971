"""A Qwen3 checkpoint of seeded random weights: build and time an artifact of a real shape
(Qwen3-0.6B's by default) without downloading one. Needs no transformers.

The weights are scaled like a trained model's where it matters to kernels and rounding:
k_norm weights |N(3.6, 9.1)| with one entry per layer at `k_norm_max` (Qwen3-0.6B has
96.5), which is what breaks early-rounding or fp16-score attention; q_norm weights small
(0.1 to 0.3): with q as large as k every score is tens of units, the softmax a near
one-hot coin flip under any rounding, and two implementations' precision is then noise
(seen: errors of 10-16% either way); other norms 1 + N(0, 0.2); matrices N(0, 1 / fan_in)
so that logits are not flat.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwen3_aot.config import Qwen3Config
from qwen3_aot.weights import hf_shapes, parse_dtype

QWEN3_0_6B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=1024,
                  intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, hidden_act="silu", attention_bias=False, bos_token_id=151643,
                  eos_token_id=151645, dtype="bfloat16")
QWEN3_0_6B_K_NORM_MAX = 96.5


def random_tensor(name: str, shape: tuple[int, ...] | torch.Size, k_norm_max: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """A float32 tensor for the Hugging Face parameter `name` (see the module's docstring);
    generator None draws from torch's global generator."""
    if name.endswith("k_norm.weight"):
        t = (torch.randn(shape, generator=generator) * 9.1 + 3.6).abs()
        t.view(-1)[torch.randint(0, t.numel(), (), generator=generator)] = k_norm_max
        return t
    if name.endswith("q_norm.weight"):
        return torch.empty(shape).uniform_(0.1, 0.3, generator=generator)
    if name.endswith("norm.weight"):
        return 1 + 0.2 * torch.randn(shape, generator=generator)
    return torch.empty(shape).normal_(0, 1.0 / shape[-1] ** 0.5, generator=generator)


def write(path: Path, *, seed: int = 0, k_norm_max: float = QWEN3_0_6B_K_NORM_MAX,
                            **overrides: object) -> Path:
    """A checkpoint directory (config.json, generation_config.json, model.safetensors) of
    Qwen3-0.6B's config with `overrides` (any config.json key: num_hidden_layers=2,
    dtype="float32", ...); no tokenizer. Returns `path`."""
    hf = {**QWEN3_0_6B, **overrides}
    cfg = Qwen3Config.from_hf_dict(hf)
    g = torch.Generator().manual_seed(seed)
    dtype = parse_dtype(str(hf["dtype"]))
    tensors = {name: random_tensor(name, shape, k_norm_max, g).to(dtype) for name, shape in hf_shapes(cfg).items()}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf, indent=1))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"]}))
    return path
