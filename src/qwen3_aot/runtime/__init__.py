"""What services import: loading an artifact and generating with it, without model code,
transformers or a JIT compile. `import qwen3_aot.runtime` imports torch, safetensors and
tokenizers only; a CPU artifact's forward also needs our custom ops, imported when it loads."""

from __future__ import annotations

from pathlib import Path

import torch

from qwen3_aot import manifest as _manifest
from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime.compiled import CompiledForward
from qwen3_aot.runtime.engine import Engine, Request
from qwen3_aot.runtime.sampling import Completion, SamplingParams

__all__ = ["CompiledForward", "Completion", "Engine", "Qwen3AotError", "Request", "SamplingParams", "load",
           "load_forward"]


def load(path: str | Path, device: str | torch.device | None = None, *, verify_files: bool = True,
         **options) -> Engine:
    """Check an artifact against this process (format, torch build, device, GPU, the sha256
    of every file) and start an engine on it: weights loaded once, the paged KV cache sized,
    CUDA graphs captured on a GPU. `options` are Engine's: num_blocks, kv_cache_tokens,
    gpu_memory_utilization, max_num_seqs, max_num_batched_tokens, cuda_graphs."""
    path, man, dev = _open(path, device, verify_files)
    return Engine(path, man, dev, **options)


def load_forward(path: str | Path, device: str | torch.device | None = None,
                 run_single_threaded: bool = False, verify_files: bool = True) -> CompiledForward:
    """Check an artifact's manifest against this process and load its compiled forward."""
    path, man, dev = _open(path, device, verify_files)
    return CompiledForward(path, man, dev, run_single_threaded)


def _open(path: str | Path, device: str | torch.device | None, verify_files: bool) -> tuple[Path, dict, torch.device]:
    path = Path(path)
    if not path.is_dir():
        raise Qwen3AotError(f"artifact {path} does not exist; build one with scripts/export.py.")
    man = _manifest.read(path, verify_files=verify_files, compiled=False)
    if "forward" not in man["graphs"]:
        raise Qwen3AotError(f"{path} holds no pt2 graph (graphs: {sorted(man['graphs'])}); an ONNX-only artifact runs "
                            "with qwen3_aot.runtime.onnx_forward.OnnxForward (not yet wired into the engine). "
                            "Rebuild with --format pt2 (or pt2,onnx) to serve it with runtime.load().")
    _manifest.check_compiled(path, man)
    try:
        dev = torch.device(device or man["device"])
    except RuntimeError as e:
        raise Qwen3AotError(f"device {device!r} not understood ({e}); use cpu or cuda.") from e
    if dev.type != man["device"]:
        raise Qwen3AotError(f"{path} was built for {man['device']}, not {dev.type}; rebuild it with --device {dev.type}.")
    return path, man, dev
