"""What the sampling pipeline costs (issue 29): nano-vllm's workload three ways in one run, and
the sampler alone on one decode step's logits.

    PYTHONPATH=src python bench/sampling_bench.py --json $OUT/sampling.json     # GPU, about 5 minutes
    PYTHONPATH=src python bench/sampling_bench.py --tiny                        # CPU smoke run
    PYTHONPATH=src python bench/sampling_bench.py --sampler-only --repeats 5    # the sampler alone, no model

It builds the Qwen3-0.6B-shaped seeded random checkpoint (bench/workloads.py, as e2e_bench does)
and measures, on one engine core with the default cache:

- the workload (256 sequences, input and output lengths uniform in 100..1024, ignore_eos) as
  output tokens/s: "temperature 0.6" (nano-vllm's, e2e_bench's figure); "Qwen3 defaults"
  (temperature 0.6, top_k 20, top_p 0.95: every row cuts, through torch.topk); "+ penalties"
  (those plus presence_penalty 1.5 and repetition_penalty 1.05 on every request). The goal:
  the second and third within 5% of the first.
- prompt logprobs (prompt_logprobs=5) of 64 prompts of 2,048 tokens, one output token each:
  time and peak GPU memory over what was allocated before, against the same prompts without
  them (the engine computes at most 512 prompt positions' logits a step).
- the sampler alone on [256, vocab] fp32 logits (host-timed around a sync, median of 50): greedy,
  temperature, Qwen3's defaults (topk path), top_p alone (the sort path), and the defaults
  with penalties: what each stage adds to a decode step (greedy + penalties against greedy:
  the penalties' own cost, without the draw). The penalised rows' histories are
  the workload's midway: prompts of 100..1024 ids below 10,000, outputs of 0..1024 ids.
  --sampler-only runs just this part, on Qwen3's vocabulary (151,936) without building a model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_support import free_memory, peak_memory, sync, system_info  # noqa: E402
from workloads import TINY_PLAN, Plan, build, random_prompts, workload  # noqa: E402

from qwen3_aot import runtime  # noqa: E402
from qwen3_aot.runtime import SamplingParams  # noqa: E402
from qwen3_aot.runtime.core.penalties import TokenHistory  # noqa: E402
from qwen3_aot.runtime.core.sampler import Sampler  # noqa: E402

VARIANTS = {
    "temperature 0.6": {},
    "Qwen3 defaults": {"top_k": 20, "top_p": 0.95},
    "+ penalties": {"top_k": 20, "top_p": 0.95, "presence_penalty": 1.5, "repetition_penalty": 1.05},
}
SAMPLER_CASES = {
    "greedy": {"temperature": 0.0},
    "temperature 0.6": {"temperature": 0.6},
    "Qwen3 defaults (topk path)": {"temperature": 0.6, "top_k": 20, "top_p": 0.95},
    "top_p 0.95 alone (sort path)": {"temperature": 0.6, "top_p": 0.95},
    "defaults + penalties": {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "presence_penalty": 1.5,
                             "repetition_penalty": 1.05},
    "min_p 0.05": {"temperature": 0.6, "min_p": 0.05},
    "greedy + penalties": {"temperature": 0.0, "presence_penalty": 1.5, "repetition_penalty": 1.05},
}


def run_variant(core: runtime.EngineCore, plan: Plan, vocab: int, fields: dict) -> dict:
    prompts, params = workload(plan, vocab)
    params = [p.replace(**fields) for p in params]
    core.generate([list(range(1, 17))], SamplingParams(max_tokens=4, **fields))  # warm-up
    sync()
    t = time.perf_counter()
    done = core.generate(prompts, params)
    sync()
    seconds = time.perf_counter() - t
    tokens = sum(c.output_tokens for c in done)
    assert tokens == sum(p.max_tokens for p in params), "ignore_eos: every request runs to max_tokens"
    return {"output_tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
            "preemptions": core.scheduler.num_preemptions}


def prompt_logprobs_run(core: runtime.EngineCore, prompts: list[list[int]], asked: int | None) -> dict:
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=asked)

    def run() -> float:
        sync()
        t = time.perf_counter()
        done = core.generate(prompts, params)
        sync()
        if asked is not None:
            assert all(len(c.prompt_logprobs) == len(p) for c, p in zip(done, prompts))
        return time.perf_counter() - t

    seconds, peak_gb = peak_memory(run)
    return {"seconds": seconds, "peak_GB": peak_gb, "prompt_tokens": sum(map(len, prompts))}


def time_sampler(vocab: int, rows: int, device: torch.device, fields: dict, repeats: int) -> float:
    """Median ms of one Sampler.sample over [rows, vocab] logits (the penalised rows with
    histories as the workload has them midway: see the module's docstring)."""
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(rows, vocab, generator=g, device=device) * 4
    params = [SamplingParams(**fields)] * rows
    history = TokenHistory(vocab, device)
    slots = None
    if params[0].uses_history:
        slots, outputs = workload_histories(history, rows, vocab)
        history.count([s for s, n in zip(slots, outputs) for _ in range(n)],
                      torch.randint(0, vocab, (sum(outputs),), device=device))
    sampler = Sampler(history)
    times = []
    for _ in range(repeats + 3):
        sync()
        t = time.perf_counter()
        sampler.sample(logits, params, [None] * rows, slots)
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times[3:])


def workload_histories(history: TokenHistory, rows: int, vocab: int) -> tuple[list[int], list[int]]:
    """A slot per row with a prompt of 100..1024 ids below 10,000 (nano-vllm's), and how many
    output tokens (0..1024) each row is to have counted."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(100, 1025, (rows,), generator=g).tolist()
    slots = [history.acquire(torch.randint(0, min(10000, vocab), (n,), generator=g).tolist()) for n in lengths]
    return slots, torch.randint(0, 1025, (rows,), generator=g).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qwen3_aot_sampling"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--tiny", action="store_true", help="a tiny model and plan (a CPU smoke run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sampler-only", action="store_true", help="only the sampler alone, on Qwen3's vocabulary")
    ap.add_argument("--repeats", type=int, default=None, help="sampler timings' repeats (default 50, 5 with --tiny)")
    ap.add_argument("--case", action="append", choices=SAMPLER_CASES, help="with --sampler-only: these cases only")
    a = ap.parse_args()
    if a.sampler_only:
        sampler_only(torch.device(a.device), a.repeats or 50, a.case or list(SAMPLER_CASES))
        return
    plan = TINY_PLAN if a.tiny else Plan()
    device = torch.device(a.device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    r: dict = {**system_info(device), "dtype": dtype, "model": "tiny" if a.tiny else "Qwen3-0.6B shape",
               "workload": plan.workload}
    print(f"[system] {r['gpu']}, torch {r['torch']}, {r['model']} {dtype}, workload {plan.workload} "
          "(sequences, shortest, longest)", flush=True)
    _, art, r["build_s"] = build(plan, a.work, device.type, dtype, a.tiny)
    vocab = json.loads((art / "manifest.json").read_text())["model_config"]["vocab_size"]

    rows = 8 if a.tiny else 256
    r["sampler_ms"] = {}
    for name, fields in SAMPLER_CASES.items():
        r["sampler_ms"][name] = time_sampler(vocab, rows, device, fields, a.repeats or (5 if a.tiny else 50))
        print(f"[sampler] {name}: {r['sampler_ms'][name]:.3f} ms ({rows} x {vocab})", flush=True)
    free_memory()

    core = runtime.load_core(art, verify_files=False)
    r["workload_runs"] = {}
    for name, fields in VARIANTS.items():
        r["workload_runs"][name] = run_variant(core, plan, vocab, fields)
        print(f"[workload] {name}: {r['workload_runs'][name]['tok_s']:.0f} output tok/s", flush=True)
    count, length = (8, 64) if a.tiny else (64, 2048)
    prompts = random_prompts(count, length, vocab, seed=1)
    core.generate(prompts[:2], SamplingParams(max_tokens=1, prompt_logprobs=5))  # warm-up
    r["prompt_logprobs"] = {"prompts": count, "length": length}
    for name, asked in (("without", None), ("prompt_logprobs=5", 5)):
        r["prompt_logprobs"][name] = prompt_logprobs_run(core, prompts, asked)
        print(f"[prompt logprobs] {name}: {r['prompt_logprobs'][name]}", flush=True)
    del core
    free_memory()

    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(r, indent=1))
    base = r["workload_runs"]["temperature 0.6"]["tok_s"]
    print(f"\n{r['gpu']} | torch {r['torch']} | {r['model']} {dtype} | workload {plan.workload}")
    print(f"{'nano-vllm workload':<34}{'output tok/s':>14}{'vs temperature 0.6':>20}")
    for name, run in r["workload_runs"].items():
        print(f"{name:<34}{run['tok_s']:>14.0f}{run['tok_s'] / base:>19.1%}")
    pl = r["prompt_logprobs"]
    print(f"\n{str(pl['prompts']) + ' prompts of ' + str(pl['length']) + ' tokens':<34}{'seconds':>14}{'peak GB':>20}")
    for name in ("without", "prompt_logprobs=5"):
        peak = pl[name]["peak_GB"]
        print(f"{name:<34}{pl[name]['seconds']:>14.2f}{'-' if peak is None else f'{peak:.2f}':>20}")
    print(f"\n{'sampler alone, ' + str(rows) + ' rows':<34}{'ms/step':>14}")
    for name, ms in r["sampler_ms"].items():
        print(f"{name:<34}{ms:>14.3f}")


def sampler_only(device: torch.device, repeats: int, cases: list[str]) -> None:
    """The sampler alone, each case printed as it ends, on [256, 151936] logits."""
    rows, vocab = 256, 151936
    print(f"[system] {system_info(device)['gpu']}, torch {torch.__version__}", flush=True)
    for name in cases:
        ms = time_sampler(vocab, rows, device, SAMPLER_CASES[name], repeats)
        print(f"[sampler] {name}: {ms:.3f} ms ({rows} x {vocab})", flush=True)


if __name__ == "__main__":
    main()
