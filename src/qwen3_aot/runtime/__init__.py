"""What services import: loading an artifact and running it, without model code or transformers."""

from __future__ import annotations

from pathlib import Path

import torch

from qwen3_aot import manifest as _manifest
from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime.compiled import CompiledForward

__all__ = ["CompiledForward", "Qwen3AotError", "load_forward"]


def load_forward(path: str | Path, device: str | torch.device | None = None,
                 run_single_threaded: bool = False, verify_files: bool = True) -> CompiledForward:
    """Check an artifact's manifest against this process and load its compiled forward."""
    path = Path(path)
    if not path.is_dir():
        raise Qwen3AotError(f"artifact {path} does not exist; build one with scripts/export.py.")
    man = _manifest.read(path, verify_files=verify_files)
    dev = torch.device(device or man["device"])
    if dev.type != man["device"]:
        raise Qwen3AotError(f"{path} was built for {man['device']}, not {dev.type}; rebuild it with --device {dev.type}.")
    return CompiledForward(path, man, dev, run_single_threaded)
