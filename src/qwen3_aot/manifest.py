"""manifest.json: what an artifact holds and what it was built with, written by `build`
and checked by `runtime` before anything compiled is loaded."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import torch

from qwen3_aot.errors import Qwen3AotError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def environment(device: str) -> dict[str, Any]:
    """The versions and hardware a compiled graph depends on."""
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "machine": platform.machine()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        env.update(cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(), compute_capability=f"{major}.{minor}")
    return env


def write(artifact: Path, manifest: dict[str, Any]) -> None:
    """Add the sha256 of every file in the artifact, then write manifest.json."""
    files = sorted(p for p in artifact.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {**manifest, "files": {str(p.relative_to(artifact)): sha256(p) for p in files}}
    (artifact / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def read(artifact: str | Path, verify_files: bool = True, compiled: bool = True) -> dict[str, Any]:
    """Read and check manifest.json against this process: format, checksums and, for the
    compiled (pt2) graph, which is tied to them, the torch build, device and GPU."""
    artifact = Path(artifact)
    path = artifact / MANIFEST
    if not path.is_file():
        raise Qwen3AotError(f"{artifact} is not a qwen3-aot artifact (no {MANIFEST}); build one with scripts/export.py.")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise Qwen3AotError(f"{path} is damaged ({e}); rebuild the artifact.") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise Qwen3AotError(f"{artifact} has format version {manifest.get('format_version')}; this qwen3-aot reads "
                            f"version {FORMAT_VERSION}. Rebuild it with this version's scripts/export.py.")
    if compiled:
        check_compiled(artifact, manifest)
    if verify_files:
        for name, digest in manifest["files"].items():
            f = artifact / name
            if not f.is_file():
                raise Qwen3AotError(f"{artifact} is incomplete: {name} is missing; rebuild or re-copy it.")
            if sha256(f) != digest:
                raise Qwen3AotError(f"{artifact}/{name} does not match its checksum (damaged or modified); "
                                    "rebuild or re-copy the artifact.")
    return manifest


def check_compiled(artifact: Path, manifest: dict[str, Any]) -> None:
    """The pt2 graph is machine code for one torch build and one kind of device: refuse others."""
    built = manifest["build_env"]
    if built["torch"] != torch.__version__:
        raise Qwen3AotError(f"{artifact} was built with torch {built['torch']}, this process has torch "
                            f"{torch.__version__}; compiled graphs are tied to one torch build: rebuild it here.")
    if manifest["device"] == "cuda":
        if not torch.cuda.is_available():
            raise Qwen3AotError(f"{artifact} was built for cuda and torch sees no GPU here; "
                                "build a cpu artifact (--device cpu) or run on a GPU machine.")
        major, minor = torch.cuda.get_device_capability()
        if built["compute_capability"] != f"{major}.{minor}":
            raise Qwen3AotError(f"{artifact} was built for compute capability {built['compute_capability']} "
                                f"({built['gpu']}), this GPU is {major}.{minor} ({torch.cuda.get_device_name()}); "
                                "rebuild it on this kind of GPU.")
