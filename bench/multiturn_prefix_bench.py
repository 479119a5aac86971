"""Prefix caching, on against off: multi-turn conversations through the server, and nano-vllm's
workload (no shared prefixes) in-process.

Builds the Qwen3-0.6B-shaped artifact of the engine benchmarks (workloads.build: seeded random
weights; --tiny: a tiny model on the CPU, a smoke run). Then, for each of two `qwen3-aot serve`
processes, prefix caching on and off (--no-prefix-caching), two multi-turn cases, each
CONVERSATIONS conversations of TURNS turns, one streaming HTTP client per conversation, all at
once, each sending its next turn when the last one's answer has ended:

- "shared system": every conversation starts with the same SYSTEM-token system prompt, then its
  own history: its users' messages (USER tokens each) and an answer (ANSWER tokens) per turn;
- "own history": each conversation starts with SYSTEM tokens of its own (nothing shared
  between conversations), then its history as above.

Each case runs twice through the server. "Back to back": every conversation sends its next
turn the moment the last answer ends, all starting at once. "Think time": each conversation
starts at a random moment within the first 2 x THINK seconds and waits a random think time
(exponential, mean THINK) before each later turn, as SGLang's bench_multiturn (a request rate)
and Dynamo's multiturn_bench (an exponential inter-turn delay) pace their users; the same
seeded delays for caching on and off, so both arms see the same arrivals. Back to back, the
two arms do not: with caching on every conversation of "shared system" hits the cache alike,
so all 64 stay in step and each turn arrives as one burst of 64, while with caching off the
first turn's uneven prefills spread the conversations apart and later turns arrive spread out.

Turn k's prompt is turn k-1's prompt, then turn k-1's answer, then the new user message. The
answer in the history is a fixed stretch of token ids, not the tokens the model generated:
the server's stream gives text, whose tokenisation need not give back the same ids. The cache
therefore holds the previous prompt's full blocks but never the previous answer, which is
also what Qwen3's template leaves of a thinking turn (README, "Prefix caching"); the figures
are those of that case. Time to first token (from sending the request to the first streamed
text) at p50 and p99 per turn, and output tokens/s over the whole case.

The same conversations on the core alone (no server, no HTTP): each turn's requests added at
once and stepped to their ends, caching on and off; what caching changes with no intake cost,
beside what a client of the server sees.

Then nano-vllm's workload (workloads.workload: random prompts, nothing shared) through the
core as bench/e2e_bench.py runs it, caching on and off: the cost of caching where it never
hits. Prints GPU, torch, shapes, then a table; writes JSON with --json.

    PYTHONPATH=src python bench/multiturn_prefix_bench.py --tokenizer /tmp/qwen-tokenizer.json --json prefix.json
    PYTHONPATH=src python bench/multiturn_prefix_bench.py --tiny      # CPU smoke run

A larger shape, whose prefill costs more per token (8B's is about 13x the 0.6B's FLOPs): an
artifact built elsewhere with a tokenizer (bench/fp8_bench.py's bf16 8B, say), the server part
alone, in one call of under 10 minutes:

    PYTHONPATH=src python bench/multiturn_prefix_bench.py --artifact /tmp/qwen3_aot_fp8/8B/bf16 \
        --parts server --cases "shared system" --tokenizer /tmp/qwen-tokenizer.json --json prefix-8B.json
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_support  # noqa: E402
import serve  # noqa: E402  (bench/serve.py: the server's start, the client pool, percentiles)
import workloads  # noqa: E402

from qwen3_aot import runtime  # noqa: E402

try:
    import httpx
except ImportError:  # the openai client of late 2026 brings httpx2, the same API
    import httpx2 as httpx


@dataclasses.dataclass(frozen=True)
class Shape:
    conversations: int = 64
    turns: int = 8
    system: int = 2000   # tokens of the system prompt (shared or each conversation's own)
    user: int = 64       # tokens of each user message
    answer: int = 64     # tokens each turn generates (ignore_eos), and of each answer in the history
    think: float = 1.0   # seconds: mean think time before a turn, in the paced runs


TINY_SHAPE = Shape(conversations=4, turns=3, system=64, user=8, answer=8, think=0.05)
CASES = ("shared system", "own history")
PACINGS = ("back to back", "think time")
GOAL_TTFT_RATIO = 5.0      # at the last turn, caching off over on (issue 31)
GOAL_WORKLOAD_LOSS = 0.01  # nano-vllm's workload: caching on at most 1% slower
PARTS = ("workload", "engine", "server")  # nano-vllm's workload, the core alone, through the server


def conversations(shape: Shape, case: str, vocab: int, seed: int = 0) -> list[list[list[int]]]:
    """Each conversation's prompts, turn by turn (token ids below min(vocab, 10000), as nano-vllm's);
    another seed, other tokens (a server's later run must not find an earlier run's prompts)."""
    rng = random.Random(seed)
    top = min(vocab, 10000) - 1

    def ids(n: int) -> list[int]:
        return [rng.randint(0, top) for _ in range(n)]

    shared = ids(shape.system)
    out = []
    for _ in range(shape.conversations):
        prompt = list(shared) if case == "shared system" else ids(shape.system)
        turns = []
        for _ in range(shape.turns):
            prompt = prompt + ids(shape.user)
            turns.append(prompt)
            prompt = prompt + ids(shape.answer)
        out.append(turns)
    return out


def think_times(shape: Shape, paced: bool) -> list[list[float]]:
    """Per conversation, the seconds it waits before each turn (the first: its start within
    the first 2 x think seconds); all 0 back to back. Seeded: the same for both arms."""
    if not paced:
        return [[0.0] * shape.turns for _ in range(shape.conversations)]
    rng = random.Random(1)
    return [[rng.uniform(0, 2 * shape.think)] + [rng.expovariate(1 / shape.think) for _ in range(shape.turns - 1)]
            for _ in range(shape.conversations)]


async def _converse(port: int, convs: list[list[list[int]]], waits: list[list[float]], answer: int,
                    start_at: float) -> list[list[dict]]:
    """Every conversation of `convs` at once, turn after turn, each turn after its wait; per
    conversation, per turn: the time to first text, output tokens, cached prompt tokens."""
    limits = httpx.Limits(max_connections=len(convs), max_keepalive_connections=len(convs))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600, limits=limits) as client:
        async def one(prompt: list[int]) -> dict:
            body = {"model": "bench", "prompt": prompt, "max_tokens": answer, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            first, usage = None, {}
            async for at, event in bench_support.completion_events(client, body):
                if first is None and event.get("choices") and event["choices"][0].get("text"):
                    first = at
                usage = event.get("usage") or usage
            return {"ttft": first, "tokens": usage.get("completion_tokens", 0),
                    "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)}

        async def conversation(turns: list[list[int]], wait: list[float]) -> list[dict]:
            out = []
            for prompt, seconds in zip(turns, wait):
                if seconds:
                    await asyncio.sleep(seconds)
                out.append(await one(prompt))
            return out

        await asyncio.sleep(max(0.0, start_at - time.time()))
        return list(await asyncio.gather(*(conversation(t, w) for t, w in zip(convs, waits))))


def _client_process(port: int, convs: list, waits: list, answer: int, start_at: float) -> tuple[list[list[dict]], float]:
    try:
        return asyncio.run(_converse(port, convs, waits, answer, start_at)), time.time()
    except Exception as e:  # httpx's errors do not unpickle: the pool would only say a process broke
        raise RuntimeError(f"a client failed: {type(e).__name__}: {e}") from None


def run_case(port: int, convs: list, shape: Shape, paced: bool, pool: concurrent.futures.ProcessPoolExecutor,
             processes: int) -> dict:
    """The conversations spread over the client processes; per turn TTFT p50/p99 (ms) and the
    cached share of the prompts, and output tok/s over the case (think times included)."""
    processes = max(1, min(processes, len(convs)))
    waits = think_times(shape, paced)
    shares = [convs[k::processes] for k in range(processes)]
    start_at = time.time() + 0.5
    parts = list(pool.map(_client_process, [port] * processes, shares, [waits[k::processes] for k in range(processes)],
                          [shape.answer] * processes, [start_at] * processes))
    seconds = max(end for _, end in parts) - start_at
    results = [conv for rs, _ in parts for conv in rs]
    turns = []
    for k in range(shape.turns):
        ttft = sorted(c[k]["ttft"] for c in results if c[k]["ttft"] is not None)
        prompt = sum(len(conv[k]) for conv in convs)
        turns.append({"turn": k + 1, "ttft_ms": {"p50": serve.percentile(ttft, 50) * 1e3,
                                                 "p99": serve.percentile(ttft, 99) * 1e3},
                      "cached_share": sum(c[k]["cached"] for c in results) / prompt})
    tokens = sum(t["tokens"] for c in results for t in c)
    assert tokens == shape.conversations * shape.turns * shape.answer, "ignore_eos: every turn runs to max_tokens"
    return {"turns": turns, "tok_s": tokens / seconds, "seconds": seconds}


def engine_case(core: runtime.EngineCore, convs: list, shape: Shape) -> dict:
    """The same conversations on the core alone, no server: each turn's requests all added at
    once, then stepped until every one has ended; per turn TTFT p50/p99 (ms, from adding the
    turn's requests to the step that returned a request's first token) and the cached share,
    and output tok/s. Arrivals with no intake cost: what caching itself changes."""
    params = runtime.SamplingParams(max_tokens=shape.answer, temperature=0, ignore_eos=True)
    turns, tokens, seconds = [], 0, 0.0
    for k in range(shape.turns):
        requests = [core.add_request(conv[k], params) for conv in convs]
        first: dict[int, float] = {}
        start = time.perf_counter()
        while not all(r.finished for r in requests):
            for r in core.step():
                first.setdefault(id(r), time.perf_counter() - start)
        seconds += time.perf_counter() - start
        ttft = sorted(first[id(r)] for r in requests)
        completions = [r.completion() for r in requests]
        tokens += sum(c.output_tokens for c in completions)
        turns.append({"turn": k + 1, "ttft_ms": {"p50": serve.percentile(ttft, 50) * 1e3,
                                                 "p99": serve.percentile(ttft, 99) * 1e3},
                      "cached_share": sum(c.cached_tokens for c in completions) / sum(len(c[k]) for c in convs)})
    return {"turns": turns, "tok_s": tokens / seconds, "seconds": seconds}


def engine_alone(artifact: Path, shape: Shape, vocab: int) -> dict:
    """engine_case for each case, caching on and off (one core at a time)."""
    out = {}
    for caching in ("on", "off"):
        core = runtime.load_core(artifact, verify_files=False, prefix_caching=caching == "on")
        core.generate([list(range(1, 17))], runtime.SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
        for case in CASES:
            out[f"{case}, caching {caching}"] = engine_case(core, conversations(shape, case, vocab), shape)
            print(f"[engine alone: {case}, caching {caching}] {out[f'{case}, caching {caching}']}", flush=True)
        del core
        bench_support.free_memory()
    return out


def nano_vllm_workload(artifact: Path, plan: workloads.Plan, vocab: int) -> dict:
    """nano-vllm's workload on the core, caching off then on (one core at a time: each sizes its
    KV cache to the GPU). Each core first generates for other random prompts (torch's draws,
    not the workload's), so that the measured run, on the cached core too, meets no prompt it
    has seen; the tokens the cache served in it."""
    n, lo, hi = plan.workload
    warm_up = workloads.random_prompts(min(n, 64), hi, vocab, seed=1)
    tok_s, hits = {}, 0
    for name in ("off", "on"):
        core = runtime.load_core(artifact, verify_files=False, prefix_caching=name == "on")
        core.generate(warm_up, runtime.SamplingParams(max_tokens=lo, ignore_eos=True))
        before = core.scheduler.prefix_cache_hits
        tok_s[name] = workloads.run_workload(core, plan, vocab)["tok_s"]
        hits += core.scheduler.prefix_cache_hits - before
        del core
        bench_support.free_memory()
    return {"on_tok_s": tok_s["on"], "off_tok_s": tok_s["off"], "measured_hit_tokens": hits,
            "loss": 1 - tok_s["on"] / tok_s["off"]}


def through_server(artifact: Path, shape: Shape, cases: list[str], vocab: int, work: Path,
                   client_processes: int) -> dict:
    """Each pacing and case through a `qwen3-aot serve` with caching on, then one with it off."""
    out = {}
    work.mkdir(parents=True, exist_ok=True)
    with serve.client_pool(client_processes) as pool:
        for caching in ("on", "off"):
            port = serve.free_port()
            server = serve.start_server(artifact, port, work / f"server-caching-{caching}.log", "default",
                                        work / f"probe-{caching}.jsonl",
                                        () if caching == "on" else ("--no-prefix-caching",))
            try:
                serve.over_http(port, [list(range(1, 17))], [runtime.SamplingParams(max_tokens=4, ignore_eos=True)],
                                1, pool, 1)  # warm-up
                for pacing in PACINGS:
                    for case in cases:
                        key = f"{case}, {pacing}, caching {caching}"
                        out[key] = run_case(port, conversations(shape, case, vocab, PACINGS.index(pacing)), shape,
                                            pacing == "think time", pool, client_processes)
                        print(f"[{key}] {out[key]}", flush=True)
            finally:
                server.terminate()
                server.wait(timeout=60)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/qwen3_aot_bench_prefix"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--tiny", action="store_true", help="a tiny model and shape on the CPU (a smoke run)")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="a tokenizer.json covering the model's vocabulary (Qwen's: tests/qwen_checkpoint.py makes "
                         "one); needed for time to first text. --tiny takes the test fixture's")
    ap.add_argument("--client-processes", type=int, default=4)
    ap.add_argument("--artifact", type=Path, default=None,
                    help="an artifact already built (with a tokenizer), instead of the 0.6B-shaped one")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    a = ap.parse_args()
    cases = a.cases.split(",")
    if not set(cases) <= set(CASES):
        ap.error(f"--cases takes {', '.join(CASES)}")
    parts = a.parts.split(",")
    if not set(parts) <= set(PARTS):
        ap.error(f"--parts takes {', '.join(PARTS)}")
    shape = TINY_SHAPE if a.tiny else Shape()
    plan = workloads.TINY_PLAN if a.tiny else workloads.Plan()
    tokenizer = a.tokenizer or (workloads.REPO / "tests/fixtures/tiny-qwen3/tokenizer.json" if a.tiny else None)
    if tokenizer is None:
        ap.error("--tokenizer is needed (the server streams no text without one)")
    device = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    r: dict = {**bench_support.system_info(device), "dtype": dtype, "model": "tiny" if a.tiny else "Qwen3-0.6B shape",
               "shape": dataclasses.asdict(shape), "workload_plan": plan.workload, "parts": parts,
               "cases": cases}
    if a.artifact is not None:
        artifact = a.artifact
        cfg = json.loads((artifact / "manifest.json").read_text())["model_config"]
        r["model"] = f"{a.artifact} (hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers)"
    else:  # one graph: the small-batch graph's export and compile would double the build, and both
        # arms of every comparison here run the same graphs
        _, artifact, r["build_s"] = workloads.build(plan, a.work, device, dtype, a.tiny, tokenizer,
                                                    ("--no-small-batch-graph",))
    vocab = json.loads((artifact / "manifest.json").read_text())["model_config"]["vocab_size"]
    if "workload" in parts:
        r["workload"] = nano_vllm_workload(artifact, plan, vocab)
        print(f"[workload] {r['workload']}", flush=True)
    if "engine" in parts:
        r["engine_alone"] = engine_alone(artifact, shape, vocab)
    r["multiturn"] = through_server(artifact, shape, cases, vocab, a.work, a.client_processes) \
        if "server" in parts else {}
    if a.json:
        a.json.write_text(json.dumps(r, indent=1))
    report(r, shape, a.tiny)


def report(r: dict, shape: Shape, tiny: bool) -> None:
    print(f"\n{r['gpu']}, torch {r['torch']}, {r['model']}, {r['dtype']}; {shape.conversations} conversations x "
          f"{shape.turns} turns, system {shape.system} tokens, user {shape.user}, answer {shape.answer}; "
          f"think time {shape.think} s mean in the paced runs")
    w = r.get("workload")
    if w:
        print(f"nano-vllm workload {r['workload_plan']}: caching on {w['on_tok_s']:.0f} tok/s, off "
              f"{w['off_tok_s']:.0f} ({w['loss']:+.1%} loss; {w['measured_hit_tokens']} tokens hit)")
    for pacing in PACINGS if r["multiturn"] else ():
        print(f"\nthrough the server, {pacing}")
        turn_table(r["multiturn"], [f"{case}, {pacing}" for case in r["cases"]])
    if "engine_alone" in r:
        print("\nthe core alone, each turn's requests at once")
        turn_table(r["engine_alone"], list(CASES))
    if tiny:
        return

    def ratio(cases: dict, case: str) -> float:
        return (cases[f"{case}, caching off"]["turns"][-1]["ttft_ms"]["p50"]
                / cases[f"{case}, caching on"]["turns"][-1]["ttft_ms"]["p50"])

    if "engine_alone" in r:
        print(f"the core alone, turn {shape.turns}: {ratio(r['engine_alone'], 'shared system'):.1f}x lower with caching")
    for pacing in PACINGS if r["multiturn"] else ():
        x = ratio(r["multiturn"], f"shared system, {pacing}")
        print(f"goal: turn {shape.turns} TTFT p50 >= {GOAL_TTFT_RATIO:.0f}x lower with caching, through the "
              f"server, {pacing}: {x:.1f}x ({'met' if x >= GOAL_TTFT_RATIO else 'NOT met'})")
    if w:
        print(f"goal: nano-vllm workload within {GOAL_WORKLOAD_LOSS:.0%}: {w['loss']:+.1%} "
              f"({'met' if w['loss'] <= GOAL_WORKLOAD_LOSS else 'NOT met'})")


def turn_table(cases: dict, names: list[str]) -> None:
    print(f"{'case':>26s} {'turn':>4s} {'TTFT p50 on':>12s} {'p99 on':>8s} {'p50 off':>8s} {'p99 off':>8s} "
          f"{'off/on p50':>10s} {'cached':>7s}  (ms)")
    for case in names:
        on, off = cases[f"{case}, caching on"], cases[f"{case}, caching off"]
        for t_on, t_off in zip(on["turns"], off["turns"]):
            ratio = t_off["ttft_ms"]["p50"] / max(t_on["ttft_ms"]["p50"], 1e-9)
            print(f"{case:>26s} {t_on['turn']:>4d} {t_on['ttft_ms']['p50']:>12.1f} {t_on['ttft_ms']['p99']:>8.1f} "
                  f"{t_off['ttft_ms']['p50']:>8.1f} {t_off['ttft_ms']['p99']:>8.1f} {ratio:>10.1f} "
                  f"{t_on['cached_share']:>7.0%}")
        print(f"{case:>26s} output tok/s: caching on {on['tok_s']:.0f}, off {off['tok_s']:.0f}")


if __name__ == "__main__":
    main()
