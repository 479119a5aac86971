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


def rope_cos_sin(head_dim: int, theta: float, max_positions: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The [max_positions, head_dim] fp32 table, computed as transformers computes it (fp32
    inverse frequencies, fp32 products), so that fp32 runs match it bit for bit."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)
