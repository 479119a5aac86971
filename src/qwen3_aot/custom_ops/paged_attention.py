"""Causal grouped-query attention over a paged KV cache, the cache write included.

``paged_attention(q, k, v, k_cache, v_cache, positions, seq_ids, block_tables, scale) -> out``

    q: [T, Hq, D]; k, v: [T, Hkv, D]: the new tokens of a flat batch, any mix
        of prefills and decodes from S sequences (a sequence's tokens are
        contiguous and in position order)
    k_cache, v_cache: [num_blocks, block_size, Hkv, D], same dtype as q;
        MUTATED: token t's k and v are written at position positions[t] of
        sequence seq_ids[t], i.e. block block_tables[s, p // block_size],
        offset p % block_size
    positions: [T] int64; seq_ids: [T] int32; block_tables: [S, max_blocks] int32
    out: [T, Hq, D], dtype of q

    For token t of sequence s at position p, query head h, kv head h // (Hq/Hkv):
        scores_j = scale * q[t, h] . K_s[j]        for j = 0..p (causal)
        out[t, h] = sum_j softmax(scores)_j V_s[j]
    Scores, softmax and the P.V product in fp32 (K reaches ~220 with Qwen3's
    k_norm, so an fp16 score would overflow); the probabilities are not rounded
    to bf16 before P.V as flash attention does: that rounding alone made our
    bf16 logits drift further from float64 than transformers' on CPU. One
    rounding, of the output.

The write happens first, so a prefill's tokens see each other. Triton: one
kernel writes the new k/v; one program per (token, kv head) then streams the
sequence's keys in tiles of BLOCK_N (each key finds its block in the table,
so any block size works) with an online softmax, the query heads of a group
sharing each K/V load (padded to 16 rows for tl.dot). Correct for any mix;
speed for long contexts is the later flash-decoding / prefill-tile work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


@triton.jit
def _cache_write_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, pos_ptr, seq_ptr, bt_ptr, bt_stride,
                        BS: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    pos = tl.load(pos_ptr + t)
    seq = tl.load(seq_ptr + t).to(tl.int64)
    blk = tl.load(bt_ptr + seq * bt_stride + pos // BS).to(tl.int64)
    offs = tl.arange(0, D)
    dst = ((blk * BS + pos % BS) * HKV + h) * D + offs
    src = (t * HKV + h) * D + offs
    tl.store(kc_ptr + dst, tl.load(k_ptr + src))
    tl.store(vc_ptr + dst, tl.load(v_ptr + src))


@triton.jit
def _attention_kernel(q_ptr, kc_ptr, vc_ptr, out_ptr, pos_ptr, seq_ptr, bt_ptr, bt_stride, SCALE: tl.constexpr,
                      BS: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                      G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, FP32: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    group: tl.constexpr = HQ // HKV
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    rows = (t * HQ + kvh * group + g)[:, None] * D + d[None, :]
    q = tl.load(q_ptr + rows, mask=(g < group)[:, None], other=0.0)
    pos = tl.load(pos_ptr + t)
    seq = tl.load(seq_ptr + t).to(tl.int64)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for start in range(0, pos + 1, BLOCK_N):
        j = start + n  # key positions of this tile; each looks up its own block (any block size)
        valid = j <= pos
        blk = tl.load(bt_ptr + seq * bt_stride + j // BS, mask=valid, other=0).to(tl.int64)
        kv_off = ((blk * BS + j % BS) * HKV + kvh)[:, None] * D + d[None, :]
        k = tl.load(kc_ptr + kv_off, mask=valid[:, None], other=0.0)
        v = tl.load(vc_ptr + kv_off, mask=valid[:, None], other=0.0).to(tl.float32)
        if FP32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:  # bf16/fp16 products are exact in fp32, and the dot accumulates in fp32
            s = tl.dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s * SCALE, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        # P.V with p kept in fp32 (tf32x3 is fp32-accurate on the tensor cores)
        if FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="tf32x3")
        m = m_new
    out = acc / l[:, None]
    tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=(g < group)[:, None])


def paged_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor,
                           block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """The Triton path (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    t, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    bt = block_tables.contiguous()
    wrap_triton(_cache_write_kernel)[(t, hkv)](
        k, v, k_cache, v_cache, positions, seq_ids, bt, bt.shape[1], BS=bs, HKV=hkv, D=d)
    out = torch.empty_like(q)
    wrap_triton(_attention_kernel)[(t, hkv)](
        q, k_cache, v_cache, out, positions, seq_ids, bt, bt.shape[1], SCALE=scale,
        BS=bs, HQ=hq, HKV=hkv, D=d, G_PAD=max(16, triton.next_power_of_2(hq // hkv)),
        BLOCK_N=64 if d <= 128 else 32, FP32=q.dtype == torch.float32, num_warps=4, num_stages=2)
    return out


def paged_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                              v_cache: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor,
                              block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain torch, one sequence at a time; float64 inputs give the float64 oracle."""
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // hkv
    pos = positions.long()
    blocks = block_tables.long()[seq_ids.long(), pos // bs]
    k_cache[blocks, pos % bs] = k
    v_cache[blocks, pos % bs] = v
    c = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty_like(q)
    for s in torch.unique(seq_ids).tolist():
        rows = (seq_ids == s).nonzero().squeeze(1)
        ctx = int(pos[rows].max()) + 1
        j = torch.arange(ctx, device=q.device)
        kb = block_tables.long()[s, j // bs]
        keys = k_cache[kb, j % bs].to(c).repeat_interleave(group, dim=1)    # [ctx, Hq, D]
        vals = v_cache[kb, j % bs].to(c).repeat_interleave(group, dim=1)
        scores = torch.einsum("thd,jhd->htj", q[rows].to(c), keys) * scale  # [Hq, Tq, ctx]
        scores = scores.masked_fill(j[None, None, :] > pos[rows][None, :, None], float("-inf"))
        out[rows] = torch.einsum("htj,jhd->thd", scores.softmax(-1), vals).to(q.dtype)
    return out


@triton_op("qwen3_aot::paged_attention", mutates_args={"k_cache", "v_cache"})
def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor,
                    block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    return paged_attention_triton(q, k, v, k_cache, v_cache, positions, seq_ids, block_tables, scale)


paged_attention.register_kernel("cpu")(paged_attention_reference)


@paged_attention.register_fake
def _(q, k, v, k_cache, v_cache, positions, seq_ids, block_tables, scale):
    return torch.empty_like(q)
