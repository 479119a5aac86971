"""manifest.json: what an artifact holds and what it was built with, written by `build`
and checked by `runtime` before anything compiled is loaded."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from qwen3_aot import quantization
from qwen3_aot.errors import Qwen3AotError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# what the runtime reads, with the JSON type each must have
REQUIRED_KEYS = {"model_config": dict, "dtype": str, "device": str, "build_env": dict, "graphs": dict,
                 "files": dict, "sizes": dict, "limits": dict, "kv_cache": dict}
DTYPE_NAMES = ("bfloat16", "float16", "float32")
HASH_AT_LOAD_MAX_BYTES = 64 << 20  # smaller files are hashed at every load: well under a second
CACHE_ENV = "QWEN3_AOT_CACHE_DIR"
HASH_THREADS = 8


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


def write(artifact: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add the sha256 and size of every file in the artifact, then write manifest.json; returns it."""
    files = sorted(p for p in artifact.rglob("*") if p.is_file() and p.name != MANIFEST)
    # hashlib releases the GIL: the shards of a linked 32B checkpoint (17 files, 64 GB) hash in parallel
    with ThreadPoolExecutor(max(1, min(len(files), os.cpu_count() or 1, HASH_THREADS))) as pool:
        digests = list(pool.map(sha256, files))
    manifest = {**manifest, "files": {str(p.relative_to(artifact)): d for p, d in zip(files, digests)},
                "sizes": {str(p.relative_to(artifact)): p.stat().st_size for p in files}}
    (artifact / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read(artifact: str | Path, verify_files: bool = True, compiled: bool = True) -> dict[str, Any]:
    """Read and check manifest.json against this process: format, the keys the runtime reads,
    the dtype and, for the compiled (pt2) graph, which is tied to them, the torch build, device
    and GPU. verify_files: also check the files (see `check_files`, full=False)."""
    artifact = Path(artifact)
    path = artifact / MANIFEST
    if not path.is_file():
        raise Qwen3AotError(f"{artifact} is not a qwen3-aot artifact (no {MANIFEST}); build one with scripts/export.py.")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Qwen3AotError(f"{path} is damaged ({e}); rebuild the artifact.") from e
    if not isinstance(manifest, dict):
        raise Qwen3AotError(f"{path} is damaged (not a JSON object); rebuild the artifact.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise Qwen3AotError(f"{artifact} has format version {manifest.get('format_version')}; this qwen3-aot reads "
                            f"version {FORMAT_VERSION}. Rebuild it with this version's scripts/export.py.")
    _check_structure(artifact, manifest)
    check_quantization(artifact, manifest)
    if compiled:
        check_compiled(artifact, manifest)
    if verify_files:
        check_files(artifact, manifest)
    return manifest


def _check_structure(artifact: Path, manifest: dict[str, Any]) -> None:
    missing = [k for k, kind in REQUIRED_KEYS.items() if not isinstance(manifest.get(k), kind)]
    for name, graph in manifest.get("graphs", {}).items():
        if not (isinstance(graph, dict) and isinstance(graph.get("file"), str)):
            missing.append(f"graphs.{name}.file")
    if missing:
        raise Qwen3AotError(f"{artifact}/{MANIFEST} lacks {', '.join(missing)} (or holds the wrong kind of value); "
                            "it is damaged or from another tool: rebuild the artifact.")
    if manifest["dtype"] not in DTYPE_NAMES:
        raise Qwen3AotError(f"{artifact} has dtype {manifest['dtype']!r}; this qwen3-aot runs {', '.join(DTYPE_NAMES)}. "
                            "Rebuild the artifact.")
    if set(manifest["sizes"]) != set(manifest["files"]):
        raise Qwen3AotError(f"{artifact}/{MANIFEST} lists different files under files and sizes; rebuild the artifact.")


FP8_STORED, SCALE_STORED = "F8_E4M3", "F32"


def check_quantization(artifact: Path, manifest: dict[str, Any]) -> None:
    """The manifest's quantization (quantization.py) against the weights file's header, as the
    dtype is: exactly its layers stored in FP8, each with its fp32 scales, and nothing else FP8."""
    q = manifest.get("quantization")
    weights = manifest.get("weights")
    if q is not None and not (isinstance(q, dict) and q.get("method") in quantization.METHODS
                              and isinstance(q.get("layers"), list)):
        raise Qwen3AotError(f"{artifact}/{MANIFEST} has a quantization entry this qwen3-aot does not read "
                            f"({q!r:.200}); "
                            "rebuild the artifact.")
    if q is not None and isinstance(weights, dict) and not isinstance(weights.get("checkpoint_quantization"), dict):
        raise Qwen3AotError(f"{artifact} has FP8 weights that its weights entry does not say how to read; rebuild it.")
    if q is not None and weights is None:
        raise Qwen3AotError(f"{artifact} has FP8 weights outside a weights file (tensor-parallel shards), which this "
                            "qwen3-aot does not load; rebuild it without --tensor-parallel.")
    f = artifact / weights if isinstance(weights, str) else None
    if f is None or not f.is_file() or f.stat().st_size != manifest["sizes"].get(weights):
        return  # linked and tensor-parallel artifacts hold float weights; damage is check_files' to report
    try:
        _, header = safetensors_layout(f)
    except Qwen3AotError:
        return
    fp8 = sorted(n for n, t in header.items() if n != "__metadata__" and t.get("dtype") == FP8_STORED)
    layers = sorted(q["layers"]) if q else []
    scales_ok = all(header.get(f"{n}_scale", {}).get("dtype") == SCALE_STORED for n in layers)
    if fp8 != layers or not scales_ok:
        said = f"FP8 layers {layers[:3]}{'...' if len(layers) > 3 else ''}" if q else "float weights"
        raise Qwen3AotError(f"{artifact}: its manifest says {said}, and {weights} holds FP8 tensors {fp8[:3]}"
                            f"{'...' if len(fp8) > 3 else ''}{'' if scales_ok else ' without their fp32 scales'}; "
                            "the weights were replaced: rebuild the artifact.")


def check_files(artifact: Path, manifest: dict[str, Any], full: bool = False) -> list[str]:
    """Refuse a damaged artifact; returns one line per file saying what was checked.

    Always: each file exists with its recorded size, and a safetensors file's header is whole
    and covers the file exactly. Hashed: the graph files (machine code that runs) and every
    file up to HASH_AT_LOAD_MAX_BYTES. A larger file (the weights: tens of GB) is hashed once
    per host, and the digest remembered under its (path, size, mtime_ns, inode) in
    `hash_cache_dir()`: a later load reads only the cache. So a file modified in place
    with its size and mtime kept is caught by `qwen3-aot check` (full=True: every byte of
    every file hashed, the cache refreshed), not at load.
    """
    graph_files = {g["file"] for g in manifest["graphs"].values()}
    lines = []
    for name, digest in manifest["files"].items():
        f = artifact / name
        if not f.is_file():
            raise Qwen3AotError(f"{artifact} is incomplete: {name} is missing; rebuild or re-copy it.")
        size = f.stat().st_size
        if size != manifest["sizes"][name]:
            raise Qwen3AotError(f"{artifact}/{name} has {size} bytes, the manifest says {manifest['sizes'][name]} "
                                "(truncated or replaced); rebuild or re-copy the artifact.")
        checked = [f"{size} bytes"]
        if name.endswith(".safetensors"):
            safetensors_layout(f)
            checked.append("safetensors header")
        if full or name in graph_files or size <= HASH_AT_LOAD_MAX_BYTES:
            got, how = sha256(f), "sha256"
            _remember(f, got)
        else:
            got, how = cached_sha256(f)
        if got != digest:
            raise Qwen3AotError(f"{artifact}/{name} does not match its checksum (damaged or modified); "
                                "rebuild or re-copy the artifact.")
        lines.append(f"{name}: {', '.join(checked + [how])} ok")
    return lines


def check(artifact: str | Path) -> list[str]:
    """The full verification behind `qwen3-aot check`: the manifest, then every byte of every
    file against its sha256; returns what was checked, line by line."""
    artifact = Path(artifact)
    if not artifact.is_dir():
        raise Qwen3AotError(f"artifact {artifact} does not exist; build one with scripts/export.py.")
    manifest = read(artifact, verify_files=False, compiled=False)
    quant = manifest.get("quantization")
    lines = [f"{MANIFEST}: format {FORMAT_VERSION}, {manifest['dtype']} for {manifest['device']}, "
             + (f"FP8 weights ({quant['method']}, {len(quant['layers'])} layers, GEMM {quant.get('gemm', 'triton')}), "
                if quant else "")
             + f"graphs {sorted(manifest['graphs'])}, {len(manifest['files'])} files ok"]
    lines += check_files(artifact, manifest, full=True)
    try:
        check_compiled(artifact, manifest)
        lines.append(f"this process can run its compiled graph (torch {torch.__version__})")
    except Qwen3AotError as e:
        lines.append(f"note: {e}")
    return lines


def remember_hashes(artifact: Path, manifest: dict[str, Any]) -> None:
    """Seed the hash cache with digests the build computed itself (after its final rename,
    which keeps inode and mtime), so that the first load does not hash the weights again."""
    for name, digest in manifest["files"].items():
        if manifest["sizes"][name] > HASH_AT_LOAD_MAX_BYTES:
            _remember(artifact / name, digest)


def safetensors_layout(path: Path) -> tuple[int, dict[str, Any]]:
    """Where a safetensors file's tensor bytes start (its tensors' offsets count from there),
    and its JSON header, checked to cover the file exactly."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        raw = f.read(n) if 0 < n <= size - 8 else b""
    try:
        header = json.loads(raw)
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, IndexError, AttributeError):
        raise Qwen3AotError(f"{path} has no valid safetensors header (damaged); rebuild or re-copy the artifact.") from None
    if 8 + n + end != size:
        raise Qwen3AotError(f"{path} holds {size} bytes, its safetensors header describes {8 + n + end} "
                            "(truncated or damaged); rebuild or re-copy the artifact.")
    return 8 + n, header


def hash_cache_dir() -> Path:
    """Where digests of large files are remembered: $QWEN3_AOT_CACHE_DIR, else
    $XDG_CACHE_HOME/qwen3-aot (~/.cache/qwen3-aot), subdirectory sha256."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen3-aot"
    return Path(root) / "sha256"


def _cache_key(f: Path) -> tuple[Path, dict[str, Any]]:
    st = f.stat()
    key = {"path": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino,
           "device": st.st_dev}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return hash_cache_dir() / f"{name}.json", key


def cached_sha256(f: Path) -> tuple[str, str]:
    """The file's sha256 and how it was had: from the cache when the file is unchanged by
    path, size, mtime and inode, else hashed now (and remembered)."""
    entry, key = _cache_key(f)
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(entry.read_text())
        if {k: cached.get(k) for k in key} == key and isinstance(cached.get("sha256"), str):
            return cached["sha256"], "sha256 (cached on this host)"
    digest = sha256(f)
    _remember(f, digest)
    return digest, "sha256"


def _remember(f: Path, digest: str) -> None:
    """Best effort: an unwritable cache only means hashing again next time."""
    with contextlib.suppress(OSError):
        entry, key = _cache_key(f)
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}")
        tmp.write_text(json.dumps({**key, "sha256": digest}))
        os.replace(tmp, entry)


def check_compiled(artifact: Path, manifest: dict[str, Any]) -> None:
    """The pt2 graph is machine code for one torch build and one kind of device: refuse others."""
    built = manifest["build_env"]
    if built.get("torch") != torch.__version__:
        raise Qwen3AotError(f"{artifact} was built with torch {built.get('torch')}, this process has torch "
                            f"{torch.__version__}; compiled graphs are tied to one torch build: rebuild it here.")
    if manifest["device"] == "cuda":
        if not torch.cuda.is_available():
            raise Qwen3AotError(f"{artifact} was built for cuda and torch sees no GPU here; "
                                "build a cpu artifact (--device cpu) or run on a GPU machine.")
        major, minor = torch.cuda.get_device_capability()
        if manifest.get("quantization") and (major, minor) < (8, 9):
            raise Qwen3AotError(f"{artifact} has FP8 weights, which need a GPU of compute capability 8.9 or more "
                                f"(Ada, Hopper); this one is {major}.{minor} ({torch.cuda.get_device_name()}). "
                                "Build a bf16 artifact for it.")
        if built.get("compute_capability") != f"{major}.{minor}":
            raise Qwen3AotError(f"{artifact} was built for compute capability {built.get('compute_capability')} "
                                f"({built.get('gpu')}), this GPU is {major}.{minor} ({torch.cuda.get_device_name()}); "
                                "rebuild it on this kind of GPU.")
