"""q/k RMSNorm + RoPE of a projection already made: custom_ops/qkv_rope.py's epilogue as an op.

``qk_norm_rope(qkv, q_norm_weight, k_norm_weight, cos_sin, positions, num_q_heads,
num_kv_heads, eps) -> (q, k, v)``
    qkv: [T, (Hq + 2 * Hkv) * D], the q, k and v projections side by side; the rest as
    qkv_rope, whose math (and kernel) this is without the projection.

Why an op of its own: a model whose qkv projection is not a plain matmul (FP8 weights,
custom_ops/fp8_linear.py) makes qkv itself and needs only the epilogue.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from qwen3_aot.custom_ops.qkv_rope import _empty_qkv, qk_norm_rope_reference, qk_norm_rope_triton


@triton_op("qwen3_aot::qk_norm_rope", mutates_args=())
def qk_norm_rope(qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor, cos_sin: torch.Tensor,
                 positions: torch.Tensor, num_q_heads: int, num_kv_heads: int,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return qk_norm_rope_triton(qkv, q_norm_weight, k_norm_weight, cos_sin, positions, num_q_heads, num_kv_heads, eps)


qk_norm_rope.register_kernel("cpu")(qk_norm_rope_reference)


@qk_norm_rope.register_fake
def _(qkv, q_norm_weight, k_norm_weight, cos_sin, positions, num_q_heads, num_kv_heads, eps):
    return _empty_qkv(qkv, num_q_heads, num_kv_heads, q_norm_weight.shape[0])
