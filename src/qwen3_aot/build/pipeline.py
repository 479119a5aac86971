"""Checkpoint directory -> artifact directory: load, export, compile, package, verify.

The artifact is written under a temporary name beside the output and renamed at the
end, so a failed or interrupted build leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file

from qwen3_aot import manifest
from qwen3_aot.build.aoti import compile_package
from qwen3_aot.build.graph import GraphLimits, export_forward, input_specs
from qwen3_aot.driver import FlatBatchDriver
from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.model import Qwen3ForCausalLM

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja"]
# A sanity bound for the build's final check (a broken graph is off by O(1)); the parity
# tests bound the error tightly against float64.
VERIFY_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def stage(name: str, log: Callable[[str], None]) -> Iterator[None]:
    log(f"[{name}] ...")
    t0 = time.perf_counter()
    yield
    log(f"[{name}] done in {time.perf_counter() - t0:.1f} s")


def resolve_device(device: str | None) -> str:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu"):
        raise Qwen3AotError(f"device {device!r} is not supported; use cuda or cpu.")
    if device == "cuda" and not torch.cuda.is_available():
        raise Qwen3AotError("--device cuda was asked for, but torch sees no CUDA GPU here; use --device cpu.")
    return device


def verify(artifact: Path, model: Qwen3ForCausalLM, log: Callable[[str], None]) -> float:
    """Load the artifact as a service would and compare its logits with the eager model."""
    from qwen3_aot.runtime import load_forward

    compiled = load_forward(artifact)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 33)]
    block_size = manifest.read(artifact, verify_files=False)["kv_cache"]["block_size"]
    want = torch.cat(model.logits(seqs, block_size=block_size))
    got = torch.cat(FlatBatchDriver(compiled, model.config, model.dtype, model.device, block_size).logits(seqs))
    err = float((got.double() - want.double()).norm() / want.double().norm())
    log(f"[verify] compiled vs eager logits: relative error {err:.2e}")
    if not torch.isfinite(got).all() or err > VERIFY_TOL[model.dtype]:
        raise Qwen3AotError(f"the compiled artifact disagrees with the eager model (relative error {err:.2e}, "
                            f"bound {VERIFY_TOL[model.dtype]:.0e}); the build is not kept.")
    return err


def export_artifact(checkpoint: str | Path, output: str | Path, device: str | None = None,
                    dtype: str | None = None, force: bool = False, limits: GraphLimits = GraphLimits(),
                    formats: tuple[str, ...] = ("pt2",), check: bool = True,
                    log: Callable[[str], None] = _log) -> Path:
    """Build an artifact from a Hugging Face Qwen3 checkpoint directory; returns its path.

    formats: "pt2" (the AOTInductor package, paged KV cache) and/or "onnx" (onnxruntime,
    past/present KV cache); both share the artifact's manifest and tokenizer files."""
    checkpoint, output = Path(checkpoint), Path(output)
    device = resolve_device(device)
    formats = tuple(dict.fromkeys(formats))
    if not formats or set(formats) - {"pt2", "onnx"}:
        raise Qwen3AotError(f"formats {formats} not understood; use pt2, onnx or pt2,onnx.")
    if output.exists() and not force:
        raise Qwen3AotError(f"{output} already exists; pass --force to replace it.")
    t_start = time.perf_counter()
    tmp = output.parent / f".{output.name}.partial-{os.getpid()}"
    output.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with stage("load", log):
            model = Qwen3ForCausalLM.from_pretrained(checkpoint, dtype=dtype, device=device)
            limits = limits.resolved(model.config.max_position_embeddings)
        graphs: dict = {}
        options: dict = {}
        if "pt2" in formats:
            with stage("export", log):
                ep = export_forward(model, limits)
            with stage("compile", log):
                options = compile_package(ep, tmp / "model.pt2", device)
            graphs["forward"] = {"file": "model.pt2", "inputs": input_specs(model, limits),
                                 "output": {"name": "logits", "shape": ["logit_rows", model.config.vocab_size],
                                            "dtype": "float32"}}
        if "onnx" in formats:
            from qwen3_aot.build.onnx_export import export_onnx

            with stage("onnx", log):
                graphs["onnx"] = export_onnx(model, tmp, log)
        with stage("package", log):
            if "pt2" in formats:  # an ONNX graph carries its own weights (model.onnx.data)
                tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
                save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                          str(tmp / "weights.safetensors"))
            copied = [f for f in TOKENIZER_FILES if (checkpoint / f).is_file()]
            for f in copied:
                shutil.copy2(checkpoint / f, tmp / f)
            if "tokenizer.json" not in copied:
                log(f"[package] warning: {checkpoint} has no tokenizer.json; the artifact will take token ids only")
            manifest.write(tmp, {
                "format_version": manifest.FORMAT_VERSION,
                "model_config": model.config.to_dict(),
                "dtype": str(model.dtype).replace("torch.", ""),
                "device": device,
                "build_env": manifest.environment(device),
                "graphs": graphs,
                "limits": {"max_num_tokens": limits.max_num_tokens, "max_num_seqs": limits.max_num_seqs,
                           "max_model_len": limits.max_model_len, "max_num_blocks": limits.max_num_blocks},
                "kv_cache": {"block_size": limits.block_size,
                             "layout": ["num_blocks", "block_size", "kv_heads", "head_dim"]},
                "weights": "weights.safetensors" if "pt2" in formats else None,
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
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    log(f"[done] {output} ({size / 1e6:.1f} MB) in {time.perf_counter() - t_start:.1f} s")
    return output
