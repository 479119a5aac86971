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
    Scores and softmax in fp32 (K reaches ~220 with Qwen3's k_norm, so an fp16
    score would overflow). For bf16/fp16 the P.V product takes P in fp16 (11
    significant bits, 8x finer than the bf16 flash attention uses: rounding P to
    bf16 alone made our bf16 logits drift further from float64 than
    transformers' on CPU) and V in fp16 (exact for bf16 values of magnitude
    6e-5..65504; Qwen3's V are far inside), accumulated in fp32; fp32 inputs stay
    fp32 throughout. One rounding, of the output.

``paged_attention_cached(q, k_cache, v_cache, positions, seq_ids, block_tables, scale) -> out``

    the same where the new tokens' k and v are in the cache already (the small-batch
    graph's q/k epilogue, custom_ops/qkv_rope.py, writes them there): nothing mutated.

The write happens first, so a prefill's tokens see each other. Triton, up to three
kernels after the write, each key finding its block in the table (any block
size); a kernel with nothing to do in this batch gets an empty grid, which
AOTInductor and Triton do not launch:
- split (flash-decoding): one program per (token, kv head, split); the keys of a
  long context are split over num_splits programs (more the fewer tokens there
  are, so that batch 1 at 32k still fills the GPU), whose partial softmaxes the
  combine kernel merges; the query heads of a group share each K/V load. It
  takes every token of a batch of at most SPLIT_TOKENS tokens (decode, small
  mixed steps) and, in a larger batch, the tokens among its first SPLIT_TOKENS
  that are alone in their sequence (the decodes of a step that also prefills);
- tiles (flash attention): one program per (tile of BLOCK_M tokens, kv head),
  the tile's queries (times their group's heads) sharing each K/V tile; a tile
  spanning several sequences takes them in turn, skipping the split kernel's.
  A decode in a tile costs a whole run over its context for one row of the
  tile: that is why a large batch's decodes go to the split kernel.

Every offset into the cache is computed in int64 (the block id is cast as it is loaded, and
positions are int64): the graph takes up to 2**22 blocks, 2**36 elements a layer at Qwen3's
8 KV heads of 128 dims and 16-token blocks, past 2**31 and past what an H200 holds
(tests/custom_ops/test_index_bounds.py reads the offsets the kernels compute at those sizes).
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


SPLIT_TOKENS = 256     # batches up to this many tokens take the split (decode) kernels, larger ones the tiles
SPLIT_PROGRAMS = 512   # (token, kv head, split) programs the split kernels aim for
# Launch parameters (any value is correct; chosen by bench/attention_bench.py --sweep, whose
# figures are in BENCHMARKS.md "Paged attention"): keys per inner step for 16-bit K/V and
# head_dim <= 128, fewer for wider heads and for fp32 so that a tile keeps its bytes (its
# shared memory), and pipeline stages of the K/V loads.
KEYS_PER_STEP = 128
SPLIT_STAGES = 2
TILE_STAGES = 2
DOT_MIN_ROWS = 16   # tl.dot wants at least 16 rows: the split kernel pads a kv head's query group to it
COMBINE_DIMS = 32   # head dims per combine program: a head of 128 dims merges in 4 programs at once
COMBINE_CHUNK = 64  # partials the combine merges per load (more splits than that take several loads)
TILE_ROWS = 128     # query rows (tokens x group heads) per tile; half for heads over 128 dims (registers)
SPLIT_WARPS = COMBINE_WARPS = 4
TILE_WARPS = 8      # a tile's [128, D] accumulator and two K/V tiles want the registers of 8 warps
LOG2E = 1.4426950408889634


@triton.jit
def _scores(q, k, qk_scale, FP32: tl.constexpr):
    """q [M, D] . k [N, D]^T in fp32, times scale * log2(e) (the softmax uses exp2)."""
    if FP32:
        return tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    return tl.dot(q, tl.trans(k)) * qk_scale  # bf16/fp16 products are exact in fp32, accumulated in fp32


@triton.jit
def _pv(p, v, FP32: tl.constexpr):
    """P [M, N] fp32 . V [N, D], accumulated in fp32 (P and V in fp16 unless fp32: see the docstring)."""
    if FP32:
        return tl.dot(p, v.to(tl.float32), input_precision="ieee")
    return tl.dot(p.to(tl.float16), v.to(tl.float16))


@triton.jit
def _online_softmax_step(qk, m, l, acc, v, FP32: tl.constexpr):
    """Fold one tile of masked scores (-inf where masked; a row may be all -inf) into (m, l, acc)."""
    m_new = tl.maximum(m, tl.max(qk, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-masked row so far: no NaN from -inf - -inf
    p = tl.exp2(qk - m_ref[:, None])
    alpha = tl.exp2(m - m_ref)
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _pv(p, v, FP32)
    return m_new, l, acc


@triton.jit
def _shares_sequence(seq_ptr, t, seq, num_tokens):
    """Whether token t has a neighbour of its own sequence in the batch (a sequence's tokens are contiguous)."""
    prev = tl.load(seq_ptr + t - 1, mask=t > 0, other=-1)
    nxt = tl.load(seq_ptr + t + 1, mask=t + 1 < num_tokens, other=-1)
    return (prev == seq) | (nxt == seq)


@triton.jit
def _tiles_take(seq_ptr, t, seq, num_tokens, split_tokens):
    """The routing rule, in one place (both kernels ask it, so no token is computed by neither):
    the tiles take token t when the batch has more than split_tokens tokens and t is past the
    first split_tokens or shares its sequence with a neighbour (a prompt's chunk); the split
    kernel takes every other token (a small batch whole; a large one's decodes)."""
    return (t >= split_tokens) | ((num_tokens > split_tokens) & _shares_sequence(seq_ptr, t, seq, num_tokens))


@triton.jit
def _split_chunk(ctx, num_splits, BLOCK_N: tl.constexpr):
    """Keys per split of a context of `ctx` keys: a whole number of BLOCK_N steps, so that
    the splits that run are the first cdiv(ctx, chunk) (the split and combine kernels agree)."""
    return tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N


@triton.jit
def _split_kernel(q_ptr, kc_ptr, vc_ptr, out_ptr, part_acc_ptr, part_ml_ptr, pos_ptr, seq_ptr, bt_ptr, bt_stride,
                  num_tokens, split_tokens, num_splits, QK_SCALE: tl.constexpr, BS: tl.constexpr, HQ: tl.constexpr,
                  HKV: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr,
                  BLOCK_N: tl.constexpr, FP32: tl.constexpr):
    """Program (token, kv head, split): the split's share of the token's keys for the
    group's query heads; the whole answer if num_splits == 1, else a partial for _combine_kernel.
    In a batch of more than split_tokens tokens, only tokens alone in their sequence (the tiles take the rest)."""
    t = tl.program_id(0).to(tl.int64)
    seq = tl.load(seq_ptr + t)
    if _tiles_take(seq_ptr, t, seq, num_tokens, split_tokens):
        return
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(pos_ptr + t) + 1
    chunk = _split_chunk(ctx, num_splits, BLOCK_N)
    lo = split * chunk
    if lo >= ctx:  # a short context needs fewer splits; _combine_kernel skips this one
        return
    hi = tl.minimum(lo + chunk, ctx)
    seq = seq.to(tl.int64)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + (t * HQ + heads)[:, None] * D + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + n
        valid = j < hi
        blk = tl.load(bt_ptr + seq * bt_stride + j // BS, mask=valid, other=0).to(tl.int64)
        kv_off = ((blk * BS + j % BS) * HKV + kvh)[:, None] * D + d[None, :]
        k = tl.load(kc_ptr + kv_off, mask=valid[:, None], other=0.0)
        v = tl.load(vc_ptr + kv_off, mask=valid[:, None], other=0.0)
        qk = tl.where(valid[None, :], _scores(q, k, QK_SCALE, FP32), float("-inf"))
        m, l, acc = _online_softmax_step(qk, m, l, acc, v, FP32)
    rows = g < GROUP
    if num_splits == 1:
        out = acc / l[:, None]
        tl.store(out_ptr + (t * HQ + heads)[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=rows[:, None])
    else:
        part = (t * num_splits + split) * HQ + heads
        tl.store(part_acc_ptr + part[:, None] * D + d[None, :], acc, mask=rows[:, None])
        tl.store(part_ml_ptr + 2 * part, m, mask=rows)
        tl.store(part_ml_ptr + 2 * part + 1, l, mask=rows)


@triton.jit
def _combine_kernel(out_ptr, part_acc_ptr, part_ml_ptr, pos_ptr, num_splits, HQ: tl.constexpr, D: tl.constexpr,
                    D_PART: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """Program (token, query head, D_PART of the head's dims), launched only when num_splits > 1:
    merge the partial softmaxes of the splits that ran in one pass, CHUNK splits per load,
    rescaling by the running maximum (a pass for the maximum, then one for the sums, one split
    at a time, was a chain of dependent loads; BENCHMARKS.md has the figures)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d = tl.program_id(2) * D_PART + tl.arange(0, D_PART)
    ctx = tl.load(pos_ptr + t) + 1
    ran = tl.cdiv(ctx, _split_chunk(ctx, num_splits, BLOCK_N))
    base = t * num_splits * HQ + h
    c = tl.arange(0, CHUNK)
    m_run = tl.full([1], float("-inf"), tl.float32)
    l_run = tl.zeros([1], tl.float32)
    acc = tl.zeros([D_PART], tl.float32)
    for i in range(0, ran, CHUNK):
        ok = i + c < ran
        part = base + (i + c) * HQ
        m = tl.load(part_ml_ptr + 2 * part, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m_run, tl.max(m, 0))  # finite: every split that ran saw at least one key
        w = tl.where(ok, tl.exp2(m - m_new), 0.0)
        alpha = tl.exp2(m_run - m_new)
        l_run = l_run * alpha + tl.sum(w * tl.load(part_ml_ptr + 2 * part + 1, mask=ok, other=0.0), 0)
        acc = acc * alpha + tl.sum(w[:, None] * tl.load(part_acc_ptr + part[:, None] * D + d[None, :],
                                                        mask=ok[:, None], other=0.0), 0)
        m_run = m_new
    tl.store(out_ptr + (t * HQ + h) * D + d, (acc / l_run).to(out_ptr.dtype.element_ty))


@triton.jit
def _tile_kernel(q_ptr, kc_ptr, vc_ptr, out_ptr, pos_ptr, seq_ptr, bt_ptr, bt_stride, num_tokens, split_tokens,
                 QK_SCALE: tl.constexpr, BS: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                 GROUP: tl.constexpr, G_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 FP32: tl.constexpr):
    """Program (tile of BLOCK_M tokens, kv head), launched for batches of more than
    split_tokens tokens: rows are (token, head of the group). The tile's tokens are taken one
    sequence (a contiguous run) at a time, each run streaming its sequence's keys up to its
    last position, causally masked per row; a token alone in its sequence among the first
    split_tokens is the split kernel's and skipped."""
    kvh = tl.program_id(1)
    t0 = tl.program_id(0) * BLOCK_M
    r = tl.arange(0, BLOCK_M * G_PAD)
    tok = t0 + r // G_PAD
    g = r % G_PAD
    in_batch = tok < num_tokens
    row_ok = in_batch & (g < GROUP)
    d = tl.arange(0, D)
    rows_off = (tok.to(tl.int64) * HQ + kvh * GROUP + g)[:, None] * D + d[None, :]
    q = tl.load(q_ptr + rows_off, mask=row_ok[:, None], other=0.0)
    row_seq = tl.load(seq_ptr + tok, mask=in_batch, other=-1)
    row_pos = tl.load(pos_ptr + tok, mask=in_batch, other=-1)
    t_end = tl.minimum(t0 + BLOCK_M, num_tokens)
    run = t0
    while run < t_end:
        seq = tl.load(seq_ptr + run)
        in_run = row_ok & (row_seq == seq) & (tok >= run)
        run_len = tl.sum((in_run & (g == 0)).to(tl.int32))  # a sequence's tokens are contiguous
        if _tiles_take(seq_ptr, run, seq, num_tokens, split_tokens):  # a run's tokens go together
            _tile_run(q, kc_ptr, vc_ptr, out_ptr, rows_off, bt_ptr + seq.to(tl.int64) * bt_stride, in_run, row_pos,
                      kvh, QK_SCALE, BS, HKV, D, BLOCK_M * G_PAD, BLOCK_N, FP32)
        run += run_len


@triton.jit
def _tile_run(q, kc_ptr, vc_ptr, out_ptr, rows_off, seq_table, in_run, row_pos, kvh, QK_SCALE: tl.constexpr,
              BS: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
              FP32: tl.constexpr):
    """The rows `in_run` of a tile (one sequence's tokens) over their sequence's keys."""
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    last = tl.max(tl.where(in_run, row_pos, -1))
    first = tl.min(tl.where(in_run, row_pos, last))
    m = tl.full([ROWS], float("-inf"), tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    # keys up to the run's first position are seen by all its rows: no mask (rows outside the
    # run are not stored; their q is a real or zero row, so their scores stay finite)
    unmasked = (first + 1) // BLOCK_N * BLOCK_N
    for start in range(0, unmasked, BLOCK_N):
        j = start + n
        blk = tl.load(seq_table + j // BS).to(tl.int64)
        kv_off = ((blk * BS + j % BS) * HKV + kvh)[:, None] * D + d[None, :]
        k = tl.load(kc_ptr + kv_off)
        v = tl.load(vc_ptr + kv_off)
        m, l, acc = _online_softmax_step(_scores(q, k, QK_SCALE, FP32), m, l, acc, v, FP32)
    for start in range(unmasked, last + 1, BLOCK_N):
        j = start + n
        valid = j <= last
        blk = tl.load(seq_table + j // BS, mask=valid, other=0).to(tl.int64)
        kv_off = ((blk * BS + j % BS) * HKV + kvh)[:, None] * D + d[None, :]
        k = tl.load(kc_ptr + kv_off, mask=valid[:, None], other=0.0)
        v = tl.load(vc_ptr + kv_off, mask=valid[:, None], other=0.0)
        visible = in_run[:, None] & (j[None, :] <= row_pos[:, None])
        qk = tl.where(visible, _scores(q, k, QK_SCALE, FP32), float("-inf"))
        m, l, acc = _online_softmax_step(qk, m, l, acc, v, FP32)
    tl.store(out_ptr + rows_off, (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=in_run[:, None])


def paged_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor,
                           block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """The Triton path (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    cache_write_triton(k, v, k_cache, v_cache, positions, seq_ids, block_tables)
    return paged_attention_cached_triton(q, k_cache, v_cache, positions, seq_ids, block_tables, scale)


def cache_write_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       positions: torch.Tensor, seq_ids: torch.Tensor, block_tables: torch.Tensor) -> None:
    bs, hkv, d = k_cache.shape[1:]
    bt = block_tables.contiguous()
    wrap_triton(_cache_write_kernel)[(k.shape[0], hkv)](
        k.contiguous(), v.contiguous(), k_cache, v_cache, positions, seq_ids, bt, bt.shape[1], BS=bs, HKV=hkv, D=d)


def paged_attention_cached_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  positions: torch.Tensor, seq_ids: torch.Tensor, block_tables: torch.Tensor,
                                  scale: float) -> torch.Tensor:
    t, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    q = q.contiguous()
    bt = block_tables.contiguous()
    out = torch.empty_like(q)
    # Grids as integer arithmetic on the token count, which is symbolic in the exported graph
    # (no branch on it); an empty first grid dimension is not launched. The split kernel looks
    # at the first min(t, SPLIT_TOKENS) tokens, with num_splits shrinking as t grows, to 1 past
    # `most` tokens (then no combine); the tiles run only for t > SPLIT_TOKENS.
    small = (SPLIT_TOKENS // t + SPLIT_TOKENS) // (SPLIT_TOKENS + 1)  # 1 if t <= SPLIT_TOKENS else 0
    most = min(SPLIT_PROGRAMS // hkv, SPLIT_TOKENS)
    several = (most // t + most) // (most + 1)  # 1 if t <= most (num_splits > 1) else 0
    split_rows = t * small + SPLIT_TOKENS * (1 - small)
    num_splits = 1 + most // t
    partials = t * several * num_splits * hq + 1  # one spare row: never an empty tensor
    part_acc = torch.empty(partials * d, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(partials * 2, dtype=torch.float32, device=q.device)
    fp32 = q.dtype == torch.float32
    common = dict(QK_SCALE=scale * LOG2E, BS=bs, HQ=hq, HKV=hkv, D=d, GROUP=group, FP32=fp32)
    keys = max(16, KEYS_PER_STEP * 128 // max(d, 128) // (2 if fp32 else 1))
    g_pad = triton.next_power_of_2(group)
    wrap_triton(_split_kernel)[(split_rows, hkv, num_splits)](
        q, k_cache, v_cache, out, part_acc, part_ml, positions, seq_ids, bt, bt.shape[1], t, SPLIT_TOKENS,
        num_splits, **common, G_PAD=max(DOT_MIN_ROWS, g_pad), BLOCK_N=keys, num_warps=SPLIT_WARPS,
        num_stages=SPLIT_STAGES)
    d_part = min(d, COMBINE_DIMS)
    wrap_triton(_combine_kernel)[(t * several, hq, d // d_part)](
        out, part_acc, part_ml, positions, num_splits, HQ=hq, D=d, D_PART=d_part, BLOCK_N=keys, CHUNK=COMBINE_CHUNK,
        num_warps=COMBINE_WARPS)
    block_m = max(1, (TILE_ROWS if d <= 128 else TILE_ROWS // 2) // g_pad)
    wrap_triton(_tile_kernel)[(triton.cdiv(t, block_m) * (1 - small), hkv)](
        q, k_cache, v_cache, out, positions, seq_ids, bt, bt.shape[1], t, SPLIT_TOKENS, **common, G_PAD=g_pad,
        BLOCK_M=block_m, BLOCK_N=keys, num_warps=TILE_WARPS, num_stages=TILE_STAGES)
    return out


def paged_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                              v_cache: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor,
                              block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain torch, one sequence at a time; float64 inputs give the float64 oracle."""
    cache_write_reference(k, v, k_cache, v_cache, positions, seq_ids, block_tables)
    return paged_attention_cached_reference(q, k_cache, v_cache, positions, seq_ids, block_tables, scale)


def cache_write_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          positions: torch.Tensor, seq_ids: torch.Tensor, block_tables: torch.Tensor) -> None:
    bs = k_cache.shape[1]
    pos = positions.long()
    blocks = block_tables.long()[seq_ids.long(), pos // bs]
    k_cache[blocks, pos % bs] = k
    v_cache[blocks, pos % bs] = v


def paged_attention_cached_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     positions: torch.Tensor, seq_ids: torch.Tensor, block_tables: torch.Tensor,
                                     scale: float) -> torch.Tensor:
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // hkv
    pos = positions.long()
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


@triton_op("qwen3_aot::paged_attention_cached", mutates_args=())
def paged_attention_cached(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                           seq_ids: torch.Tensor, block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    return paged_attention_cached_triton(q, k_cache, v_cache, positions, seq_ids, block_tables, scale)


paged_attention.register_kernel("cpu")(paged_attention_reference)
paged_attention_cached.register_kernel("cpu")(paged_attention_cached_reference)


@paged_attention.register_fake
def _(q, k, v, k_cache, v_cache, positions, seq_ids, block_tables, scale):
    return torch.empty_like(q)


@paged_attention_cached.register_fake
def _(q, k_cache, v_cache, positions, seq_ids, block_tables, scale):
    return torch.empty_like(q)
