"""The build's yardstick: the eager model's own weights run in float64, one layer at a time.

Comparing the compiled bf16 graph with the eager bf16 model measures the noise of two bf16
computations (4% on an 8B-shaped random checkpoint), not an error. Both are compared with
this instead: the same weights, each layer's upcast to float64 only while that layer runs,
float64 activations and the float64 paths of our ops' plain-torch references. No second copy
of the model is made (fp32 32B would be 128 GB): the most it holds at once is one weight
matrix in float64 (the lm_head, 6 GB at 32B; the largest layer matrix, gate_up, 2 GB).
float64 rather than float32 so that an fp32 build is measured against something more
precise than itself; on CPU and on data-centre GPUs float64 matmuls over the check's few
hundred tokens take seconds even at 32B.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qwen3_aot.custom_ops.paged_attention import paged_attention_reference
from qwen3_aot.custom_ops.qkv_rope import qkv_rope_reference, rope_cos_sin
from qwen3_aot.custom_ops.rms_norm import add_rms_norm_reference, rms_norm_reference
from qwen3_aot.model import Qwen3ForCausalLM

REFERENCE_DTYPE = torch.float64


class Float64Forward:
    """A forward with the flat-batch signature of `Qwen3ForCausalLM.forward` (drive it with a
    FlatBatchDriver whose dtype is float64) over `model`'s weights; returns float64 logits."""

    def __init__(self, model: Qwen3ForCausalLM) -> None:
        cfg = model.config
        self.model = model
        # float64 angles: the fp32 table is part of what the graphs round
        self.cos_sin = rope_cos_sin(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings,
                                    model.device).to(REFERENCE_DTYPE)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor,
                 block_tables: torch.Tensor, logits_indices: torch.Tensor,
                 k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> torch.Tensor:
        m, cfg = self.model, self.model.config
        up = lambda w: w.to(REFERENCE_DTYPE)  # noqa: E731  (a layer's weights, only while it runs)
        eps, scale = cfg.rms_norm_eps, 1.0 / math.sqrt(cfg.head_dim)
        x = F.embedding(input_ids, m.embed_tokens).to(REFERENCE_DTYPE)  # rows first, then upcast
        residual = x
        for i, layer in enumerate(m.layers):
            if i == 0:
                h = rms_norm_reference(x, up(layer.input_norm), eps)
            else:
                h, residual = add_rms_norm_reference(x, residual, up(layer.input_norm), eps)
            q, k, v = qkv_rope_reference(h, up(layer.qkv_proj), up(layer.q_norm), up(layer.k_norm), self.cos_sin,
                                         positions, cfg.num_attention_heads, cfg.num_key_value_heads, eps)
            a = paged_attention_reference(q, k, v, k_caches[i], v_caches[i], positions, seq_ids, block_tables, scale)
            x = F.linear(a.flatten(1), up(layer.o_proj))
            h, residual = add_rms_norm_reference(x, residual, up(layer.post_norm), eps)
            gate, up_ = F.linear(h, up(layer.gate_up_proj)).chunk(2, dim=-1)
            x = F.linear(F.silu(gate) * up_, up(layer.down_proj))
        h, _ = add_rms_norm_reference(x[logits_indices], residual[logits_indices], up(m.norm), eps)
        return F.linear(h, up(m.lm_head_weight()))
