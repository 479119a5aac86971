"""The Qwen3 dense family on one GPU (issue 15, item 3): for each shape, seeded random bf16
weights written shard by shard, the artifact built with `--weights link`, and per shape:
build time and where it goes (the pipeline's stages), artifact size on disk, load time
against reading the weight bytes from the page cache, new process to first token, decode
batch 1 and 64 against the floor, peak GPU memory. Checkpoint and artifact are deleted
before the next shape (the GPU machine has 64 GiB of disk).

    PYTHONPATH=src python bench/family_bench.py --shapes 1.7B,4B --json $OUT/family_small.json
    PYTHONPATH=src python bench/family_bench.py --tiny          # a tiny shape on the CPU (smoke run)

scripts/gpu_family_check.sh runs the family in calls that each fit 10 minutes.

The 32B case, planned (estimates, not measurements):
- disk: the checkpoint is 65.5 GB (61 GiB: 32.8e9 parameters in bf16); the linked artifact
  adds its graph and RoPE table (tens of MB), the weights being hard links. A copied artifact
  (a second 61 GiB) could not be built on that disk; nothing else may be kept beside it, and
  `--stage checkpoint` refuses to start without the room.
- GPU memory (139 GiB): 61 GiB of weights and the KV cache when measured. The build's
  verify holds the eager model and the loaded artifact at once (122 GiB) plus a float64
  layer and the float64 lm_head (6 GB), about 130 GiB.
- host memory (128 GiB): the build's eager load reads every tensor to the CPU and
  concatenates q/k/v and gate/up there (about 105 GB at peak), before the model goes to
  the GPU.
- writing: on the 2-core CPU machine where this was written, torch drew 76 M normal floats
  a second on one core and saved 0.41 GB/s (synced); 65.5 GB of bf16 would take about
  7 minutes to draw there on one core and 2.7 minutes to write. Here the weights are drawn
  on the GPU (seconds), so writing is bounded by the disk: about 1 to 3 minutes if its
  speed is like the one measured here (the run reports the speed it saw).
- the build: 8B took 170 s (compile 115 s, package 34 s) before weights were linked; at
  32B loading 65 GB, compiling 64 layers and verifying is estimated at 5 to 7 minutes. With
  the checkpoint's writing that is over one 10-minute call, so 32B runs in three calls
  (--stage checkpoint, build, measure). Files survive between calls only while the machine
  stays warm, 30 s after a call: the calls must run back to back, and a stage whose input
  is gone says so and which stage to run first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import bench_systems  # noqa: E402
import workloads  # noqa: E402
from bench_support import (copy_bandwidth, decode_floor_ms, free_memory, model_sizes, system_info,  # noqa: E402
                           start_up_figures)
from bench_systems import Ours, load_ours, small_batch_comparison  # noqa: E402

from qwen3_aot.config import Qwen3Config  # noqa: E402
from qwen3_aot.errors import Qwen3AotError  # noqa: E402
from qwen3_aot.random_checkpoint import QWEN3_0_6B, QWEN3_0_6B_K_NORM_MAX, random_tensor  # noqa: E402
from qwen3_aot.weights import INDEX, hf_shapes, parse_dtype  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Qwen3's config.json facts: head_dim 128 and 8 KV heads for all, vocab 151,936, rope_theta 1e6
FAMILY = dict(head_dim=128, num_key_value_heads=8, vocab_size=151936, rope_theta=1e6, max_position_embeddings=40960)
SHAPES = {
    "1.7B": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, intermediate_size=6144,
                 tie_word_embeddings=True),
    "4B": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, intermediate_size=9728,
               tie_word_embeddings=True),
    "8B": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, intermediate_size=12288,
               tie_word_embeddings=False),
    "14B": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, intermediate_size=17408,
                tie_word_embeddings=False),
    "32B": dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=64, intermediate_size=25600,
                tie_word_embeddings=False),
}
PLAN = workloads.Plan(batches=(1, 64), prompt_len=512, new_tokens=64, prefill=(128,), repeats=2)
TINY_PLAN = replace(workloads.TINY_PLAN, batches=(1, 4), prefill=(8,))
SHARD_BYTES = 4 << 30
# beyond the checkpoint: the graph and RoPE table (24 MB at 14B), the compile's cache and
# temporary files, the hash cache. 2 GiB, not more: the GPU machine has 64.0 GiB free and
# the 32B checkpoint takes 61.0 of them
DISK_MARGIN = 2 << 30
STAGE_LINE = re.compile(r"\[(?P<stage>[\w ]+)\] done in (?P<s>[0-9.]+) s")


def config(shape: str, dtype: str) -> dict:
    """config.json of a family shape (or "tiny": the engine benchmarks' tiny model, workloads.TINY_MODEL)."""
    return {**QWEN3_0_6B, **(workloads.TINY_MODEL if shape == "tiny" else {**FAMILY, **SHAPES[shape]}), "dtype": dtype}


def write_checkpoint(path: Path, hf: dict, device: torch.device, seed: int = 0) -> dict:
    """A sharded checkpoint of seeded random weights (qwen3_aot.random_checkpoint's recipe,
    one generator per tensor so that each is drawn on `device` alone): one shard in memory
    at a time, never the model. Returns bytes and seconds (drawing, writing)."""
    cfg, dtype = Qwen3Config.from_hf_dict(hf), parse_dtype(hf["dtype"])
    shapes = list(hf_shapes(cfg).items())
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape) in enumerate(shapes):
        n = torch.Size(shape).numel() * dtype.itemsize
        if size and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    path.mkdir(parents=True, exist_ok=True)
    weight_map, drawn_s, written_s, nbytes = {}, 0.0, 0.0, 0
    for k, members in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        t = time.perf_counter()
        tensors = {}
        for i in members:
            n, shape = shapes[i]
            g = torch.Generator(device).manual_seed(seed * 1_000_003 + i)
            with torch.device(device):
                tensors[n] = random_tensor(n, shape, QWEN3_0_6B_K_NORM_MAX, g).to(dtype).cpu()
            weight_map[n] = name
        t1 = time.perf_counter()
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        os.sync()  # the disk's speed, not the page cache's
        written_s += time.perf_counter() - t1
        drawn_s += t1 - t
        nbytes += sum(x.nbytes for x in tensors.values())
        del tensors
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": nbytes}, "weight_map": weight_map}, indent=1))
    (path / "config.json").write_text(json.dumps(hf, indent=1))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"]}))
    return {"bytes": nbytes, "shards": len(shards), "draw_s": drawn_s, "write_s": written_s,
            "write_GBps": nbytes / written_s / 1e9}


def checkpoint_bytes(hf: dict) -> int:
    dtype = parse_dtype(hf["dtype"])
    return sum(torch.Size(s).numel() for s in hf_shapes(Qwen3Config.from_hf_dict(hf)).values()) * dtype.itemsize


def build(ckpt: Path, art: Path, device: str, dtype: str, tiny: bool) -> dict:
    """scripts/export.py --weights link, as a user runs it; its log streamed, and the seconds
    of each stage the pipeline logs (load, export, compile, package, verify)."""
    limits = ["--max-num-tokens", "256", "--max-model-len", "512"] if tiny else []
    cmd = [sys.executable, str(REPO / "scripts/export.py"), str(ckpt), "-o", str(art), "--device", device,
           "--dtype", dtype, "--weights", "link", "--force", *limits]
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    stages = {}
    for line in p.stderr:
        print(line, end="", file=sys.stderr, flush=True)
        m = STAGE_LINE.match(line)
        if m:
            stages[m["stage"]] = float(m["s"])
    if p.wait():
        raise Qwen3AotError(f"the export of {ckpt} failed (exit {p.returncode}); its log is above.")
    return {"build_s": time.perf_counter() - t, "stages_s": stages}


def disk_usage(art: Path, ckpt: Path) -> dict:
    """Bytes on disk: the artifact alone (every file), the artifact's own (not shared with the
    checkpoint), and checkpoint + artifact with hard links counted once."""
    def inodes(d: Path) -> dict[tuple[int, int], int]:
        return {(s.st_dev, s.st_ino): s.st_blocks * 512 for s in (p.stat() for p in d.rglob("*") if p.is_file())}

    a, c = inodes(art), inodes(ckpt)
    return {"artifact_GB": sum(a.values()) / 1e9, "artifact_own_GB": sum(v for k, v in a.items() if k not in c) / 1e9,
            "together_GB": sum({**a, **c}.values()) / 1e9}


def page_cache_read_s(files: list[Path]) -> float:
    """Seconds to read `files` once they are in the page cache (read twice, the second timed)."""
    buf = bytearray(64 << 20)

    def read() -> None:
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass

    read()
    t = time.perf_counter()
    read()
    return time.perf_counter() - t


def measure(art: Path, plan: workloads.Plan, device: torch.device) -> dict:
    """Load time against the page cache, a new process to first token, decode tok/s at each
    batch against the floor, peak GPU memory; the engine benchmarks' measures (bench_systems)."""

    man = json.loads((art / "manifest.json").read_text())
    weight_files = [art / f for f in man["weights"]["files"]]
    r: dict = {"page_cache_read_s": page_cache_read_s(weight_files),
               "weight_file_GB": sum(f.stat().st_size for f in weight_files) / 1e9}
    r.update(start_up_figures(art))
    weight_bytes = r.pop("weight_bytes")
    r["copy_GBps"] = copy_bandwidth(device) / 1e9
    vocab = man["model_config"]["vocab_size"]
    system, ours = bench_systems.measure(lambda: Ours(load_ours(art, plan), "ours"), plan, vocab)
    if system.engine.graphs is not None and system.engine.forward.small_batch_graph is not None:
        r["small_batch_graph"] = small_batch_comparison(system, plan, vocab)
    del system
    free_memory()
    sizes = model_sizes(man["model_config"], weight_bytes, parse_dtype(man["dtype"]))
    context = plan.prompt_len + plan.new_tokens / 2
    r["decode"] = {b: {"tok_s": d["tok_s"],
                       "floor_tok_s": b / decode_floor_ms(sizes, b, context, r["copy_GBps"] * 1e9) * 1e3}
                   for b, d in ours["decode"].items()}
    r["peak_memory_GB"], r["weight_GB"] = ours["peak_memory_GB"], weight_bytes / 1e9
    return r


def run_shape(shape: str, stage: str, work: Path, device: torch.device, tiny: bool) -> dict:
    dtype = "float32" if tiny else "bfloat16"
    hf = config(shape, dtype)
    root = work / shape
    ckpt, art, record = root / "checkpoint", root / "artifact", root / "record.json"
    r: dict = json.loads(record.read_text()) if stage == "measure" and record.is_file() else {"shape": shape}
    if stage in ("checkpoint", "build", "all") and not (ckpt / INDEX).is_file():
        need, free = checkpoint_bytes(hf) + DISK_MARGIN, shutil.disk_usage(work).free
        if need > free:
            raise Qwen3AotError(f"{shape}: the checkpoint needs {need / 2**30:.1f} GiB with margin, {work} has "
                                f"{free / 2**30:.1f} GiB free: remove other shapes' files (--work).")
        print(f"[{shape}] writing the checkpoint ({checkpoint_bytes(hf) / 1e9:.1f} GB)", flush=True)
        r["checkpoint"] = write_checkpoint(ckpt, hf, device)
        print(f"[{shape}] checkpoint {r['checkpoint']}", flush=True)
    if stage in ("build", "all"):
        r.update(build(ckpt, art, device.type, dtype, tiny))
        r["disk"] = disk_usage(art, ckpt)
        print(f"[{shape}] build {r['build_s']:.0f} s {r['stages_s']}, disk {r['disk']}", flush=True)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(r))
    if stage in ("measure", "all"):
        if not (art / "manifest.json").is_file():
            raise Qwen3AotError(f"{shape}: no artifact at {art}: run --stage build first, back to back (the GPU "
                                "machine keeps files only while it stays warm, 30 s after a call).")
        r.update(measure(art, TINY_PLAN if tiny else PLAN, device))
        shutil.rmtree(root)
    return r


def report(results: list[dict]) -> None:
    batches = sorted({int(b) for r in results for b in r.get("decode", {})})
    columns = ["build s", "compile s", "artifact GB", "own GB", "load s", "page cache s", "1st token s",
               *[f"b{b} tok/s (floor)" for b in batches], "peak GB"]
    print("\n" + f"{'shape':6s}" + "".join(f"{c:>{max(len(c) + 2, 9)}s}" for c in columns))
    fmt = lambda v: "-" if v is None else f"{v:.2f}" if v < 100 else f"{v:.0f}"  # noqa: E731
    for r in results:
        decode = {int(b): d for b, d in r.get("decode", {}).items()}
        cells = [fmt(r.get("build_s")), fmt(r.get("stages_s", {}).get("compile")),
                 fmt(r.get("disk", {}).get("artifact_GB")), fmt(r.get("disk", {}).get("artifact_own_GB")),
                 fmt(r.get("load_forward_s")), fmt(r.get("page_cache_read_s")), fmt(r.get("ttft", {}).get("total_s")),
                 *[f"{fmt(decode[b]['tok_s'])} ({fmt(decode[b]['floor_tok_s'])})" if b in decode else "-"
                   for b in batches], fmt(r.get("peak_memory_GB"))]
        print(f"{r['shape']:6s}" + "".join(f"{v:>{max(len(c) + 2, 9)}s}" for v, c in zip(cells, columns)))
    for r in results:
        if "stages_s" in r:
            print(f"{r['shape']}: build stages (s) {r['stages_s']}")
        if "ttft" in r:
            t = r["ttft"]
            parts = ", ".join(f"{k} {v:.2f}" for k, v in t["load_parts_s"].items())
            print(f"{r['shape']}: new process to first token {t['total_s']:.2f} s: import torch "
                  f"{t['import_torch_s']:.2f}, qwen3_aot.runtime {t['import_s'] - t['import_torch_s']:.2f}, load "
                  f"{t['load_s']:.2f} ({parts}), first token {t['first_token_s']:.3f}")
        if "checkpoint" in r:
            c = r["checkpoint"]
            print(f"{r['shape']}: checkpoint {c['bytes'] / 1e9:.1f} GB in {c['shards']} shards, drawn in "
                  f"{c['draw_s']:.1f} s, written in {c['write_s']:.1f} s ({c['write_GBps']:.2f} GB/s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--stage", choices=["all", "checkpoint", "build", "measure"], default="all",
                    help="all: write, build, measure, delete; or one part (32B: three back-to-back calls)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qwen3_aot_family"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU (a smoke run)")
    a = ap.parse_args()
    shapes = ["tiny"] if a.tiny else [s.strip() for s in a.shapes.split(",")]
    unknown = set(shapes) - set(SHAPES) - {"tiny"}
    if unknown:
        raise SystemExit(f"unknown shapes {sorted(unknown)}; use {', '.join(SHAPES)}")
    device = torch.device("cpu" if a.tiny else "cuda")
    a.work.mkdir(parents=True, exist_ok=True)
    results = []
    for shape in shapes:
        results.append(run_shape(shape, a.stage, a.work, device, a.tiny))
        if a.json:  # after each shape: a later shape's failure keeps the earlier ones
            a.json.write_text(json.dumps({**system_info(device), "stage": a.stage, "results": results}, indent=1))
    report(results)


if __name__ == "__main__":
    main()
