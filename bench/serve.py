"""The OpenAI-compatible server under load, against the same workload in-process.

Builds the Qwen3-0.6B-shaped artifact of the engine benchmarks (workloads.build: seeded random weights;
--tiny: a tiny model on the CPU, a smoke run), runs nano-vllm's workload (workloads.workload) through
`runtime.load(...).generate` in this process, then through `qwen3-aot serve` on 127.0.0.1 by
streaming HTTP clients at each concurrency: output tokens/s against in-process, and time to
first token and inter-token latency (between streamed chunks) at p50 and p99. Prints a table
and writes JSON.

Each server variant (--variants) is a fresh server process started by bench/server_process.py:
"default" as installed, "h11" without uvloop and httptools (uvicorn then runs asyncio and h11),
"si" with a 0.5 ms GIL switch interval, "thread" with the engine in the server's process (its
loop a thread beside the event loop) rather than a process of its own. Each run reports how
late a thread of the server that sleeps 1 ms wakes (the GIL wait its threads see), and with
--py-spy a profile of the threads holding the GIL during the highest concurrency.

    PYTHONPATH=src python bench/serve.py --json serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import collections
import multiprocessing
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

try:
    import httpx
except ImportError:  # the openai client of late 2026 brings httpx2, the same API
    import httpx2 as httpx

sys.path.insert(0, str(Path(__file__).parent))
import bench_support  # noqa: E402
import workloads  # noqa: E402

from qwen3_aot import runtime  # noqa: E402

HEALTH_TIMEOUT_S = 300  # the server's start: torch's import, the load, CUDA-graph capture
VARIANTS = {  # (bench/server_process.py's options, serve's)
    "default": ([], []), "h11": (["--without", "uvloop,httptools"], []), "si": (["--switch-interval", "0.0005"], []),
    "thread": ([], ["--engine-in-process"])}
# The workload is sent again at each concurrency: prefix caching would serve the later runs'
# prompts from the first's blocks, so every engine here runs without it (as the in-process one);
# bench/multiturn_prefix_bench.py measures caching.
NO_CACHE = {"prefix_caching": False}
PY_SPY_SECONDS = 6


def in_process(artifact: Path, prompts: list, params: list) -> float:
    with runtime.load(artifact, verify_files=False, **NO_CACHE) as engine:
        engine.generate([list(range(1, 17))], runtime.SamplingParams(max_tokens=4))  # warm-up
        t = time.perf_counter()
        tokens = sum(c.output_tokens for c in engine.generate(prompts, params))
        return tokens / (time.perf_counter() - t)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(artifact: Path, port: int, log: Path, variant: str, probe: Path,
                 serve_args: tuple[str, ...] = ("--no-prefix-caching",)) -> subprocess.Popen:
    probe.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "server_process.py"), "--probe", str(probe),
                             *VARIANTS[variant][0], "--", "serve", str(artifact), "--port", str(port),
                             "--served-model-name", "bench", "--max-queue", "100000", *VARIANTS[variant][1],
                             *serve_args],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server did not answer /health within {HEALTH_TIMEOUT_S} s; see {log}")


async def one_request(client: httpx.AsyncClient, prompt: list[int], sp: runtime.SamplingParams) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": sp.max_tokens, "temperature": sp.temperature,
            "ignore_eos": sp.ignore_eos, "stream": True, "stream_options": {"include_usage": True}}
    times, tokens = [], 0
    async for at, event in bench_support.completion_events(client, body):
        if event.get("choices") and event["choices"][0].get("text"):
            times.append(at)
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    return {"ttft": times[0] if times else None, "itl": [b - a for a, b in zip(times, times[1:])], "tokens": tokens}


async def _clients(port: int, jobs: list, concurrency: int, start_at: float) -> tuple[list[dict], float]:
    """`concurrency` clients in this process, each taking the next of `jobs`, from `start_at`
    (a time.time() shared by every client process); their results and when the last ended."""
    pending, results = list(jobs), []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600, limits=limits) as client:
        async def worker():
            while pending:
                prompt, sp = pending.pop()
                results.append(await one_request(client, prompt, sp))

        await asyncio.sleep(max(0.0, start_at - time.time()))
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.time()


def _client_process(port: int, jobs: list, concurrency: int, start_at: float) -> tuple[list[dict], float]:
    try:
        return asyncio.run(_clients(port, jobs, concurrency, start_at))
    except Exception as e:  # httpx's errors do not unpickle: the pool would only say a process broke
        raise RuntimeError(f"a client failed: {type(e).__name__}: {e}") from None


def client_pool(processes: int) -> concurrent.futures.ProcessPoolExecutor:
    """Client processes, started (and done importing) before any is timed."""
    pool = concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
    list(pool.map(time.sleep, [0.5] * processes))  # each process takes one: all are up
    return pool


def over_http(port: int, prompts: list, params: list, concurrency: int,
              pool: concurrent.futures.ProcessPoolExecutor, processes: int) -> dict:
    """Every request of the workload, `concurrency` clients at a time, each taking the next,
    spread over the pool's client processes: one Python process parsing every event of 256
    streams falls behind the server (chunks then arrive back to back), and the figure would
    be the client's."""
    processes = max(1, min(processes, concurrency))
    jobs = list(zip(prompts, params))
    shares = [jobs[k::processes] for k in range(processes)]
    per = [concurrency // processes + (k < concurrency % processes) for k in range(processes)]
    start_at = time.time() + 0.5  # every process has its share before the clock starts
    parts = list(pool.map(_client_process, [port] * processes, shares, per, [start_at] * processes))
    results = [r for rs, _ in parts for r in rs]
    seconds = max(end for _, end in parts) - start_at
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)  # none without a tokenizer
    itl = sorted(x for r in results for x in r["itl"])
    tokens = sum(r["tokens"] for r in results)
    assert tokens == sum(sp.max_tokens for sp in params), "ignore_eos: every request runs to max_tokens"
    return {"concurrency": concurrency, "client_processes": processes, "tok_s": tokens / seconds, "seconds": seconds,
            "ttft_ms": {"p50": percentile(ttft, 50) * 1e3, "p99": percentile(ttft, 99) * 1e3},
            "itl_ms": {"p50": percentile(itl, 50) * 1e3, "p99": percentile(itl, 99) * 1e3}}


def probe_mark(server: subprocess.Popen, probe: Path) -> dict:
    """The GIL probe's figures since the last mark (bench/server_process.py)."""
    lines = len(probe.read_text().splitlines()) if probe.exists() else 0
    server.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = probe.read_text().splitlines() if probe.exists() else []
        if len(text) > lines:
            return json.loads(text[-1])
        time.sleep(0.05)
    return {}


def py_spy(binary: str, pid: int, out: Path) -> subprocess.Popen:
    """Samples of the threads holding the GIL, PY_SPY_SECONDS long, as collapsed stacks."""
    return subprocess.Popen([binary, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--gil",
                             "--threads", "--rate", "250", "--duration", str(PY_SPY_SECONDS), "--format", "raw",
                             "--output", str(out)], stdout=subprocess.DEVNULL,
                            stderr=out.with_suffix(".err").open("w"))


def summarize_stacks(raw: Path, top: int = 15) -> dict:
    """Who held the GIL (a GIL per process): samples by process and thread, and the functions
    they were in (self samples). The engine process is the one started with child_main."""
    roles, leaves, total = collections.Counter(), collections.Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n, frames = int(count), stack.split(";")
        total += n
        process = "engine process" if "child_main" in stack.split(";thread", 1)[0] else "server"
        thread = next((f.split("): ", 1)[-1] for f in frames if f.startswith("thread (")), "?")
        role = f"{process} {thread}"
        roles[role] += n
        leaves[f"{role}: {frames[-1]}"] += n
    return {"samples": total, "roles": dict(roles), "top": leaves.most_common(top)}


def percentile(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p / 100))] if sorted_values else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/qwen3_aot_bench_serve"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--tiny", action="store_true", help="a tiny model and workload on the CPU (a smoke run)")
    ap.add_argument("--concurrency", default=None, help="comma-separated (default 1,16,64,256; tiny: 1,4)")
    ap.add_argument("--client-processes", type=int, default=4,
                    help="processes the HTTP clients are spread over (at most one per client)")
    ap.add_argument("--threads", type=int, default=0,
                    help="also the workload sent by this many threads through the in-process Engine, and the same "
                         "arrivals driven on the core in one thread (workloads.run_workload_threads and _lanes)")
    ap.add_argument("--first-token", action="store_true",
                    help="also new process to first token on the artifact (bench_support's, the second of two runs)")
    ap.add_argument("--variants", default="default", help=f"comma-separated server variants of {sorted(VARIANTS)}")
    ap.add_argument("--py-spy", default=None, help="a py-spy binary: profile the server at the highest concurrency")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="a tokenizer.json covering the model's vocabulary (Qwen's: tests/qwen_checkpoint.py makes "
                         "one); without one the artifact streams no text, and TTFT and ITL are not measured")
    a = ap.parse_args()
    plan = workloads.TINY_PLAN if a.tiny else workloads.Plan()
    device = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    levels = [int(c) for c in (a.concurrency or ("1,4" if a.tiny else "1,16,64,256")).split(",")]
    r: dict = {**bench_support.system_info(device), "dtype": dtype, "model": "tiny" if a.tiny else "Qwen3-0.6B shape",
               "plan": plan.workload}
    _, artifact, r["build_s"] = workloads.build(plan, a.work, device, dtype, a.tiny, a.tokenizer)
    vocab = json.loads((artifact / "manifest.json").read_text())["model_config"]["vocab_size"]
    prompts, params = workloads.workload(plan, vocab)
    if a.first_token:
        bench_support.time_to_first_token(artifact, {})  # the first warms the page cache
        r["first_token"] = bench_support.time_to_first_token(artifact, {})
    r["in_process_tok_s"] = in_process(artifact, prompts, params)
    bench_support.free_memory()
    if a.threads:
        with runtime.load(artifact, verify_files=False, **NO_CACHE) as engine:
            r["workload_threads"] = workloads.run_workload_threads(engine, plan, vocab, a.threads)
        bench_support.free_memory()
        core = runtime.load_core(artifact, verify_files=False, **NO_CACHE)
        r["workload_lanes"] = workloads.run_workload_lanes(core, plan, vocab, a.threads)
        del core
        bench_support.free_memory()
    r["http"], r["server_exit"], r["stacks"] = [], {}, {}
    with client_pool(a.client_processes) as pool:
        for variant in a.variants.split(","):
            port, probe = free_port(), a.work / f"probe-{variant}.jsonl"
            server = start_server(artifact, port, a.work / f"server-{variant}.log", variant, probe)
            try:
                over_http(port, prompts[:2], params[:2], 1, pool, 1)  # warm-up
                for c in levels:
                    spy = py_spy(a.py_spy, server.pid, a.work / f"stacks-{variant}.txt") \
                        if a.py_spy and c == max(levels) else None
                    probe_mark(server, probe)
                    h = over_http(port, prompts, params, c, pool, a.client_processes)
                    r["http"].append({"variant": variant, **h, "gil_probe": probe_mark(server, probe)})
                    if spy is not None and spy.wait(timeout=60) == 0:
                        r["stacks"][variant] = summarize_stacks(a.work / f"stacks-{variant}.txt")
            finally:
                server.terminate()
                r["server_exit"][variant] = server.wait(timeout=60)
    if a.json:
        a.json.write_text(json.dumps(r, indent=1))
    print(f"\n{r['gpu']}, torch {r['torch']}, {r['model']}, {r['dtype']}; workload {plan.workload} "
          f"(requests, shortest, longest); in-process {r['in_process_tok_s']:.0f} output tok/s")
    if "first_token" in r:
        ft = r["first_token"]
        print(f"new process to first token {ft['total_s']:.2f} s: import torch {ft['import_torch_s']:.2f}, "
              f"imports {ft['import_s']:.2f}, load {ft['load_s']:.2f} {ft['load_parts_s']}, "
              f"first token {ft['first_token_s']:.3f}")
    for variant, st in r["stacks"].items():
        print(f"GIL holders, {variant}, concurrency {max(levels)}: {st['samples']} samples {st['roles']}")
        for leaf, n in st["top"][:8]:
            print(f"  {n / max(1, st['samples']):5.1%} {leaf[:110]}")
    print(f"{'variant':>8s} {'concurrency':>11s} {'tok/s':>9s} {'vs in-process':>14s} {'TTFT p50':>9s} {'p99':>8s} "
          f"{'ITL p50':>8s} {'p99':>8s} {'GIL p50':>8s} {'p99':>6s}  (ms)")
    for h in r["http"]:
        gil = h["gil_probe"].get("late_ms", {})
        share = h["tok_s"] / r["in_process_tok_s"]
        print(f"{h['variant']:>8s} {h['concurrency']:>11d} {h['tok_s']:>9.0f} {share:>13.0%} "
              f"{h['ttft_ms']['p50']:>9.1f} {h['ttft_ms']['p99']:>8.1f} {h['itl_ms']['p50']:>8.2f} "
              f"{h['itl_ms']['p99']:>8.2f} {gil.get('50', 0):>8.2f} {gil.get('99', 0):>6.2f}")
    if "workload_threads" in r:
        wt, wl = r["workload_threads"], r["workload_lanes"]
        print(f"in-process: one generate call {wt['one_call_tok_s']:.0f} tok/s; {wt['threads']} threads one request "
              f"at a time each {wt['threads_tok_s']:.0f} ({wt['ratio']:.0%} of one call); the same arrivals on the "
              f"core in one thread {wl['tok_s']:.0f} (the threads reach {wt['threads_tok_s'] / wl['tok_s']:.0%} of "
              f"it; its busiest lane makes {wl['critical_steps']} tokens one after another)")


if __name__ == "__main__":
    main()
