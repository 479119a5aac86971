"""The systems the engine benchmarks compare, and how one is measured: a System takes token-id
prompts and decodes greedily; Ours is the engine core on an artifact; `measure` gives a
system's decode tok/s per batch, prefill ms per prompt length and peak GPU memory;
`small_batch_comparison` sets the decode graphs the engine chose against the alternatives."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_support import best_of, peak_memory, sync  # noqa: E402
from workloads import Plan, random_prompts  # noqa: E402

from qwen3_aot import runtime  # noqa: E402
from qwen3_aot.runtime import SamplingParams  # noqa: E402


class System:
    """Something that generates from token-id prompts: decode(prompts, n) makes n greedy tokens
    per prompt, eos ignored; prefill(prompt) makes the first token of one prompt."""

    name = ""

    def decode(self, prompts: list[list[int]], n: int) -> object:
        raise NotImplementedError

    def prefill(self, prompt: list[int]) -> object:
        return self.decode([prompt], 1)

    def decode_step_seconds(self, prompts: list[list[int]], n: int, repeats: int) -> float:
        """Seconds per decode step of the whole batch: generate(n + 1) - generate(1), over n;
        a difference that noise swamps (seen on a busy CPU) is taken again over twice the steps."""
        self.decode(prompts, 2)  # warm-up: allocations, kernel loading
        for _ in range(4):
            t1 = best_of(repeats, lambda: self.decode(prompts, 1))
            tn = best_of(repeats, lambda: self.decode(prompts, n + 1))
            if tn > t1:
                return (tn - t1) / n
            n *= 2
        raise RuntimeError(f"{self.name}: generating {n // 2 + 1} tokens took no longer than 1; the machine is too busy")


class Ours(System):
    def __init__(self, engine: runtime.EngineCore, name: str) -> None:
        self.engine, self.name = engine, name

    def decode(self, prompts: list[list[int]], n: int) -> object:
        return self.engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))

    def decode_step_seconds(self, prompts: list[list[int]], n: int, repeats: int) -> float:
        """n engine steps timed once every prompt is prefilled, all of them decoding: chunked
        prefill admits a large batch over several steps, decoding the first sequences in
        steps that prefill the rest, which generate(n + 1) - generate(1) would count."""
        def timed_steps() -> float:
            sp = SamplingParams(max_tokens=2 * n + 1, temperature=0, ignore_eos=True)  # none ends while timed
            reqs = [self.engine.add_request(p, sp) for p in prompts]
            try:
                prefill_requests(self.engine, reqs)
                assert len(self.engine.scheduler.running) == len(reqs), "the whole batch decodes together"
                preemptions = self.engine.scheduler.num_preemptions
                sync()
                t = time.perf_counter()
                for _ in range(n):
                    self.engine.step()
                sync()
                t = (time.perf_counter() - t) / n
                assert self.engine.scheduler.num_preemptions == preemptions, "the KV cache is too small"
                return t
            finally:
                for r in reqs:
                    self.engine.abort(r)

        timed_steps()  # warm-up
        return min(timed_steps() for _ in range(repeats))


def prefill_requests(engine: runtime.EngineCore, requests: list[runtime.Request]) -> None:
    """Step until every request has its prompt in the cache (chunked: the first ones are then
    already decoding)."""
    while any(r.seq.num_computed < len(r.seq.token_ids) - 1 for r in requests):
        engine.step()


def load_ours(artifact: Path, plan: Plan, **options) -> runtime.EngineCore:
    """The engine core on `artifact`, its batch and KV cache sized for the plan's largest batch and prompt.
    Without prefix caching: each timing repeats its prompts, which the cache would serve."""
    return runtime.load_core(artifact, verify_files=False, max_num_seqs=max(plan.batches),
                             kv_cache_tokens=max(plan.batches) * (plan.prompt_len + plan.new_tokens + 16)
                             + max(plan.prefill), prefix_caching=False, **options)


def measure(make: Callable[[], System], plan: Plan, vocab: int) -> tuple[System, dict]:
    """Load a system, then its decode tok/s and ms/step per batch size, prefill ms per prompt
    length, and the peak GPU memory of loading it and decoding (weights, cache, activations)."""
    out: dict = {"decode": {}, "prefill_ms": {}}

    def load_and_decode() -> System:
        system = make()
        for b in plan.batches:
            step = system.decode_step_seconds(random_prompts(b, plan.prompt_len, vocab, seed=b), plan.new_tokens,
                                              plan.repeats)
            out["decode"][b] = {"tok_s": b / step, "step_ms": step * 1e3}
            print(f"  {system.name}, decode batch {b}: {b / step:.0f} tok/s, {step * 1e3:.2f} ms/step", flush=True)
        return system

    system, out["peak_memory_GB"] = peak_memory(load_and_decode)
    for n in plan.prefill:
        prompt = random_prompts(1, n, vocab, seed=n)[0]
        system.prefill(prompt)
        out["prefill_ms"][n] = best_of(plan.repeats + 1, lambda: system.prefill(prompt)) * 1e3
        print(f"  {system.name}, prefill {n}: {out['prefill_ms'][n]:.2f} ms", flush=True)
    return system, out


def same_logits(a, b) -> dict[int, bool]:
    """Whether two sets of decode graphs give bitwise the same logits at each batch both replay
    the small-batch graph for (token ids 1..n at position 0, row r in block r + 1, free while
    nothing runs: rows sharing a cache slot would race)."""
    import numpy as np

    out = {}
    for n in sorted(set(a.small_batch_sizes) & set(b.small_batch_sizes)):
        tables = np.zeros((n, a.tables.shape[1]), dtype=np.int32)
        tables[:, 0] = np.arange(1, n + 1)
        logits = [g(list(range(1, n + 1)), [0] * n, tables).clone() for g in (a, b)]
        out[n] = bool(torch.equal(*logits))
    return out


def small_batch_comparison(ours: Ours, plan: Plan, vocab: int) -> dict:
    """Decode tok/s at small batches with the CUDA graphs the engine chose (the small-batch
    graph where it replayed faster) and with the main graph's alone, and without dependent
    launch (runtime/forward/dependent_launch.py), in the same run."""
    from qwen3_aot.runtime.forward.decode_graphs import DecodeGraphs

    engine = ours.engine
    chosen = engine.graphs
    out = {"replayed_for": list(chosen.small_batch_sizes), "dependent_edges": chosen.dependent_edges, "tok_s": {}}
    main_only = DecodeGraphs(engine.forward, engine.cache, chosen.max_batch, chosen.tables.shape[1], engine.device,
                             small_batch_graph=False, dependent_launch=False)
    no_dependent = DecodeGraphs(engine.forward, engine.cache, chosen.max_batch, chosen.tables.shape[1], engine.device,
                                dependent_launch=False)
    out["same_logits_without_dependent_launch"] = same_logits(chosen, no_dependent)
    for b in (1, 2, 4, 8, 16):
        if b > chosen.max_batch:
            break
        prompts = random_prompts(b, plan.prompt_len, vocab, seed=b)
        row = {}
        for label, graphs in (("chosen", chosen), ("main graph only", main_only),
                              ("no dependent launch", no_dependent)):
            engine.graphs = graphs
            row[label] = b / ours.decode_step_seconds(prompts, plan.new_tokens, plan.repeats)
        out["tok_s"][b] = row
        print(f"  decode batch {b}: {row['chosen']:.0f} tok/s with the graphs chosen, {row['main graph only']:.0f} "
              f"with the main graph alone, {row['no dependent launch']:.0f} without dependent launch", flush=True)
    engine.graphs = chosen
    return out
