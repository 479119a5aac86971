"""End-to-end benchmark (issue 7): one command, one table, ours against what a user would
pick instead and against the physical floor, measured side by side in one run.

    PYTHONPATH=src python bench/e2e_bench.py --json $OUT/e2e.json --png $OUT/e2e_decode.png

It writes a Qwen3-0.6B-shaped checkpoint of seeded random weights (no tokenizer: prompts
are token ids, so no detokenisation is timed), builds the artifact with scripts/export.py
(the user's command, verify included) and measures:

- ours: the artifact through `qwen3_aot.runtime` (CUDA graphs on);
- ours eager: `qwen3_aot.model`, uncompiled, as the forward of the same engine;
- transformers eager (bf16, sdpa);
- the floor: the bytes a step must read (weights, plus K/V) over the copy bandwidth
  measured in this run; for prefill, the larger of that and the matmul FLOPs at the bf16
  matmul rate measured in this run.

Figures: decode tokens/s at batch 1, 8, 64, 256 (512-token prompts, greedy, eos ignored;
ours: 64 engine steps timed once every sequence is decoding; transformers: generate(65) -
generate(1), over 64); prefill time of one 128, 2,048 and 8,192-token prompt to its first
token; a new process to the first token; peak GPU memory during the decode runs (weights,
cache, activations); build time; and the nano-vllm workload (256 sequences, input and output lengths uniform in 100..1024, seeded,
temperature 0.6, ignore_eos) as output tokens/s. --profile adds where a decode step's time
goes (host work, graph replay, kernels). --tiny runs the same on a tiny model on the CPU.

What other benchmarks share lives beside it: the measuring in bench_support.py, the plan, model
and workloads in workloads.py, the systems and their decode and prefill measures in bench_systems.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_support import (best_of, copy_bandwidth, decode_floor_ms, free_memory, host_ms,  # noqa: E402
                           matmul_rate, model_sizes, prefill_floor_ms, sync, system_info, time_to_first_token)
from bench_systems import Ours, System, load_ours, measure, prefill_requests, small_batch_comparison  # noqa: E402
from workloads import (TINY_PLAN, Plan, build, random_prompts, run_workload, run_workload_lanes,  # noqa: E402
                       run_workload_threads, workload)

from qwen3_aot import runtime  # noqa: E402
from qwen3_aot.model import Qwen3ForCausalLM  # noqa: E402
from qwen3_aot.runtime.forward.flat_batch import PositionalForward  # noqa: E402
from qwen3_aot.runtime import SamplingParams  # noqa: E402

GOALS = {  # issue 7, Qwen3-0.6B shape on the GPU machine: (figure, at least or at most, value)
    "decode batch 1": ("tok/s", ">=", 1000), "decode batch 64": ("tok/s", ">=", 15000),
    "prefill 2048": ("ms", "<=", 15), "new process -> first token": ("s", "<=", 3),
    "nano-vllm workload": ("tok/s", ">=", 20000)}


# ---- the transformers baseline ----

class Transformers(System):
    name = "transformers eager"

    def __init__(self, checkpoint: Path, dtype: torch.dtype, device: torch.device) -> None:
        from transformers import Qwen3ForCausalLM as HF

        self.model = HF.from_pretrained(checkpoint, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        self.device = device

    @torch.inference_mode()
    def decode(self, prompts: list[list[int]], n: int) -> object:
        ids = torch.tensor(prompts, device=self.device)
        return self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=0)

    @torch.inference_mode()
    def prefill(self, prompt: list[int]) -> object:
        ids = torch.tensor([prompt], device=self.device)
        return self.model(ids, logits_to_keep=1).logits.argmax(-1)  # what generate's first step computes


def run_workload_transformers(hf: Transformers, plan: Plan, vocab: int) -> dict:
    """The same requests through transformers' generate: one left-padded batch, sampled until
    the longest request's max_tokens (generate has no per-row length); only requested tokens count."""
    prompts, params = workload(plan, vocab)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=hf.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=hf.device)
    n = max(p.max_tokens for p in params)
    sync()
    t = time.perf_counter()
    with torch.inference_mode():
        hf.model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=True,
                          temperature=0.6, top_k=0, top_p=1.0, pad_token_id=0)
    sync()
    t = time.perf_counter() - t
    tokens = sum(p.max_tokens for p in params)
    return {"output_tokens": tokens, "seconds": t, "tok_s": tokens / t}


# ---- the profile of a decode step ----

def profile_decode(engine: runtime.EngineCore, plan: Plan, vocab: int, batch: int) -> dict:
    """Where a decode step of `batch` sequences goes: host time of each part of EngineCore.step
    (waiting for the GPU is in "wait + take tokens"), the CUDA-graph replay alone, and the
    kernels of one forward (torch.profiler on the eager call of the compiled graph)."""
    spent: dict[str, float] = {}

    wrapped: list[tuple[object, str, object]] = []

    def timed(obj: object, attr: str, label: str) -> None:
        fn = getattr(obj, attr)
        wrapped.append((obj, attr, vars(obj).get(attr)))

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - t
        setattr(obj, attr, wrapper)

    prompts = random_prompts(batch, plan.prompt_len, vocab, seed=batch)
    sp = SamplingParams(max_tokens=plan.new_tokens + 1, temperature=0, ignore_eos=True)
    engine.generate(prompts, sp)
    for obj, attr, label in [(engine.scheduler, "schedule", "schedule"),
                             (engine, "_forward", "scheduled inputs + launch"),
                             (engine, "_decode_ahead", "decode ahead: inputs + launch"),
                             (engine, "_sample", "sampling launch"), (engine, "_receive", "wait + take tokens"),
                             (engine, "step", "step")]:
        timed(obj, attr, label)
    reqs = [engine.add_request(p, sp) for p in prompts]
    prefill_requests(engine, reqs)  # not counted
    # chunked prefill staggers the sequences, so they finish over the last steps: keep the
    # inputs of the first decode step, whole, for the replays below
    first_step = [(len(seq.token_ids) - 1, seq.token_ids[-1], list(seq.block_table)) for seq in engine.scheduler.running]
    spent.clear()
    steps = sequences = 0
    while engine.has_unfinished():
        sequences += len(engine.scheduler.running)
        engine.step()
        steps += 1
    for obj, attr, original in wrapped:  # an instance attribute back, or the class's method
        setattr(obj, attr, original) if original is not None else delattr(obj, attr)
    out: dict = {"batch": batch, "steps": steps, "mean_batch": sequences / steps,
                 "host_ms_per_step": {k: v / steps * 1e3 for k, v in spent.items()}}

    g, cache = engine.graphs, engine.cache
    if g is not None:
        pos, ids, tables = zip(*first_step)
        width = max(map(len, tables))
        tables = np.array([t + [0] * (width - len(t)) for t in tables], dtype=np.int32)
        g(list(ids), list(pos), tables)
        b = next(s for s in g.sizes if s >= batch)
        args = (g.ids[:b], g.pos[:b], g.seq_ids[:b], g.tables[:b], g.rows[:b], cache.k, cache.v)
        out["replayed_context"] = int(g.pos[:batch].max()) + 1
        out["replays_small_batch_graph"] = b in g.small_batch_sizes
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g.graphs[b].replay()
        start.record()
        for _ in range(50):
            g.graphs[b].replay()
        end.record()
        sync()
        out["graph_replay_ms"] = start.elapsed_time(end) / 50
        # host time alone (the GPU idle before each): the replay's launch, and the whole decode
        # call (inputs to pinned memory, two copies, the launch)
        out["replay_launch_host_ms"] = host_ms(g.graphs[b].replay)
        out["decode_call_host_ms"] = host_ms(lambda: g(list(ids), list(pos), tables))
        with torch.inference_mode():
            out["compiled_call_ms"] = best_of(20, lambda: engine.forward(*args)) * 1e3
        for label, fn in (("eager call", lambda: engine.forward(*args)), ("graph replay", g.graphs[b].replay)):
            try:
                out[label] = kernel_table(fn)
            except Exception as e:  # the profiler's event API moves between torch versions; keep the rest
                out[label] = {"error": repr(e)}
    return out


def prefill_one_package_or_two(art: Path, plan: Plan, vocab: int, work: Path, rounds: int = 2) -> dict:
    """Prefill ms of the artifact loaded whole (both packages) and of a view of it that holds
    the main graph alone (the small-batch graph left out of its manifest), engines taken in
    turn in one process: prefill runs the main graph either way, so a difference is the cost
    of the second package being loaded, and the spread between rounds the machine's."""
    from qwen3_aot.runtime.forward.compiled import SMALL_BATCH_GRAPH

    view = work / "main-graph-only"
    shutil.rmtree(view, ignore_errors=True)
    shutil.copytree(art, view, copy_function=os.link)
    man = json.loads((view / "manifest.json").read_text())
    del man["graphs"][SMALL_BATCH_GRAPH]
    (view / "manifest.json").unlink()  # a link to the artifact's own: not written through
    (view / "manifest.json").write_text(json.dumps(man))
    out: dict = {label: {n: [] for n in plan.prefill} for label in ("both packages", "main package only")}
    for _ in range(rounds):
        for label, path in (("both packages", art), ("main package only", view)):
            free_memory()
            system = Ours(load_ours(path, plan), label)
            for n in plan.prefill:
                prompt = random_prompts(1, n, vocab, seed=n)[0]
                system.prefill(prompt)
                out[label][n].append(best_of(plan.repeats + 1, lambda: system.prefill(prompt)) * 1e3)
            del system
    for label, by_len in out.items():
        print(f"  prefill, {label}: " + ", ".join(f"{n}: {' / '.join(f'{ms:.2f}' for ms in v)} ms"
                                                 for n, v in by_len.items()), flush=True)
    shutil.rmtree(view)
    return out


def import_profile(top: int = 12) -> list[dict]:
    """`python -X importtime -c 'import torch'`: the modules with the largest cumulative import times."""
    p = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torch"], capture_output=True, text=True)
    rows = []
    for line in p.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append({"module": parts[2].rstrip(), "cumulative_s": int(parts[1]) / 1e6})
    return sorted(rows, key=lambda r: -r["cumulative_s"])[:top]


def kernel_table(fn: Callable[[], object], calls: int = 10) -> dict:
    """The kernels of fn (one forward), by total GPU time, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
               and e.self_device_time_total > 0]
    kernels.sort(key=lambda e: -e.self_device_time_total)
    return {"kernels_per_call": sum(e.count for e in kernels) / calls,
            "kernel_ms_per_call": sum(e.self_device_time_total for e in kernels) / calls / 1e3,
            "top_kernels": [{"name": e.key[:90], "per_call": e.count / calls,
                             "us_per_call": e.self_device_time_total / calls} for e in kernels[:25]]}


# ---- the run ----

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qwen3_aot_e2e"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None, help="chart of decode tok/s against batch size")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and plan (a CPU smoke run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", action="store_true", help="also profile decode steps of batch 1, 8, 64 and 256")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: eager, transformers, "
                                               "workload, transformers-workload")
    a = ap.parse_args()
    plan = TINY_PLAN if a.tiny else Plan()
    skip = set(filter(None, a.skip.split(",")))
    device = torch.device(a.device)
    dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, dtype_name)
    r: dict = {**system_info(device), "dtype": dtype_name, "plan": asdict(plan),
               "model": "tiny" if a.tiny else "Qwen3-0.6B shape"}
    print(f"[build] {r['model']}, {dtype_name}, {device.type}", flush=True)
    ckpt, art, r["build_s"] = build(plan, a.work, device.type, dtype_name, a.tiny)
    print(f"[build] {r['build_s']:.1f} s", flush=True)

    # fresh processes first, while this one holds no GPU memory; the first warms the page cache
    # (a tiny artifact's 2 MB need no warming)
    if not a.tiny:
        time_to_first_token(art, {})
    r["ttft"] = time_to_first_token(art, {})
    r["ttft_unchecked"] = time_to_first_token(art, {"verify_files": False, "cuda_graphs": False})
    r["import_torch_s"] = best_of(1, lambda: subprocess.run([sys.executable, "-c", "import torch"], check=True))
    r["import_profile"] = import_profile()
    print(f"[first token] {r['ttft']}", flush=True)

    r["copy_GBps"] = copy_bandwidth(device) / 1e9
    r["matmul_TFLOPs"] = matmul_rate(device, dtype) / 1e12
    systems: dict[str, dict] = {}
    vocab = json.loads((art / "manifest.json").read_text())["model_config"]["vocab_size"]
    ours, systems["ours"] = measure(lambda: Ours(load_ours(art, plan), "ours"), plan, vocab)
    engine = ours.engine
    sizes = model_sizes(engine.config, engine.forward.weight_bytes, dtype)
    if a.profile:
        r["profile"] = [profile_decode(engine, plan, vocab, b) for b in (1, 8, 64, 256) if b <= max(plan.batches)]
    if engine.graphs is not None and engine.forward.small_batch_graph is not None:
        r["small_batch_graph"] = small_batch_comparison(ours, plan, vocab)
    small_graph = engine.forward.small_batch_graph is not None
    del ours, engine
    if small_graph:
        r["prefill_packages"] = prefill_one_package_or_two(art, plan, vocab, a.work)
    if "eager" not in skip:
        def eager() -> Ours:  # the same engine, the eager model as its forward
            engine = load_ours(art, plan, cuda_graphs=False)
            engine.forward = PositionalForward(Qwen3ForCausalLM.from_pretrained(ckpt, dtype=dtype, device=device))
            return Ours(engine, "ours eager")
        _, systems["ours eager"] = measure(eager, plan, vocab)
    if "workload" not in skip:
        free_memory()
        # the defaults (the cache takes 90% of the GPU) but prefix caching: the lanes run the
        # workload's prompts again, which the cache would serve (bench/multiturn_prefix_bench.py measures it)
        engine = runtime.load_core(art, verify_files=False, prefix_caching=False)
        r["workload"] = run_workload(engine, plan, vocab)
        print(f"[workload] {r['workload']}", flush=True)
        r["workload_lanes"] = run_workload_lanes(engine, plan, vocab, lanes=64)
        print(f"[workload] {r['workload_lanes']}", flush=True)
        del engine
        free_memory()
        with runtime.load(art, verify_files=False, prefix_caching=False) as engine:
            r["workload_threads"] = run_workload_threads(engine, plan, vocab, threads=64)
        print(f"[workload] {r['workload_threads']}", flush=True)
    if "transformers" not in skip:
        free_memory()
        hf, systems["transformers eager"] = measure(lambda: Transformers(ckpt, dtype, device), plan, vocab)
        if "transformers-workload" not in skip and "workload" not in skip:
            r["workload_transformers"] = run_workload_transformers(hf, plan, vocab)
            print(f"[workload] transformers {r['workload_transformers']}", flush=True)
        del hf
    bw, flops = r["copy_GBps"] * 1e9, r["matmul_TFLOPs"] * 1e12
    context = plan.prompt_len + plan.new_tokens / 2
    systems["floor"] = {"decode": {b: {"step_ms": decode_floor_ms(sizes, b, context, bw)} for b in plan.batches},
                        "prefill_ms": {n: prefill_floor_ms(sizes, n, bw, flops) for n in plan.prefill}}
    for b, d in systems["floor"]["decode"].items():
        d["tok_s"] = b / d["step_ms"] * 1e3
    r["systems"], r["sizes"] = systems, sizes
    if a.json:
        a.json.write_text(json.dumps(r, indent=1))
    if a.png:
        chart(r, a.png)
    report(r, plan)


def chart(r: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for name, s in r["systems"].items():
        bs = sorted(s["decode"], key=int)
        ax.plot([int(b) for b in bs], [s["decode"][b]["tok_s"] for b in bs], marker="o",
                linestyle="--" if name == "floor" else "-", label=name)
    ax.set(xscale="log", yscale="log", xlabel="batch size (sequences decoding together)", ylabel="decode tokens/s",
           title=f"{r['model']}, {r['dtype']}, {r['gpu']}\n{r['plan']['prompt_len']}-token prompts, torch {r['torch']}")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks([int(b) for b in r["plan"]["batches"]], [str(b) for b in r["plan"]["batches"]])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def report(r: dict, plan: Plan) -> None:
    s = r["systems"]
    hf, floor = s.get("transformers eager"), s["floor"]
    names = [n for n in ("ours", "ours eager", "transformers eager") if n in s]
    print(f"\n{r['gpu']}, torch {r['torch']}, {r['model']}, {r['dtype']}, random weights; copy "
          f"{r['copy_GBps']:.0f} GB/s, matmul {r['matmul_TFLOPs']:.1f} TFLOP/s")
    head = f"{'figure':28s}" + "".join(f"{n:>19s}" for n in names) + f"{'floor':>10s}{'ours/HF':>9s}{'floor/ours':>11s}"
    print(head)
    rows = []
    for b in plan.batches:
        rows.append((f"decode batch {b} (tok/s)", [s[n]["decode"][b]["tok_s"] for n in names],
                     floor["decode"][b]["tok_s"], True))
    for n in plan.prefill:
        rows.append((f"prefill {n} (ms)", [s[x]["prefill_ms"][n] for x in names], floor["prefill_ms"][n], False))
    rows.append(("peak GPU memory (GB)", [s[x]["peak_memory_GB"] for x in names], None, False))
    for label, vals, fl, higher_better in rows:
        line = f"{label:28s}" + "".join(f"{v:19.2f}" if v is not None else f"{'-':>19s}" for v in vals)
        line += f"{fl:10.2f}" if fl is not None else f"{'':10s}"
        if hf and vals[0] is not None and vals[-1]:
            line += f"{(vals[0] / vals[-1] if higher_better else vals[-1] / vals[0]):8.1f}x"
        if fl is not None:
            line += f"{(vals[0] / fl if higher_better else fl / vals[0]):10.0%}"
        print(line)
    t = r["ttft"]
    print(f"new process -> first token: {t['total_s']:.2f} s (interpreter {t['interpreter_s']:.2f}, import "
          f"{t['import_s']:.2f} of which torch {t['import_torch_s']:.2f}, load {t['load_s']:.2f} "
          f"({', '.join(f'{k} {v:.3f}' for k, v in t['load_parts_s'].items())}), first token "
          f"{t['first_token_s']:.3f}); "
          f"verify_files=False, cuda_graphs=False: {r['ttft_unchecked']['total_s']:.2f} s; "
          f"python -c 'import torch' alone: {r['import_torch_s']:.2f} s")
    print("  import torch, largest cumulative: " + ", ".join(f"{m['module'].strip()} {m['cumulative_s']:.2f}"
                                                           for m in r["import_profile"][:8]))
    print(f"build (scripts/export.py, verify included): {r['build_s']:.1f} s")
    if "workload" in r:
        w = r["workload"]
        line = f"nano-vllm workload: {w['tok_s']:.0f} output tok/s ({w['output_tokens']} tokens in {w['seconds']:.1f} s)"
        if "workload_transformers" in r:
            wt = r["workload_transformers"]
            line += f"; transformers {wt['tok_s']:.0f} tok/s ({w['tok_s'] / wt['tok_s']:.1f}x)"
        print(line)
        for kind, k in w["steps"].items():
            if k["steps"]:
                print(f"  {kind}: {k['steps']} steps, {k['seconds']:.2f} s ({k['seconds'] / k['steps'] * 1e3:.2f} ms "
                      f"a step), {k['tokens'] / k['steps']:.0f} tokens of {k['sequences'] / k['steps']:.0f} "
                      "sequences a step")
        wt, wl = r["workload_threads"], r["workload_lanes"]
        print(f"  through the Engine: one generate call {wt['one_call_tok_s']:.0f} tok/s; {wt['threads']} threads, "
              f"one request at a time each, {wt['threads_tok_s']:.0f} tok/s ({wt['ratio']:.0%} of one call)")
        print(f"  the same arrivals on the core in one thread ({wl['lanes']} lanes): {wl['tok_s']:.0f} tok/s "
              f"({wl['tok_s'] / w['tok_s']:.0%} of the core's one batch; the threads reach "
              f"{wt['threads_tok_s'] / wl['tok_s']:.0%} of it); its busiest lane makes {wl['critical_steps']} tokens "
              f"one after another, {wl['critical_steps'] / wl['seconds']:.0f} steps/s at least")
    if "small_batch_graph" in r:
        c = r["small_batch_graph"]
        print(f"small-batch graph replayed for decode batches {c['replayed_for']} ({c['dependent_edges']} edges of "
              "dependent launch); decode tok/s, the graphs chosen / the main graph alone / without dependent launch: "
              + ", ".join(f"batch {b} {v['chosen']:.0f} / {v['main graph only']:.0f} / {v['no dependent launch']:.0f}"
                          for b, v in c["tok_s"].items())
              + f"; bitwise the same logits without dependent launch: {c['same_logits_without_dependent_launch']}")
    for p in r.get("profile", []):
        print(f"\nprofile, decode batch {p['batch']} ({p['steps']} steps, {p['mean_batch']:.0f} sequences on average): "
              "host ms/step "
              + ", ".join(f"{k} {v:.3f}" for k, v in p["host_ms_per_step"].items()))
        if "graph_replay_ms" in p:
            which = "the small-batch graph" if p.get("replays_small_batch_graph") else "the main graph"
            print(f"  graph replay ({which}) {p['graph_replay_ms']:.3f} ms (context {p['replayed_context']}); "
                  f"compiled call without graph {p['compiled_call_ms']:.3f} ms; host: replay launch "
                  f"{p['replay_launch_host_ms']:.3f} ms, decode call {p['decode_call_host_ms']:.3f} ms")
        for label in ("eager call", "graph replay"):
            k = p.get(label, {})
            if "error" in k or not k:
                print(f"  kernels of one {label}: {k.get('error', 'none recorded')}")
                continue
            print(f"  kernels of one {label}: {k['kernels_per_call']:.0f}, {k['kernel_ms_per_call']:.3f} ms")
            for e in k["top_kernels"][:12 if label == "eager call" else 0]:
                print(f"  {e['us_per_call']:8.1f} us {e['per_call']:5.0f}x  {e['name']}")
    if r["model"] != "tiny":
        figures = {"decode batch 1": s["ours"]["decode"][1]["tok_s"], "decode batch 64": s["ours"]["decode"][64]["tok_s"],
                   "prefill 2048": s["ours"]["prefill_ms"][2048], "new process -> first token": t["total_s"],
                   "nano-vllm workload": r.get("workload", {}).get("tok_s")}
        for goal, (unit, op, want) in GOALS.items():
            got = figures[goal]
            if got is not None:
                met = got >= want if op == ">=" else got <= want
                print(f"goal {goal}: {got:.1f} {unit} {op} {want}: {'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
