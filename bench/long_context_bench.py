"""Long context with YaRN (issue 33): Qwen3 shapes stretched to 131,072 tokens, prefill and
decode at 32k to 128k through the compiled artifact.

For one shape (seeded random bf16 weights, Qwen3's config with YaRN factor 4 over its 32,768
trained positions), the artifact is built as a user would (`export --rope-scaling ...
--max-model-len 131072`, weights linked, the build's float64 check skipped: it is tested in CI
and costs minutes at 8B), loaded with `qwen3_aot.runtime.load_forward`, and driven directly:
- prefill: one prompt of 32k, 64k and 128k tokens, in chunks of the artifact's token budget
  (--chunk, 8192: the engine's default step) as the engine's chunked prefill runs it; time to
  first token (every chunk, then the last row's logits on the host; no tokenizer or
  scheduler), prefill tokens/s, against a flash-attention-class reference: SDPA's flash
  backend on the same causal shapes (one layer, times the layers; k and v expanded to the
  query heads) plus the same projections (cuBLAS GEMMs of the chunk, times chunks and layers).
  Goal: no worse than 1.3x that reference at 128k.
- decode: one step of batch 1 and 16 at 128k contexts, as CUDA-graph replays (as the
  engine's DecodeGraphs; at batch 1 also the small-batch graph where the artifact has one,
  the faster reported, as the engine picks), tokens/s against the floor: the weights plus the
  KV bytes a step reads, over the measured copy bandwidth (read + write counted, as
  BENCHMARKS.md's floors). Goal: within 80% of the floor at 128k.
  Sixteen distinct 128k contexts need 16 x 15 GB (0.6B) or 16 x 19 GB (8B) of KV, more than
  an H200 holds: batch 16 at 128k is sixteen sequences over one shared 128k context (each its
  own last block, as a prefix cache shares full blocks), its floor counting the shared bytes
  once; beside it batch 16 over distinct contexts as long as the GPU holds (up to 32k).
- peak GPU memory of each phase (torch's allocator: the compiled graph allocates through it).
The decode graphs are captured plainly: the engine's DecodeGraphs also makes the edges into the
small-batch kernels programmatic on Hopper (+7% at batch 1 on the 0.6B shape, BENCHMARKS.md),
which this leaves out.

    PYTHONPATH=src python bench/long_context_bench.py --shape 0.6B --json $OUT/long_context_0.6B.json
    PYTHONPATH=src python bench/long_context_bench.py --shape 8B --json $OUT/long_context_8B.json
    PYTHONPATH=src python bench/long_context_bench.py --tiny     # a tiny shape on the CPU (smoke run)

Each shape is one call of under 10 minutes (8B: checkpoint ~1 min, build ~3-4 min, measures
~1 min); everything it writes lives in a temporary directory removed at the end (8B: 16.4 GB
of checkpoint, the artifact hard-links it). Imports qwen3_aot, torch and safetensors only.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from qwen3_aot.build import GraphLimits, export
from qwen3_aot.config import Qwen3Config
from qwen3_aot.weights import INDEX, hf_shapes

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}  # Qwen3's documented
# Qwen3's config.json facts (head_dim 128, 8 KV heads, vocab 151,936, rope_theta 1e6)
COMMON = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, num_key_value_heads=8,
              head_dim=128, max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6, hidden_act="silu",
              attention_bias=False, bos_token_id=151643, eos_token_id=151645, dtype="bfloat16")
SHAPES = {
    "0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 tie_word_embeddings=True),
    "8B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               tie_word_embeddings=False),
}
# the CPU smoke run: YaRN factor 4 over 64 positions, so its 256 positions cross the original context
TINY = dict(COMMON, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=160, tie_word_embeddings=True,
            dtype="float32")
TINY_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
BLOCK = 16
SHARD_BYTES = 4 << 30
DISTINCT_MAX = 32768  # batch 16 over distinct contexts: up to this long, as the GPU's memory allows
K_NORM_MAX = 96.5     # Qwen3-0.6B's largest k_norm weight: the scale the attention must survive


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the checkpoint and the artifact ----

def draw(name: str, shape: tuple[int, ...], device: str, g: torch.Generator) -> torch.Tensor:
    """qwen3_aot.random_checkpoint's recipe, drawn on `device` (the 8B shape's 8e9 numbers take
    seconds on a GPU, minutes on one CPU core)."""
    if name.endswith("k_norm.weight"):
        t = (torch.randn(shape, device=device, generator=g) * 9.1 + 3.6).abs()
        t[0] = K_NORM_MAX
        return t
    if name.endswith("q_norm.weight"):
        return torch.empty(shape, device=device).uniform_(0.1, 0.3, generator=g)
    if name.endswith("norm.weight"):
        return 1 + 0.2 * torch.randn(shape, device=device, generator=g)
    return torch.randn(shape, device=device, generator=g) / math.sqrt(shape[-1])


def write_checkpoint(path: Path, hf: dict, device: str) -> float:
    """Seeded random weights in safetensors shards of up to 4 GiB with their index; returns GB written."""
    cfg = Qwen3Config.from_hf_dict(hf)
    dtype = getattr(torch, hf["dtype"])
    g = torch.Generator(device=device).manual_seed(0)
    path.mkdir(parents=True)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    written = 0

    def flush() -> None:
        nonlocal written
        if shard:
            name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            written += sum(t.nbytes for t in shard.values())
            shard.clear()

    for name, shape in hf_shapes(cfg).items():
        t = draw(name, shape, device, g).to(dtype).cpu()
        if shard and sum(x.nbytes for x in shard.values()) + t.nbytes > SHARD_BYTES:
            flush()
        shard[name] = t
    flush()
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": written}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(hf, indent=1))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": hf["bos_token_id"],
                                                             "eos_token_id": hf["eos_token_id"]}))
    return written / 1e9


# ---- timing ----

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of fn() (synchronised), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device copy, read and write counted (BENCHMARKS.md's floors use it)."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)
    x = torch.randn(n, device=device)
    y = torch.empty_like(x)
    return 2 * x.nbytes / seconds(lambda: y.copy_(x), device, repeats=10, warmup=2)


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


# ---- the measurements ----

class Bench:
    def __init__(self, forward, cfg: Qwen3Config, dtype: torch.dtype, device: torch.device, max_len: int,
                 chunk: int, num_blocks: int) -> None:
        self.fwd, self.cfg, self.dtype, self.device = forward, cfg, dtype, device
        self.max_len, self.chunk = max_len, chunk
        self.cols = -(-max_len // BLOCK)  # the block table's width: the artifact's blocks per sequence
        shape = (num_blocks, BLOCK, cfg.num_key_value_heads, cfg.head_dim)
        # whole, fresh tensors (AOTInductor clones an input it cannot prove aligned); zeros: the
        # decode timings do not depend on the values, and no NaN of uninitialised memory
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.num_blocks = num_blocks
        self.g = torch.Generator().manual_seed(1)

    def table(self, rows: list[list[int]]) -> torch.Tensor:
        t = torch.zeros(len(rows), self.cols, dtype=torch.int32)
        for i, r in enumerate(rows):
            t[i, :len(r)] = torch.tensor(r, dtype=torch.int32)
        return t.to(self.device)

    def prefill(self, length: int) -> float:
        """Seconds to the first token of one prompt of `length` tokens (blocks 0.. of the cache), chunked."""
        table = self.table([list(range(-(-length // BLOCK)))])
        ids = torch.randint(0, self.cfg.vocab_size, (length,), generator=self.g).to(self.device)
        chunks = []
        for start in range(0, length, self.chunk):
            n = min(self.chunk, length - start)
            chunks.append((ids[start:start + n], torch.arange(start, start + n, device=self.device),
                           torch.zeros(n, dtype=torch.int32, device=self.device),
                           torch.tensor([n - 1], device=self.device)))
        sync(self.device)
        t0 = time.perf_counter()
        for tokens, pos, seq, last in chunks:
            logits = self.fwd(tokens, pos, seq, table, last, self.k, self.v)
        logits.argmax(-1).cpu()  # the first token on the host
        return time.perf_counter() - t0

    def decode_step(self, graph, tables: list[list[int]], position: list[int]) -> float:
        """Seconds per decode step of len(tables) sequences (one token each at `position`),
        replayed as a CUDA graph on a GPU, called directly on the CPU."""
        b = len(tables)
        inputs = (torch.randint(0, self.cfg.vocab_size, (b,), generator=self.g).to(self.device),
                  torch.tensor(position, device=self.device), torch.arange(b, dtype=torch.int32, device=self.device),
                  self.table(tables), torch.arange(b, device=self.device), self.k, self.v)
        if self.device.type != "cuda":
            return seconds(lambda: graph(*inputs), self.device, repeats=3)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                graph(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            graph(*inputs)
        replays = 20
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cuda_graph.replay()
        start.record()
        for _ in range(replays):
            cuda_graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / replays


def reference_prefill(cfg: Qwen3Config, length: int, chunk: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The flash-attention-class reference of a prefill: SDPA (flash backend on CUDA) over the
    causal [1, Hq, length, D] shapes, one layer timed and times the layers, plus the projections'
    GEMMs of each chunk (what the graph runs through cuBLAS), times chunks and layers."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    hq, d, h, i = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    qkv = [torch.randn(1, hq, length, d, dtype=dtype, device=device) for _ in range(3)]
    backend = SDPBackend.FLASH_ATTENTION if device.type == "cuda" else SDPBackend.MATH
    with sdpa_kernel(backend):
        attention = seconds(lambda: F.scaled_dot_product_attention(*qkv, is_causal=True), device)
    qkv.clear()  # 3 GB at 128k of the 8B shape: gone before the GEMMs
    w = {"qkv": (cfg.q_size + 2 * cfg.kv_size, h), "o": (h, cfg.q_size), "gate_up": (2 * i, h), "down": (h, i)}
    gemms = 0.0
    sizes = [min(chunk, length - s) for s in range(0, length, chunk)]
    for n in sorted(set(sizes)):
        per_layer = 0.0
        for out_features, in_features in w.values():
            x = torch.randn(n, in_features, dtype=dtype, device=device)
            weight = torch.randn(out_features, in_features, dtype=dtype, device=device)
            per_layer += seconds(lambda: F.linear(x, weight), device)
        gemms += per_layer * sizes.count(n)
    layers = cfg.num_hidden_layers
    return {"sdpa_attention_s": attention * layers, "projections_s": gemms * layers,
            "reference_s": (attention + gemms) * layers}


def weight_bytes_read(cfg: Qwen3Config, elem: int) -> int:
    """Bytes of weights a decode step reads: every matrix and norm once, the embedding as
    lm_head when tied (its looked-up rows are negligible when untied)."""
    shapes = hf_shapes(cfg)
    total = sum(math.prod(s) for s in shapes.values())
    if not cfg.tie_word_embeddings:
        total -= math.prod(shapes["model.embed_tokens.weight"])
    return total * elem


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: run with --tiny for the CPU smoke run")
    hf = TINY if args.tiny else dict(COMMON, **SHAPES[args.shape])
    yarn = TINY_YARN if args.tiny else YARN
    cfg = Qwen3Config.from_hf_dict(hf).with_rope_scaling(yarn)
    max_len = cfg.context_length  # 131,072 (tiny: 256)
    prefills = [int(x) for x in args.prefill.split(",")] if args.prefill else \
        ([64, 128, 256] if args.tiny else [32768, 65536, 131072])
    chunk = args.chunk or (64 if args.tiny else 8192)
    dtype = getattr(torch, hf["dtype"])
    elem = torch.finfo(dtype).bits // 8
    result: dict = {"shape": "tiny" if args.tiny else args.shape, "device": torch.cuda.get_device_name(device)
                    if device.type == "cuda" else "cpu", "torch": torch.__version__, "dtype": hf["dtype"],
                    "rope_scaling": cfg.rope_scaling, "max_model_len": max_len, "chunk": chunk}
    log(f"{result['device']}, torch {torch.__version__}; {result['shape']} with YaRN {yarn} -> {max_len} positions")
    work = Path(tempfile.mkdtemp(prefix="long_context_", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        gb = write_checkpoint(work / "ckpt", hf, str(device))
        result["checkpoint_s"], result["checkpoint_gb"] = time.perf_counter() - t0, gb
        log(f"[checkpoint] {gb:.2f} GB in {result['checkpoint_s']:.0f} s")
        log(f"[build] as: qwen3-aot export CKPT -o ART --rope-scaling '{json.dumps(yarn)}' --max-model-len {max_len}"
            f" --max-num-tokens {chunk} --weights link --no-verify")
        t0 = time.perf_counter()
        art = export(work / "ckpt", work / "artifact", device=device.type, weights="link", check=False,
                     limits=GraphLimits(max_model_len=max_len, max_num_tokens=chunk), rope_scaling=yarn, log=log)
        result["build_s"] = time.perf_counter() - t0
        man = json.loads((art / "manifest.json").read_text())
        assert man["model_config"]["rope_scaling"] == cfg.rope_scaling and man["limits"]["max_model_len"] == max_len

        from qwen3_aot.runtime import load_forward

        t0 = time.perf_counter()
        fwd = load_forward(art, device, run_single_threaded=device.type == "cuda", verify_files=False)
        result["load_s"] = time.perf_counter() - t0
        bw = copy_bandwidth(device)
        result["copy_bandwidth_gbs"] = bw / 1e9
        kv_token = 2 * cfg.num_hidden_layers * cfg.kv_size * elem  # K and V, every layer
        distinct = distinct_context(cfg, kv_token, max_len, args.tiny, device)
        # blocks: the 128k prompt, 16 own last blocks of the shared batch, then 16 distinct contexts
        shared_blocks = -(-max_len // BLOCK)
        num_blocks = shared_blocks + 16 + 16 * -(-distinct // BLOCK)
        result["kv_cache_gb"] = num_blocks * BLOCK * kv_token / 1e9
        peak_reset(device)
        bench = Bench(fwd, cfg, dtype, device, max_len, chunk, num_blocks)
        bench.prefill(min(2 * chunk, max_len))  # warm-up: first calls, the allocator's pools
        result["prefill"] = []
        for n in prefills:
            peak_reset(device)
            ttft = bench.prefill(n)
            peak = peak_gb(device)  # ours alone: before the reference allocates its own tensors
            ref = reference_prefill(cfg, n, chunk, dtype, device)
            row = {"tokens": n, "ttft_s": ttft, "tok_s": n / ttft, **ref, "vs_reference": ttft / ref["reference_s"],
                   "peak_gb": peak}
            result["prefill"].append(row)
            log(f"[prefill {n}] {ttft:.2f} s, {n / ttft:,.0f} tok/s; reference {ref['reference_s']:.2f} s "
                f"(SDPA {ref['sdpa_attention_s']:.2f} + projections {ref['projections_s']:.2f}): "
                f"{row['vs_reference']:.2f}x")
        result["decode"] = decode(bench, cfg, weight_bytes_read(cfg, elem), kv_token, bw, max_len, distinct,
                                  shared_blocks, 4 if args.tiny else 16)
        peaks = [r["peak_gb"] for r in result["prefill"] + result["decode"] if r["peak_gb"] is not None]
        result["peak_gb"] = max(peaks) if peaks else None  # our prefills' and decodes', not the reference's
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def distinct_context(cfg: Qwen3Config, kv_token: int, max_len: int, tiny: bool, device: torch.device) -> int:
    """The context of each of 16 distinct sequences: up to DISTINCT_MAX, as the GPU's free memory
    allows beside the shared 128k cache and ~8 GB of activations (a multiple of 4096 tokens)."""
    if tiny:
        return 64
    free, _ = torch.cuda.mem_get_info(device)
    room = free - (max_len + 16 * BLOCK) * kv_token - (8 << 30)
    return max(4096, min(DISTINCT_MAX, room // (16 * kv_token) // 4096 * 4096))


def decode(bench: Bench, cfg: Qwen3Config, weights: int, kv_token: int, bw: float, max_len: int, distinct: int,
           shared_blocks: int, batch: int) -> list[dict]:
    """Decode steps at batch 1 and `batch` over 128k contexts (the batch sharing one), and at
    `batch` over distinct contexts of `distinct` tokens; each against its bytes floor."""
    last = max_len - 1
    prefix = list(range(shared_blocks - 1))  # every full block of the prompt but the last
    own = [shared_blocks + i for i in range(batch)]  # each shared sequence's last block
    base = shared_blocks + batch
    per = -(-distinct // BLOCK)
    cases = [
        (f"batch 1, {_k(max_len)} context", [prefix + [shared_blocks - 1]], [last], max_len),
        (f"batch {batch}, one shared {_k(max_len)} context", [prefix + [own[i]] for i in range(batch)],
         [last] * batch, (shared_blocks - 1) * BLOCK + batch * (max_len - (shared_blocks - 1) * BLOCK)),
        (f"batch {batch}, distinct {_k(distinct)} contexts",
         [list(range(base + i * per, base + (i + 1) * per)) for i in range(batch)], [distinct - 1] * batch,
         batch * distinct),
    ]
    rows = []
    for name, tables, positions, kv_tokens in cases:
        peak_reset(bench.device)
        graphs = {"main": bench.fwd}
        small = getattr(bench.fwd, "small_batch_graph", None)
        if small is not None and len(tables) <= getattr(bench.fwd, "small_batch_max", 0):
            graphs["small-batch"] = small
        times = {g: bench.decode_step(fn, tables, positions) for g, fn in graphs.items()}
        graph = min(times, key=times.get)
        step = times[graph]
        floor = (weights + kv_tokens * kv_token) / bw
        row = {"case": name, "batch": len(tables), "context": positions[0] + 1, "graph": graph,
               "step_ms": step * 1e3, "tok_s": len(tables) / step, "floor_ms": floor * 1e3,
               "floor_tok_s": len(tables) / floor, "of_floor": floor / step, "kv_gb_read": kv_tokens * kv_token / 1e9,
               "weights_gb_read": weights / 1e9, "peak_gb": peak_gb(bench.device),
               "graphs_ms": {g: t * 1e3 for g, t in times.items()}}
        rows.append(row)
        log(f"[decode {name}] {step * 1e3:.2f} ms/step ({graph}), {row['tok_s']:,.0f} tok/s; floor "
            f"{floor * 1e3:.2f} ms: {row['of_floor']:.0%}")
    return rows


def table(result: dict) -> str:
    r = result
    lines = [f"{r['device']}, torch {r['torch']}, {r['shape']} {r['dtype']}, YaRN factor "
             f"{r['rope_scaling']['factor']:g} -> max_model_len {r['max_model_len']}, chunk {r['chunk']}; "
             f"build {r['build_s']:.0f} s, load {r['load_s']:.1f} s, copy {r['copy_bandwidth_gbs']:,.0f} "
             f"GB/s, KV cache {r['kv_cache_gb']:.1f} GB, peak {_gb(r['peak_gb'])}",
             "", "| prefill | TTFT s | tok/s | SDPA attn s | projections s | reference s | vs reference | peak GB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["prefill"]:
        lines.append(f"| {r['tokens']:,} | {r['ttft_s']:.3f} | {r['tok_s']:,.0f} | {r['sdpa_attention_s']:.3f} | "
                     f"{r['projections_s']:.3f} | {r['reference_s']:.3f} | {r['vs_reference']:.2f}x | "
                     f"{_gb(r['peak_gb'])} |")
    lines += ["", "| decode | graph | ms/step | tok/s | floor ms | floor tok/s | of floor | KV GB read | peak GB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["decode"]:
        lines.append(f"| {r['case']} | {r['graph']} | {r['step_ms']:.3f} | {r['tok_s']:,.0f} | {r['floor_ms']:.3f} | "
                     f"{r['floor_tok_s']:,.0f} | {r['of_floor']:.0%} | {r['kv_gb_read']:.2f} | {_gb(r['peak_gb'])} |")
    return "\n".join(lines)


def _k(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else f"{tokens}"


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.6B")
    ap.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU: a smoke run of every step")
    ap.add_argument("--prefill", default=None, help="prompt lengths, comma-separated (default 32768,65536,131072)")
    ap.add_argument("--chunk", type=int, default=None, help="prefill tokens per step: the artifact's max_num_tokens "
                                                             "(default 8192, the engine's step)")
    ap.add_argument("--workdir", default=None, help="where the temporary checkpoint and artifact go (default $TMPDIR)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
