"""The paged KV cache: per-layer K and V tensors that the compiled graph writes in place.
Which sequence holds which block is core bookkeeping (runtime/core/block_pool.py)."""

from __future__ import annotations

from typing import Callable

import torch

from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime.forward.flat_batch import FlatBatch, Forward

RESERVED_BLOCK = 0  # never handed out: padded rows of a CUDA-graph decode step write here


def block_bytes(model_config: dict, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block over all layers, K and V."""
    c = model_config
    per_token = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * dtype.itemsize
    return per_token * block_size


def cache_tensors(model_config: dict, num_blocks: int, block_size: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each layer's K and V [num_blocks, block_size, kv_heads, head_dim], zeros."""
    c = model_config
    shape = (num_blocks, block_size, c["num_key_value_heads"], c["head_dim"])
    layers = range(c["num_hidden_layers"])
    return ([torch.zeros(shape, dtype=dtype, device=device) for _ in layers],
            [torch.zeros(shape, dtype=dtype, device=device) for _ in layers])


class KVCache:
    """`num_blocks` blocks of `block_size` tokens, each layer's K and V
    [num_blocks, block_size, kv_heads, head_dim]. Whole, freshly allocated tensors:
    AOTInductor clones an input it cannot prove aligned, and a write would land in the clone.
    Sequences hold blocks through their block tables; block 0 is reserved (RESERVED_BLOCK)."""

    def __init__(self, model_config: dict, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        if num_blocks < 2:
            raise Qwen3AotError(f"the KV cache needs at least 2 blocks (one is reserved), got {num_blocks}; "
                                "raise num_blocks / kv_cache_tokens (or gpu_memory_utilization).")
        self.k, self.v = cache_tensors(model_config, num_blocks, block_size, dtype, device)
        self.num_blocks, self.block_size = num_blocks, block_size

    @property
    def capacity(self) -> int:
        """The most tokens one sequence can hold: every block but the reserved one."""
        return (self.num_blocks - 1) * self.block_size


def cuda_cache_bytes(forward: Forward, model_config: dict, block_size: int, dtype: torch.dtype,
                     device: torch.device, utilization: float, max_tokens: int, rows: int,
                     after: Callable[[torch.Tensor], object] | None = None) -> int:
    """The bytes a KV cache may take: `utilization` of the GPU, less what is in use (weights,
    CUDA context, other processes) and the peak of the largest step, measured by running one:
    max_tokens tokens (all at position 0 of a scratch cache: activations, not context length,
    set the peak) with `rows` logit rows, then `after` on the logits (the engine's sampling)."""
    scratch = KVCache(model_config, 2, block_size, dtype, device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    zeros = torch.zeros(max_tokens, dtype=torch.int64, device=device)
    with torch.inference_mode():
        batch = FlatBatch(zeros, zeros, zeros.int(), torch.ones(1, 1, dtype=torch.int32, device=device),
                          torch.arange(rows, device=device))
        logits = forward.run(batch, scratch.k, scratch.v)
        if after is not None:
            after(logits)
    peak = torch.cuda.max_memory_allocated(device) - base
    del logits, scratch, zeros
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return int(total * utilization - (total - free) - peak)
