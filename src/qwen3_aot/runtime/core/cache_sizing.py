"""How many KV-cache blocks an engine core gets: what the caller asked for (blocks or tokens),
else on CUDA what fits in its share of the GPU after the weights and the peak of the largest
step, on CPU enough for every sequence at full length (at most CPU_CACHE_BYTES)."""

from __future__ import annotations

import torch

from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime.core.sampler import Sampler
from qwen3_aot.runtime.core.sampling_params import SamplingParams
from qwen3_aot.runtime.forward.flat_batch import Forward
from qwen3_aot.runtime.forward.kv_cache import block_bytes, cuda_cache_bytes

CPU_CACHE_BYTES = 1 << 30  # the default KV cache on CPU: 1 GiB, or less if the sequences need less


def plan_num_blocks(forward: Forward, sampler: Sampler, config: dict, block_size: int, dtype: torch.dtype,
                    device: torch.device, max_model_len: int, tensor_parallel: int | None,
                    kv_cache_tokens: int | None, utilization: float, max_num_seqs: int, max_tokens: int) -> int:
    """The number of blocks (our error if none fit); `forward` runs the largest step once on CUDA."""
    per_block = block_bytes(config, block_size, dtype) // (tensor_parallel or 1)  # a rank's
    if kv_cache_tokens is not None:
        if kv_cache_tokens < 1:
            raise Qwen3AotError(f"kv_cache_tokens must be >= 1, got {kv_cache_tokens}.")
        return -(-kv_cache_tokens // block_size) + 1
    if device.type == "cuda":
        if not 0 < utilization <= 1:
            raise Qwen3AotError(f"gpu_memory_utilization must be in (0, 1], got {utilization}.")
        rows = min(max_num_seqs, max_tokens)
        if tensor_parallel is None:
            # the step's logits sampled with top-p, the costliest sampling
            budget = cuda_cache_bytes(forward, config, block_size, dtype, device, utilization, max_tokens, rows,
                                      lambda logits: sampler(logits, [SamplingParams(top_p=0.9)] * rows, [None] * rows))
        else:
            budget = forward.cuda_cache_bytes(utilization, max_tokens, rows)
        if budget < 2 * per_block:
            raise Qwen3AotError(f"no GPU memory left for the KV cache at gpu_memory_utilization={utilization} "
                                "(weights, activations and other processes take it); raise it, lower "
                                "max_num_batched_tokens, or free the GPU.")
        return budget // per_block
    wanted = max_num_seqs * -(-max_model_len // block_size) + 1
    return max(2, min(wanted, CPU_CACHE_BYTES // per_block))


def within(name: str, value: int | None, default: int, limit: int, build_option: str) -> int:
    """An option, by default min(default, limit); refused outside 1..limit (the artifact's compiled limit)."""
    if value is None:
        return min(default, limit)
    if not 1 <= value <= limit:
        raise Qwen3AotError(f"{name}={value} is outside 1..{limit}, the range this artifact was compiled for; "
                            f"choose one inside it, or rebuild with a larger {build_option}.")
    return value
