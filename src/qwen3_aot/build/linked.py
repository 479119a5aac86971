"""`--weights link`: the artifact keeps the checkpoint's own safetensors files, hard-linked,
and the runtime fuses q/k/v and gate/up as it loads them (`runtime.forward.weight_reader.read_model_state`).

A copied artifact (`--weights copy`, the default) writes weights.safetensors under our names
with the fused tensors made at build time: a second copy of the weights on disk (64 GB for
Qwen3-32B in bf16). A linked one costs no disk for the weights and stays valid when the
checkpoint is moved or deleted (a hard link keeps the bytes; a symlink would dangle), at
the price of fusing at every load. Hard links need the checkpoint and the artifact on one
filesystem and the checkpoint's bytes in the run dtype; otherwise the build refuses and
says to use --weights copy, which converts and copies.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwen3_aot.config import Qwen3Config
from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.quantization import scale_names
from qwen3_aot.weights import (CHECKPOINT_LAYOUT, INDEX, STORED_DTYPES, checkpoint_quantization, hf_shapes,
                               name_rule, open_safetensors, parse_dtype, tensor_files)

WEIGHT_MODES = ("copy", "link")
BUFFERS = "buffers.safetensors"  # what the model computes rather than reads (the RoPE table)


def linkable_files(checkpoint: Path, output_dir: Path, dtype: str | None) -> list[str]:
    """The checkpoint's safetensors files (relative names) a linked artifact in `output_dir`
    takes, checked before any work: every tensor the model reads stored in the run dtype,
    every file on `output_dir`'s filesystem."""
    cfg = Qwen3Config.from_checkpoint(checkpoint)
    run = parse_dtype(dtype or cfg.dtype)
    located = tensor_files(checkpoint)
    shards = sorted({f.relative_to(checkpoint).as_posix() for f in located.values()})
    quant = checkpoint_quantization(checkpoint)
    fp8 = set(scale_names(quant, list(hf_shapes(cfg)))) if quant else set()  # FP8 as stored: read so at load
    other = []
    for f in sorted(set(located.values())):
        with open_safetensors(f) as sf:
            names = [n for n in sf.keys() if n in hf_shapes(cfg) and located[n] == f]
            other += [(n, sf.get_slice(n).get_dtype()) for n in names
                      if STORED_DTYPES.get(sf.get_slice(n).get_dtype()) != (torch.float8_e4m3fn if n in fp8 else run)]
    if other:
        n, stored = other[0]
        raise Qwen3AotError(f"--weights link keeps the checkpoint's bytes as they are, and {checkpoint} stores "
                            f"{len(other)} tensor(s) in another dtype than {str(run).replace('torch.', '')} (e.g. {n}: "
                            f"{stored}). Build in the checkpoint's dtype (drop --dtype), or use --weights copy, "
                            "which converts (and writes a second copy of the weights).")
    target = os.stat(output_dir).st_dev
    elsewhere = [s for s in shards if os.stat(checkpoint / s).st_dev != target]
    if elsewhere:
        raise Qwen3AotError(_other_filesystem(checkpoint, output_dir))
    return shards


def _other_filesystem(checkpoint: Path, output_dir: Path) -> str:
    return (f"--weights link hard-links the checkpoint's files, and {checkpoint} is on another filesystem than "
            f"{output_dir} (a hard link cannot cross filesystems; a symlink would break when the checkpoint moves). "
            "Put the artifact on the checkpoint's filesystem, or use --weights copy.")


def link_weights(checkpoint: Path, shards: list[str], buffers: dict[str, torch.Tensor], tmp: Path) -> dict:
    """Hard-link `shards` (and the index, when sharded) into the artifact at `tmp`, write the
    model's computed buffers beside them; returns the manifest's "weights" entry."""
    index = INDEX if (checkpoint / INDEX).is_file() else None
    for name in shards + ([index] if index else []):
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        try:  # the resolved file: a Hugging Face cache's snapshot holds symlinks into its blobs
            os.link((checkpoint / name).resolve(), tmp / name)
        except OSError as e:
            raise Qwen3AotError(f"{_other_filesystem(checkpoint, tmp.parent)} ({e})") from e
    save_file({k: v.detach().contiguous().cpu() for k, v in buffers.items()}, str(tmp / BUFFERS))
    quant = checkpoint_quantization(checkpoint)
    return {"layout": CHECKPOINT_LAYOUT, "files": shards, "index": index, "buffers": BUFFERS,
            "names": name_rule(), "fused_at_load": True, "linked_from": str(checkpoint.resolve()),
            # how the runtime finds and reads an FP8 checkpoint's scales (quantization.CheckpointQuantization)
            **({"checkpoint_quantization": quant.source()} if quant else {})}
