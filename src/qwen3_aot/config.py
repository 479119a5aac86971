"""Qwen3Config: the architecture hyper-parameters read from a checkpoint's config.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from qwen3_aot.errors import Qwen3AotError


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    dtype: str = "bfloat16"  # the dtype the checkpoint was saved in

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Qwen3Config":
        return cls(**d)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> "Qwen3Config":
        """Validate a Hugging Face Qwen3 config dict and keep what the graph needs."""
        arch = hf.get("architectures") or []
        if hf.get("model_type") != "qwen3" and "Qwen3ForCausalLM" not in arch:
            raise Qwen3AotError(
                f"{source}: model_type is {hf.get('model_type')!r} (architectures {arch}); "
                "qwen3-aot supports the dense Qwen3 family only (model_type 'qwen3')."
            )
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "rms_norm_eps"]
        missing = [k for k in required if k not in hf]
        if missing:
            raise Qwen3AotError(f"{source}: missing keys {missing}; is this a complete Qwen3 config?")
        if hf.get("attention_bias"):
            raise Qwen3AotError(f"{source}: attention_bias=true is not Qwen3 and is not supported.")
        if hf.get("use_sliding_window"):
            raise Qwen3AotError(f"{source}: use_sliding_window=true is not supported; set it to false.")
        if hf.get("hidden_act", "silu") != "silu":
            raise Qwen3AotError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (Qwen3 uses silu).")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise Qwen3AotError(f"{source}: RoPE scaling {rope_type!r} is not supported, only the default RoPE.")
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        heads = int(hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or hf["hidden_size"] // heads)
        if head_dim & (head_dim - 1) or head_dim < 16:
            raise Qwen3AotError(f"{source}: head_dim {head_dim} must be a power of two >= 16 for the Triton kernels.")
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise Qwen3AotError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}.")
        dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "bfloat16").replace("torch.", "")
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            rope_theta=float(rope_theta),
            rms_norm_eps=float(hf["rms_norm_eps"]),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            dtype=dtype,
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "Qwen3Config":
        path = Path(path)
        if not path.is_dir():
            raise Qwen3AotError(f"checkpoint directory {path} does not exist (or is not a directory).")
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise Qwen3AotError(f"{path} has no config.json; point at a Hugging Face checkpoint directory.")
        try:
            hf = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise Qwen3AotError(f"{cfg_file} is not valid JSON: {e}") from e
        return cls.from_hf_dict(hf, str(cfg_file))
