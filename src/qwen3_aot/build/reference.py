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
import types

import torch

from qwen3_aot.custom_ops.paged_attention import paged_attention_reference
from qwen3_aot.custom_ops.fp8_linear import dequantize
from qwen3_aot.custom_ops.qkv_rope import qk_norm_rope_reference, qkv_rope_reference
from qwen3_aot.custom_ops.rms_norm import add_rms_norm_reference, rms_norm_reference
from qwen3_aot.model import Qwen3ForCausalLM, decoder_layers, final_logits, rope_table

REFERENCE_DTYPE = torch.float64


class Float64Forward:
    """A forward with the flat-batch signature of `Qwen3ForCausalLM.forward` (drive it with a
    FlatBatchDriver whose dtype is float64) over `model`'s weights; returns float64 logits."""

    def __init__(self, model: Qwen3ForCausalLM) -> None:
        cfg = model.config
        self.model = model
        # the model's own fp32 table, upcast: transformers' float64 model builds its table in
        # fp32 too (fp32 angles), so this is the function the reference computes
        self.cos_sin = rope_table(cfg, model.cos_sin.shape[0], model.device).to(REFERENCE_DTYPE)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor,
                 block_tables: torch.Tensor, logits_indices: torch.Tensor,
                 k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> torch.Tensor:
        scale = 1.0 / math.sqrt(self.model.config.head_dim)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return paged_attention_reference(q, k, v, k_caches[i], v_caches[i], positions, seq_ids, block_tables,
                                             scale)

        x, residual = decoder_layers(self.model, input_ids, positions, attend, ops=FLOAT64_OPS, upcast=_upcast,
                                     cos_sin=self.cos_sin)
        return final_logits(self.model, x, residual, logits_indices, ops=FLOAT64_OPS, upcast=_upcast)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """A weight in float64, only while it is used."""
    return t.to(REFERENCE_DTYPE)


def _dequantized_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, act_quant: bool,
                        block_scales: bool = False) -> torch.Tensor:
    """An FP8 projection as the checkpoint means it: x times the exactly dequantized weight, in
    float64. Without the activation quantization of the FP8 GEMM: that is an error of the graph
    (the build's verify measures it), not part of the model."""
    return torch.nn.functional.linear(x, dequantize(w, w_scale, REFERENCE_DTYPE))


# our ops' plain-torch references, whose float64 paths compute in float64 throughout
FLOAT64_OPS = types.SimpleNamespace(rms_norm=rms_norm_reference, add_rms_norm=add_rms_norm_reference,
                                    qkv_rope=qkv_rope_reference, qk_norm_rope=qk_norm_rope_reference,
                                    fp8_linear=_dequantized_linear)
