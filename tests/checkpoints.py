"""Random Qwen3 checkpoints written with transformers' save_pretrained, for tests."""

from __future__ import annotations

from pathlib import Path

import torch

SMALL = dict(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
             num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=256,
             rope_theta=1e6)


def write_random_checkpoint(path: Path, *, seed: int = 0, k_norm_max: float = 100.0,
                            dtype: torch.dtype = torch.float32, tie: bool = True, bos_token_id: int = 1,
                            eos_token_id: int | list[int] = 2, **overrides) -> Path:
    """A random Qwen3 with Qwen3-0.6B-like extreme k_norm weights (one entry at k_norm_max
    per layer, the rest |N(3.6, 9.1)|), and weights large enough that logits are not flat.

    q_norm weights are kept small (0.1 to 0.3): with q as large as k every score is tens of
    units, the softmax is a near one-hot coin flip under any rounding, and comparing the
    precision of two implementations measures noise (seen: errors of 10-16% either way).
    K still reaches k_norm_max, which is what breaks early-rounding or fp16-score graphs.
    bos/eos ids go into config.json and generation_config.json."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(**{**SMALL, **overrides}, tie_word_embeddings=tie, rms_norm_eps=1e-6,
                      bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("k_norm.weight"):
                p.copy_((torch.randn_like(p) * 9.1 + 3.6).abs())
                p[torch.randint(0, p.numel(), ())] = k_norm_max
            elif name.endswith("q_norm.weight"):
                p.uniform_(0.1, 0.3)
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 1.0 / p.shape[-1] ** 0.5)
    model.to(dtype).save_pretrained(path)
    return path
