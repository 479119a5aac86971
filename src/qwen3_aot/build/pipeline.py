"""Checkpoint directory -> artifact directory: load, export, compile, package, verify.

The artifact is written under a temporary name beside the output and renamed at the
end, so a failed or interrupted build leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file

from qwen3_aot import manifest
from qwen3_aot.build.aoti import compile_package
from qwen3_aot.build.graph import GraphLimits, export_forward, input_specs
from qwen3_aot.build.linked import WEIGHT_MODES, link_weights, linkable_files
from qwen3_aot.build.tensor_parallel import build_rank_graph, check_degree, write_shards
from qwen3_aot.config import Qwen3Config
from qwen3_aot.custom_ops.dependent_launch import DEPENDENT_KERNELS
from qwen3_aot.custom_ops.dependent_launch import enabled as dependent_launch_enabled
from qwen3_aot.custom_ops.fp8_linear import TILES_BLOCK_M, cublas_gemm_chosen
from qwen3_aot.driver import FlatBatchDriver
from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.model import Qwen3ForCausalLM
from qwen3_aot.runtime.forward.compiled import SMALL_BATCH_GRAPH
from qwen3_aot.weights import checkpoint_quantization, dtype_name

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja"]
# verify refuses a compiled graph whose error (against the float64 reference) exceeds
# VERIFY_RATIO x the eager model's error + VERIFY_FLOOR: the two differ by reassociation and
# fusion, so neither is exactly the other; a broken graph is off by O(1)
VERIFY_RATIO = 1.25
VERIFY_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# ONNX's check (build/onnx_export.verify_onnx) still bounds its difference from the eager model
VERIFY_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
SMALL_BATCH_FILE = "model_small.pt2"
# the largest decode batch the runtime may replay the small-batch graph for: its projections'
# cost grows with the rows, and past 4 cuBLAS wins each of them (BENCHMARKS.md, small_linear)
SMALL_BATCH_MAX = 4
# an FP8 artifact's: as many rows as its weight-only projections take in one tile, each weight
# read once (custom_ops/fp8_linear.py's tiles kernel), against the main graph's activation
# quantization and GEMM; DecodeGraphs still keeps it only for the batches it replays faster
FP8_SMALL_BATCH_MAX = TILES_BLOCK_M
# By default the small-batch graph is built for models narrower than this: its projections
# beat cuBLAS's at a few rows where a layer's matrices are small (the 0.6B shape, hidden
# 1024: batch 1 1.5x faster), and at the 8B shape (hidden 4096) the engine never replayed it
# (no batch ran faster), so its compile only lengthened the build (BENCHMARKS.md).
SMALL_BATCH_BELOW_HIDDEN = 4096
DECODE_STEPS = 2  # teacher-forced decode steps after the prefill: they read what it cached
HEARTBEAT_S = 10.0  # how often a running stage logs its elapsed time


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def stage(name: str, log: Callable[[str], None], heartbeat_s: float = HEARTBEAT_S) -> Iterator[None]:
    """Log the stage's start, its elapsed seconds every `heartbeat_s` while it runs (compile
    takes minutes on a large model, and a silent build looks hung), and its end."""
    log(f"[{name}] ...")
    t0 = time.perf_counter()
    ended = threading.Event()

    def heartbeat() -> None:
        while not ended.wait(heartbeat_s):
            log(f"[{name}] ... {time.perf_counter() - t0:.0f} s")

    beats = threading.Thread(target=heartbeat, name=f"qwen3-aot {name} heartbeat", daemon=True)
    beats.start()
    try:
        yield
    finally:
        ended.set()
        beats.join()
    log(f"[{name}] done in {time.perf_counter() - t0:.1f} s")


def resolve_device(device: str | None) -> str:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu"):
        raise Qwen3AotError(f"device {device!r} is not supported; use cuda or cpu.")
    if device == "cuda" and not torch.cuda.is_available():
        raise Qwen3AotError("--device cuda was asked for, but torch sees no CUDA GPU here; use --device cpu.")
    return device


def check_sequences(vocab_size: int, block_size: int, max_model_len: int) -> tuple[list[list[int]], list[list[int]]]:
    """Seeded random tokens: a batch of four lengths from 3 to 4 blocks + 5 (its last
    DECODE_STEPS tokens decoded one step at a time, through the split-K kernels), and a
    batch of more than SPLIT_TOKENS tokens in one step (the flash-attention tiles)."""
    from qwen3_aot.custom_ops.paged_attention import SPLIT_TOKENS

    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, vocab_size, (min(n, max_model_len),), generator=g).tolist()  # noqa: E731
    stepped = [rand(n) for n in (DECODE_STEPS + 1, block_size + 1, 2 * block_size + 3, 4 * block_size + 5)]
    one_step = [rand(SPLIT_TOKENS), rand(SPLIT_TOKENS // 2 + block_size + 1)]
    return stepped, one_step


def check_logits(driver: FlatBatchDriver, stepped: list[list[int]], one_step: list[list[int]]) -> torch.Tensor:
    """float64 logits of every row the check computes, in one order for every forward."""
    one = torch.cat(driver.logits(one_step))
    dev = driver.device
    table, blocks = driver.block_tables([len(s) for s in stepped])
    caches = driver.new_kv_cache(blocks)
    ids, pos, seq = driver.prefill_inputs([s[:-DECODE_STEPS] for s in stepped])
    rows = [one, driver.forward(ids, pos, seq, table, torch.arange(len(ids), device=dev), *caches)]
    every = torch.arange(len(stepped), device=dev)
    for j in range(DECODE_STEPS, 0, -1):
        tokens = torch.tensor([s[-j] for s in stepped], device=dev)
        positions = torch.tensor([len(s) - j for s in stepped], device=dev)
        rows.append(driver.forward(tokens, positions, every.to(torch.int32), table, every, *caches))
    return torch.cat([r.double() for r in rows])


def verify(artifact: Path, model: Qwen3ForCausalLM, log: Callable[[str], None]) -> tuple[float, float]:
    """Load the artifact as a service would; refuse it if its logits are clearly worse than
    the eager model's at the same dtype; returns (compiled error, eager error).

    Both are measured against `Float64Forward`, the same weights in float64 (see
    build/reference.py for why that and not an fp32 copy of the model): relative error
    ||got - ref|| / ||ref|| over every logit of the check's sequences (`check_sequences`).
    Two bf16 results differ from each other by about as much as each differs from float64,
    so comparing them directly refused correct artifacts; an artifact is refused only when
    non-finite or above VERIFY_RATIO x eager's error + VERIFY_FLOOR[dtype].
    The weights are not hashed here (verify_files=False): the build has just written them.
    """
    from qwen3_aot.build.reference import REFERENCE_DTYPE, Float64Forward
    from qwen3_aot.runtime import CompiledForward, load_forward

    man = manifest.read(artifact, verify_files=False)
    block_size = man["kv_cache"]["block_size"]
    cfg, dev = model.config, model.device
    seqs = check_sequences(cfg.vocab_size, block_size, man["limits"]["max_model_len"])
    with torch.inference_mode():
        ref = check_logits(FlatBatchDriver(Float64Forward(model), cfg, REFERENCE_DTYPE, dev, block_size), *seqs)
        eager = check_logits(FlatBatchDriver(model, cfg, model.dtype, dev, block_size), *seqs)
        compiled = load_forward(artifact, device=dev, verify_files=False)
        got = {"compiled": check_logits(FlatBatchDriver(compiled, cfg, model.dtype, dev, block_size), *seqs)}
        # a tensor-parallel forward has no small-batch graph; every row through it, prompts too: it takes any batch
        if isinstance(compiled, CompiledForward) and compiled.small_batch_graph is not None:
            small = FlatBatchDriver(compiled.small_batch_graph, cfg, model.dtype, dev, block_size)
            got["small-batch graph"] = check_logits(small, *seqs)
    err = lambda x: float((x - ref).norm() / ref.norm()) if torch.isfinite(x).all() else float("inf")  # noqa: E731
    err_eager = err(eager)
    errors = {name: err(x) for name, x in got.items()}
    bound = VERIFY_RATIO * err_eager + VERIFY_FLOOR[model.dtype]
    log(f"[verify] compiled vs eager, each against float64 (relative error of {len(ref)} rows of logits): "
        + ", ".join(f"{name} {e:.2e}" for name, e in errors.items())
        + f", eager {err_eager:.2e} (bound {bound:.2e} = {VERIFY_RATIO} x eager + {VERIFY_FLOOR[model.dtype]:.0e})")
    for name, e in errors.items():
        if not e <= bound:
            raise Qwen3AotError(f"the artifact ({name}) is less accurate than the eager model (relative error "
                                f"against float64: {name} {e:.2e}, eager {err_eager:.2e}, bound {bound:.2e}); the "
                                "build is not kept. Rebuild; if it persists, report it with this output.")
    return max(errors.values()), err_eager


def wants_small_batch_graph(option: bool | None, cfg: Qwen3Config, device: str, tensor_parallel: int | None,
                            formats: tuple[str, ...], fp8: bool = False) -> bool:
    """Whether a build compiles the small-batch graph: only for a one-process pt2 graph on
    CUDA (its kernels are Triton's; tensor-parallel ranks replay no CUDA graphs); `option`
    None decides by the model's width, except with FP8 weights: there its weight-only kernels
    are the path for decode batches up to FP8_SMALL_BATCH_MAX at every width (the main graph
    quantizes the activations and runs a GEMM tiled for many rows)."""
    if device != "cuda" or tensor_parallel is not None or "pt2" not in formats:
        return False
    if option is None:
        return fp8 or cfg.hidden_size < SMALL_BATCH_BELOW_HIDDEN
    return option


def fp8_gemm(model: Qwen3ForCausalLM, device: str) -> str:
    """The GEMM the graph's FP8 projections of many rows were traced with, for the manifest:
    "cublas" where the op takes cuBLAS's for some projection (the op's own predicate, asked as
    model.project calls it), else "triton"; an environment variable picks it at build time, so
    the artifact says which."""
    dev = torch.device(device)
    chosen = any(cublas_gemm_chosen(dev, model.dtype, getattr(layer, name).shape, True, True)
                 for layer in model.layers for name in layer.block_scaled)
    return "cublas" if chosen else "triton"


def check_quantized_build(checkpoint: Path, quantize: str | None, device: str, formats: tuple[str, ...],
                          weights: str, tensor_parallel: int | None) -> bool:
    """Whether the build has FP8 weights (a quantized checkpoint or --quantize fp8), refusing
    what FP8 cannot be built as yet; before any work."""
    quant = checkpoint_quantization(checkpoint, quantize)
    if quant is None:
        return False
    what = f"{checkpoint}'s {quant.method} weights" if quantize is None else "--quantize fp8"
    if formats != ("pt2",):
        raise Qwen3AotError(f"{what}: FP8 is built for the pt2 graph only (ONNX export has no FP8 projection); use "
                            "--format pt2.")
    if tensor_parallel is not None:
        raise Qwen3AotError(f"{what}: FP8 weights are not sharded for --tensor-parallel yet; drop it (FP8 halves the "
                            "weights: a model that needed two GPUs in bf16 may fit one).")
    if weights == "link" and quantize is not None:
        raise Qwen3AotError("--quantize fp8 writes new weights, and --weights link keeps the checkpoint's: use "
                            "--weights copy (or link an FP8 checkpoint, which needs no --quantize).")
    if device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        raise Qwen3AotError(f"{what}: FP8 needs a GPU of compute capability 8.9 or more (Ada, Hopper), this one is "
                            f"{torch.cuda.get_device_name()}; build from a bf16 checkpoint without --quantize.")
    return True


def export(checkpoint: str | Path, output: str | Path, device: str | None = None,
                    dtype: str | None = None, force: bool = False, limits: GraphLimits = GraphLimits(),
                    formats: tuple[str, ...] = ("pt2",), check: bool = True, weights: str = "copy",
                    tensor_parallel: int | None = None, small_batch_graph: bool | None = None,
                    rope_scaling: dict | None = None, quantize: str | None = None,
                    log: Callable[[str], None] = _log) -> Path:
    """Build an artifact from a Hugging Face Qwen3 checkpoint directory; returns its path.

    formats: "pt2" (the AOTInductor package, paged KV cache) and/or "onnx" (onnxruntime,
    past/present KV cache); both share the artifact's manifest and tokenizer files.
    weights: how the pt2 graph's weights are kept: "copy" (weights.safetensors, our names,
    fused at build time, any dtype) or "link" (the checkpoint's files hard-linked, fused at
    load: no second copy on disk; see build/linked.py).
    tensor_parallel: N ranks, each a worker process at load holding its shard of the weights
    and its KV heads (build/tensor_parallel.py); None: the one-process artifact. N = 1 builds
    the worker form with one rank, the same code as N > 1 (to check it on one GPU).
    small_batch_graph: on CUDA, also compile the forward's small-batch form (model_small.pt2,
    `model.small_batch_layers`, the same weights), which the runtime replays for the decode
    batches it runs faster (runtime/forward/decode_graphs.py); it adds its compile to the build.
    None: for models of hidden size under SMALL_BATCH_BELOW_HIDDEN, and every FP8 one.
    rope_scaling: replaces the checkpoint's RoPE scaling (config.json's rope_scaling form, e.g.
    YaRN {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, Qwen3's
    documented 131,072 tokens); None keeps the checkpoint's. Its resolved fields are recorded in
    the manifest's model_config, and limits.max_model_len 0 then means the stretched context.
    quantize: "fp8" quantizes a float checkpoint's projections to block FP8 (quantization.py);
    an FP8 checkpoint (Qwen's block FP8, compressed-tensors) is read as FP8 without it."""
    checkpoint, output = Path(checkpoint), Path(output)
    device = resolve_device(device)
    formats = tuple(dict.fromkeys(formats))
    if not formats or set(formats) - {"pt2", "onnx"}:
        raise Qwen3AotError(f"formats {formats} not understood; use pt2, onnx or pt2,onnx.")
    if weights not in WEIGHT_MODES:
        raise Qwen3AotError(f"--weights {weights!r} not understood; use {' or '.join(WEIGHT_MODES)}.")
    if weights == "link" and "pt2" not in formats:
        raise Qwen3AotError("--weights link is for the pt2 graph; an onnx-only artifact keeps its weights in "
                            "model.onnx.data. Drop --weights or add pt2 to --format.")
    if tensor_parallel is not None:
        check_degree(Qwen3Config.from_checkpoint(checkpoint), tensor_parallel)
        if weights != "copy" or formats != ("pt2",):
            raise Qwen3AotError("--tensor-parallel writes each rank's shard of the weights for the pt2 graph: use it "
                                "with --format pt2 and --weights copy (the defaults).")
    if rope_scaling is not None:  # refused before anything is loaded or written
        Qwen3Config.from_checkpoint(checkpoint).with_rope_scaling(rope_scaling)
    fp8 = check_quantized_build(checkpoint, quantize, device, formats, weights, tensor_parallel)
    if output.exists() and not force:
        raise Qwen3AotError(f"{output} already exists; pass --force to replace it.")
    t_start = time.perf_counter()
    tmp = output.parent / f".{output.name}.partial-{os.getpid()}"
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(output.parent, log)
    shards = linkable_files(checkpoint, output.parent, dtype) if weights == "link" else None
    shutil.rmtree(tmp, ignore_errors=True)
    with sigterm_raises():
        tmp.mkdir()
        try:
            small = wants_small_batch_graph(small_batch_graph, Qwen3Config.from_checkpoint(checkpoint), device,
                                            tensor_parallel, formats, fp8)
            written = _build(checkpoint, tmp, device, dtype, limits, formats, check, shards, tensor_parallel, small,
                             rope_scaling, log, quantize)
            _replace(tmp, output)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    manifest.remember_hashes(output, written)
    size = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    log(f"[done] {output} ({size / 1e6:.1f} MB) in {time.perf_counter() - t_start:.1f} s")
    return output


def _build(checkpoint: Path, tmp: Path, device: str, dtype: str | None, limits: GraphLimits,
           formats: tuple[str, ...], check: bool, shards: list[str] | None, tensor_parallel: int | None,
           small_batch: bool, rope_scaling: dict | None, log: Callable[[str], None],
           quantize: str | None = None) -> dict:
    """Every file of the artifact into `tmp`, checked; returns the manifest written.
    shards: the checkpoint files to hard-link as the weights (`linkable_files`), or None to copy them.
    tensor_parallel: the number of ranks of a tensor-parallel artifact, or None.
    small_batch: compile the small-batch graph too.
    rope_scaling: the RoPE scaling replacing the checkpoint's, or None. quantize: see `export`."""
    with stage("load", log):
        model = Qwen3ForCausalLM.from_pretrained(checkpoint, dtype=dtype, device=device, quantize=quantize)
        cfg = model.config if rope_scaling is None else model.config.with_rope_scaling(rope_scaling)
        limits = limits.resolved(cfg.context_length)
        # the RoPE table of exactly the positions the artifact takes: it is a graph constant,
        # saved with the weights (64 MB at 131,072 positions and head_dim 128)
        model.set_positions(limits.max_model_len, cfg)
    graphs: dict = {}
    options: dict = {}
    if "pt2" in formats and tensor_parallel is not None:
        with stage("export and compile the rank graph", log):
            inputs, options = build_rank_graph(model, tensor_parallel, limits, tmp / "model.pt2", device)
    elif "pt2" in formats:
        with stage("export", log):
            ep = export_forward(model, limits)
        with stage("compile", log):
            options = compile_package(ep, tmp / "model.pt2", device)
        inputs = input_specs(model, limits)
    output = {"name": "logits", "shape": ["logit_rows", model.config.vocab_size], "dtype": "float32"}
    if "pt2" in formats:
        graphs["forward"] = {"file": "model.pt2", "inputs": inputs, "output": output}
    if small_batch:
        with stage("export the small-batch graph", log):
            ep = export_forward(model, limits, small_batch=True)
        with stage("compile the small-batch graph", log):
            compile_package(ep, tmp / SMALL_BATCH_FILE, device)
        graphs[SMALL_BATCH_GRAPH] = {"file": SMALL_BATCH_FILE, "inputs": inputs, "output": output,
                                     "max_batch": FP8_SMALL_BATCH_MAX if model.quantization else SMALL_BATCH_MAX}
    if "onnx" in formats:
        from qwen3_aot.build.onnx_export import export_onnx

        with stage("onnx", log):
            graphs["onnx"] = export_onnx(model, tmp, log)
    with stage("package", log):
        weights = None  # an ONNX graph carries its own weights (model.onnx.data), a TP one its shards
        parallel = None
        if tensor_parallel is not None:
            parallel = write_shards(model, tensor_parallel, tmp)
        elif "pt2" in formats and shards is not None:
            weights = link_weights(checkpoint, shards, dict(model.named_buffers()), tmp)
        elif "pt2" in formats:
            tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                      str(tmp / "weights.safetensors"))
            weights = "weights.safetensors"
        copied = [f for f in TOKENIZER_FILES if (checkpoint / f).is_file()]
        for f in copied:
            shutil.copy2(checkpoint / f, tmp / f)
        if "tokenizer.json" not in copied:
            log(f"[package] warning: {checkpoint} has no tokenizer.json; the artifact will take token ids only")
        written = manifest.write(tmp, {
            "format_version": manifest.FORMAT_VERSION,
            "model_config": model.config.to_dict(),
            "dtype": dtype_name(model.dtype),
            "device": device,
            "build_env": manifest.environment(device),
            "graphs": graphs,
            "dependent_kernels": list(DEPENDENT_KERNELS) if dependent_launch_enabled(torch.device(device)) else [],
            "limits": {"max_num_tokens": limits.max_num_tokens, "max_num_seqs": limits.max_num_seqs,
                       "max_model_len": limits.max_model_len, "max_num_blocks": limits.max_num_blocks},
            "kv_cache": {"block_size": limits.block_size,
                         "layout": ["num_blocks", "block_size", "kv_heads", "head_dim"]},
            "weights": weights,
            **({"quantization": {**model.quantization, "gemm": fp8_gemm(model, device)}} if model.quantization
               else {}),
            **({"tensor_parallel": parallel} if parallel is not None else {}),
            "tokenizer_files": copied,
            "build_options": options,
            "source_checkpoint": str(checkpoint.resolve()),
        })
    if check and "pt2" in formats:
        with stage("verify", log):
            verify(tmp, model, log)
    if check and "onnx" in formats:
        from qwen3_aot.build.onnx_export import verify_onnx

        with stage("verify onnx", log):
            verify_onnx(tmp, graphs["onnx"], model, log)
    return written


def _replace(new: Path, output: Path) -> None:
    """Put `new` at `output`. An existing artifact is renamed away first and removed only once
    the new one is in place, so a service can load the old one until then; if this process
    dies in between, the next export puts the old one back (`remove_stale_partials`)."""
    if not output.exists():
        new.rename(output)
        return
    old = output.parent / f".{output.name}.old-{os.getpid()}"
    output.rename(old)
    try:
        new.rename(output)
    except BaseException:
        old.rename(output)
        raise
    shutil.rmtree(old, ignore_errors=True)


PARTIAL = re.compile(r"\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>[0-9]+)")


def remove_stale_partials(parent: Path, log: Callable[[str], None]) -> None:
    """Clean up after exports that were killed (SIGKILL, power loss): a half-built
    `.NAME.partial-PID` of a dead process is removed; a `.NAME.old-PID` (an artifact renamed
    away for --force) goes back to NAME if nothing took its place, else is removed."""
    for p in parent.iterdir():
        m = PARTIAL.fullmatch(p.name)
        if not m or not p.is_dir() or _alive(int(m["pid"])):
            continue
        target = parent / m["name"]
        if m["kind"] == "old" and not target.exists():
            p.rename(target)
            log(f"[export] restored {target}, left renamed away by a killed export (pid {m['pid']})")
        else:
            shutil.rmtree(p, ignore_errors=True)
            log(f"[export] removed {p.name}, left by a killed export (pid {m['pid']})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises SystemExit(143) while the build runs, so that its cleanup runs as it does
    for Ctrl-C (the default action kills the process with the partial directory left behind).
    Signal handlers can be set only in the main thread: elsewhere SIGTERM keeps its action."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
