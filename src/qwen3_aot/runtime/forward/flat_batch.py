"""The forward's interface: the flat batch it takes (`FlatBatch`) and what every forward the
engine core can run provides (`Forward`).

The flat batch is the compiled graph's input (qwen3_aot.model.Qwen3ForCausalLM.forward): any
number of sequences' new tokens in one row, over the paged KV cache the runtime owns and
passes in whole (each layer's K and V, written in place)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import torch


@dataclasses.dataclass(frozen=True)
class FlatBatch:
    """input_ids, positions [T] int64; seq_ids [T] int32 (each token's row of block_tables);
    block_tables [S, width] int32; logit_rows [N] int64 (the tokens whose logits are wanted)."""
    input_ids: torch.Tensor
    positions: torch.Tensor
    seq_ids: torch.Tensor
    block_tables: torch.Tensor
    logit_rows: torch.Tensor

    def inputs(self) -> tuple[torch.Tensor, ...]:
        """The tensors in the graph's argument order (the KV caches follow them)."""
        return self.input_ids, self.positions, self.seq_ids, self.block_tables, self.logit_rows


class Forward(Protocol):
    """A forward of the artifact's model: fp32 logits [N, vocab] of a flat batch, its K/V
    written into the caches. CompiledForward (one process) and TensorParallelForward (one
    worker process per rank) implement it."""

    load_seconds: dict[str, float]  # where its load went, part by part

    def run(self, batch: FlatBatch, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> torch.Tensor:
        ...


class PositionalForward:
    """A Forward of a callable with the graph's positional signature (the eager model,
    `torch.compile` of it): what benchmarks put in an engine core for the uncompiled baseline."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.load_seconds: dict[str, float] = {}

    def run(self, batch: FlatBatch, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> torch.Tensor:
        return self.fn(*batch.inputs(), k_caches, v_caches)
