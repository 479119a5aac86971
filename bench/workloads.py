"""What the engine benchmarks run: the plan (batch sizes, prompt and output lengths), the seeded
random model exported as a user exports one, random prompts, and nano-vllm's workload with the
ways of running it (one batch on the core, arrivals in lanes on the core, callers in threads on
the Engine)."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import random_checkpoint  # noqa: E402
from bench_support import sync  # noqa: E402

from qwen3_aot import runtime  # noqa: E402
from qwen3_aot.runtime import SamplingParams  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Plan:
    """What an engine benchmark runs: decode batch sizes, each prompt's length and the tokens
    decoded after it, prefill prompt lengths, the workload's size, and repeats of each timing."""

    batches: tuple[int, ...] = (1, 8, 64, 256)
    prompt_len: int = 512
    new_tokens: int = 64
    prefill: tuple[int, ...] = (128, 2048, 8192)
    workload: tuple[int, int, int] = (256, 100, 1024)  # sequences, shortest and longest input/output
    repeats: int = 2


TINY_PLAN = Plan(batches=(1, 4), prompt_len=16, new_tokens=32, prefill=(8, 64), workload=(8, 4, 24), repeats=3)
TINY_MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)


def build(plan: Plan, work: Path, device: str, dtype: str, tiny: bool,
          tokenizer: Path | None = None, export_args: tuple[str, ...] = ()) -> tuple[Path, Path, float]:
    """The seeded random checkpoint exported (`export_args`: more of export's options); `tokenizer`:
    a tokenizer.json to give it (the artifact then streams text; without one it takes and gives
    token ids only)."""
    ckpt, art = work / "checkpoint", work / "artifact"
    random_checkpoint.write(ckpt, seed=0, **(TINY_MODEL if tiny else {}), dtype=dtype)
    if tokenizer is not None:
        shutil.copy(tokenizer, ckpt / "tokenizer.json")
    limits = ["--max-num-tokens", "256", "--max-model-len", "512"] if tiny else []
    t = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "scripts/export.py"), str(ckpt), "-o", str(art),
                    "--device", device, "--dtype", dtype, "--force", *limits, *export_args], check=True)
    return ckpt, art, time.perf_counter() - t


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed)).tolist()


def workload(plan: Plan, vocab: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """nano-vllm's bench.py: random token ids (below 10,000), lengths uniform in [lo, hi]."""
    n, lo, hi = plan.workload
    rng = random.Random(0)
    prompts = [[rng.randint(0, min(10000, vocab - 1)) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(lo, hi)) for _ in range(n)]
    return prompts, params


def run_workload(engine: runtime.EngineCore, plan: Plan, vocab: int) -> dict:
    """Output tokens/s of the workload, and where its time went: steps that only decode
    (one token per sequence: CUDA graphs) against steps that prefill, alone or mixed with
    decodes (one flat batch through the compiled graph), by count, seconds and tokens (a step
    is an EngineCore.step call, named by what it queued; with overlap it also waits for the one before)."""
    prompts, params = workload(plan, vocab)
    engine.generate([list(range(1, 17))], SamplingParams(max_tokens=4))  # nano-vllm's warm-up
    kinds = {k: {"steps": 0, "seconds": 0.0, "tokens": 0, "sequences": 0} for k in ("decode only", "with prefill")}
    queued: list[runtime.StepRecord] = []
    engine.observers.append(queued.append)
    try:
        sync()
        t = time.perf_counter()
        requests = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        while engine.has_unfinished():
            queued.clear()
            t_step = time.perf_counter()
            engine.step()
            for record in queued:
                k = kinds["decode only" if record.kind == "decode" else "with prefill"]
                k["steps"] += 1
                k["seconds"] += time.perf_counter() - t_step
                k["tokens"] += record.tokens
                k["sequences"] += record.decodes + record.prefills
        sync()
        t = time.perf_counter() - t
    finally:
        engine.observers.remove(queued.append)
    done = [r.completion() for r in requests]
    tokens = sum(c.output_tokens for c in done)
    assert tokens == sum(p.max_tokens for p in params), "ignore_eos: every request runs to max_tokens"
    return {"output_tokens": tokens, "prompt_tokens": sum(map(len, prompts)), "seconds": t, "tok_s": tokens / t,
            "preemptions": engine.scheduler.num_preemptions, "steps": kinds}


def run_workload_lanes(engine: runtime.EngineCore, plan: Plan, vocab: int, lanes: int) -> dict:
    """The 64-thread arrival pattern without threads: `lanes` lanes on the core in this thread,
    each adding its next request (request k to lane k mod lanes) between the steps after its
    previous one ended, which is what a thread's next `generate` call can do at best. The
    threads' figure over this one is the cost of the Engine's loop and queues; this one over
    one call of all the requests is the cost of the arrival pattern itself. `critical_steps`:
    the most output tokens one lane makes, a step each at least, one after another."""
    prompts, params = workload(plan, vocab)
    order = [list(range(k, len(prompts), lanes)) for k in range(lanes)]
    engine.generate([list(range(1, 17))], SamplingParams(max_tokens=4))
    active: dict[int, runtime.Request] = {}
    tokens = 0
    sync()
    t = time.perf_counter()
    while True:
        for k in range(lanes):
            if k not in active and order[k]:
                i = order[k].pop(0)
                active[k] = engine.add_request(prompts[i], params[i])
        if not active:
            break
        engine.step()
        for k, r in list(active.items()):
            if r.finished:
                tokens += r.completion().output_tokens
                del active[k]
    sync()
    t = time.perf_counter() - t
    critical = max(sum(params[i].max_tokens for i in range(k, len(prompts), lanes)) for k in range(lanes))
    return {"lanes": lanes, "tok_s": tokens / t, "seconds": t, "critical_steps": critical}


def run_workload_threads(engine: runtime.Engine, plan: Plan, vocab: int, threads: int) -> dict:
    """The workload through the thread-safe Engine, as a service meets it: one generate call
    of every request, then `threads` callers each submitting its share one request at a time
    (request k goes to caller k mod threads); output tokens/s of each, same requests."""
    prompts, params = workload(plan, vocab)
    engine.generate([list(range(1, 17))], SamplingParams(max_tokens=4))
    t = time.perf_counter()
    tokens = sum(c.output_tokens for c in engine.generate(prompts, params))
    one_call = tokens / (time.perf_counter() - t)
    counts = [0] * threads

    def caller(k: int) -> None:
        for i in range(k, len(prompts), threads):
            counts[k] += engine.generate(prompts[i], params[i])[0].output_tokens

    pool = [threading.Thread(target=caller, args=(k,)) for k in range(threads)]
    t = time.perf_counter()
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    by_threads = sum(counts) / (time.perf_counter() - t)
    assert sum(counts) == tokens, "the same requests, the same output tokens"
    return {"threads": threads, "one_call_tok_s": one_call, "threads_tok_s": by_threads,
            "ratio": by_threads / one_call}
