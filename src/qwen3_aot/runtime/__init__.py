"""What services import: loading an artifact and generating with it, without model code,
transformers or a JIT compile. `import qwen3_aot.runtime` imports torch, safetensors and
tokenizers only; a CPU artifact's forward also needs our custom ops, imported when it loads,
and an ONNX artifact the ONNX engine (runtime/onnx/) and onnxruntime, imported when one loads."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qwen3_aot import manifest as _manifest
from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime.forward.compiled import CompiledForward
from qwen3_aot.runtime.core.engine_core import EngineCore, StepRecord
from qwen3_aot.runtime.service.engine import Engine
from qwen3_aot.runtime.service.engine_process import ProcessLoop
from qwen3_aot.runtime.service.loop import EngineLoop
from qwen3_aot.runtime.service.messages import EngineStats
from qwen3_aot.runtime.core.request import Request
from qwen3_aot.runtime.core.sampling_params import Completion, SamplingParams
from qwen3_aot.runtime.service.streams import AsyncStream, Stream
from qwen3_aot.runtime.forward.tensor_parallel import TensorParallelForward, tensor_parallel_size

if TYPE_CHECKING:
    from qwen3_aot.runtime.onnx.onnx_engine import OnnxEngine

__all__ = ["AsyncStream", "CompiledForward", "Completion", "Engine", "EngineCore", "EngineStats", "OnnxEngine",
           "Qwen3AotError", "Request", "SamplingParams", "StepRecord", "Stream", "TensorParallelForward", "load",
           "load_core", "load_forward"]


def _keyword_options(cls: type) -> set[str]:
    """The keyword-only options of an engine's constructor, which `load` passes through."""
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def __getattr__(name: str) -> type:
    if name == "OnnxEngine":  # the ONNX engine only for those who use it
        from qwen3_aot.runtime.onnx.onnx_engine import OnnxEngine

        return OnnxEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _engine_options(format: str) -> set[str]:
    if format == "pt2":
        return _keyword_options(EngineCore)
    from qwen3_aot.runtime.onnx.onnx_engine import OnnxEngine

    return _keyword_options(OnnxEngine)


def load(path: str | Path, device: str | torch.device | None = None, *, verify_files: bool = True,
         format: str | None = None, engine_process: bool = False, **options) -> Engine | OnnxEngine:
    """Check an artifact against this process (format, torch build, device, GPU, file sizes
    and headers, checksums: see manifest.read) and start an engine on it: weights loaded once, the paged KV cache sized,
    CUDA graphs captured on a GPU, and the Engine's loop thread started (it is safe to share
    between threads and asyncio tasks; see qwen3_aot.runtime.service.engine).

    format: which graph to serve, "pt2" (an Engine, continuous batching) or "onnx" (an
    OnnxEngine on onnxruntime, static batching); default pt2 when the artifact has one.
    engine_process: run the Engine's loop, and its core, in a process of its own
    (runtime/service/engine_process.py), so that callers busy in Python (a server's event loop) never
    hold the GIL the loop needs between steps; the Engine's API is the same.
    `options` are the engine's: for pt2 EngineCore's (num_blocks, kv_cache_tokens,
    gpu_memory_utilization, max_num_seqs, max_num_batched_tokens, cuda_graphs, overlap,
    prefix_caching); for onnx OnnxEngine's (max_batch_size)."""
    path, man = _read(path, verify_files)
    graphs = {"pt2": "forward", "onnx": "onnx"}
    if format is None:
        format = next((f for f, g in graphs.items() if g in man["graphs"]), None)
        if format is None:
            raise Qwen3AotError(f"{path} holds no pt2 or onnx graph; rebuild it with scripts/export.py.")
    if format not in graphs:
        raise Qwen3AotError(f"format {format!r} is not one of {sorted(graphs)}.")
    if graphs[format] not in man["graphs"]:
        raise Qwen3AotError(f"{path} holds no {format} graph (it holds {sorted(man['graphs'])}); rebuild it with "
                            f"--format {format} (or pt2,onnx).")
    _check_options(options, format)
    if format == "onnx":
        if engine_process:
            raise Qwen3AotError("engine_process is for the pt2 Engine; an onnx engine runs in the caller's thread.")
        from qwen3_aot.runtime.onnx.onnx_engine import OnnxEngine

        return OnnxEngine(path, man, device, **options)
    dev = _compiled_device(path, man, device)
    if engine_process:
        return Engine(ProcessLoop(path, dev, options))
    return Engine(EngineLoop(lambda: EngineCore(path, man, dev, **options), dev))


def load_core(path: str | Path, device: str | torch.device | None = None, *, verify_files: bool = True,
              **options) -> EngineCore:
    """As `load` for a pt2 artifact, without the loop thread: the single-threaded core that
    benchmarks and tests step themselves (`add_request`, `step`, `generate`)."""
    path, man = _read_pt2(path, verify_files)
    _check_options(options, "pt2")
    return EngineCore(path, man, _compiled_device(path, man, device), **options)


def _check_options(options: dict, format: str) -> None:
    allowed = _engine_options(format)
    unknown = set(options) - allowed
    if unknown:
        raise Qwen3AotError(f"{sorted(unknown)}: not options of the {format} engine, which takes "
                            f"{sorted(allowed)}.")


def load_forward(path: str | Path, device: str | torch.device | None = None,
                 run_single_threaded: bool = False,
                 verify_files: bool = True) -> CompiledForward | TensorParallelForward:
    """Check an artifact's manifest against this process and load its compiled forward: of a
    tensor-parallel artifact, its worker processes (`close()` stops them)."""
    path, man = _read_pt2(path, verify_files)
    dev = _compiled_device(path, man, device)
    if tensor_parallel_size(man) is not None:
        return TensorParallelForward(path, man, dev)
    return CompiledForward(path, man, dev, run_single_threaded)


def _read_pt2(path: str | Path, verify_files: bool) -> tuple[Path, dict]:
    path, man = _read(path, verify_files)
    if "forward" not in man["graphs"]:
        raise Qwen3AotError(f"{path} holds no pt2 graph (it holds {sorted(man['graphs'])}); rebuild it with "
                            "--format pt2 (or pt2,onnx).")
    return path, man


def _read(path: str | Path, verify_files: bool) -> tuple[Path, dict]:
    path = Path(path)
    if not path.is_dir():
        raise Qwen3AotError(f"artifact {path} does not exist; build one with scripts/export.py.")
    return path, _manifest.read(path, verify_files=verify_files, compiled=False)


def _compiled_device(path: Path, man: dict, device: str | torch.device | None) -> torch.device:
    """The device to run the pt2 graph on, which must be the one it was compiled for."""
    _manifest.check_compiled(path, man)
    try:
        dev = torch.device(device or man["device"])
    except RuntimeError as e:
        raise Qwen3AotError(f"device {device!r} not understood ({e}); use cpu or cuda.") from e
    if dev.type != man["device"]:
        raise Qwen3AotError(f"{path} was built for {man['device']}, not {dev.type}; rebuild it with --device {dev.type}.")
    return dev
