"""Fused QKV projection + per-head q/k RMSNorm + RoPE (Qwen3's attention prologue).

``qkv_rope(x, w_qkv, q_norm_weight, k_norm_weight, cos_sin, positions,
num_q_heads, num_kv_heads, eps) -> (q, k, v)``

    x: [T, H]; w_qkv: [(Hq + 2*Hkv) * D, H] (q, k, v rows stacked), dtype of x
    q_norm_weight, k_norm_weight: [D]
    cos_sin: [max_positions, D] fp32, row p = [cos(p * f), sin(p * f)] for the
        D/2 frequencies f; positions: [T] int64
    q: [T, Hq, D], k: [T, Hkv, D], v: [T, Hkv, D], dtype of x

    qkv = x @ w_qkv.T                        (torch matmul, rounded to x.dtype
                                              as transformers' projections are)
    q_h = rms_norm(qkv[q head h], q_norm_weight)      per head, in fp32
    k_h = rms_norm(qkv[k head h], k_norm_weight)      per head, in fp32
    then RoPE, rotate-half: with u = [a, b] the halves of a head,
        rope(u) = [a*cos - b*sin, b*cos + a*sin]       in fp32
    and one rounding to x.dtype at the end. Norm comes BEFORE RoPE: RoPE does
    not commute with the per-dimension weight. Qwen3-0.6B's k_norm weights
    reach 96.5, so k reaches ~220: nothing is rounded between norm and RoPE.

``qk_norm_rope_cache(qkv, q_norm_weight, k_norm_weight, cos_sin, positions, seq_ids,
block_tables, k_cache, v_cache, num_q_heads, num_kv_heads, eps) -> q``
    the same from qkv, the projection already made (the small-batch graph's own
    projection, custom_ops/small_linear.py, makes it with the input norm fused in),
    with k and v written straight into the paged cache as paged_attention writes
    them (k_cache, v_cache MUTATED; custom_ops/paged_attention.py has the layout):
    paged_attention_cached then attends, one launch a layer fewer.

The Triton kernel is the epilogue: one program per (token, head), q, k and v
heads alike (v is copied out so that no output aliases another).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


@triton.jit
def _qkv_epilogue_kernel(qkv_ptr, qw_ptr, kw_ptr, cs_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, seq_ptr, bt_ptr, bt_stride,
                         EPS: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                         TO_CACHE: tl.constexpr, BS: tl.constexpr):
    """TO_CACHE: k_ptr and v_ptr are the paged caches, token t's slot found in its block table."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    half = tl.arange(0, D // 2)
    src = qkv_ptr + t * (HQ + 2 * HKV) * D + h * D
    a = tl.load(src + half).to(tl.float32)
    b = tl.load(src + D // 2 + half).to(tl.float32)
    kv_row = t
    if TO_CACHE:
        p = tl.load(pos_ptr + t)
        blk = tl.load(bt_ptr + tl.load(seq_ptr + t).to(tl.int64) * bt_stride + p // BS).to(tl.int64)
        kv_row = blk * BS + p % BS
    if h >= HQ + HKV:  # v: copied as is
        dst = v_ptr + (kv_row * HKV + h - HQ - HKV) * D
        tl.store(dst + half, a.to(v_ptr.dtype.element_ty))
        tl.store(dst + D // 2 + half, b.to(v_ptr.dtype.element_ty))
    else:
        if h < HQ:
            w_ptr = qw_ptr
            dst = q_ptr + (t * HQ + h) * D
        else:
            w_ptr = kw_ptr
            dst = k_ptr + (kv_row * HKV + h - HQ) * D
        inv_rms = tl.rsqrt((tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / D + EPS)
        a = a * inv_rms * tl.load(w_ptr + half).to(tl.float32)
        b = b * inv_rms * tl.load(w_ptr + D // 2 + half).to(tl.float32)
        pos = tl.load(pos_ptr + t)
        cos = tl.load(cs_ptr + pos * D + half)
        sin = tl.load(cs_ptr + pos * D + D // 2 + half)
        tl.store(dst + half, (a * cos - b * sin).to(dst.dtype.element_ty))
        tl.store(dst + D // 2 + half, (b * cos + a * sin).to(dst.dtype.element_ty))


def _empty_qkv(x: torch.Tensor, num_q_heads: int, num_kv_heads: int, head_dim: int):
    t = x.shape[0]
    return (x.new_empty(t, num_q_heads, head_dim), x.new_empty(t, num_kv_heads, head_dim),
            x.new_empty(t, num_kv_heads, head_dim))


def qkv_rope_triton(x: torch.Tensor, w_qkv: torch.Tensor, q_norm_weight: torch.Tensor,
                    k_norm_weight: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor,
                    num_q_heads: int, num_kv_heads: int, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton path (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    qkv = torch.nn.functional.linear(x, w_qkv)
    return qk_norm_rope_triton(qkv, q_norm_weight, k_norm_weight, cos_sin, positions, num_q_heads, num_kv_heads, eps)


def qk_norm_rope_triton(qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor,
                        cos_sin: torch.Tensor, positions: torch.Tensor, num_q_heads: int, num_kv_heads: int,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    head_dim = q_norm_weight.shape[0]
    qkv = qkv.contiguous()
    q, k, v = _empty_qkv(qkv, num_q_heads, num_kv_heads, head_dim)
    wrap_triton(_qkv_epilogue_kernel)[(qkv.shape[0], num_q_heads + 2 * num_kv_heads)](
        qkv, q_norm_weight, k_norm_weight, cos_sin, positions, q, k, v, positions, positions, 0, EPS=eps,
        HQ=num_q_heads, HKV=num_kv_heads, D=head_dim, TO_CACHE=False, BS=1, num_warps=1,
    )
    return q, k, v


def qk_norm_rope_cache_triton(qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor,
                              cos_sin: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor,
                              block_tables: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              num_q_heads: int, num_kv_heads: int, eps: float) -> torch.Tensor:
    head_dim = q_norm_weight.shape[0]
    qkv, bt = qkv.contiguous(), block_tables.contiguous()
    q = qkv.new_empty(qkv.shape[0], num_q_heads, head_dim)
    wrap_triton(_qkv_epilogue_kernel)[(qkv.shape[0], num_q_heads + 2 * num_kv_heads)](
        qkv, q_norm_weight, k_norm_weight, cos_sin, positions, q, k_cache, v_cache, seq_ids, bt, bt.shape[1], EPS=eps,
        HQ=num_q_heads, HKV=num_kv_heads, D=head_dim, TO_CACHE=True, BS=k_cache.shape[1], num_warps=1,
    )
    return q


def rope_reference(u: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of u [T, heads, D] in u's dtype (fp32 or float64)."""
    half = u.shape[-1] // 2
    cs = cos_sin[positions].to(u.dtype)[:, None, :]
    cos, sin = cs[..., :half], cs[..., half:]
    a, b = u[..., :half], u[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def qkv_rope_reference(x: torch.Tensor, w_qkv: torch.Tensor, q_norm_weight: torch.Tensor,
                       k_norm_weight: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor,
                       num_q_heads: int, num_kv_heads: int, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain torch, same rounding as the kernel; float64 inputs give the float64 oracle."""
    return qk_norm_rope_reference(torch.nn.functional.linear(x, w_qkv), q_norm_weight, k_norm_weight, cos_sin,
                                  positions, num_q_heads, num_kv_heads, eps)


def qk_norm_rope_reference(qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor,
                           cos_sin: torch.Tensor, positions: torch.Tensor, num_q_heads: int, num_kv_heads: int,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtype = qkv.dtype
    c = torch.float64 if dtype == torch.float64 else torch.float32
    d = q_norm_weight.shape[0]
    qkv = qkv.to(c)
    q, k, v = qkv.split([num_q_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)

    def norm_rope(u: torch.Tensor, w: torch.Tensor, heads: int) -> torch.Tensor:
        u = u.reshape(-1, heads, d)
        u = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + eps) * w.to(c)
        return rope_reference(u, cos_sin, positions).to(dtype)

    # contiguous: v is a slice of qkv, and the op's outputs have the fake's (dense) strides
    return (norm_rope(q, q_norm_weight, num_q_heads), norm_rope(k, k_norm_weight, num_kv_heads),
            v.reshape(-1, num_kv_heads, d).to(dtype).contiguous())


def qk_norm_rope_cache_reference(qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor,
                                 cos_sin: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor,
                                 block_tables: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 num_q_heads: int, num_kv_heads: int, eps: float) -> torch.Tensor:
    from qwen3_aot.custom_ops.paged_attention import cache_write_reference

    q, k, v = qk_norm_rope_reference(qkv, q_norm_weight, k_norm_weight, cos_sin, positions, num_q_heads,
                                     num_kv_heads, eps)
    cache_write_reference(k, v, k_cache, v_cache, positions, seq_ids, block_tables)
    return q


@triton_op("qwen3_aot::qkv_rope", mutates_args=())
def qkv_rope(x: torch.Tensor, w_qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor,
             cos_sin: torch.Tensor, positions: torch.Tensor, num_q_heads: int, num_kv_heads: int,
             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return qkv_rope_triton(x, w_qkv, q_norm_weight, k_norm_weight, cos_sin, positions,
                           num_q_heads, num_kv_heads, eps)


@triton_op("qwen3_aot::qk_norm_rope_cache", mutates_args={"k_cache", "v_cache"})
def qk_norm_rope_cache(qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor,
                       cos_sin: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor, block_tables: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, num_q_heads: int, num_kv_heads: int,
                       eps: float) -> torch.Tensor:
    return qk_norm_rope_cache_triton(qkv, q_norm_weight, k_norm_weight, cos_sin, positions, seq_ids, block_tables,
                                     k_cache, v_cache, num_q_heads, num_kv_heads, eps)


qkv_rope.register_kernel("cpu")(qkv_rope_reference)
qk_norm_rope_cache.register_kernel("cpu")(qk_norm_rope_cache_reference)


@qkv_rope.register_fake
def _(x, w_qkv, q_norm_weight, k_norm_weight, cos_sin, positions, num_q_heads, num_kv_heads, eps):
    return _empty_qkv(x, num_q_heads, num_kv_heads, q_norm_weight.shape[0])


@qk_norm_rope_cache.register_fake
def _(qkv, q_norm_weight, k_norm_weight, cos_sin, positions, seq_ids, block_tables, k_cache, v_cache, num_q_heads,
      num_kv_heads, eps):
    return qkv.new_empty(qkv.shape[0], num_q_heads, q_norm_weight.shape[0])


def rope_cos_sin(head_dim: int, theta: float, max_positions: int, device: torch.device | str = "cpu",
                 scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """The [max_positions, head_dim] fp32 table of `cos_sin`: row p = [A cos(p f_i), A sin(p f_i)]
    for the D/2 = head_dim/2 inverse frequencies f_i, i = 0 .. D/2 - 1, computed as transformers
    computes them (fp32 frequencies, fp32 products p * f_i, cos and sin in fp32, then times A),
    so that fp32 runs match it bit for bit. `scaling` is Qwen3Config.rope_scaling: every field
    resolved from config.json (or --rope-scaling) by qwen3_aot.config.rope_scaling_fields.

    Plain RoPE (scaling None; A = 1):   f_i = theta^(-2i/D)       (theta: config.json rope_theta)
    linear (positions divided by s):    f_i = theta^(-2i/D) / s   (s: the field factor), A = 1

    YaRN (arXiv 2309.00071; transformers' _compute_yarn_parameters, which Qwen3 documents for
    131,072 tokens with s = 4, L = 32,768):
      s  = factor; L = original_max_position_embeddings (the context trained to)
      extrapolation  e_i = theta^(-2i/D)       (the trained frequencies, kept where they turn
                                                many times within L)
      interpolation  n_i = theta^(-2i/D) / s   (positions compressed by s, for frequencies that
                                                turn less than once within L)
      the index i at which f_i turns r times within L (L e_i = 2 pi r, solved for i):
          d(r) = D ln(L / (2 pi r)) / (2 ln theta)
      low = d(beta_fast), high = d(beta_slow)  (beta_fast 32, beta_slow 1 unless given), rounded
          down and up (floor, ceil) when truncate (true unless given), then clamped:
          low = max(low, 0), high = min(high, D - 1)  (D - 1, not D/2 - 1: as transformers)
      ramp_i = clamp((i - low) / (high - low), 0, 1)  over i = 0 .. D/2 - 1  (high += 0.001
          when low == high), computed in fp32
      f_i = n_i ramp_i + e_i (1 - ramp_i)      (written as transformers writes it: with
                                                x_i = 1 - ramp_i, f_i = n_i (1 - x_i) + e_i x_i)
      A = attention_factor: as given, else 0.1 ln(s) + 1 (the paper's eq. 21; 1.1386 for s = 4),
          or with mscale and mscale_all_dim both set (m, m'), (0.1 m ln s + 1) / (0.1 m' ln s + 1).
      A multiplies cos and sin alike, i.e. both q and k: every attention score q.k gets A^2 =
      1 / t of the paper's softmax temperature t, with no other change to the graph.

    Positions are exact in fp32 below 2^24, and the angles p f_i carry fp32's relative error
    (at p = 131,071 up to ~0.008 rad for the fastest frequency), as in transformers, whose
    float64 model also builds its table in fp32: tests hold both to the same table.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    attention_factor = 1.0
    if scaling is not None and scaling["rope_type"] == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling is not None and scaling["rope_type"] == "yarn":
        inv_freq, attention_factor = _yarn_inv_freq(head_dim, theta, scaling)
    elif scaling is not None:
        raise ValueError(f"rope scaling {scaling['rope_type']!r}: qwen3_aot.config refuses it before it gets here")
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = freqs.cos(), freqs.sin()
    if attention_factor != 1.0:  # fp32 times the Python float, as transformers' `emb.cos() * attention_scaling`
        cos, sin = cos * attention_factor, sin * attention_factor
    return torch.cat([cos, sin], dim=-1).to(device)


def _yarn_inv_freq(dim: int, theta: float, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN's blended inverse frequencies and attention factor (see rope_cos_sin), each step in
    transformers' order and dtypes."""
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(scaling["beta_fast"]), correction_dim(scaling["beta_slow"])
    if scaling["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_share = 1 - ramp
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim)  # theta^(2i/D)
    interpolation = 1.0 / (factor * pos_freqs)
    extrapolation = 1.0 / pos_freqs
    inv_freq = interpolation * (1 - extrapolation_share) + extrapolation * extrapolation_share
    return inv_freq, scaling["attention_factor"]
