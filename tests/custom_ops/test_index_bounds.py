"""The kernels' offsets into the paged KV cache at the largest sizes an artifact takes, run
under the Triton interpreter: no product of block index, block size, heads and head_dim may
wrap at 2**31.

A cache of 2**22 blocks (the graph's num_blocks range, GraphLimits.max_num_blocks) of Qwen3's
16-token blocks, 8 KV heads of 128 dims, has 2**36 elements per layer: 137 GB in bf16 for one
layer's K alone, more than an H200 (141 GB for K and V of every layer) can hold, and 32x past
2**31. Such a cache cannot be allocated here, so the kernels address a small real one as if
it were that large: each offset a kernel adds to a cache's base pointer is recorded exactly as
the kernel computed it (in the kernel's own integer dtype: the interpreter's numpy arrays),
then folded into the real tensor so that every access stays in bounds. The test asserts that
the recorded offsets are the exact ones (Python integers) for block ids near 2**22 and
positions near 131,072; an offset computed in int32 would wrap and miss them. The values the
kernels compute are tested elsewhere (test_paged_attention.py, test_qkv_rope.py); here only the
addresses are.
"""

import os

import numpy as np
import pytest
import torch

from qwen3_aot.build.graph import GraphLimits
from qwen3_aot.custom_ops import paged_attention as attention
from qwen3_aot.custom_ops.qkv_rope import qk_norm_rope_cache_triton, rope_cos_sin

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="reads the offsets through the Triton interpreter (CPU)")

HQ, HKV, D, BS = 32, 8, 128, 16  # Qwen3-8B's heads (the 0.6B has the same KV geometry); the default block size
MAX_BLOCKS = GraphLimits().max_num_blocks
MAX_LEN = 131072  # Qwen3 with YaRN factor 4
VIRTUAL = MAX_BLOCKS * BS * HKV * D  # elements of the largest cache the graph takes, per layer and K or V
H200_BYTES = 141e9


def test_the_virtual_cache_is_larger_than_an_h200_holds_and_past_int32():
    assert VIRTUAL * 2 > H200_BYTES / 2  # bf16; K and V of one layer at least share the memory
    assert VIRTUAL > 16 * 2**31


class VirtualCaches:
    """Record every offset added to the base pointer of `tensors` and fold it into the real
    tensor (offset mod (numel - 2 PAD) + PAD: never the base itself, and room for the head's
    dims a kernel adds after a row's start)."""

    PAD = D

    def __init__(self, monkeypatch, *tensors: torch.Tensor) -> None:
        from triton.runtime import interpreter

        self.numel = {t.data_ptr(): t.numel() for t in tensors}
        self.dtypes: set[np.dtype] = set()
        self.row_starts: set[int] = set()  # the offsets of lanes at a head's dim 0
        self.low, self.high = 0, 0
        real = interpreter.InterpreterBuilder.create_addptr

        def create_addptr(builder, ptr, offset):
            base = np.asarray(ptr.data)
            numel = self.numel.get(int(base.flat[0])) if (base == base.flat[0]).all() else None
            if numel is not None:
                off = np.asarray(offset.data)
                self.record(off)
                folded = off.astype(np.int64) % (numel - 2 * self.PAD) + self.PAD
                offset = interpreter.TensorHandle(folded.astype(off.dtype), offset.dtype)
            return real(builder, ptr, offset)

        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_addptr", create_addptr)

    def record(self, off: np.ndarray) -> None:
        self.dtypes.add(off.dtype)
        self.low, self.high = min(self.low, int(off.min())), max(self.high, int(off.max()))
        self.row_starts.update(int(x) for x in np.unique(off[off % D == 0]))


def top_blocks(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A block table [rows, cols] of distinct block ids among the highest the graph takes."""
    g = torch.Generator().manual_seed(seed)
    ids = MAX_BLOCKS - 1 - torch.randperm(rows * cols, generator=g)
    return ids.reshape(rows, cols).to(torch.int32)


def row_start(table: torch.Tensor, seq: int, pos: int, head: int) -> int:
    """The exact element offset of (position pos of sequence seq, kv head) in the cache."""
    blk = int(table[seq, pos // BS])
    return ((blk * BS + pos % BS) * HKV + head) * D


def small_cache(dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32: the interpreter's numpy matmuls are fast in fp32 (fp16 has no BLAS); the offsets are
    computed alike for every dtype."""
    return torch.zeros(4, BS, HKV, D, dtype=dtype), torch.zeros(4, BS, HKV, D, dtype=dtype)


def assert_exact(caches: VirtualCaches, wanted: set[int]) -> None:
    assert max(wanted) > 2**31  # the case reaches past int32
    assert caches.low >= 0 and caches.high < VIRTUAL, "an offset wrapped or left the cache"
    assert wanted <= caches.row_starts, f"{len(wanted - caches.row_starts)} rows addressed wrongly"
    assert caches.dtypes == {np.dtype(np.int64)}


# three sequences; positions up to the last of a 131,072-token context; the block table as
# wide as the graph's (131,072 / 16 = 8,192 columns)
WRITES = [(0, MAX_LEN - 1), (0, MAX_LEN - 2), (1, 5), (2, MAX_LEN // 2 + 3)]


def test_cache_writes_at_the_last_blocks_and_positions(monkeypatch):
    k_cache, v_cache = small_cache()
    caches = VirtualCaches(monkeypatch, k_cache, v_cache)
    table = top_blocks(3, MAX_LEN // BS, seed=0)
    seqs, pos = zip(*WRITES)
    k = torch.randn(len(WRITES), HKV, D, dtype=k_cache.dtype)
    attention.cache_write_triton(k, k.clone(), k_cache, v_cache, torch.tensor(pos),
                                 torch.tensor(seqs, dtype=torch.int32), table)
    assert_exact(caches, {row_start(table, s, p, h) for s, p in WRITES for h in range(HKV)})


def test_the_qk_norm_epilogue_writes_at_the_last_blocks_and_positions(monkeypatch):
    k_cache, v_cache = small_cache()
    caches = VirtualCaches(monkeypatch, k_cache, v_cache)
    table = top_blocks(3, MAX_LEN // BS, seed=1)
    seqs, pos = zip(*WRITES)
    qkv = torch.randn(len(WRITES), (HQ + 2 * HKV) * D, dtype=k_cache.dtype)
    ones = torch.ones(D, dtype=k_cache.dtype)
    qk_norm_rope_cache_triton(qkv, ones, ones, rope_cos_sin(D, 1e6, MAX_LEN), torch.tensor(pos),
                              torch.tensor(seqs, dtype=torch.int32), table, k_cache, v_cache, HQ, HKV, 1e-6)
    assert_exact(caches, {row_start(table, s, p, h) for s, p in WRITES for h in range(HKV)})


@pytest.mark.parametrize("kernels", ["split", "tiles"])
# a tile's rows outside the sequence being run divide 0 by 0 and are not stored
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
def test_attention_reads_every_key_at_the_last_blocks(monkeypatch, kernels):
    """Short contexts (the interpreter runs a program at a time) over blocks at the top of the
    range: the block id, not the position, makes the offset large. 'split': the split
    (flash-decoding) kernel, 2 splits a token; 'tiles': the split kernel's token budget lowered
    so that an 8-token batch takes the flash-attention tiles."""
    if kernels == "tiles":  # sequence 0 prefills positions 30..36 (7 tokens), sequence 1 decodes at 40
        monkeypatch.setattr(attention, "SPLIT_TOKENS", 4)
        pos, seqs = list(range(30, 37)) + [40], [0] * 7 + [1]
    else:  # two decodes, 2 splits each rather than ~512 programs in all: the interpreter takes ~0.15 s a program
        monkeypatch.setattr(attention, "SPLIT_PROGRAMS", 2 * HKV)
        pos, seqs = [36, 40], [0, 1]
    k_cache, v_cache = small_cache()
    caches = VirtualCaches(monkeypatch, k_cache, v_cache)
    table = top_blocks(2, MAX_LEN // BS, seed=2)
    q = torch.randn(len(pos), HQ, D, dtype=k_cache.dtype)
    attention.paged_attention_cached_triton(q, k_cache, v_cache, torch.tensor(pos),
                                            torch.tensor(seqs, dtype=torch.int32), table, D ** -0.5)
    assert_exact(caches, {row_start(table, s, j, h) for s, p in zip(seqs, pos) for j in range(p + 1)
                          for h in range(HKV)})
