"""The generation engine: prompts in, text out, continuously batched over one compiled forward.

tokenizer -> scheduler -> paged KV cache -> compiled forward (or a CUDA graph of it) ->
sampler -> incremental detokeniser. One thread drives it: `generate`, `step`, or the
generators `stream` hands out (several streams may be consumed in turn; each step advances
every request in flight).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Generator

import numpy as np
import torch

from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime.compiled import CompiledForward
from qwen3_aot.runtime.kv_cache import RESERVED_BLOCK, KVCache, block_bytes
from qwen3_aot.runtime.requests import Prompt, Request, make_request, pair_up
from qwen3_aot.runtime.sampler import Sampler
from qwen3_aot.runtime.sampling import Completion, SamplingParams
from qwen3_aot.runtime.scheduler import Batch, Scheduler
from qwen3_aot.runtime.tokenizer import Tokenizer

CPU_CACHE_BYTES = 1 << 30  # the default KV cache on CPU: 1 GiB, or less if the sequences need less
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Engine:
    """Built by `qwen3_aot.runtime.load`, which checks the artifact first. Options:

    num_blocks / kv_cache_tokens: the KV cache size, in blocks or tokens. Default: on CUDA,
        what fits in `gpu_memory_utilization` of the GPU after the weights and the peak of
        the largest step; on CPU, enough for max_num_seqs full-length sequences, at most 1 GiB.
    max_num_seqs: sequences in flight (default 256); max_num_batched_tokens: tokens in one
        step (default 8192). Both at most the artifact's compiled limits.
    cuda_graphs: on CUDA, replay decode steps from CUDA graphs (batch 1, 2, 4, ... max_num_seqs).
    overlap: queue each step on the device before reading the tokens of the one before, so
        that the host's bookkeeping (tokens taken, stop checks, the next inputs) runs while the
        device computes instead of between its steps (see `step`).
    """

    def __init__(self, artifact: Path, manifest: dict, device: torch.device, *, num_blocks: int | None = None,
                 kv_cache_tokens: int | None = None, gpu_memory_utilization: float = 0.9,
                 max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None,
                 cuda_graphs: bool = True, overlap: bool = True) -> None:
        limits, self.config = manifest["limits"], manifest["model_config"]
        self.device, self.max_model_len = device, limits["max_model_len"]
        self.dtype, self.block_size = DTYPES[manifest["dtype"]], manifest["kv_cache"]["block_size"]
        self.tokenizer = Tokenizer.from_dir(artifact)
        use_graphs = cuda_graphs and device.type == "cuda"
        self.forward = CompiledForward(artifact, manifest, device, run_single_threaded=use_graphs)
        self.sampler = Sampler()
        max_num_seqs = _within("max_num_seqs", max_num_seqs, 256, limits["max_num_seqs"], "--max-num-seqs")
        max_tokens = _within("max_num_batched_tokens", max_num_batched_tokens, 8192, limits["max_num_tokens"],
                             "--max-num-tokens")
        if num_blocks is None:
            num_blocks = min(self._plan_blocks(kv_cache_tokens, gpu_memory_utilization, max_num_seqs, max_tokens),
                             limits["max_num_blocks"])
        num_blocks = _within("num_blocks", num_blocks, num_blocks, limits["max_num_blocks"], "max_num_blocks")
        self.cache = KVCache(self.config, num_blocks, self.block_size, self.dtype, device)
        max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.scheduler = Scheduler(self.cache, max_num_seqs, max_tokens, max_blocks_per_seq)
        self.graphs = DecodeGraphs(self.forward, self.cache, max_num_seqs, max_blocks_per_seq,
                                   device) if use_graphs else None
        self._requests: dict[int, Request] = {}  # in flight, by sequence id
        self._ids = itertools.count()
        self.overlap = overlap
        self._in_flight: Launched | None = None  # a step queued on the device, its tokens not yet taken

    # ---- the public API ----

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Completions of one prompt (text or token ids) or a list of them, in order; one
        SamplingParams for all or one per prompt. All are checked before any is run."""
        requests = [self._request(p, s) for p, s in pair_up(prompts, sampling)]
        for r in requests:
            self._add(r)
        try:
            while not all(r.finished for r in requests):
                self.step()
        finally:  # an exception (or Ctrl-C) leaves no request of ours behind
            for r in requests:
                self.abort(r)
        return [r.completion() for r in requests]

    def stream(self, prompt: Prompt, sampling: SamplingParams | None = None) -> Generator[str, None, Completion]:
        """Text pieces as they are generated (whole characters; text that could still become
        a stop string is held back); the generator's return value is the Completion. The
        prompt is checked now, the request joins at the first `next`; closing the generator
        early cancels it and frees its blocks."""
        return self._stream(self._request(prompt, sampling))

    def add_request(self, prompt: Prompt, sampling: SamplingParams | None = None) -> Request:
        """Queue a request; `step` advances it, `request.completion()` once `request.finished`."""
        request = self._request(prompt, sampling)
        self._add(request)
        return request

    def abort(self, request: Request) -> None:
        """Cancel a request: it leaves the batch and its blocks are freed (no-op once finished)."""
        if not request.finished:
            self.scheduler.remove(request.seq)
            self._requests.pop(request.seq.seq_id, None)
            request.finish_reason = "abort"

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()  # an in-flight step's live requests are running there too

    @property
    def num_free_blocks(self) -> int:
        return self.cache.num_free

    @torch.inference_mode()
    def step(self) -> None:
        """Queue one forward on the device and take the tokens of the step before it.

        The forward is over the tokens the scheduler picks, or, when the step in flight was a
        decode of every running sequence and nothing waits to join, the next such decode, its
        input ids the in-flight step's samples, still on the device (`_decode_ahead`). The
        in-flight step's tokens are then read and taken while the device computes the next
        one; a request that ends on one of them had a row of that next step computed in vain.
        With overlap=False each step's tokens are taken before `step` returns."""
        previous, self._in_flight = self._in_flight, None
        if previous is not None:
            self._in_flight = self._decode_ahead(previous)
            self._take(previous)
        if self._in_flight is None:
            batch = self.scheduler.schedule()
            if batch:
                self._in_flight = self._launch(batch)
        if not self.overlap and self._in_flight is not None:
            self._take(self._in_flight)
            self._in_flight = None

    # ---- inside a step ----

    def _launch(self, batch: Batch) -> Launched | None:
        """The scheduled batch's forward, and a sample for each sequence whose tokens are now
        all in the cache (the others are mid-prompt; None if every one is)."""
        logits = self._forward(batch)
        for seq, n in batch:
            seq.num_computed += n
        done = [self._requests[seq.seq_id] for seq, _ in batch if seq.num_computed == len(seq.token_ids)]
        return self._sample(logits, done) if done else None

    def _decode_ahead(self, previous: Launched) -> Launched | None:
        """The next decode step, queued before `previous`'s tokens are known, when it is sure to
        be one: overlap on, CUDA graphs, no sequence waiting, every running sequence sampled in
        `previous` (so decoding), and a block for each one's next position. Its input ids are
        `previous`'s samples on the device; its positions follow the ones computed. A request
        that will end on its `previous` token by max_tokens gets no row; one that ends by eos
        or a stop string (not known yet) gets one computed in vain."""
        if not self.overlap or self.graphs is None or self.scheduler.waiting:
            return None
        live = [r for r in previous.requests if not r.finished]
        running = self.scheduler.running
        if len(live) != len(running) or any(r.seq is not seq for r, seq in zip(live, running)):
            return None
        # a request whose next token is its max_tokens-th ends on it: no row for it
        rows = [i for i, r in enumerate(previous.requests)
                if not r.finished and r.seq.num_output_tokens + 1 < r.params.max_tokens]
        seqs = [previous.requests[i].seq for i in rows]
        if not seqs or len(seqs) > self.graphs.max_batch:
            return None
        if not all(self.scheduler.reserve(seq, 1) for seq in seqs):
            return None  # the cache is full: the scheduler preempts, once the tokens are in
        logits = self.graphs.decode_from_device(previous.ids, None if len(rows) == len(previous.requests) else rows,
                                                [seq.num_computed for seq in seqs], self.scheduler.block_tables(seqs))
        for seq in seqs:
            seq.num_computed += 1
        return self._sample(logits, [previous.requests[i] for i in rows])

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> Launched:
        ids, logprobs = self.sampler.sample(logits, [r.params for r in requests], [r.generator for r in requests])
        return Launched(requests, ids, logprobs)

    def _take(self, launched: Launched) -> None:
        """Wait for a step's tokens and give each to its request, unless it has ended since
        (on an earlier token, or aborted)."""
        ids, logprobs = launched.results()
        for i, r in enumerate(launched.requests):
            if not r.finished:
                self._append(r, ids[i], logprobs[i] if logprobs else None)

    def _forward(self, batch: Batch) -> torch.Tensor:
        """Logits of the last token of each sequence that reaches its end in this batch."""
        seqs = [seq for seq, _ in batch]
        if (self.graphs is not None and len(batch) <= self.graphs.max_batch
                and all(n == 1 and seq.num_computed + 1 == len(seq.token_ids) for seq, n in batch)):
            # a decode step (one token per sequence, its last): lists built directly, no per-token loop
            return self.graphs([s.token_ids[-1] for s in seqs], [s.num_computed for s in seqs],
                               self.scheduler.block_tables(seqs))
        ids, pos, seq_ids, rows = [], [], [], []
        for i, (seq, n) in enumerate(batch):
            start = seq.num_computed
            ids += seq.token_ids[start:start + n]
            pos += range(start, start + n)
            seq_ids += [i] * n
            if start + n == len(seq.token_ids):
                rows.append(len(ids) - 1)
        tables = torch.from_numpy(self.scheduler.block_tables(seqs))
        dev = self.device
        return self.forward(
            torch.tensor(ids, dtype=torch.int64, device=dev), torch.tensor(pos, dtype=torch.int64, device=dev),
            torch.tensor(seq_ids, dtype=torch.int32, device=dev), tables.to(dev),
            torch.tensor(rows or [len(ids) - 1], dtype=torch.int64, device=dev),  # the graph wants >= 1 row
            self.cache.k, self.cache.v)

    def _append(self, r: Request, token: int, logprob: float | None) -> None:
        if r.accept(token, logprob):
            self.scheduler.remove(r.seq)
            del self._requests[r.seq.seq_id]

    # ---- requests ----

    def _request(self, prompt: Prompt, params: SamplingParams | None) -> Request:
        """Check a prompt and its parameters (our error, nothing changed if bad) and make its request."""
        limits = [(self.max_model_len, f"the artifact's max_model_len ({self.max_model_len}); shorten one of them"),
                  (self.cache.capacity, f"the KV cache ({self.cache.capacity} tokens); shorten them or load with a "
                                        "larger cache (num_blocks, kv_cache_tokens or gpu_memory_utilization)")]
        return make_request(next(self._ids), prompt, params, self.tokenizer, self.config["vocab_size"], limits,
                            self.device)

    def _add(self, request: Request) -> None:
        self._requests[request.seq.seq_id] = request
        self.scheduler.add(request.seq)

    def _stream(self, r: Request) -> Generator[str, None, Completion]:
        self._add(r)
        try:
            while True:
                if not r.finished:
                    self.step()
                piece = r.text.take(final=r.finished)
                if piece:
                    yield piece
                if r.finished:
                    return r.completion()
        finally:  # closed early (GeneratorExit) or an error: cancel, free the blocks
            self.abort(r)

    # ---- sizing the cache ----

    def _plan_blocks(self, kv_cache_tokens: int | None, utilization: float, max_num_seqs: int,
                     max_tokens: int) -> int:
        per_block = block_bytes(self.config, self.block_size, self.dtype)
        if kv_cache_tokens is not None:
            if kv_cache_tokens < 1:
                raise Qwen3AotError(f"kv_cache_tokens must be >= 1, got {kv_cache_tokens}.")
            return -(-kv_cache_tokens // self.block_size) + 1
        if self.device.type == "cuda":
            if not 0 < utilization <= 1:
                raise Qwen3AotError(f"gpu_memory_utilization must be in (0, 1], got {utilization}.")
            budget = self._cuda_cache_bytes(utilization, max_num_seqs, max_tokens)
            if budget < 2 * per_block:
                raise Qwen3AotError(f"no GPU memory left for the KV cache at gpu_memory_utilization={utilization} "
                                    "(weights, activations and other processes take it); raise it, lower "
                                    "max_num_batched_tokens, or free the GPU.")
            return budget // per_block
        wanted = max_num_seqs * -(-self.max_model_len // self.block_size) + 1
        return max(2, min(wanted, CPU_CACHE_BYTES // per_block))

    def _cuda_cache_bytes(self, utilization: float, max_num_seqs: int, max_tokens: int) -> int:
        """`utilization` of the GPU, less what is in use (weights, CUDA context, other
        processes) and the peak of the largest step, measured by running one: max_tokens
        tokens (all at position 0 of a scratch cache: activations, not context length, set
        the peak) with max_num_seqs logit rows, sampled with top-p (the sort is the costliest)."""
        dev, rows = self.device, min(max_num_seqs, max_tokens)
        scratch = KVCache(self.config, 2, self.block_size, self.dtype, dev)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        zeros = torch.zeros(max_tokens, dtype=torch.int64, device=dev)
        with torch.inference_mode():
            logits = self.forward(zeros, zeros, zeros.int(), torch.ones(1, 1, dtype=torch.int32, device=dev),
                                  torch.arange(rows, device=dev), scratch.k, scratch.v)
            self.sampler(logits, [SamplingParams(top_p=0.9)] * rows, [None] * rows)
        peak = torch.cuda.max_memory_allocated(dev) - base
        del logits, scratch, zeros
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        return int(total * utilization - (total - free) - peak)


class Launched:
    """A step queued on the device: the request of each sampled row, the ids (and logprobs)
    on the device, and their copies on their way to pinned host memory."""

    def __init__(self, requests: list[Request], ids: torch.Tensor, logprobs: torch.Tensor | None) -> None:
        self.requests, self.ids = requests, ids
        self._host = [_to_host(t) for t in (ids, logprobs) if t is not None]
        self._ready = None
        if ids.device.type == "cuda":
            self._ready = torch.cuda.Event()
            self._ready.record()

    def results(self) -> tuple[list[int], list[float] | None]:
        """The ids and logprobs as lists, once the device has them (waits)."""
        if self._ready is not None:
            self._ready.synchronize()
        ids = self._host[0].tolist()
        return ids, self._host[1].tolist() if len(self._host) > 1 else None


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


class DecodeGraphs:
    """CUDA graphs of the decode step (one token per sequence) for batch sizes 1, 2, 4, ...
    up to max_batch: a replay launches the whole forward at once, where the eager call pays a
    launch per kernel, which dominates small-batch decode. Inputs are copied into static
    buffers (the ids from the host, or on the device from the samples of the step before);
    a batch is padded to the next captured size, its padding rows decoding token 0 at
    position 0 into the reserved block. The AOTI package must be loaded with
    run_single_threaded=True to be capturable."""

    def __init__(self, forward: CompiledForward, cache: KVCache, max_batch: int, max_blocks_per_seq: int,
                 device: torch.device) -> None:
        self.sizes = sorted({min(1 << i, max_batch) for i in range(max_batch.bit_length() + 1)})
        self.max_batch = n = self.sizes[-1]
        # Inputs are copied from pinned host memory, asynchronously; with overlap a step's
        # inputs are written while the step before may not have read its own yet: two sets of
        # host buffers, taken in turn (a set is rewritten two steps on, once the step that
        # used it has given its tokens)
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
        pool = None
        with torch.cuda.device(device), torch.inference_mode():
            for b in reversed(self.sizes):  # largest first: the smaller ones reuse its memory pool
                args = (self.ids[:b], self.pos[:b], self.seq_ids[:b], self.tables[:b], self.rows[:b], cache.k, cache.v)
                forward(*args)  # warm up outside the graph (first-call allocations, kernel loading)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[b] = forward(*args)
                pool = graph.pool()
                self.graphs[b] = graph

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


def _within(name: str, value: int | None, default: int, limit: int, build_option: str) -> int:
    """An option, by default min(default, limit); refused outside 1..limit (the artifact's compiled limit)."""
    if value is None:
        return min(default, limit)
    if not 1 <= value <= limit:
        raise Qwen3AotError(f"{name}={value} is outside 1..{limit}, the range this artifact was compiled for; "
                            f"choose one inside it, or rebuild with a larger {build_option}.")
    return value
