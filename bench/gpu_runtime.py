"""Runtime figures on the GPU (issue 5), on a Qwen3-0.6B-shaped bf16 artifact of random weights
(the one bench/gpu_artifact.py built in the same --work, else built here first, unverified):

- time from a new process to the first token of a 32-token prompt, with the artifact in the
  page cache (the first run warms it and is not reported), for load options that change it;
- decode tokens/s at batch 1 and 64 (32-token prompts, 64 new tokens, greedy, eos ignored),
  our engine with and without CUDA graphs against transformers eager (bf16, its default
  attention) in the same process, and the batch-1 step against the weights-read floor.

    PYTHONPATH=src python bench/gpu_runtime.py --json $OUT/runtime.json

Decode time is isolated as generate(max_tokens=65) - generate(max_tokens=1), each the best of 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from qwen3_aot import runtime
from qwen3_aot.runtime import SamplingParams

CHILD = r"""
import json, sys, time
t = {"start": time.time()}
import torch
from qwen3_aot import runtime
from qwen3_aot.runtime import SamplingParams
t["import"] = time.time()
engine = runtime.load(sys.argv[1], **json.loads(sys.argv[2]))
torch.cuda.synchronize()
t["load"] = time.time()
engine.generate([list(range(1000, 1032))], SamplingParams(max_tokens=1, temperature=0))
t["first_token"] = time.time()
print("CHILD" + json.dumps(t))
"""

TTFT_OPTIONS = {  # label: runtime.load options
    "default": {},
    "verify_files=False, cuda_graphs=False": {"verify_files": False, "cuda_graphs": False},
}
NEW_TOKENS, PROMPT_LEN = 64, 32


def time_to_first_token(artifact: Path, options: dict) -> dict:
    spawn = time.time()
    p = subprocess.run([sys.executable, "-c", CHILD, str(artifact), json.dumps(options)], capture_output=True,
                       text=True, timeout=300)
    lines = [x[5:] for x in p.stdout.splitlines() if x.startswith("CHILD")]
    if not lines:
        return {"error": p.stderr[-3000:]}
    t = json.loads(lines[0])
    return {"interpreter_s": t["start"] - spawn, "import_s": t["import"] - t["start"], "load_s": t["load"] - t["import"],
            "first_token_s": t["first_token"] - t["load"], "total_s": t["first_token"] - spawn}


def best_of(n: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def decode_tokens_per_s(generate: Callable[[int], object]) -> tuple[float, float]:
    """(tokens/s of the decode steps alone, ms per decode step) of a batch generator."""
    generate(NEW_TOKENS + 1)  # warm-up: allocations, kernel loading, graph pools
    t1, tn = best_of(2, lambda: generate(1)), best_of(2, lambda: generate(NEW_TOKENS + 1))
    step = (tn - t1) / NEW_TOKENS
    return 1 / step, step * 1e3


def prompts(batch: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(0, vocab, (batch, PROMPT_LEN), generator=g).tolist()


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = best_of(10, lambda: y.copy_(x))
    return 2 * x.numel() / t


def ours_decode(art: Path, graphs: bool, batches: list[int], out: dict) -> tuple[int, int]:
    """Our engine's decode rate at each batch size into `out`; returns (weight bytes, vocab size)."""
    eng = runtime.load(art, verify_files=False, cuda_graphs=graphs, max_num_seqs=max(batches),
                       kv_cache_tokens=max(batches) * (PROMPT_LEN + NEW_TOKENS + 16))
    vocab = eng.config["vocab_size"]
    for b in batches:
        ps = prompts(b, vocab)
        rate, ms = decode_tokens_per_s(lambda n: eng.generate(
            ps, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)))
        out[f"ours{'' if graphs else ' (no CUDA graphs)'}, batch {b}"] = {"tok_s": b * rate, "step_ms": ms}
        print(f"ours graphs={graphs} batch {b}: {b * rate:.0f} tok/s, {ms:.2f} ms/step", flush=True)
    return sum(w.nbytes for w in eng.forward._weights.values()), vocab


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/qwen3_aot_gpu_artifact"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--batches", default="1,64")
    a = ap.parse_args()
    ckpt, art = a.work / "checkpoint", a.work / "artifact"
    batches = [int(b) for b in a.batches.split(",")]
    r: dict = {"torch": torch.__version__, "new_tokens": NEW_TOKENS, "prompt_len": PROMPT_LEN}
    if not (art / "manifest.json").exists():  # built in another process: this one stays off the GPU
        subprocess.run([sys.executable, str(Path(__file__).parent / "random_checkpoint.py"), str(ckpt)], check=True)
        subprocess.run([sys.executable, "scripts/export.py", str(ckpt), "-o", str(art), "--device", "cuda",
                        "--dtype", "bfloat16", "--no-verify", "--force"], check=True)

    # 1. fresh processes first, while this one holds no GPU memory
    time_to_first_token(art, {})  # warms the page cache
    r["ttft"] = {label: time_to_first_token(art, opts) for label, opts in TTFT_OPTIONS.items()}
    for label, t in r["ttft"].items():
        print("time to first token,", label, t, flush=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], capture_output=True)
    r["python_import_torch_s"] = time.perf_counter() - t

    # 2. decode throughput, side by side
    r["gpu"], r["copy_GBps"] = torch.cuda.get_device_name(), copy_bandwidth() / 1e9
    r["decode"] = {}
    for graphs in (True, False):
        weight_bytes, vocab = ours_decode(art, graphs, batches, r["decode"])
        gc.collect()
        torch.cuda.empty_cache()
    r["weights_GB"] = weight_bytes / 1e9
    r["batch1_floor_ms"] = weight_bytes / (r["copy_GBps"] * 1e9) * 1e3

    from transformers import Qwen3ForCausalLM as HF

    hf = HF.from_pretrained(ckpt, dtype=torch.bfloat16).to("cuda").eval()
    for b in batches:
        ids = torch.tensor(prompts(b, vocab), device="cuda")

        @torch.inference_mode()
        def hf_generate(n: int) -> torch.Tensor:
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)

        rate, ms = decode_tokens_per_s(hf_generate)
        r["decode"][f"transformers eager, batch {b}"] = {"tok_s": b * rate, "step_ms": ms}
        print(f"transformers batch {b}: {b * rate:.0f} tok/s, {ms:.2f} ms/step", flush=True)

    if a.json:
        a.json.write_text(json.dumps(r, indent=1))
    print(f"\n{r['gpu']}, torch {r['torch']}, copy bandwidth {r['copy_GBps']:.0f} GB/s; Qwen3-0.6B shape, bf16, "
          f"random weights; {PROMPT_LEN}-token prompts")
    print(f"python -c 'import torch' alone: {r['python_import_torch_s']:.2f} s")
    print(f"{'new process -> first token':42s} {'total':>7s} {'import':>7s} {'load':>7s} {'1st tok':>7s}")
    for label, t in r["ttft"].items():
        if "error" in t:
            print(f"{label:42s} FAILED: {t['error'][-800:]}")
        else:
            print(f"{label:42s} {t['total_s']:6.2f}s {t['import_s']:6.2f}s {t['load_s']:6.2f}s {t['first_token_s']:6.2f}s")
    print(f"\n{'decode, ' + str(NEW_TOKENS) + ' new tokens':42s} {'tok/s':>9s} {'ms/step':>8s} {'vs HF':>6s}")
    for label, d in r["decode"].items():
        b = label.rsplit(" ", 1)[1]
        hf_rate = r["decode"][f"transformers eager, batch {b}"]["tok_s"]
        print(f"{label:42s} {d['tok_s']:9.0f} {d['step_ms']:8.2f} {d['tok_s'] / hf_rate:5.2f}x")
    print(f"batch-1 floor: {r['weights_GB']:.2f} GB of weights at {r['copy_GBps']:.0f} GB/s = "
          f"{r['batch1_floor_ms']:.3f} ms/step")


if __name__ == "__main__":
    main()
