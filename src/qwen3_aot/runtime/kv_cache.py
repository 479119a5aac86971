"""The paged KV cache: per-layer K and V tensors that the compiled graph writes in place,
and the free list of their blocks."""

from __future__ import annotations

from collections import deque

import torch

from qwen3_aot.errors import Qwen3AotError

RESERVED_BLOCK = 0  # never handed out: padded rows of a CUDA-graph decode step write here


def block_bytes(model_config: dict, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block over all layers, K and V."""
    c = model_config
    per_token = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * dtype.itemsize
    return per_token * block_size


class KVCache:
    """`num_blocks` blocks of `block_size` tokens, each layer's K and V
    [num_blocks, block_size, kv_heads, head_dim]. Whole, freshly allocated tensors:
    AOTInductor clones an input it cannot prove aligned, and a write would land in the clone.
    Sequences own blocks through their block tables; block 0 is reserved (RESERVED_BLOCK)."""

    def __init__(self, model_config: dict, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        if num_blocks < 2:
            raise Qwen3AotError(f"the KV cache needs at least 2 blocks (one is reserved), got {num_blocks}; "
                                "raise num_blocks / kv_cache_tokens (or gpu_memory_utilization).")
        c = model_config
        shape = (num_blocks, block_size, c["num_key_value_heads"], c["head_dim"])
        layers = range(c["num_hidden_layers"])
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = deque(b for b in range(num_blocks) if b != RESERVED_BLOCK)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """The most tokens one sequence can hold: every block but the reserved one."""
        return (self.num_blocks - 1) * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        assert n <= len(self._free), "the scheduler checks num_free first"
        return [self._free.popleft() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)
