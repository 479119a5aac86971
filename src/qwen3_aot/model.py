"""The separated Qwen3 graph: plain torch and our custom ops, nothing else.

One forward serves prefill and decode alike: it takes a flat batch of T new
tokens from S sequences (see `Qwen3ForCausalLM.forward`) and a paged KV cache
that the caller owns and that the forward writes in place. This module is what
torch.export and AOTInductor compile; `logits` and `generate_greedy` drive it
eagerly for tests and as the uncompiled baseline.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import qwen3_aot.custom_ops  # noqa: F401  (registers torch.ops.qwen3_aot.*)
from qwen3_aot.config import Qwen3Config
from qwen3_aot.custom_ops.qkv_rope import rope_cos_sin
from qwen3_aot.driver import FlatBatchDriver, KVCache
from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.weights import load_checkpoint, parse_dtype

ops = torch.ops.qwen3_aot


def _param(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class DecoderLayer(nn.Module):
    """One layer's weights, named as weights.to_model_state names them."""

    def __init__(self, cfg: Qwen3Config, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        p = dict(dtype=dtype, device=device)
        self.input_norm = _param(h, **p)
        self.qkv_proj = _param(cfg.q_size + 2 * cfg.kv_size, h, **p)
        self.q_norm = _param(cfg.head_dim, **p)
        self.k_norm = _param(cfg.head_dim, **p)
        self.o_proj = _param(h, cfg.q_size, **p)
        self.post_norm = _param(h, **p)
        self.gate_up_proj = _param(2 * i, h, **p)
        self.down_proj = _param(h, i, **p)


class Qwen3ForCausalLM(nn.Module):
    def __init__(self, cfg: Qwen3Config, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.config = cfg
        p = dict(dtype=dtype, device=device)
        self.embed_tokens = _param(cfg.vocab_size, cfg.hidden_size, **p)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype, device) for _ in range(cfg.num_hidden_layers))
        self.norm = _param(cfg.hidden_size, **p)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(cfg.vocab_size, cfg.hidden_size, **p)
        cos_sin_device = "cpu" if str(device) == "meta" else device
        self.register_buffer("cos_sin", rope_cos_sin(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings,
                                                     cos_sin_device), persistent=False)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype | None = None,
                        device: torch.device | str | None = None) -> "Qwen3ForCausalLM":
        """Load a Hugging Face Qwen3 checkpoint directory (safetensors only)."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise Qwen3AotError("device cuda was asked for, but torch sees no CUDA GPU here; use device='cpu'.")
        cfg, state = load_checkpoint(path, dtype)
        model = cls(cfg, parse_dtype(dtype or cfg.dtype), device="meta")
        model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
        model.cos_sin = model.cos_sin.to(device)
        return model.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens if self.config.tie_word_embeddings else self.lm_head

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor,
                block_tables: torch.Tensor, logits_indices: torch.Tensor,
                k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> torch.Tensor:
        """Logits [N, vocab] (fp32) for the rows `logits_indices` of a flat batch.

        input_ids, positions: [T] int64, the new tokens and their positions in their sequences;
        seq_ids: [T] int32, which row of block_tables each token belongs to (a sequence's
            tokens contiguous, in position order);
        block_tables: [S, max_blocks] int32, the cache blocks of each sequence;
        logits_indices: [N] int64, the token rows whose logits are wanted;
        k_caches, v_caches: per layer [num_blocks, block_size, kv_heads, head_dim], written in place.
        """
        cfg = self.config
        eps, scale = cfg.rms_norm_eps, 1.0 / math.sqrt(cfg.head_dim)
        x = F.embedding(input_ids, self.embed_tokens)
        residual = x
        for i, layer in enumerate(self.layers):
            if i == 0:
                h = ops.rms_norm(x, layer.input_norm, eps)
            else:
                h, residual = ops.add_rms_norm(x, residual, layer.input_norm, eps)
            q, k, v = ops.qkv_rope(h, layer.qkv_proj, layer.q_norm, layer.k_norm, self.cos_sin, positions,
                                   cfg.num_attention_heads, cfg.num_key_value_heads, eps)
            a = ops.paged_attention(q, k, v, k_caches[i], v_caches[i], positions, seq_ids, block_tables, scale)
            x = F.linear(a.flatten(1), layer.o_proj)
            h, residual = ops.add_rms_norm(x, residual, layer.post_norm, eps)
            gate, up = F.linear(h, layer.gate_up_proj).chunk(2, dim=-1)
            x = F.linear(F.silu(gate) * up, layer.down_proj)
        h, _ = ops.add_rms_norm(x[logits_indices], residual[logits_indices], self.norm, eps)
        return F.linear(h, self.lm_head_weight()).float()

    # ---- eager use: tests, parity and the uncompiled baseline ----

    def driver(self, block_size: int = 16) -> FlatBatchDriver:
        return FlatBatchDriver(self, self.config, self.dtype, self.device, block_size)

    def new_kv_cache(self, num_blocks: int, block_size: int = 16) -> KVCache:
        return self.driver(block_size).new_kv_cache(num_blocks)

    def logits(self, sequences: list[list[int]], block_size: int = 16) -> list[torch.Tensor]:
        """fp32 logits [len, vocab] for every position of every sequence, in one paged batch."""
        return self.driver(block_size).logits(sequences)

    def generate_greedy(self, sequences: list[list[int]], max_new_tokens: int,
                        block_size: int = 16) -> list[list[int]]:
        """Exactly `max_new_tokens` greedy tokens per sequence (no eos stop)."""
        return self.driver(block_size).generate_greedy(sequences, max_new_tokens)
