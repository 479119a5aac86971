"""Random Qwen3 checkpoints written with transformers' save_pretrained, for tests."""

from __future__ import annotations

from pathlib import Path

import torch

from qwen3_aot.random_checkpoint import random_tensor

SMALL = dict(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
             num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=256,
             rope_theta=1e6)


def write_random_checkpoint(path: Path, *, seed: int = 0, k_norm_max: float = 100.0,
                            dtype: torch.dtype = torch.float32, tie: bool = True, bos_token_id: int = 1,
                            eos_token_id: int | list[int] = 2, **overrides) -> Path:
    """A random Qwen3 of qwen3_aot.random_checkpoint's recipe (one k_norm entry at
    k_norm_max per layer), written by transformers' save_pretrained so that the loader is
    tested on the files transformers writes. bos/eos ids go into config.json and
    generation_config.json."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(**{**SMALL, **overrides}, tie_word_embeddings=tie, rms_norm_eps=1e-6,
                      bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(random_tensor(name, p.shape, k_norm_max))
    model.to(dtype).save_pretrained(path)
    return path
