"""Build a Qwen3-0.6B-shaped artifact on the GPU, load it in a fresh process, check parity.

One command (issue 4's GPU check): writes a checkpoint with seeded random weights, runs
scripts/export.py's pipeline (bf16, cuda), then in a new process times load and the
first forward and reads GPU memory, and compares the loaded artifact with the eager
model (prefill + paged decode) and with float64 transformers on CPU. Prints a table last.

    PYTHONPATH=src python bench/gpu_artifact.py --json $OUT/artifact.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import random_checkpoint  # noqa: E402
from bench_support import system_info  # noqa: E402

from qwen3_aot.build import export  # noqa: E402
from qwen3_aot.driver import FlatBatchDriver  # noqa: E402
from qwen3_aot.model import Qwen3ForCausalLM  # noqa: E402
from qwen3_aot.runtime import load_forward  # noqa: E402

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from qwen3_aot.runtime import load_forward
t_import = time.perf_counter()
f = load_forward(sys.argv[1], device=sys.argv[2])
t_load = time.perf_counter()
dev = torch.device(sys.argv[2])
L, cfg = f.num_layers, json.load(open(sys.argv[1] + "/manifest.json"))["model_config"]
shape = (4, 16, cfg["num_key_value_heads"], cfg["head_dim"])
k = [torch.zeros(shape, dtype=torch.bfloat16, device=dev) for _ in range(L)]
v = [torch.zeros(shape, dtype=torch.bfloat16, device=dev) for _ in range(L)]
ids = torch.arange(32, device=dev); pos = torch.arange(32, device=dev)
seq = torch.zeros(32, dtype=torch.int32, device=dev); bt = torch.arange(2, dtype=torch.int32, device=dev)[None]
tok = f(ids, pos, seq, bt, torch.tensor([31], device=dev), k, v).argmax(-1).item()
if dev.type == "cuda":
    torch.cuda.synchronize()
t_first = time.perf_counter()
mem = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
print("CHILD" + json.dumps(dict(import_s=t_import - t0, load_s=t_load - t_import, first_forward_s=t_first - t_load,
                                 total_s=t_first - t0, gpu_mem_after_load_GB=mem / 1e9, token=tok)))
"""


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm()) if torch.isfinite(a).all() else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/qwen3_aot_gpu_artifact"))
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than 0.6B's 28 (quick checks)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-verify", action="store_true", help="skip the build's in-process check")
    a = ap.parse_args()
    ckpt, art = a.work / "checkpoint", a.work / "artifact"
    r: dict = system_info(a.device)
    t = time.perf_counter()
    random_checkpoint.write(ckpt, **({"num_hidden_layers": a.layers} if a.layers else {}))
    r["write_checkpoint_s"] = time.perf_counter() - t
    t = time.perf_counter()
    from qwen3_aot.build.toolchain import loaded_libstdcxx, pick_cxx
    r["cxx"], r["libstdcxx"] = pick_cxx(), str(loaded_libstdcxx())
    print("compiler", r["cxx"], "process libstdc++", r["libstdcxx"], flush=True)
    export(ckpt, art, device=a.device, dtype="bfloat16", force=True, check=not a.no_verify)
    r["build_s"] = time.perf_counter() - t
    r["artifact_MB"] = {f.name: f.stat().st_size / 1e6 for f in art.iterdir()}
    p = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CHILD, str(art), a.device],
                       capture_output=True, text=True)
    child = [json.loads(x[5:]) for x in p.stdout.splitlines() if x.startswith("CHILD")]
    r["fresh_process"] = child[0] if child else {"error": p.stderr[-3000:]}
    print("fresh process:", r["fresh_process"], flush=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], capture_output=True)
    r["python_import_torch_s"] = time.perf_counter() - t

    # parity: loaded artifact vs eager (same process), prefill + paged decode, and vs float64
    eager = Qwen3ForCausalLM.from_pretrained(ckpt, dtype="bfloat16", device=a.device)
    compiled = load_forward(art, device=a.device)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, eager.config.vocab_size, (n,), generator=g).tolist() for n in (7, 33, 70)]
    drv_c = FlatBatchDriver(compiled, eager.config, eager.dtype, eager.device)
    drv_e = FlatBatchDriver.of(eager)
    lc, le = drv_c.logits(seqs), drv_e.logits(seqs)
    r["compiled_vs_eager_rel"] = rel(torch.cat(lc), torch.cat(le))
    gc, ge = drv_c.generate_greedy(seqs, 24), drv_e.generate_greedy(seqs, 24)
    r["greedy_24_equal"] = gc == ge
    r["greedy_agree_tokens"] = sum(x == y for s, t in zip(gc, ge) for x, y in zip(s, t))
    try:
        from transformers import Qwen3ForCausalLM as HF

        hf64 = HF.from_pretrained(ckpt, dtype=torch.float64, attn_implementation="eager").eval()
        with torch.inference_mode():
            exact = torch.cat([hf64(torch.tensor([s])).logits[0] for s in seqs])
        del hf64
        hf16 = HF.from_pretrained(ckpt, dtype=torch.bfloat16).to(a.device).eval()
        with torch.inference_mode():
            theirs = torch.cat([hf16(torch.tensor([s], device=a.device)).logits[0] for s in seqs])
        r["vs_float64_rel"] = {"compiled": rel(torch.cat(lc), exact), "eager": rel(torch.cat(le), exact),
                               "transformers_bf16": rel(theirs, exact)}
    except ImportError:
        r["vs_float64_rel"] = "transformers not installed"
    if a.json:
        a.json.write_text(json.dumps(r, indent=1))
    fp = r["fresh_process"]
    print(f"\n{r['gpu']}, torch {r['torch']}, Qwen3-0.6B shape{f' ({a.layers} layers)' if a.layers else ''}, bf16")
    print(f"build (export+compile+package+verify)  {r['build_s']:.1f} s")
    print("artifact                               " + ", ".join(f"{k} {v:.1f} MB" for k, v in r["artifact_MB"].items()))
    if "error" in fp:
        print("fresh process FAILED:", fp["error"][-1500:])
    else:
        print(f"fresh process: import {fp['import_s']:.2f} s, load {fp['load_s']:.2f} s, first forward "
              f"{fp['first_forward_s']:.2f} s, total {fp['total_s']:.2f} s; GPU memory after load "
              f"{fp['gpu_mem_after_load_GB']:.2f} GB")
    print(f"compiled vs eager logits rel {r['compiled_vs_eager_rel']:.2e}; greedy 3x24 equal: {r['greedy_24_equal']} "
          f"({r['greedy_agree_tokens']}/72 tokens)")
    print(f"vs float64: {r['vs_float64_rel']}")


if __name__ == "__main__":
    main()
