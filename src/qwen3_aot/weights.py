"""Read a Qwen3 checkpoint's safetensors into our parameter names.

Hugging Face names (``model.layers.3.self_attn.q_proj.weight``) become ours
(``layers.3.qkv_proj``): q, k and v are concatenated once here, and gate and up
likewise, so the graph does one matmul for each. Only safetensors are read: a
checkpoint that has nothing but pickle files (*.bin, *.pt) is refused, never
unpickled.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from qwen3_aot import quantization
from qwen3_aot.config import Qwen3Config
from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.quantization import CheckpointQuantization

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # old checkpoints saved this buffer; we recompute it


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
        name = str(name)
    key = name.replace("torch.", "")
    key = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(key, key)
    if key not in DTYPES:
        raise Qwen3AotError(f"dtype {name!r} is not supported; use one of {sorted(DTYPES)}.")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """The name a manifest records for `dtype` ("bfloat16"), the one `parse_dtype` reads back."""
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise Qwen3AotError(f"dtype {dtype} is not supported; use one of {sorted(DTYPES)}.")


def hf_shapes(cfg: Qwen3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face Qwen3 checkpoint must hold, with its shape."""
    h, d = cfg.hidden_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (cfg.q_size, h),
            p + "self_attn.k_proj.weight": (cfg.kv_size, h),
            p + "self_attn.v_proj.weight": (cfg.kv_size, h),
            p + "self_attn.o_proj.weight": (h, cfg.q_size),
            p + "self_attn.q_norm.weight": (d,),
            p + "self_attn.k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.up_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, cfg.intermediate_size),
        })
    return shapes


@contextlib.contextmanager
def open_safetensors(f: Path) -> Iterator:
    """safe_open (tensors read onto the CPU), with a damaged file (truncated, bad header,
    unreadable) turned into our error naming it."""
    try:
        with safe_open(str(f), "pt") as sf:
            yield sf
    except (SafetensorError, OSError) as e:
        raise _unreadable(f, e) from e


def _unreadable(f: Path, e: Exception) -> Qwen3AotError:
    return Qwen3AotError(f"{f} is not a readable safetensors file ({e}); it may be truncated or damaged: "
                         "download or copy it again.")


INDEX = "model.safetensors.index.json"
CHECKPOINT_LAYOUT = "checkpoint"  # a linked artifact's weights: the checkpoint's files and names
# the dtype names of a safetensors header
STORED_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F8_E4M3": torch.float8_e4m3fn}


def tensor_files(path: Path, files: list[str] | None = None) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it: the index's map when `path`
    has one, else the tensors of `files` (default: every *.safetensors in `path`)."""
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (json.JSONDecodeError, AttributeError) as e:
            raise Qwen3AotError(f"{index} is not a valid safetensors index ({e}); download it again.") from e
        for f in set(weight_map.values()):
            if not (path / f).is_file():
                raise Qwen3AotError(f"{index} names shard {f}, which is missing from {path}.")
        return {name: path / f for name, f in weight_map.items()}
    shards = [path / f for f in files] if files is not None else sorted(path.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise Qwen3AotError(
                f"{path} holds only pickle weights ({', '.join(pickles[:3])}); qwen3-aot never unpickles. "
                "Convert them to safetensors first (e.g. save_pretrained(..., safe_serialization=True))."
            )
        raise Qwen3AotError(f"{path} has no *.safetensors weights.")
    out: dict[str, Path] = {}
    for f in shards:
        with open_safetensors(f) as sf:
            for name in sf.keys():
                out[name] = f
    return out


def load_hf_tensors(path: str | Path, cfg: Qwen3Config,
                    quant: CheckpointQuantization | None = None) -> dict[str, torch.Tensor]:
    """Read and validate every tensor of the checkpoint, as stored (HF names, disk dtype);
    quant: the checkpoint's quantization, whose weights are FP8 and have scale tensors."""
    path = Path(path)
    files = tensor_files(path)
    expected: dict[str, tuple[int, ...] | None] = dict(hf_shapes(cfg))
    fp8 = quantization.scale_names(quant, list(expected)) if quant else {}
    expected.update({scale: None for scale in fp8.values()})  # shapes checked as they are read (row_scales)
    names = {n for n in files if not n.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        names.discard("lm_head.weight")  # some tied checkpoints store the copy too; the embedding wins
    missing = sorted(set(expected) - names)
    extra = sorted(names - set(expected))
    if missing:
        raise Qwen3AotError(f"{path}: checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. {missing[:3]}.")
    if extra:
        raise Qwen3AotError(f"{path}: checkpoint has {len(extra)} tensor(s) a Qwen3 with this config does not, e.g. {extra[:3]}.")
    tensors: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for n in expected:
        by_file.setdefault(files[n], []).append(n)
    for f, ns in by_file.items():
        with open_safetensors(f) as sf:
            for n in ns:
                tensors[n] = _checked(f, n, sf.get_tensor(n), expected[n], n in fp8)
    return tensors


def _checked(f: Path, name: str, t: torch.Tensor, shape: tuple[int, ...] | None, fp8: bool) -> torch.Tensor:
    if shape is None:
        return t
    if tuple(t.shape) != shape:
        raise Qwen3AotError(f"{f.name}: tensor {name} has shape {tuple(t.shape)}, the config says {shape}.")
    if fp8 and t.dtype != torch.float8_e4m3fn:
        raise Qwen3AotError(f"{f.name}: tensor {name} is {t.dtype}; the checkpoint's quantization_config makes it a "
                            "quantized layer, stored as float8_e4m3fn.")
    if t.dtype == torch.float8_e4m3fn and not fp8:
        raise Qwen3AotError(f"{f.name}: tensor {name} is float8_e4m3fn, and the checkpoint's quantization_config does "
                            f"not quantize it; qwen3-aot reads FP8 only for the q/k/v/o/gate/up/down projections of "
                            f"{quantization.SUPPORTED}.")
    if t.dtype not in DTYPES.values() and not fp8:
        raise Qwen3AotError(f"{f.name}: tensor {name} is {t.dtype}; only bf16, fp16 and fp32 are supported.")
    return t


# Our tensor names and the Hugging Face tensors each is made of (concatenated along dim 0 when
# there are several); "{i}" is the layer. The one table behind `to_model_state`, the runtime's
# fusion of a linked artifact at load, and the rule a linked artifact's manifest records.
GLOBAL_NAMES: dict[str, tuple[str, ...]] = {
    "embed_tokens": ("model.embed_tokens.weight",),
    "norm": ("model.norm.weight",),
    "lm_head": ("lm_head.weight",),  # absent when tied: the graph reads embed_tokens
}
LAYER_NAMES: dict[str, tuple[str, ...]] = {
    "input_norm": ("model.layers.{i}.input_layernorm.weight",),
    "qkv_proj": ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
                 "model.layers.{i}.self_attn.v_proj.weight"),
    "q_norm": ("model.layers.{i}.self_attn.q_norm.weight",),
    "k_norm": ("model.layers.{i}.self_attn.k_norm.weight",),
    "o_proj": ("model.layers.{i}.self_attn.o_proj.weight",),
    "post_norm": ("model.layers.{i}.post_attention_layernorm.weight",),
    "gate_up_proj": ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    "down_proj": ("model.layers.{i}.mlp.down_proj.weight",),
}


def name_rule() -> dict[str, dict[str, list[str]]]:
    """The naming table as JSON (for a manifest): ours -> the HF names concatenated into it."""
    return {"global": {k: list(v) for k, v in GLOBAL_NAMES.items()},
            "layer": {f"layers.{{i}}.{k}": list(v) for k, v in LAYER_NAMES.items()}}


def model_state_names(cfg: Qwen3Config) -> Iterator[tuple[str, tuple[str, ...]]]:
    """Each of our tensor names with the HF tensors it is made of (concatenated along dim 0)."""
    for ours, names in GLOBAL_NAMES.items():
        if not (ours == "lm_head" and cfg.tie_word_embeddings):
            yield ours, names
    for i in range(cfg.num_hidden_layers):
        for ours, names in LAYER_NAMES.items():
            yield f"layers.{i}.{ours}", tuple(n.format(i=i) for n in names)


def model_state_items(cfg: Qwen3Config, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Our names and tensors one at a time, each made of the HF tensors `get(name)` gives."""
    for ours, names in model_state_names(cfg):
        yield ours, get(names[0]) if len(names) == 1 else torch.cat([get(n) for n in names])


def to_model_state(hf: dict[str, torch.Tensor], cfg: Qwen3Config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF names to ours, with q/k/v and gate/up concatenated, in the run dtype."""
    return {k: v.to(dtype).contiguous() for k, v in model_state_items(cfg, hf.__getitem__)}


QUANTIZE_CHOICES = ("fp8",)


def checkpoint_quantization(path: str | Path, quantize: str | None = None) -> CheckpointQuantization | None:
    """How a checkpoint's weights are quantized (its config.json's quantization_config), or
    how `quantize` ("fp8", `export --quantize`) will quantize a float one; None: float."""
    path = Path(path)
    Qwen3Config.from_checkpoint(path)  # the config's own checks and errors first
    quant = quantization.parse(json.loads((path / "config.json").read_text()), str(path / "config.json"))
    if quantize is None:
        return quant
    if quantize not in QUANTIZE_CHOICES:
        raise Qwen3AotError(f"--quantize {quantize!r} is not supported; use {' or '.join(QUANTIZE_CHOICES)}.")
    if quant is not None:
        raise Qwen3AotError(f"{path} is already quantized ({quant.method}); drop --quantize.")
    return quantization.BUILT


def load_checkpoint(path: str | Path, dtype: str | torch.dtype | None = None, quantize: str | None = None
                    ) -> tuple[Qwen3Config, dict[str, torch.Tensor]]:
    """Config and our state dict (CPU) of a Hugging Face Qwen3 checkpoint directory. A
    quantized checkpoint's projections (and all of them with quantize="fp8") come as FP8
    weights with their `_scale` tensors (quantization.py); everything else in `dtype`."""
    cfg = Qwen3Config.from_checkpoint(path)
    run_dtype = parse_dtype(dtype or cfg.dtype)
    quant = checkpoint_quantization(path, quantize)
    if quant is None:
        return cfg, to_model_state(load_hf_tensors(path, cfg), cfg, run_dtype)
    hf = load_hf_tensors(path, cfg, None if quantize else quant)
    if quantize:
        hf = quantization.quantize_checkpoint_tensors(hf, "cuda" if torch.cuda.is_available() else "cpu")
    return cfg, dict(quantization.model_state_items(model_state_names(cfg), hf.__getitem__, quant, run_dtype))
