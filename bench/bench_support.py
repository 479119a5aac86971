"""What the bench scripts measure with: timers, the copy-bandwidth and matmul-rate ceilings,
CUDA-graph replay timing, GPU memory, system info, a model's sizes and the floors they give,
and a new process's time to its first token. Every bench script takes these from here (run as
`python bench/X.py`, bench/ is first on sys.path), so that their figures are measured alike."""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

L2_ESCAPE_BYTES = 256 << 20  # several times the H100's 50 MB L2

TTFT_CHILD = r"""
import json, sys, time
t = {"start": time.time()}
import torch
t["torch"] = time.time()
from qwen3_aot import runtime
from qwen3_aot.runtime import SamplingParams
t["import"] = time.time()
if torch.cuda.is_available():  # what load does first, the CUDA context made: timed apart, a part of the load
    torch.empty(1, device="cuda")
t["cuda"] = time.time()
engine = runtime.load(sys.argv[1], **json.loads(sys.argv[2]))
t["load"] = time.time()
engine.generate([list(range(100, 132))], SamplingParams(max_tokens=1, temperature=0))
t["first_token"] = time.time()
t["parts"] = {"cuda_init": t["cuda"] - t["import"], **engine.load_seconds}
print("CHILD" + json.dumps(t))
"""


# ---- timers ----

def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_of(n: int, fn: Callable[[], object]) -> float:
    """The fewest seconds of n calls of fn, each timed on the host between synchronizations."""
    times = []
    for _ in range(n):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times)


def host_ms(fn: Callable[[], object], calls: int = 20) -> float:
    """Median host milliseconds of fn() returning, the GPU idle before each call."""
    times = []
    for _ in range(calls):
        sync()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    sync()
    return sorted(times)[calls // 2] * 1e3


def replayed_call_seconds(make_call: Callable[[], Callable[[], object]], bytes_per_call: int) -> float:
    """Median seconds per call, replayed in a CUDA graph (launch gaps out, GPU time only).

    `make_call()` returns a call on fresh inputs; one graph replay runs enough such calls,
    each on its own inputs, that they cannot all be served from L2: repeated calls on one
    small input would measure the cache, not memory."""
    import triton

    n = max(1, min(64, L2_ESCAPE_BYTES // max(bytes_per_call, 1)))
    calls = [make_call() for _ in range(n)]
    seconds = triton.testing.do_bench_cudagraph(lambda: [c() for c in calls], rep=100, return_mode="median") * 1e-3
    return seconds / n


def replay_seconds(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """Median GPU seconds of one replay of a captured graph, each replay alone on the GPU (the
    runtime's own timing, which picks the decode graphs by it)."""
    from qwen3_aot.runtime.forward.decode_graphs import replay_times

    return statistics.median(replay_times(graph, replays))


# ---- what the hardware can do ----

def copy_bandwidth(device: torch.device | str | None = None) -> float:
    """The copy-bandwidth ceiling of a memory-bound step, in bytes/s: bytes read + written by
    one large device copy (1 GiB on a GPU, 64 MiB on the CPU), the fastest of 10 (best_of).
    `device`: the GPU when there is one, else the CPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    x = torch.empty(1 << (30 if device.type == "cuda" else 26), dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() / best_of(10, lambda: y.copy_(x))


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of an 8192^3 matmul (512^3 on the CPU), the ceiling of a compute-bound prefill."""
    n = 8192 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / best_of(5, lambda: a @ b)


def system_info(device: torch.device | str | None = None) -> dict:
    """What a result was measured on: the GPU's name ("cpu" without one), torch, triton and CUDA versions."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        import triton
    except ImportError:  # no triton off Linux
        triton = None
    return {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton.__version__ if triton else None, "cuda": torch.version.cuda}


# ---- memory ----

def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_memory(fn: Callable[[], object]) -> tuple[object, float | None]:
    """fn()'s result and the most GPU memory allocated while it ran, over what was allocated before (GB)."""
    free_memory()
    if not torch.cuda.is_available():
        return fn(), None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    return out, (torch.cuda.max_memory_allocated() - base) / 1e9


# ---- a model's floors ----

def model_sizes(config: dict, weight_bytes: int, dtype: torch.dtype) -> dict:
    """What a forward of the model must read and compute, from its config.json."""
    c = config
    h, L = c["hidden_size"], c["num_hidden_layers"]
    per_layer = h * (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * c["head_dim"] \
        + c["num_attention_heads"] * c["head_dim"] * h + 3 * h * c["intermediate_size"]
    return {"weight_bytes": weight_bytes, "layer_params": L * per_layer, "vocab": c["vocab_size"], "hidden": h,
            "kv_bytes_per_token": 2 * L * c["num_key_value_heads"] * c["head_dim"] * dtype.itemsize,
            "attn_flops_per_pair": 4 * L * c["num_attention_heads"] * c["head_dim"]}


def decode_floor_ms(s: dict, batch: int, context: float, bandwidth: float) -> float:
    """A decode step reads the weights once and each sequence's K/V: those bytes over the copy bandwidth."""
    return (s["weight_bytes"] + batch * context * s["kv_bytes_per_token"]) / bandwidth * 1e3


def prefill_floor_ms(s: dict, n: int, bandwidth: float, flops: float) -> float:
    """An n-token prefill reads the weights and does the matmuls and attention: the larger of the two times."""
    work = 2 * n * s["layer_params"] + s["attn_flops_per_pair"] * n * (n + 1) / 2 + 2 * s["vocab"] * s["hidden"]
    return max(s["weight_bytes"] / bandwidth, work / flops) * 1e3


# ---- start-up ----

def time_to_first_token(artifact: Path, options: dict) -> dict:
    """A new interpreter: import, runtime.load (with `options`), generate one token of a 32-token prompt."""
    spawn = time.time()
    p = subprocess.run([sys.executable, "-c", TTFT_CHILD, str(artifact), json.dumps(options)], capture_output=True,
                       text=True, timeout=600)
    lines = [x[5:] for x in p.stdout.splitlines() if x.startswith("CHILD")]
    if not lines:
        raise RuntimeError(f"the first-token child failed:\n{p.stderr[-3000:]}")
    t = json.loads(lines[0])
    load = t["load"] - t["import"]
    # the load's parts one after another (package and weights are the forward's own parts)
    rest = load - sum(v for k, v in t["parts"].items() if k not in ("package", "weights"))
    return {"total_s": t["first_token"] - spawn, "interpreter_s": t["start"] - spawn,
            "import_s": t["import"] - t["start"], "import_torch_s": t["torch"] - t["start"],
            "load_s": load, "load_parts_s": {**t["parts"], "checks and the rest": rest},
            "first_token_s": t["first_token"] - t["load"]}


async def completion_events(client, body: dict):
    """The events of one streamed /v1/completions request through an httpx.AsyncClient, as they
    come: (seconds since it was sent, the parsed event)."""
    t0 = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield time.perf_counter() - t0, json.loads(line[6:])


def start_up_figures(art: Path) -> dict:
    """A new process to its first token (the second of two starts: the first fills the hash
    cache if the build's was lost), the compiled forward's load in this process, and the bytes
    of the weights it holds."""
    from qwen3_aot import runtime

    time_to_first_token(art, {})
    figures = {"ttft": time_to_first_token(art, {})}
    sync()
    t = time.perf_counter()
    forward = runtime.load_forward(art)
    sync()
    figures["load_forward_s"] = time.perf_counter() - t
    figures["weight_bytes"] = forward.weight_bytes
    del forward
    free_memory()
    return figures
