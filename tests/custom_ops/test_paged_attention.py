"""paged_attention against a float64 oracle: mixed prefill/decode batches, block boundaries,
GQA, poisoned unused cache blocks."""

import pytest
import torch

from conftest import rel_err
from qwen3_aot.custom_ops import paged_attention as attention
from qwen3_aot.custom_ops.paged_attention import paged_attention_reference, paged_attention_triton

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# The Triton interpreter (CPU) computes bf16 tl.dot wrongly (garbage of order 1e10, seen with
# triton 3.9): bf16 kernels are checked on the GPU only.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def _batch(hq, hkv, d, block_size, prior, new, dtype, device, seed):
    """Sequences with `prior[s]` tokens already cached and `new[s]` tokens in this batch.

    Blocks are handed out in a shuffled order; every block no sequence uses is NaN, so a
    read through a wrong block-table entry poisons the output."""
    g = torch.Generator().manual_seed(seed)
    totals = [p + n for p, n in zip(prior, new)]
    need = [-(-t // block_size) for t in totals]
    num_blocks = sum(need) + 3
    order = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(totals), max(need), dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"))
    v_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"))
    used = 0
    for s, n in enumerate(need):
        table[s, :n] = order[used:used + n]
        for j in range(prior[s]):  # earlier context, as if written by earlier steps
            blk, off = table[s, j // block_size], j % block_size
            k_cache[blk, off] = torch.randn(hkv, d, generator=g) * 30  # K near Qwen3's ~220 scale
            v_cache[blk, off] = torch.randn(hkv, d, generator=g)
        used += n
    t = sum(new)
    q = torch.randn(t, hq, d, generator=g)
    k = torch.randn(t, hkv, d, generator=g) * 30
    v = torch.randn(t, hkv, d, generator=g)
    positions = torch.cat([torch.arange(p, p + n) for p, n in zip(prior, new)])
    seq_ids = torch.cat([torch.full((n,), s, dtype=torch.int32) for s, n in enumerate(new)])
    to = lambda a: a.to(device)  # noqa: E731
    floats = [to(a.to(dtype)) for a in (q, k, v, k_cache, v_cache)]
    return (*floats, to(positions), to(seq_ids), to(table), d ** -0.5)


CASES = {
    # name: (Hq, Hkv, D, block_size, prior, new)
    "qwen3-0.6b-mixed": (16, 8, 128, 16, [0, 15, 16, 40], [17, 1, 1, 3]),  # prefill, decodes on/past a boundary
    "single-decode-long": (4, 2, 64, 16, [95], [1]),
    "prefill-on-boundary": (4, 1, 32, 32, [0], [64]),
    "one-past-boundary": (8, 2, 64, 16, [0, 32], [33, 1]),
    "block-256-hd256": (2, 1, 256, 256, [3], [2]),
    "block-4-spans-tiles": (4, 2, 32, 4, [70, 0], [1, 9]),
    "chunk-after-context": (4, 2, 64, 32, [100, 0], [40, 70]),  # a prompt's second chunk, and a new one
    "decode-batch-long": (8, 1, 128, 64, [300, 129, 511], [1, 1, 1]),  # group 8; ends on / past a block
    "block-128-hd64-mha": (4, 4, 64, 128, [127, 128], [1, 2]),
    "group-5": (10, 2, 64, 16, [33, 0], [1, 20]),  # Qwen3-14B's 40/8: a group that is not a power of two
    "decode-long-context": (4, 2, 64, 16, [2500], [1]),  # 79 partials with many-splits: two of the combine's chunks
    "decodes-around-prefill": (4, 2, 64, 16, [40, 0, 17, 5], [1, 30, 1, 1]),  # a step that decodes and prefills
}


# which kernels run: (SPLIT_TOKENS, SPLIT_PROGRAMS, KEYS_PER_STEP or None for the default); the
# cases are small, so these are forced
PATHS = {
    "split": (256, 1024, None),         # the default for small batches: a few splits per token
    "many-splits": (256, 1 << 20, 32),  # a split per 32 keys: the combine merges many partials
    "tiles": (0, 1024, None),           # the prefill tiles for every batch, runs of several sequences per tile
    "mixed": (2, 1024, None),           # a large batch: decodes among its first 2 tokens split, the rest tiles
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["triton-" + p for p in PATHS] + ["reference"])
def test_paged_attention_matches_float64(impl, case, dtype, kernel_device, monkeypatch):
    if impl != "reference" and dtype not in KERNEL_DTYPES:
        pytest.skip("bf16 tl.dot is wrong under the Triton interpreter; covered on the GPU")
    if impl != "reference":
        split_tokens, split_programs, keys = PATHS[impl.removeprefix("triton-")]
        monkeypatch.setattr(attention, "SPLIT_TOKENS", split_tokens)
        monkeypatch.setattr(attention, "SPLIT_PROGRAMS", split_programs)
        if keys is not None:
            monkeypatch.setattr(attention, "KEYS_PER_STEP", keys)
    device = "cpu" if impl == "reference" else kernel_device
    args = _batch(*CASES[case], dtype=dtype, device=device, seed=len(case))
    q, k, v, k_cache, v_cache, positions, seq_ids, table, scale = args
    oracle_args = [a.double().cpu() for a in (q, k, v, k_cache, v_cache)] + [positions.cpu(), seq_ids.cpu(),
                                                                            table.cpu(), scale]
    want = paged_attention_reference(*oracle_args)
    fn = paged_attention_reference if impl == "reference" else paged_attention_triton
    got = fn(*args)
    assert got.shape == q.shape and got.dtype == dtype
    assert rel_err(got, want) <= TOL[dtype]
    # the new k/v landed in the caller's cache tensors, exactly where the oracle put them
    written = ~torch.isnan(oracle_args[3])
    assert torch.equal(k_cache.double().cpu()[written], oracle_args[3][written])
    assert torch.equal(v_cache.double().cpu()[written], oracle_args[4][written])


def test_registered_op_mutates_caller_cache():
    args = _batch(4, 2, 32, 16, [5], [2], dtype=torch.float32, device="cpu", seed=3)
    k_cache = args[3]
    before = torch.isnan(k_cache).sum()
    torch.ops.qwen3_aot.paged_attention(*args)
    assert torch.isnan(k_cache).sum() == before - 2 * 2 * 32  # two tokens x two kv heads written
