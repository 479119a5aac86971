"""CUDA graphs of the decode step, replayed by the engine core for steps of one token per
sequence (its newest)."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from qwen3_aot.runtime.forward.compiled import CompiledForward, PackageGraph
from qwen3_aot.runtime.forward.dependent_launch import link_dependents
from qwen3_aot.runtime.forward.flat_batch import FlatBatch
from qwen3_aot.runtime.forward.kv_cache import RESERVED_BLOCK, KVCache


log = logging.getLogger("qwen3_aot")


class DecodeGraphs:
    """CUDA graphs of the decode step (one token per sequence) for batch sizes 1, 2, 4, ...
    up to max_batch: a replay launches the whole forward at once, where the eager call pays a
    launch per kernel, which dominates small-batch decode. Inputs are copied into static
    buffers (the ids from the host, or on the device from the samples of the step before);
    a batch is padded to the next captured size, its padding rows decoding token 0 at
    position 0 into the reserved block. The AOTI package must be loaded with
    run_single_threaded=True to be capturable.

    An artifact built on CUDA also holds the forward's small-batch graph (fewer kernels,
    projections that stream the weights once per row), which wins at a few rows and loses
    as they grow, by an amount that depends on the model's shape and the GPU. So once the
    main graph is captured for every batch, the small-batch graph (the forward's
    `small_batch_graph`, for batches up to its `small_batch_max`) is captured and timed against
    it from batch 1 up, kept where it replays faster, and tried no further once it loses
    (`small_batch_sizes`: the batches that replay it).
    Each graph's edges into `dependent_kernels` (kernels that wait for their inputs, as the
    manifest names them) start those kernels early (runtime/forward/dependent_launch.py;
    `self.dependent_edges` counts them).

    The buffer rule: at most one step may be in flight (queued, its tokens not yet taken)
    when the next is queued. A step's inputs go over from pinned host buffers asynchronously,
    so the host must not rewrite a set of them before the device has read it: two sets,
    taken in turn, suffice for one step in flight and no more. The engine core keeps to it
    (`EngineCore.step` takes the tokens of the step before before queueing a third)."""

    def __init__(self, forward: CompiledForward, cache: KVCache, max_batch: int, max_blocks_per_seq: int,
                 device: torch.device, *, small_batch_graph: bool = True, dependent_launch: bool = True) -> None:
        """small_batch_graph / dependent_launch False: capture without them (benchmarks, tests)."""
        self.sizes = sorted({min(1 << i, max_batch) for i in range(max_batch.bit_length() + 1)})
        self.max_batch = n = self.sizes[-1]
        # two sets of pinned host buffers, taken in turn (the buffer rule above)
        self.ids_pos = torch.zeros(2, n, dtype=torch.int64, device=device)
        self.ids, self.pos = self.ids_pos[0], self.ids_pos[1]
        self.tables = torch.full((n, max_blocks_per_seq), RESERVED_BLOCK, dtype=torch.int32, device=device)
        pinned = device.type == "cuda"
        self._host = [(torch.zeros(2, n, dtype=torch.int64, pin_memory=pinned),
                       torch.zeros(n * max_blocks_per_seq, dtype=torch.int32, pin_memory=pinned),
                       torch.zeros(n, dtype=torch.int64, pin_memory=pinned)) for _ in range(2)]
        self._turn = 0
        self._rows = torch.zeros(n, dtype=torch.int64, device=device)
        # every captured input must outlive the graphs, which replay on their addresses: a
        # freed one is reused by the next allocation (seen: an illegal memory access)
        self.seq_ids = torch.arange(n, dtype=torch.int32, device=device)
        self.rows = torch.arange(n, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.small_batch_sizes: list[int] = []
        self.dependent_kernels = forward.dependent_kernels if dependent_launch else ()
        self.dependent_edges = 0
        small = forward.small_batch_graph if small_batch_graph else None
        self._pool, started = None, time.perf_counter()
        with torch.cuda.device(device), torch.inference_mode():
            for b in reversed(self.sizes):  # largest first: the smaller ones reuse its memory pool
                self.graphs[b], self.logits[b] = self._capture(forward, self._batch(b), cache)
            for b in self.sizes if small is not None else ():
                if b > forward.small_batch_max:
                    break
                # a graph that loses is dropped, its outputs with it; replays never overlap, so
                # the graphs sharing the pool only ever reuse each other's dead intermediates
                other = self._capture(small, self._batch(b), cache)
                if min(replay_times(other[0])) >= min(replay_times(self.graphs[b])):
                    break  # it loses more as the batch grows
                self.graphs[b], self.logits[b] = other
                self.small_batch_sizes.append(b)
        self.capture_seconds = time.perf_counter() - started
        log.info("CUDA graphs of decode batches %s captured in %.2f s (the small-batch graph for %s; %d edges "
                 "of dependent launch)", self.sizes, self.capture_seconds, self.small_batch_sizes or "none",
                 self.dependent_edges)

    def _batch(self, b: int) -> FlatBatch:
        """The static input buffers of batch size b (one token per sequence, its own row)."""
        return FlatBatch(self.ids[:b], self.pos[:b], self.seq_ids[:b], self.tables[:b], self.rows[:b])

    def _capture(self, graph_of: CompiledForward | PackageGraph, batch: FlatBatch,
                 cache: KVCache) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        graph_of.run(batch, cache.k, cache.v)  # warm up outside the graph (first-call allocations, kernel loading)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph(keep_graph=True)  # kept to have its edges set before instantiating
        with torch.cuda.graph(graph, pool=self._pool):
            logits = graph_of.run(batch, cache.k, cache.v)
        self.dependent_edges += link_dependents(graph, self.dependent_kernels)
        graph.instantiate()
        self._pool = graph.pool()
        return graph, logits

    def __call__(self, ids: list[int], pos: list[int], tables: np.ndarray) -> torch.Tensor:
        """One decode step: ids and positions of n sequences, their block tables [n, width]."""
        host_ids_pos = self._host[self._turn][0].numpy()
        host_ids_pos[0, :len(ids)] = ids
        return self._replay(pos, tables, with_ids=True)

    def decode_from_device(self, ids: torch.Tensor, rows: list[int] | None, pos: list[int],
                           tables: np.ndarray) -> torch.Tensor:
        """As __call__, the input ids taken on the device from `ids` (the rows `rows` of it, or all)."""
        n = len(pos)
        if rows is None:
            self.ids[:n].copy_(ids)
        else:
            host_rows = self._host[self._turn][2][:n]
            host_rows.numpy()[:] = rows
            self._rows[:n].copy_(host_rows, non_blocking=True)
            torch.index_select(ids, 0, self._rows[:n], out=self.ids[:n])
        return self._replay(pos, tables, with_ids=False)

    def _replay(self, pos: list[int], tables: np.ndarray, with_ids: bool) -> torch.Tensor:
        n, width = len(pos), tables.shape[1]
        b = next(s for s in self.sizes if s >= n)
        host_ids_pos, host_tables, _ = self._host[self._turn]
        self._turn ^= 1
        host = host_ids_pos.numpy()
        host[1, :n] = pos
        host[:, n:b] = 0  # padding rows decode token 0 at position 0 ...
        host_tables = host_tables[:b * width].view(b, width)
        host_tables.numpy()[:n] = tables
        host_tables.numpy()[n:] = RESERVED_BLOCK  # ... reading and writing only the reserved block
        # contiguous host sources only: copy_ makes a non-contiguous one contiguous in pageable
        # memory, and a copy from there waits for the device
        if with_ids:
            self.ids[:b].copy_(host_ids_pos[0, :b], non_blocking=True)
        elif n < b:
            self.ids[n:b].zero_()
        self.pos[:b].copy_(host_ids_pos[1, :b], non_blocking=True)
        self.tables[:b, :width].copy_(host_tables, non_blocking=True)
        self.graphs[b].replay()
        return self.logits[b][:n]


def replay_times(graph: torch.cuda.CUDAGraph, replays: int = 10) -> list[float]:
    """GPU seconds of each of `replays` replays, each alone on the GPU, after one to warm up
    (a decode graph's padding inputs read and write only the reserved block)."""
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return times
