"""The engine core: prompts in, tokens out, continuously batched over one compiled forward.

tokenizer -> scheduler -> paged KV cache -> compiled forward (or a CUDA graph of it) ->
sampler -> incremental detokeniser. Single-threaded: whoever holds an EngineCore calls
`step`; in a service that is the loop thread of `qwen3_aot.runtime.Engine`, which alone
touches the core, so that callers in any thread or event loop never do. Benchmarks and
tests drive a core directly (`qwen3_aot.runtime.load_core`) to time or inspect its steps.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path
from typing import Callable

import torch

from qwen3_aot.runtime.forward.compiled import CompiledForward
from qwen3_aot.runtime.forward.decode_graphs import DecodeGraphs
from qwen3_aot.runtime.forward.flat_batch import FlatBatch, Forward
from qwen3_aot.runtime.forward.kv_cache import KVCache
from qwen3_aot.runtime.core.block_pool import BlockPool
from qwen3_aot.runtime.core.cache_sizing import plan_num_blocks, within
from qwen3_aot.runtime.core.device_lists import on_device
from qwen3_aot.runtime.core.grammar import GrammarMask, Grammars
from qwen3_aot.runtime.core.request import Prompt, Request, make_request, pair_up, request_limits
from qwen3_aot.runtime.core.penalties import TokenHistory
from qwen3_aot.runtime.core.sampler import Sampled, Sampler
from qwen3_aot.runtime.core.sampling_params import Completion, SamplingParams
from qwen3_aot.runtime.core.scheduler import Batch, Scheduler
from qwen3_aot.runtime.forward.tensor_parallel import META, TensorParallelForward, tensor_parallel_size
from qwen3_aot.runtime.text.tokenizer import Tokenizer
from qwen3_aot.weights import DTYPES

@dataclasses.dataclass(frozen=True)
class StepRecord:
    """What one queued forward held, handed to `EngineCore.observers` (benchmarks, tests)."""
    decodes: int     # sequences fed their newest token
    prefills: int    # sequences fed part or all of their prompt (or what a preemption dropped)
    chunked: int     # of those, the ones whose rest goes to a later step
    tokens: int
    replayed: bool   # a CUDA-graph replay
    ahead: bool      # queued before the step before it gave its tokens (overlap)

    @property
    def kind(self) -> str:
        return "mixed" if self.decodes and self.prefills else "decode" if self.decodes else "prefill"


class EngineCore:
    """Built by `qwen3_aot.runtime.load_core` (or `load`, which wraps it in an Engine), which
    checks the artifact first. Options:

    num_blocks / kv_cache_tokens: the KV cache size, in blocks or tokens. Default: on CUDA,
        what fits in `gpu_memory_utilization` of the GPU after the weights and the peak of
        the largest step; on CPU, enough for max_num_seqs full-length sequences, at most 1 GiB.
    max_num_seqs: sequences in flight (default 256); max_num_batched_tokens: tokens in one
        step (default 8192). Both at most the artifact's compiled limits.
    cuda_graphs: on CUDA, replay decode steps from CUDA graphs (batch 1, 2, 4, ... max_num_seqs).
    overlap: queue each step on the device before reading the tokens of the one before, so
        that the host's bookkeeping (tokens taken, stop checks, the next inputs) runs while the
        device computes instead of between its steps (see `step`).
    prefix_caching: keep the KV of full blocks findable by their content, so that a later
        request sharing a prefix computes only what follows it (runtime/core/block_pool.py).
    """

    def __init__(self, artifact: Path, manifest: dict, device: torch.device, *, num_blocks: int | None = None,
                 kv_cache_tokens: int | None = None, gpu_memory_utilization: float = 0.9,
                 max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None,
                 cuda_graphs: bool = True, overlap: bool = True, prefix_caching: bool = True) -> None:
        limits, self.config = manifest["limits"], manifest["model_config"]
        self.artifact, self.device, self.max_model_len = artifact, device, limits["max_model_len"]
        self.dtype, self.block_size = DTYPES[manifest["dtype"]], manifest["kv_cache"]["block_size"]
        clock = _StartClock(device)  # where start-up goes: `load_seconds`, which benchmarks report
        self.tokenizer = Tokenizer.from_dir(artifact)
        clock.lap("tokenizer")
        # -- tensor-parallel hook: a TP artifact's forward is its worker processes, which hold the
        # weights and each rank's share of the KV cache; here the cache is block bookkeeping on
        # the meta device (runtime/forward/tensor_parallel.py). Its ranks run without CUDA graphs.
        self.tensor_parallel = tensor_parallel_size(manifest)
        use_graphs = cuda_graphs and device.type == "cuda" and self.tensor_parallel is None
        self.forward: Forward = CompiledForward(artifact, manifest, device, run_single_threaded=use_graphs) \
            if self.tensor_parallel is None else TensorParallelForward(artifact, manifest, device)
        cache_device = device if self.tensor_parallel is None else META
        # -- end of the tensor-parallel hook
        clock.lap("forward")
        # the penalties' token counts, on the device that samples (the logits' device)
        self.sampler = Sampler(TokenHistory(self.config["vocab_size"], device))
        self.grammars = Grammars(self.tokenizer, self.config["vocab_size"])  # built on first use
        self.masked_steps = 0  # steps whose sampling applied a grammar mask (structured outputs)
        max_num_seqs = within("max_num_seqs", max_num_seqs, 256, limits["max_num_seqs"], "--max-num-seqs")
        max_tokens = within("max_num_batched_tokens", max_num_batched_tokens, 8192, limits["max_num_tokens"],
                             "--max-num-tokens")
        if num_blocks is None:
            planned = plan_num_blocks(self.forward, self.sampler, self.config, self.block_size, self.dtype, device,
                                      self.max_model_len, self.tensor_parallel, kv_cache_tokens,
                                      gpu_memory_utilization, max_num_seqs, max_tokens)
            num_blocks = min(planned, limits["max_num_blocks"])
        num_blocks = within("num_blocks", num_blocks, num_blocks, limits["max_num_blocks"], "max_num_blocks")
        self.cache = KVCache(self.config, num_blocks, self.block_size, self.dtype, cache_device)
        clock.lap("kv_cache")  # on CUDA: sized by running the largest step, the graph's first call
        max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.blocks = BlockPool(num_blocks, self.block_size, caching=prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_tokens, max_blocks_per_seq)
        self.graphs = DecodeGraphs(self.forward, self.cache, max_num_seqs, max_blocks_per_seq, device) \
            if use_graphs else None
        clock.lap("graphs")
        self.load_seconds = {"tokenizer": clock.laps["tokenizer"], "forward": clock.laps["forward"],
                             **self.forward.load_seconds,  # the forward's parts, within it
                             "kv_cache": clock.laps["kv_cache"], "graphs": clock.laps["graphs"]}
        self.overlap = overlap
        self.observers: list[Callable[[StepRecord], None]] = []
        self.prompt_tokens = self.generation_tokens = 0  # since load, for metrics
        self._requests: dict[int, Request] = {}  # in flight, by sequence id
        self._ids = itertools.count()
        self._in_flight: StepInFlight | None = None  # a step queued on the device, its tokens not yet taken

    # ---- requests ----

    def make_request(self, prompt: Prompt, params: SamplingParams | None) -> Request:
        """Check a prompt and its parameters (our error, nothing changed if bad) and make its
        request. Touches no state but an id counter: any thread may call it."""
        request = make_request(next(self._ids), prompt, params, self.tokenizer, self.config["vocab_size"],
                               request_limits(self.max_model_len, self.cache.capacity), self.device, self.grammars)
        self.scheduler.hash_prompt(request.seq)
        return request

    def add(self, request: Request) -> None:
        """Queue a request made by `make_request`; `step` advances it."""
        self._requests[request.seq.seq_id] = request
        self.prompt_tokens += request.seq.num_prompt_tokens
        self.scheduler.add(request.seq)

    def add_request(self, prompt: Prompt, sampling: SamplingParams | None = None) -> Request:
        request = self.make_request(prompt, sampling)
        self.add(request)
        return request

    def abort(self, request: Request) -> None:
        """Cancel a request: it leaves the batch and its blocks are freed (no-op once finished)."""
        if not request.finished:
            self.scheduler.remove(request.seq)
            self._requests.pop(request.seq.seq_id, None)
            request.finish_reason = "abort"
            self._release(request)

    def _release(self, request: Request) -> None:
        """Give back what an ended request held in the sampler (its token-history slot). A step
        still in flight may count one more token into that slot: `acquire` zeroes it after."""
        if request.history_slot is not None:
            self.sampler.history.release(request.history_slot)
            request.history_slot = None

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Completions of one prompt or a list of them, stepping this core until all are done
        (the caller's thread is the core's owner meanwhile)."""
        requests = [self.make_request(p, s) for p, s in pair_up(prompts, sampling)]
        for r in requests:
            self.add(r)
        try:
            while not all(r.finished for r in requests):
                self.step()
        finally:  # an exception (or Ctrl-C) leaves no request of ours behind
            for r in requests:
                self.abort(r)
        return [r.completion() for r in requests]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()  # an in-flight step's live requests are running there too

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free

    # ---- a step ----

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Queue one forward on the device and take the tokens of the step before it; returns
        the requests that took a token (or ended) in this call.

        The forward is over the tokens the scheduler picks, or, when the step in flight was a
        decode of every running sequence and nothing waits to join, the next such decode, its
        input ids the in-flight step's samples, still on the device (`_decode_ahead`). The
        in-flight step's tokens are then read and taken while the device computes the next
        one; a request that ends on one of them had a row of that next step computed in vain.
        A decode queued ahead with a constrained row (structured outputs) is sampled only once
        those tokens are taken, since its grammar masks need them (vLLM's order): the device
        computes its forward while the host takes the tokens and fills the masks.
        With overlap=False each step's tokens are taken before `step` returns.

        `step` is `take` then `launch`; the engine's loop calls them apart, to hand out the
        tokens taken and let newcomers join before the next forward is scheduled."""
        return self.take() + self.launch()

    @torch.inference_mode()
    def take(self) -> list[Request]:
        """The first half of `step`: queue the decode ahead when it may be, then wait for the
        step in flight and take its tokens; returns the requests that took one."""
        previous, self._in_flight = self._in_flight, None
        took: list[Request] = []
        if previous is not None:
            ahead = self._decode_ahead(previous)
            took += self._receive(previous)
            # sampled here, before anything else is queued: its logits may be a CUDA graph's
            # output buffer, which the next replay overwrites
            self._in_flight = self._sample_held_back(ahead) if isinstance(ahead, HeldBack) else ahead
        return took

    @torch.inference_mode()
    def launch(self) -> list[Request]:
        """The second half of `step`: unless a decode was queued ahead, the forward of what the
        scheduler picks now (requests added since `take` included); with overlap=False, its
        tokens taken (the requests that took one)."""
        took: list[Request] = []
        if self._in_flight is None:
            batch = self.scheduler.schedule()
            if batch:
                self._in_flight = self._launch(batch)
        if not self.overlap and self._in_flight is not None:
            took += self._receive(self._in_flight)
            self._in_flight = None
        return took

    def _launch(self, batch: Batch) -> StepInFlight | None:
        """The scheduled batch's forward, and a sample for each sequence whose tokens are now
        all in the cache (the others are mid-prompt; None if every one is)."""
        logits, replayed, prompt_rows = self._forward(batch)
        if prompt_rows is not None:
            logits = self._take_prompt_logprobs(logits, prompt_rows)
        self._observe(batch, replayed, ahead=False)
        self.scheduler.computed(batch)
        done = [self._requests[seq.seq_id] for seq, _ in batch if seq.num_computed == len(seq.token_ids)]
        return self._sample(logits, done) if done else None

    def _take_prompt_logprobs(self, logits: torch.Tensor, rows: "PromptRows") -> torch.Tensor:
        """Record the prompt logprobs these logits hold (waits for the device: only steps with
        such requests do) and return the rows to sample from."""
        for seq, first, offset, count in rows.wanted:
            r = self._requests[seq.seq_id]
            lps = torch.log_softmax(logits[offset:offset + count].float(), -1)
            targets = torch.tensor(seq.token_ids[first:first + count], device=lps.device)
            chosen = lps.gather(1, targets[:, None])[:, 0].tolist()
            n = r.params.prompt_logprobs
            top = [([], [])] * count
            if n:
                values, ids = lps.topk(n, -1)
                top = list(zip(ids.tolist(), values.tolist()))
            r.prompt_logprobs += chosen
            r.prompt_top_logprobs += [{**dict(zip(*t)), tok: lp}
                                      for t, tok, lp in zip(top, seq.token_ids[first:first + count], chosen)]
            seq.logits_from = first + count if first + count < seq.num_prompt_tokens else None
        return logits.index_select(0, torch.tensor(rows.sample, device=logits.device))

    def _decode_ahead(self, previous: StepInFlight) -> StepInFlight | HeldBack | None:
        """The next decode step, queued before `previous`'s tokens are known, when it is sure to
        be one (overlap on, CUDA graphs, and the scheduler's `schedule_ahead`). Its input ids
        are `previous`'s samples on the device. A request whose token in flight is its last by
        max_tokens gets no row; one that ends by eos or a stop string (not known yet) gets one
        computed in vain. Sampled at once, unless a row is constrained: its mask needs the token
        in flight, so the step comes back unsampled (`HeldBack`, sampled by `take`)."""
        if not self.overlap or self.graphs is None:
            return None
        rows = [i for i, r in enumerate(previous.requests) if not r.finished and r.tokens_left > 1]
        if not rows or len(rows) > self.graphs.max_batch:
            return None
        live = [r.seq for r in previous.requests if not r.finished]
        batch = self.scheduler.schedule_ahead(live, [previous.requests[i].seq for i in rows])
        if batch is None:
            return None  # someone waits, or the cache is full (the scheduler preempts once the tokens are in)
        seqs = [seq for seq, _ in batch]
        logits = self.graphs.decode_from_device(previous.ids, None if len(rows) == len(previous.requests) else rows,
                                                [seq.num_computed for seq in seqs], self.scheduler.block_tables(seqs))
        for fn in self.observers:
            fn(StepRecord(decodes=len(seqs), prefills=0, chunked=0, tokens=len(seqs), replayed=True, ahead=True))
        self.scheduler.computed(batch)
        requests = [previous.requests[i] for i in rows]
        if any(r.grammar is not None and r.grammar.phase != "done" for r in requests):
            return HeldBack(logits, requests)
        return self._sample(logits, requests)

    def _sample_held_back(self, held: HeldBack) -> StepInFlight | None:
        """Sample a decode queued ahead, its requests' matchers now past the tokens just taken.
        The rows of requests that ended on them are dropped: their matchers may have terminated
        (xgrammar refuses to fill a terminated matcher's mask) and their penalty slots are gone."""
        live = [i for i, r in enumerate(held.requests) if not r.finished]
        if not live:
            return None
        logits = held.logits
        if len(live) < len(held.requests):
            logits = logits.index_select(0, on_device(live, torch.int64, logits.device))
        return self._sample(logits, [held.requests[i] for i in live])

    def _observe(self, batch: Batch, replayed: bool, ahead: bool) -> None:
        if not self.observers:
            return
        decodes = sum(1 for seq, n in batch if n == 1 and seq.num_computed + 1 == len(seq.token_ids))
        chunked = sum(1 for seq, n in batch if seq.num_computed + n < len(seq.token_ids))
        record = StepRecord(decodes=decodes, prefills=len(batch) - decodes, chunked=chunked,
                            tokens=sum(n for _, n in batch), replayed=replayed, ahead=ahead)
        for fn in self.observers:
            fn(record)

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> StepInFlight:
        slots = None
        if any(r.params.uses_history for r in requests):
            for r in requests:
                if r.params.uses_history and r.history_slot is None:
                    r.history_slot = self.sampler.history.acquire(r.seq.token_ids[:r.seq.num_prompt_tokens])
            slots = [r.history_slot for r in requests]
        # structured outputs (runtime/core/grammar.py): the constrained rows' masks, the sampler's grammar stage
        mask = GrammarMask([r.grammar for r in requests]) if any(r.grammar is not None for r in requests) else None
        sampled = self.sampler.sample(logits, [r.params for r in requests], [r.generator for r in requests], slots,
                                      mask)
        if mask is not None and mask.masked:
            self.masked_steps += 1
        return StepInFlight(requests, sampled)

    def _receive(self, step: StepInFlight) -> list[Request]:
        """Wait for a step's tokens and give each to its request, unless it has ended since
        (on an earlier token, or aborted); returns the requests that took one."""
        ids, logprobs, top = step.results()
        took = []
        for i, r in enumerate(step.requests):
            if not r.finished:
                self.scheduler.append(r.seq, ids[i])
                self.generation_tokens += 1
                if r.accept_token(ids[i], logprobs[i] if logprobs else None, top[i] if top else None):
                    self.scheduler.remove(r.seq)
                    del self._requests[r.seq.seq_id]
                    self._release(r)
                took.append(r)
        return took

    def _forward(self, batch: Batch) -> tuple[torch.Tensor, bool, "PromptRows | None"]:
        """Logits of the last token of each sequence that reaches its end in this batch, whether
        a CUDA graph computed them, and, when a sequence needs the logits of prompt positions
        (prompt_logprobs), where those rows are (the scheduler keeps them few a step)."""
        seqs = [seq for seq, _ in batch]
        if (self.graphs is not None and len(batch) <= self.graphs.max_batch
                and all(n == 1 and seq.num_computed + 1 == len(seq.token_ids) for seq, n in batch)):
            # a decode step (one token per sequence, its last): lists built directly, no per-token loop
            return self.graphs([s.token_ids[-1] for s in seqs], [s.num_computed for s in seqs],
                               self.scheduler.block_tables(seqs)), True, None
        ids, pos, seq_ids, rows = [], [], [], []
        prompt = PromptRows()
        for i, (seq, n) in enumerate(batch):
            start, base = seq.num_computed, len(ids)
            ids += seq.token_ids[start:start + n]
            pos += range(start, start + n)
            seq_ids += [i] * n
            if seq.logits_from is not None:  # position p's logits give prompt token p + 1's logprob
                first, last = max(start, seq.logits_from - 1), min(start + n, seq.num_prompt_tokens - 1)
                if last > first:
                    prompt.wanted.append((seq, first + 1, len(rows), last - first))
                    rows += range(base + first - start, base + last - start)
            if start + n == len(seq.token_ids):
                prompt.sample.append(len(rows))
                rows.append(len(ids) - 1)
        tables = torch.from_numpy(self.scheduler.block_tables(seqs))
        dev = self.device
        flat = FlatBatch(torch.tensor(ids, dtype=torch.int64, device=dev), torch.tensor(pos, dtype=torch.int64, device=dev),
                         torch.tensor(seq_ids, dtype=torch.int32, device=dev), tables.to(dev),
                         torch.tensor(rows or [len(ids) - 1], dtype=torch.int64, device=dev))  # the graph wants >= 1 row
        return self.forward.run(flat, self.cache.k, self.cache.v), False, prompt if prompt.wanted else None


@dataclasses.dataclass
class HeldBack:
    """A decode queued ahead whose sampling waits for the tokens of the step before (a
    constrained row's mask needs them): its logits, one row per request."""
    logits: torch.Tensor
    requests: list[Request]


class PromptRows:
    """Which logits rows of a step are prompt positions (prompt_logprobs): (sequence, index of
    the first prompt token they score, first row, rows) each; and the rows to sample from."""

    def __init__(self) -> None:
        self.wanted: list[tuple[object, int, int, int]] = []
        self.sample: list[int] = []


class StepInFlight:
    """A step queued on the device: the request of each sampled row, the ids (and logprobs,
    top alternatives) on the device, and their copies on their way to pinned host memory."""

    def __init__(self, requests: list[Request], sampled: Sampled) -> None:
        self.requests, self.ids = requests, sampled.ids
        self._host = [None if t is None else _to_host(t)
                      for t in (sampled.ids, sampled.logprobs, sampled.top_ids, sampled.top_logprobs)]
        self._ready = None
        if sampled.ids.device.type == "cuda":
            self._ready = torch.cuda.Event()
            self._ready.record()

    def results(self) -> tuple[list[int], list[float] | None, list[tuple[list[int], list[float]]] | None]:
        """The ids, logprobs and (top ids, top logprobs) per row as lists, once the device has
        them (waits)."""
        if self._ready is not None:
            self._ready.synchronize()
        ids, logprobs, top_ids, top_lps = [None if t is None else t.tolist() for t in self._host]
        return ids, logprobs, None if top_ids is None else list(zip(top_ids, top_lps))


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


class _StartClock:
    """Seconds between laps, the device's queued work included (synchronised at each; only the
    engine's own GPU, never one this process has not touched)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda" and torch.cuda.is_initialized():
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.laps[name], self._last = now - self._last, now
