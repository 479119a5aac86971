"""FP8 against bf16 on one GPU (issue 32). First the FP8 kernels against their float64 oracle on
the GPU (CI has none) and timed against bf16's at each shape's projections; then per shape a
seeded random bf16 checkpoint, built twice (bf16 with --weights link; `--quantize fp8`), and for
each artifact: build time, load, new process to first token, decode batch 1 and 64 against that
dtype's floor (its weight bytes over the copy bandwidth), nano-vllm's workload, peak GPU memory
and the KV cache a default load gets; and accuracy over 512 positions of real text through
Qwen's real tokenizer (random weights: what we have): the FP8 artifact's logits and the bf16
eager model's with the same dequantized weights against float64 of those weights, the activation
quantization's own error (float64 with only the activations quantized), and FP8 against the bf16
artifact (KL divergence and top-1 agreement).

    PYTHONPATH=src python bench/fp8_bench.py --shapes 0.6B --json $OUT/fp8_0.6B.json
    PYTHONPATH=src python bench/fp8_bench.py --shapes 8B --stage build --builds bf16   # then, back to back:
    PYTHONPATH=src python bench/fp8_bench.py --shapes 8B --stage build --builds fp8
    PYTHONPATH=src python bench/fp8_bench.py --shapes 8B --stage measure --json $OUT/fp8_8B.json
    # or both 8B builds in one call (their build times then shared): --stage build --parallel-builds
    PYTHONPATH=src python bench/fp8_bench.py --shapes 32B --fp8-checkpoint --stage build    # then:
    PYTHONPATH=src python bench/fp8_bench.py --shapes 32B --fp8-checkpoint --stage measure --json $OUT/fp8_32B.json
    PYTHONPATH=src python bench/fp8_bench.py --tiny      # a tiny shape on the CPU (smoke run)

Qwen's tokenizer is made from the dashscope wheel as the tests make it (tests/qwen_checkpoint.py):
pass QWEN3_AOT_WHEELS=<folder with the wheel> on a machine without PyPI, or --tokenizer tokenizer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if "--tiny" in sys.argv:  # the kernels run under Triton's interpreter on the CPU: set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(REPO / "tests"))
import bench_systems  # noqa: E402
import family_bench  # noqa: E402
import workloads  # noqa: E402
from bench_support import (copy_bandwidth, decode_floor_ms, free_memory, model_sizes, system_info,  # noqa: E402
                           start_up_figures)

from qwen3_aot.custom_ops import fp8_linear as fp8  # noqa: E402
from qwen3_aot.errors import Qwen3AotError  # noqa: E402
from qwen3_aot.random_checkpoint import QWEN3_0_6B  # noqa: E402
from qwen3_aot.weights import INDEX, parse_dtype  # noqa: E402

SHAPES = {"0.6B": {k: QWEN3_0_6B[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                              "intermediate_size", "tie_word_embeddings")},
          **{k: v for k, v in family_bench.SHAPES.items() if k in ("8B", "14B", "32B")}}
PLAN = workloads.Plan(batches=(1, 64), prompt_len=512, new_tokens=64, prefill=(128,), workload=(64, 100, 512),
                      repeats=2)
TINY_PLAN = workloads.Plan(batches=(1, 4), prompt_len=16, new_tokens=16, prefill=(8,), workload=(6, 4, 16), repeats=2)
TEXT_POSITIONS = 512
# (rows, activations quantized): weight-only as the small-batch graph runs it (the rows kernel to 4
# rows, the tiles kernel above, to 64), the activation-quantized GEMM as the main graph runs it
KERNEL_CASES = ((1, False), (4, False), (16, False), (64, False), (64, True), (512, True))
TINY_KERNEL_CASES = ((1, False), (4, False), (16, False), (70, False), (70, True))
# the tiles kernel's (BLOCK_N, stages) also timed, to choose its defaults (fp8_linear.TILES_*)
TILES_SWEEP = ((32, 3), (64, 3), (64, 4), (128, 3), (128, 4))
L2_ROTATION = 256 << 20  # bytes of weight copies the kernel timings cycle through: over H100's / H200's 50 MB L2


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm()) if torch.isfinite(a).all() else float("inf")


def top1(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.argmax(-1) == ref.argmax(-1)).double().mean())


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over positions of KL(P || Q), P = softmax(p_logits)."""
    lp, lq = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


# ---- kernels ----

def kernel_checks(shape: str, device: torch.device, tiny: bool) -> list[dict]:
    """Each projection of the shape (N, K) in KERNEL_CASES: the op as the graph calls it
    (weight-only: the rows kernel to 4 rows, the tiles kernel above; with activation quantization
    the Triton GEMM, or cuBLAS's where QWEN3_AOT_FP8_GEMM=cublas and the scales are by block)
    against the float64 oracle, next to the fp32 reference's own error, and its time against
    bf16's (small_linear's rows kernel at <= 4 rows, else cuBLAS), with the weight bytes each
    reads; the tiles kernel also at each of TILES_SWEEP's launch parameters."""
    from qwen3_aot.custom_ops.small_linear import small_linear_triton
    from qwen3_aot.quantization import quantize_block_fp8, rows_repeat_by_block

    c = {**QWEN3_0_6B, **(workloads.TINY_MODEL if tiny else SHAPES[shape])}
    h, q, kv, i = c["hidden_size"], c["num_attention_heads"] * 128, c["num_key_value_heads"] * 128, \
        c["intermediate_size"]
    projections = {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * i, h), "down": (h, i)}
    if tiny:
        projections = {"qkv": (40, 200), "down": (70, 260)}
    cases = TINY_KERNEL_CASES if tiny else KERNEL_CASES
    # the op on the GPU; on the CPU the op is the plain-torch reference, so the Triton kernels
    # are called themselves (the interpreter)
    op = torch.ops.qwen3_aot.fp8_linear if device.type == "cuda" else \
        (lambda x, w, s, act_quant, _block: fp8.fp8_linear_triton(x, w, s, act_quant))
    out = []
    g = torch.Generator(device).manual_seed(0)
    for name, (n, k) in projections.items():
        w16 = (torch.randn(n, k, generator=g, device=device) / k ** 0.5).to(torch.bfloat16)
        wq, block_scale = quantize_block_fp8(w16)
        scale = block_scale.repeat_interleave(128, 0)[:n].contiguous()
        block = rows_repeat_by_block(scale)
        for m, act_quant in cases:
            x = torch.randn(m, k, generator=g, device=device).to(torch.bfloat16)
            cublas = fp8.cublas_gemm_chosen(x.device, x.dtype, wq.shape, act_quant, block)
            got = op(x, wq, scale, act_quant, block)
            xo = fp8.dequantize(*fp8.quantize_groups_reference(x)) if act_quant else x.double()
            oracle = torch.nn.functional.linear(xo, fp8.dequantize(wq, scale))
            r = {"shape": shape, "projection": name, "N": n, "K": k, "M": m,
                 "kernel": ("cuBLAS gemm" if cublas else "gemm") + " (activations quantized)" if act_quant
                 else ("rows" if m <= fp8.ROWS_KERNEL_MAX else "tiles") + " (weight-only)",
                 "rel_err": rel(got, oracle), "reference_rel_err": rel(fp8.fp8_linear_reference(x, wq, scale,
                                                                                                  act_quant), oracle)}
            r["ok"] = r["rel_err"] <= 1.25 * r["reference_rel_err"] + 2 ** -8
            if device.type == "cuda":
                copies = [(w16.clone(), wq.clone(), scale.clone()) for _ in range(max(2, -(-L2_ROTATION // w16.nbytes)))]
                bf16 = small_linear_triton if m <= 4 else torch.nn.functional.linear
                r["fp8_us"] = gpu_time_us(lambda c: op(x, c[1], c[2], act_quant, block), copies)
                r["bf16_us"] = gpu_time_us(lambda c: bf16(x, c[0]), copies)
                r["fp8_weight_GBps"] = (wq.nbytes + scale.nbytes) / r["fp8_us"] / 1e3
                r["bf16_weight_GBps"] = w16.nbytes / r["bf16_us"] / 1e3
                if not act_quant and m > fp8.ROWS_KERNEL_MAX:
                    r["tiles_us"] = {f"{bn}x{st}": gpu_time_us(lambda c: fp8.fp8_weight_only_triton(
                        x, c[1], c[2], block_n=bn, stages=st), copies) for bn, st in TILES_SWEEP}
            out.append(r)
            print(f"  kernel {name} {n}x{k} M={m}: {r['kernel']}, rel err {r['rel_err']:.2e} (reference "
                  f"{r['reference_rel_err']:.2e}) {'ok' if r['ok'] else 'FAILED'}"
                  + (f", {r['fp8_us']:.1f} us against bf16 {r['bf16_us']:.1f} us" if "fp8_us" in r else "")
                  + (f"; tiles (BLOCK_N x stages) {r['tiles_us']}" if "tiles_us" in r else ""), flush=True)
    return out


def gpu_time_us(call, copies: list) -> float:
    """GPU time of one call in microseconds, as the graphs run it: replayed from a CUDA graph
    (timing eager launches measures the host's launch cost, hundreds of microseconds for a
    Triton kernel launched from Python, which the artifact's graphs do not pay), each call on
    the next copy of the weights, so that they come from HBM as in a decode step, not from L2."""
    from triton.testing import do_bench_cudagraph

    turn = iter(range(1 << 62))
    return do_bench_cudagraph(lambda: call(copies[next(turn) % len(copies)])) * 1e3


# ---- building ----

def write_fp8_checkpoint(path: Path, hf: dict, device: torch.device) -> dict:
    """The seeded random checkpoint of family_bench.write_checkpoint (same draws) written as Qwen's
    block FP8 (--quantize fp8's rule, each projection quantized on `device` as drawn), sharded:
    Qwen3-32B's is 33 GB, where its bf16 one (65 GB) and an artifact do not fit a 64 GiB disk."""
    from safetensors.torch import save_file

    from qwen3_aot.config import Qwen3Config
    from qwen3_aot.quantization import quantize_block_fp8, scale_names, BUILT
    from qwen3_aot.random_checkpoint import QWEN3_0_6B_K_NORM_MAX, random_tensor
    from qwen3_aot.weights import hf_shapes

    shapes = list(hf_shapes(Qwen3Config.from_hf_dict(hf)).items())
    fp8 = scale_names(BUILT, [n for n, _ in shapes])
    path.mkdir(parents=True, exist_ok=True)
    weight_map, shard, size, nbytes, k, t = {}, {}, 0, 0, 0, time.perf_counter()

    def flush() -> None:
        nonlocal shard, size, k
        k += 1
        save_file(shard, str(path / f"model-{k:05d}.safetensors"), metadata={"format": "pt"})
        weight_map.update({n: f"model-{k:05d}.safetensors" for n in shard})
        shard, size = {}, 0

    for i, (n, shape) in enumerate(shapes):
        g = torch.Generator(device).manual_seed(i)  # family_bench.write_checkpoint's seed 0 draws
        with torch.device(device):
            w = random_tensor(n, shape, QWEN3_0_6B_K_NORM_MAX, g).to(torch.bfloat16)
        parts = dict(zip((n, fp8[n]), (x.cpu() for x in quantize_block_fp8(w)))) if n in fp8 else {n: w.cpu()}
        shard.update(parts)
        size += sum(x.nbytes for x in parts.values())
        nbytes += sum(x.nbytes for x in parts.values())
        if size > family_bench.SHARD_BYTES:
            flush()
    if shard:
        flush()
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": nbytes}, "weight_map": weight_map}))
    config = {**hf, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                            "weight_block_size": [128, 128]}}
    (path / "config.json").write_text(json.dumps(config, indent=1))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": hf["bos_token_id"],
                                                             "eos_token_id": hf["eos_token_id"]}))
    return {"bytes": nbytes, "shards": k, "seconds": time.perf_counter() - t}


# set by --no-fp8-verify: the FP8 build's verify holds the eager model and the artifact at once (32B: about
# 66 GB of FP8 weights, plus a float64 lm_head), which an 80 GB H100 may not fit
FP8_VERIFY = True


def build(ckpt: Path, art: Path, device: str, tiny: bool, fp8_weights: bool, fp8_checkpoint: bool = False) -> dict:
    """scripts/export.py as a user runs it: bf16 with --weights link, FP8 with --quantize fp8 (an FP8
    checkpoint: --weights link, nothing to quantize)."""
    limits = ["--max-num-tokens", "256", "--max-model-len", "512"] if tiny else []
    # bf16's verify is the established build's; FP8's is kept: it is its check against float64 on the GPU
    how = ["--weights", "link"] if fp8_checkpoint else ["--quantize", "fp8"] if fp8_weights else \
        ["--weights", "link", "--no-verify"]
    if fp8_weights and not FP8_VERIFY:
        how.append("--no-verify")
    cmd = [sys.executable, str(REPO / "scripts/export.py"), str(ckpt), "-o", str(art), "--device", device,
           "--force", *how, *limits]
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    stages, verify = {}, None
    for line in p.stderr:
        print(line, end="", file=sys.stderr, flush=True)
        m = family_bench.STAGE_LINE.match(line)
        if m:
            stages[m["stage"]] = float(m["s"])
        if line.startswith("[verify] compiled"):
            verify = line.strip()
    if p.wait():
        raise Qwen3AotError(f"the export of {ckpt} failed (exit {p.returncode}); its log is above.")
    return {"build_s": time.perf_counter() - t, "stages_s": stages, "verify": verify,
            "artifact_GB": sum(f.stat().st_size for f in art.rglob("*") if f.is_file()) / 1e9}


# ---- measuring ----

def measure(art: Path, plan: workloads.Plan, device: torch.device) -> dict:

    man = json.loads((art / "manifest.json").read_text())
    r: dict = {"gemm": man.get("quantization", {}).get("gemm")}  # the FP8 GEMM the artifact was built with
    r.update(start_up_figures(art))
    weight_bytes = r.pop("weight_bytes")
    bandwidth = copy_bandwidth(device)
    vocab = man["model_config"]["vocab_size"]
    system, ours = bench_systems.measure(lambda: bench_systems.Ours(bench_systems.load_ours(art, plan), "ours"), plan,
                                         vocab)
    r["workload"] = workloads.run_workload(system.engine, plan, vocab)
    print(f"  nano-vllm workload: {r['workload']['tok_s']:.0f} tok/s", flush=True)
    if system.engine.graphs is not None:
        r["small_batch_sizes"] = list(system.engine.graphs.small_batch_sizes)
    del system
    free_memory()
    r.update(default_kv_cache(art))
    sizes = model_sizes(man["model_config"], weight_bytes, parse_dtype(man["dtype"]))
    context = plan.prompt_len + plan.new_tokens / 2
    r["decode"] = {b: {"tok_s": d["tok_s"], "floor_tok_s": b / decode_floor_ms(sizes, b, context, bandwidth) * 1e3}
                   for b, d in ours["decode"].items()}
    r["prefill_ms"] = ours["prefill_ms"]
    r["peak_memory_GB"], r["weight_GB"] = ours["peak_memory_GB"], weight_bytes / 1e9
    return r


def default_kv_cache(art: Path) -> dict:
    """The KV cache a user's load gets (runtime's defaults: 90% of the GPU less the weights and
    the largest step's peak; no CUDA graphs, which this does not run): 32B's goal is >= 20 GB on
    an 80 GB H100."""
    from qwen3_aot import runtime

    core = runtime.load_core(art, verify_files=False, cuda_graphs=False)
    out = {"default_kv_cache_GB": sum(t.nbytes for t in (*core.cache.k, *core.cache.v)) / 1e9,
           "default_kv_cache_tokens": core.cache.capacity}
    del core
    free_memory()
    print(f"  default KV cache: {out['default_kv_cache_GB']:.1f} GB, {out['default_kv_cache_tokens']} tokens", flush=True)
    return out


def qwen_tokenizer(tokenizer: Path | None) -> Path:
    """`tokenizer`, or Qwen's tokenizer.json made from the dashscope wheel (once, cached)."""
    if tokenizer is not None:
        return tokenizer
    from qwen_checkpoint import dashscope_wheel, write_qwen_tokenizer_json

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen3-aot-bench"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "qwen3-tokenizer.json"
    if not path.is_file():
        write_qwen_tokenizer_json(dashscope_wheel(cache), path)
    return path


def text_ids(tokenizer: Path | None, positions: int) -> list[int]:
    """`positions` tokens of real English text (this repository's docs) through Qwen's tokenizer."""
    from tokenizers import Tokenizer

    tokenizer = qwen_tokenizer(tokenizer)
    text = "\n".join((REPO / f).read_text() for f in ("README.md", "docs/ARCHITECTURE.md", "BENCHMARKS.md"))
    ids = Tokenizer.from_file(str(tokenizer)).encode(text).ids
    assert len(ids) >= positions, "not enough text"
    return ids[:positions]


def accuracy(ckpt: Path, bf16_art: Path | None, fp8_art: Path, ids: list[int], device: torch.device,
             quantize: bool) -> dict:
    """Logits of every position of `ids` (one prefill), compared as the module's docstring says
    (bf16_art None: no bf16 artifact to compare with; quantize: the checkpoint is bf16, and the
    eager models quantize it as --quantize fp8 does)."""
    from qwen3_aot.build import reference
    from qwen3_aot.custom_ops.fp8_linear import dequantize, fp8_linear_reference
    from qwen3_aot.driver import FlatBatchDriver
    from qwen3_aot.model import Qwen3ForCausalLM
    from qwen3_aot.quantization import SCALE_SUFFIX
    from qwen3_aot.runtime import load_forward

    def logits(forward, cfg, dtype) -> torch.Tensor:
        with torch.inference_mode():
            return FlatBatchDriver(forward, cfg, dtype, device).logits([ids])[0].double().cpu()

    model = Qwen3ForCausalLM.from_pretrained(ckpt, dtype="bfloat16", device=device,
                                             quantize="fp8" if quantize else None)
    cfg = model.config
    ids = [i % cfg.vocab_size for i in ids]  # --tiny: the fixture tokenizer's added tokens lie past its 512 rows
    ref = logits(reference.Float64Forward(model), cfg, torch.float64)
    act_only_ops = types.SimpleNamespace(**{**vars(reference.FLOAT64_OPS), "fp8_linear": fp8_linear_reference})
    plain_ops, reference.FLOAT64_OPS = reference.FLOAT64_OPS, act_only_ops
    try:  # float64 with the activations quantized as the GEMM quantizes them: their own error
        act_quantized = logits(reference.Float64Forward(model), cfg, torch.float64)
    finally:
        reference.FLOAT64_OPS = plain_ops
    fp8_eager = logits(model, cfg, torch.bfloat16)
    with torch.no_grad():  # the bf16 eager model of the same dequantized weights
        for layer in model.layers:
            for name in [n[: -len(SCALE_SUFFIX)] for n, _ in layer.named_parameters() if n.endswith(SCALE_SUFFIX)]:
                w = dequantize(getattr(layer, name), getattr(layer, name + SCALE_SUFFIX), torch.float32)
                setattr(layer, name, torch.nn.Parameter(w.to(torch.bfloat16), requires_grad=False))
                delattr(layer, name + SCALE_SUFFIX)
    bf16_dequantized = logits(model, cfg, torch.bfloat16)
    del model
    free_memory()
    fwd = load_forward(fp8_art)
    fp8_artifact = logits(fwd, cfg, torch.bfloat16)
    del fwd
    free_memory()
    against = lambda x: {"rel_err": rel(x, ref), "top1": top1(x, ref)}  # noqa: E731
    out = {"positions": len(ids), "vs_float64_of_dequantized": {
        "fp8_artifact": against(fp8_artifact), "fp8_eager": against(fp8_eager),
        "bf16_eager_dequantized": against(bf16_dequantized), "activation_quantization_only": against(act_quantized)}}
    if bf16_art is not None:
        fwd = load_forward(bf16_art)
        bf16_artifact = logits(fwd, cfg, torch.bfloat16)
        del fwd
        free_memory()
        out["fp8_vs_bf16_artifact"] = {"kl": kl(bf16_artifact, fp8_artifact), "top1": top1(fp8_artifact, bf16_artifact),
                                       "rel_err": rel(fp8_artifact, bf16_artifact)}
    return out


# ---- a shape ----

def run_shape(shape: str, stage: str, work: Path, device: torch.device, tiny: bool, tokenizer: Path | None,
              builds: tuple[str, ...] = ("bf16", "fp8"), fp8_checkpoint: bool = False, parallel: bool = False) -> dict:
    """fp8_checkpoint: the checkpoint written in block FP8 and linked, no bf16 artifact (32B on 64 GiB);
    parallel: the builds at once (their build times then share the machine: not each one's own)."""
    hf = family_bench.config("tiny", "bfloat16") if tiny else {**family_bench.config("8B", "bfloat16"),
                                                               **SHAPES[shape]}
    root = work / shape
    ckpt, record = root / "checkpoint", root / "record.json"
    arts = {"fp8": root / "fp8"} if fp8_checkpoint else {"bf16": root / "bf16", "fp8": root / "fp8"}
    r: dict = json.loads(record.read_text()) if stage != "all" and record.is_file() else {"shape": shape}
    if stage in ("build", "all"):
        if not (ckpt / INDEX).is_file():
            print(f"[{shape}] writing the {'FP8 ' if fp8_checkpoint else ''}checkpoint", flush=True)
            r["checkpoint"] = (write_fp8_checkpoint if fp8_checkpoint else family_bench.write_checkpoint)(ckpt, hf,
                                                                                                        device)
            if not tiny:  # the artifacts then stream text: bench/multiturn_prefix_bench.py --artifact serves them
                shutil.copy(qwen_tokenizer(tokenizer), ckpt / "tokenizer.json")
        todo = [name for name in arts if name in builds]
        # parallel: each export is its own process, mostly CPU-bound compiling; together they fit
        # one call of the GPU machine where one after the other would take two
        with ThreadPoolExecutor(max(1, len(todo)) if parallel else 1) as pool:
            done = pool.map(lambda name: build(ckpt, arts[name], device.type, tiny, name == "fp8", fp8_checkpoint),
                            todo)
            for name, b in zip(todo, done):
                r[name] = {**b, "built_in_parallel_with": [n for n in todo if n != name] if parallel else []}
                print(f"[{shape}] {name} build {r[name]['build_s']:.0f} s {r[name]['stages_s']}", flush=True)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(r))
    if stage in ("measure", "all"):
        arts = {name: art for name, art in arts.items() if name in builds}
        if not all((a / "manifest.json").is_file() for a in arts.values()):
            raise Qwen3AotError(f"{shape}: no artifacts in {root}: run --stage build first, back to back.")
        for name, art in arts.items():
            print(f"[{shape}] measuring {name}", flush=True)
            r[name] = {**r.get(name, {}), **measure(art, TINY_PLAN if tiny else PLAN, device)}
            print(json.dumps({"measured": name, **r[name]}), flush=True)  # kept in the log if a later part times out
        record.write_text(json.dumps(r))
        try:  # the measures above are kept whatever happens here (a tokenizer that cannot be made, memory)
            if "fp8" not in arts:
                raise Qwen3AotError("no FP8 artifact measured: nothing to compare")
            r["accuracy"] = accuracy(ckpt, arts.get("bf16"), arts["fp8"],
                                     text_ids(tokenizer, 64 if tiny else TEXT_POSITIONS), device, not fp8_checkpoint)
            print(f"[{shape}] accuracy {json.dumps(r['accuracy'])}", flush=True)
        except Exception as e:  # noqa: BLE001  (reported in the JSON and the table)
            r["accuracy_error"] = f"{type(e).__name__}: {e}"[:2000]
            print(f"[{shape}] accuracy failed: {r['accuracy_error']}", flush=True)
        shutil.rmtree(root)
    return r


def report(results: list[dict], kernels: list[dict]) -> None:
    if kernels:
        print("\nkernel          N x K          M   kernel                       rel err  (ref)     fp8 us  bf16 us")
        for k in kernels:
            print(f"{k['shape']:>5s} {k['projection']:8s} {k['N']:>6d}x{k['K']:<6d} {k['M']:>4d}   {k['kernel']:28s}"
                  f" {k['rel_err']:.2e} ({k['reference_rel_err']:.2e}) "
                  + (f"{k['fp8_us']:8.1f} {k['bf16_us']:8.1f}" if "fp8_us" in k else "")
                  + ("  tiles' fastest {0} {1:.1f}".format(*min(k["tiles_us"].items(), key=lambda i: i[1]))
                     if "tiles_us" in k else "")
                  + ("" if k["ok"] else "  FAILED"))
    fmt = lambda v: "-" if v is None else f"{v:.2f}" if v < 100 else f"{v:.0f}"  # noqa: E731
    print(f"\n{'shape':6s}{'dtype':>6s}{'build s':>9s}{'load s':>8s}{'1st tok s':>10s}{'b1 tok/s (floor)':>18s}"
          f"{'b64 tok/s (floor)':>19s}{'workload tok/s':>16s}{'peak GB':>9s}{'weights GB':>12s}{'KV GB':>7s}")
    for r in results:
        for name in ("bf16", "fp8"):
            d = r.get(name)
            if not d:  # not built (32B: FP8 only)
                continue
            dec = {int(b): v for b, v in d.get("decode", {}).items()}
            cells = [fmt(d.get("build_s")), fmt(d.get("load_forward_s")), fmt(d.get("ttft", {}).get("total_s"))]
            cells += [f"{fmt(dec[b]['tok_s'])} ({fmt(dec[b]['floor_tok_s'])})" if b in dec else "-"
                      for b in (sorted(dec) + [None, None])[:2]]  # the plan's two batches, "-" if not measured
            cells += [fmt(d.get("workload", {}).get("tok_s")), fmt(d.get("peak_memory_GB")), fmt(d.get("weight_GB")),
                      fmt(d.get("default_kv_cache_GB"))]
            widths = [9, 8, 10, 18, 19, 16, 9, 12, 7]
            print(f"{r['shape']:6s}{name:>6s}" + "".join(f"{c:>{w}s}" for c, w in zip(cells, widths)))
    for r in results:
        if "accuracy" in r:
            a = r["accuracy"]
            v = a["vs_float64_of_dequantized"]
            print(f"{r['shape']}: against float64 of the dequantized weights over {a['positions']} positions "
                  "(rel err, top-1): " + ", ".join(f"{k} {x['rel_err']:.2e} {x['top1']:.3f}" for k, x in v.items()))
            b = a.get("fp8_vs_bf16_artifact")
            if b:
                print(f"{r['shape']}: FP8 against the bf16 artifact: KL {b['kl']:.2e}, top-1 {b['top1']:.3f}, "
                      f"rel err {b['rel_err']:.2e}")
        if "accuracy_error" in r:
            print(f"{r['shape']}: accuracy not measured: {r['accuracy_error']}")
        if any(r.get(name, {}).get("built_in_parallel_with") for name in ("bf16", "fp8")):
            print(f"{r['shape']}: the builds ran at once: their build s share the machine")
        for name in ("bf16", "fp8"):
            if r.get(name, {}).get("verify"):
                print(f"{r['shape']} {name}: {r[name]['verify']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="0.6B", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--stage", choices=["all", "build", "measure", "kernels"], default="all",
                    help="all: kernels, write, build, measure, delete; or one part (8B and up: build, then measure)")
    ap.add_argument("--builds", default="bf16,fp8",
                    help="which artifacts --stage build makes (8B and up: one call each, back to back) and "
                         "--stage measure measures")
    ap.add_argument("--fp8-checkpoint", action="store_true",
                    help="write the checkpoint in block FP8 and link it; FP8 only (32B: 33 GB, where bf16's 65 GB and "
                         "a second artifact do not fit the GPU machine's 64 GiB disk)")
    ap.add_argument("--no-fp8-verify", action="store_true",
                    help="build FP8 without the build's verify (see FP8_VERIFY)")
    ap.add_argument("--parallel-builds", action="store_true",
                    help="--stage build runs the builds at once (8B, 14B: both in one call; build times shared)")
    ap.add_argument("--no-kernel-checks", action="store_true",
                    help="--stage measure without the kernel checks (when they ran in the same session already)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qwen3_aot_fp8"))
    ap.add_argument("--tokenizer", type=Path, default=None, help="Qwen's tokenizer.json (default: made from dashscope)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU (a smoke run)")
    a = ap.parse_args()
    global FP8_VERIFY
    FP8_VERIFY = not a.no_fp8_verify
    shapes = ["tiny"] if a.tiny else [s.strip() for s in a.shapes.split(",")]
    unknown = set(shapes) - set(SHAPES) - {"tiny"}
    if unknown:
        raise SystemExit(f"unknown shapes {sorted(unknown)}; use {', '.join(SHAPES)}")
    device = torch.device("cpu" if a.tiny else "cuda")
    if a.tiny:  # the tiny model's vocabulary is the fixture's (512 tokens), not Qwen's
        a.tokenizer = a.tokenizer or REPO / "tests/fixtures/tiny-qwen3/tokenizer.json"
    print(json.dumps({**system_info(device), "shapes": shapes, "stage": a.stage,
                      "QWEN3_AOT_FP8_GEMM": os.environ.get("QWEN3_AOT_FP8_GEMM")}), flush=True)
    a.work.mkdir(parents=True, exist_ok=True)
    kernels, results = [], []
    if a.stage in ("all", "kernels", "measure") and not a.no_kernel_checks:
        for shape in shapes:
            try:
                kernels += kernel_checks(shape, device, a.tiny)
            except Exception as e:  # noqa: BLE001  (a kernel that does not compile here: say so, measure the rest)
                kernels.append({"shape": shape, "projection": "-", "N": 0, "K": 0, "M": 0, "kernel": "-",
                                "rel_err": float("inf"), "reference_rel_err": 0.0, "ok": False,
                                "error": f"{type(e).__name__}: {e}"[:2000]})
                print(f"  kernel checks failed: {kernels[-1]['error']}", flush=True)
    for shape in shapes if a.stage != "kernels" else []:
        results.append(run_shape(shape, a.stage, a.work, device, a.tiny, a.tokenizer,
                                 tuple(b.strip() for b in a.builds.split(",")), a.fp8_checkpoint,
                                 a.parallel_builds))
        if a.json:  # after each shape: a later shape's failure keeps the earlier ones
            a.json.write_text(json.dumps({**system_info(device), "kernels": kernels, "results": results}, indent=1))
    if a.json:
        a.json.write_text(json.dumps({**system_info(device), "kernels": kernels, "results": results}, indent=1))
    report(results, kernels)
    if not all(k["ok"] for k in kernels):
        raise SystemExit("an FP8 kernel is further from float64 than its bound: see FAILED above")


if __name__ == "__main__":
    main()
