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
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from qwen3_aot.config import Qwen3Config
from qwen3_aot.errors import Qwen3AotError

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
    """safe_open, with a damaged file (truncated, bad header, unreadable) turned into our error naming it."""
    try:
        with safe_open(str(f), "pt") as sf:
            yield sf
    except (SafetensorError, OSError) as e:
        raise Qwen3AotError(f"{f} is not a readable safetensors file ({e}); it may be truncated or damaged: "
                            "download or copy it again.") from e


def _tensor_files(path: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (json.JSONDecodeError, AttributeError) as e:
            raise Qwen3AotError(f"{index} is not a valid safetensors index ({e}); download it again.") from e
        for f in set(weight_map.values()):
            if not (path / f).is_file():
                raise Qwen3AotError(f"{index} names shard {f}, which is missing from {path}.")
        return {name: path / f for name, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise Qwen3AotError(
                f"{path} holds only pickle weights ({', '.join(pickles[:3])}); qwen3-aot never unpickles. "
                "Convert them to safetensors first (e.g. save_pretrained(..., safe_serialization=True))."
            )
        raise Qwen3AotError(f"{path} has no *.safetensors weights.")
    out: dict[str, Path] = {}
    for f in files:
        with open_safetensors(f) as sf:
            for name in sf.keys():
                out[name] = f
    return out


def load_hf_tensors(path: str | Path, cfg: Qwen3Config) -> dict[str, torch.Tensor]:
    """Read and validate every tensor of the checkpoint, as stored (HF names, disk dtype)."""
    path = Path(path)
    files = _tensor_files(path)
    expected = hf_shapes(cfg)
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
                t = sf.get_tensor(n)
                if tuple(t.shape) != expected[n]:
                    raise Qwen3AotError(f"{f.name}: tensor {n} has shape {tuple(t.shape)}, the config says {expected[n]}.")
                if t.dtype not in DTYPES.values():
                    raise Qwen3AotError(f"{f.name}: tensor {n} is {t.dtype}; only bf16, fp16 and fp32 are supported.")
                tensors[n] = t
    return tensors


def to_model_state(hf: dict[str, torch.Tensor], cfg: Qwen3Config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF names to ours, with q/k/v and gate/up concatenated, in the run dtype."""
    out = {
        "embed_tokens": hf["model.embed_tokens.weight"],
        "norm": hf["model.norm.weight"],
    }
    if not cfg.tie_word_embeddings:
        out["lm_head"] = hf["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        a = p + "self_attn."
        out[q + "input_norm"] = hf[p + "input_layernorm.weight"]
        out[q + "qkv_proj"] = torch.cat([hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"]])
        out[q + "q_norm"] = hf[a + "q_norm.weight"]
        out[q + "k_norm"] = hf[a + "k_norm.weight"]
        out[q + "o_proj"] = hf[a + "o_proj.weight"]
        out[q + "post_norm"] = hf[p + "post_attention_layernorm.weight"]
        out[q + "gate_up_proj"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        out[q + "down_proj"] = hf[p + "mlp.down_proj.weight"]
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def load_checkpoint(path: str | Path, dtype: str | torch.dtype | None = None) -> tuple[Qwen3Config, dict[str, torch.Tensor]]:
    """Config and our state dict (CPU) of a Hugging Face Qwen3 checkpoint directory."""
    cfg = Qwen3Config.from_checkpoint(path)
    run_dtype = parse_dtype(dtype or cfg.dtype)
    return cfg, to_model_state(load_hf_tensors(path, cfg), cfg, run_dtype)
