"""The Qwen3 graph for ONNX: `qwen3_aot.model`'s layers (its `decoder_layers`), with an ordinary
past/present KV cache (onnxruntime has no paged cache), and the ONNX translation of
each of our custom ops.

Inputs (B sequences, T new tokens each, P cached tokens each):
    input_ids [B, T] int64; position_ids [B, T] int64 (each token's position in its sequence);
    attention_mask [B, P+T] int64: 1 where a cache slot or new token holds a real token,
        0 for padding (left padding for a batch of different lengths);
    logits_indices [N] int64: the columns of the T new tokens whose logits are wanted
        (all of them to score a text, [T-1] to generate: full logits of a 2,048-token prompt
        of Qwen3-0.6B would be 1.2 GB per sequence);
    past_key_i, past_value_i [B, Hkv, P, D] per layer, in the model's dtype (P may be 0).
Outputs: logits [B, N, vocab] fp32; present_key_i, present_value_i [B, Hkv, P+T, D].

New token t of a row sits at slot P+t; it attends to the slots j <= P+t whose mask is 1
(bottom-right causal alignment, written out as an explicit boolean mask: DESIGN.md's
`is_causal` trap), and always to its own slot, so that a padding row attends to something
and stays finite (a NaN in a padded slot's K/V would poison every row through P.V).
"""

from __future__ import annotations

import math

import onnx_ir as ir
import torch
from onnx import TensorProto
from onnxscript.onnx_opset import opset23 as op
from torch import nn

import qwen3_aot.custom_ops  # noqa: F401  (registers torch.ops.qwen3_aot.*)
from qwen3_aot.model import Qwen3ForCausalLM, decoder_layers, final_logits

OPSET = 23
ops = torch.ops.qwen3_aot


@torch.library.custom_op("qwen3_aot::onnx_attention", mutates_args=())
def onnx_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_key: torch.Tensor,
                   past_value: torch.Tensor, mask: torch.Tensor, num_q_heads: int, num_kv_heads: int,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Export-only stand-in for ONNX `Attention` (opset 23) with past/present KV.

    q [B, T, Hq*D], k/v [B, T, Hkv*D] (token-major, as the projections leave them: no
    transposes in the graph), past_key/past_value [B, Hkv, P, D], mask [B, 1, T, P+T] bool
    (True: attend) -> (out [B, T, Hq*D], present_key, present_value [B, Hkv, P+T, D]).
    GQA: query head h reads kv head h // (Hq/Hkv). Scores, softmax and P.V in fp32 (float64
    for float64 inputs), one rounding of the output, as paged_attention.
    A custom op rather than F.scaled_dot_product_attention: its ONNX translation is ours
    (past/present inside the Attention node, softmax_precision, no GQA expand, 3-D inputs),
    the same under every torch version."""
    b, t, d = q.shape[0], q.shape[1], past_key.shape[3]

    def heads_first(u: torch.Tensor, heads: int) -> torch.Tensor:
        return u.reshape(b, t, heads, d).transpose(1, 2)

    present_key = torch.cat([past_key, heads_first(k, num_kv_heads)], dim=2)
    present_value = torch.cat([past_value, heads_first(v, num_kv_heads)], dim=2)
    group = num_q_heads // num_kv_heads
    c = torch.float64 if q.dtype == torch.float64 else torch.float32
    keys = present_key.to(c).repeat_interleave(group, dim=1)
    vals = present_value.to(c).repeat_interleave(group, dim=1)
    scores = heads_first(q, num_q_heads).to(c) @ keys.transpose(-1, -2) * scale
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vals
    return out.transpose(1, 2).reshape(q.shape).to(q.dtype), present_key, present_value


@onnx_attention.register_fake
def _(q, k, v, past_key, past_value, mask, num_q_heads, num_kv_heads, scale):
    shape = (past_key.shape[0], past_key.shape[1], past_key.shape[2] + k.shape[1], past_key.shape[3])
    return torch.empty_like(q), past_key.new_empty(shape), past_value.new_empty(shape)


class OnnxQwen3(nn.Module):
    """Wraps a loaded Qwen3ForCausalLM (its tensors, not copies) with the past/present-KV
    forward that torch.onnx exports. Tokens run flat ([B*T, H]) between the attentions, as
    in the paged graph, so every projection is a 2-D Gemm on the [out, in] weight (no
    transposed copy of the tied embedding) and the ops get the [T, H] inputs they take."""

    def __init__(self, model: Qwen3ForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                logits_indices: torch.Tensor, past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """past: [past_key_0, past_value_0, past_key_1, ...]; returns (logits, present_key_0,
        present_value_0, ...). See the module docstring for shapes."""
        m, cfg = self.model, self.model.config
        scale = 1.0 / math.sqrt(cfg.head_dim)
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b, t = input_ids.shape
        mask = attention_mask_4d(attention_mask, t)
        presents: list[torch.Tensor] = []

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            a, present_key, present_value = onnx_attention(
                q.reshape(b, t, hq * d), k.reshape(b, t, hkv * d), v.reshape(b, t, hkv * d),
                past[2 * i], past[2 * i + 1], mask, hq, hkv, scale)
            presents.extend((present_key, present_value))
            return a.reshape(b * t, hq * d)

        x, residual = decoder_layers(m, input_ids.reshape(-1), position_ids.reshape(-1), attend)
        rows = (torch.arange(b, device=x.device)[:, None] * t + logits_indices[None, :]).reshape(-1)
        logits = final_logits(m, x, residual, rows).float()
        return (logits.reshape(b, logits_indices.shape[0], cfg.vocab_size), *presents)


def attention_mask_4d(attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """[B, P+T] 0/1 -> [B, 1, T, P+T] bool: new token t (slot P+t) sees valid slots j <= P+t,
    and always its own slot (see the module docstring)."""
    total = attention_mask.shape[1]
    slots = torch.arange(total, device=attention_mask.device)
    query_slots = slots[total - new_tokens:]
    causal = slots[None, :] <= query_slots[:, None]
    own = slots[None, :] == query_slots[:, None]
    return ((causal[None] & (attention_mask != 0)[:, None, :]) | own[None])[:, None]


# ---- ONNX translations (onnxscript, opset 23) of the custom ops ----

def _fp32(x):
    """Cast to fp32 unless already fp32: our ops normalise and rotate in fp32, rounding once."""
    return x if x.dtype == ir.DataType.FLOAT else op.Cast(x, to=TensorProto.FLOAT)


def _like(y, x):
    return y if x.dtype == ir.DataType.FLOAT else op.CastLike(y, x)


def _rms(x, weight, eps: float):
    """RMSNormalization in fp32. ONNX's own stash_type=1 would round the normalised value to
    x's dtype BEFORE the weight multiply (transformers' rounding); we round once, after."""
    return op.RMSNormalization(_fp32(x), _fp32(weight), axis=-1, epsilon=eps, stash_type=1)


def rms_norm_onnx(x, weight, eps: float):
    return _like(_rms(x, weight, eps), x)


def add_rms_norm_onnx(x, residual, weight, eps: float):
    s = op.Add(x, residual)  # in x's dtype: the residual stream the op rounds to x's dtype
    return _like(_rms(s, weight, eps), x), s


def qkv_rope_onnx(x, w_qkv, q_norm_weight, k_norm_weight, cos_sin, positions, num_q_heads: int,
                  num_kv_heads: int, eps: float):
    """Gemm, then per head RMSNormalization and RotaryEmbedding (rotate-half) in fp32.
    cos/sin rows are gathered for the batch's positions (a [T, D] gather) rather than sliced
    from the whole [max_positions, D] table."""
    d = q_norm_weight.shape[0]
    qkv = op.Gemm(x, w_qkv, transB=1)
    bounds = [0, num_q_heads * d, (num_q_heads + num_kv_heads) * d, (num_q_heads + 2 * num_kv_heads) * d]
    q, k, v = (op.Slice(qkv, op.Constant(value_ints=[lo]), op.Constant(value_ints=[hi]), op.Constant(value_ints=[1]))
               for lo, hi in zip(bounds, bounds[1:]))
    cos, sin = op.Split(op.Unsqueeze(op.Gather(cos_sin, positions, axis=0), [0]), axis=2, num_outputs=2)

    def norm_rope(u, weight, heads: int):
        u = _rms(op.Reshape(u, op.Constant(value_ints=[-1, heads, d])), weight, eps)
        u = op.RotaryEmbedding(op.Reshape(u, op.Constant(value_ints=[1, -1, heads * d])), cos, sin,
                               interleaved=0, num_heads=heads)
        return _like(op.Reshape(u, op.Constant(value_ints=[-1, heads, d])), x)

    return (norm_rope(q, q_norm_weight, num_q_heads), norm_rope(k, k_norm_weight, num_kv_heads),
            op.Reshape(v, op.Constant(value_ints=[-1, num_kv_heads, d])))


def attention_onnx(q, k, v, past_key, past_value, mask, num_q_heads: int, num_kv_heads: int, scale: float):
    """ONNX Attention with the past inside the node, an explicit boolean mask (is_causal=0)
    and the softmax in fp32 whatever the activation dtype."""
    y, present_key, present_value, _ = op.Attention(
        q, k, v, mask, past_key, past_value, q_num_heads=num_q_heads, kv_num_heads=num_kv_heads, scale=scale,
        is_causal=0, softmax_precision=TensorProto.FLOAT)
    return y, present_key, present_value


def translation_table() -> dict:
    return {
        ops.rms_norm.default: rms_norm_onnx,
        ops.add_rms_norm.default: add_rms_norm_onnx,
        ops.qkv_rope.default: qkv_rope_onnx,
        torch.ops.qwen3_aot.onnx_attention.default: attention_onnx,
    }
