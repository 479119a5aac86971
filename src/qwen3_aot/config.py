"""Qwen3Config: the architecture hyper-parameters read from a checkpoint's config.json."""

from __future__ import annotations

import dataclasses
import json
import math
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
    # RoPE scaling with every field resolved as transformers resolves it (`rope_scaling_fields`),
    # or None for the plain RoPE; custom_ops/qkv_rope.rope_cos_sin computes the table from it
    rope_scaling: dict[str, Any] | None = dataclasses.field(default=None, hash=False)

    @property
    def context_length(self) -> int:
        """The longest sequence the model's positions are meant for, as vLLM derives it: YaRN's
        original_max_position_embeddings x factor (Qwen3 with YaRN factor 4: 32,768 x 4 = 131,072;
        its max_position_embeddings, 40,960, is the unscaled model's), linear's
        max_position_embeddings x factor, else max_position_embeddings."""
        s = self.rope_scaling
        if s is None:
            return self.max_position_embeddings
        if s["rope_type"] == "yarn":
            return int(s["original_max_position_embeddings"] * s["factor"])
        return int(self.max_position_embeddings * s["factor"])

    def with_rope_scaling(self, scaling: dict[str, Any], source: str = "--rope-scaling") -> "Qwen3Config":
        """This config with its RoPE scaling replaced by `scaling` (a config.json rope_scaling
        dict, e.g. {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768};
        {"rope_type": "default"} removes it), checked as config.json's is. rope_theta stays the
        checkpoint's unless `scaling` names one."""
        if not isinstance(scaling, dict):
            raise Qwen3AotError(f"{source}: expected a JSON object such as {YARN_EXAMPLE}, got {scaling!r}.")
        theta, resolved = rope_scaling_fields({"rope_theta": self.rope_theta, **scaling},
                                              self.max_position_embeddings, source)
        return dataclasses.replace(self, rope_theta=theta, rope_scaling=resolved)

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
        params, scaling = hf.get("rope_parameters"), hf.get("rope_scaling")
        if params and scaling and params != scaling:
            # transformers 5 then reads rope_scaling alone and takes rope_theta from the top level
            # (10,000 if absent), silently dropping rope_parameters' rope_theta: refuse the ambiguity
            raise Qwen3AotError(f"{source} has both rope_parameters and rope_scaling; transformers reads rope_scaling "
                                "alone (and loses rope_parameters' rope_theta). Put the scaling fields into "
                                "rope_parameters and delete rope_scaling (or pass them to export with --rope-scaling).")
        rope = dict(scaling or params or {})
        rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
        rope_theta, rope_scaling = rope_scaling_fields(rope, int(hf.get("max_position_embeddings", 32768)), source)
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
            rope_scaling=rope_scaling,
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


YARN_EXAMPLE = '{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}'
# the fields transformers reads for each RoPE type we compute (modeling_rope_utils'
# _compute_linear_scaling_rope_parameters and _compute_yarn_parameters, transformers 5.25)
_FIELDS = {
    "default": {"rope_type", "type", "rope_theta", "partial_rotary_factor"},
    "linear": {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor"},
    "yarn": {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "original_max_position_embeddings",
             "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"},
}


def _number(rope: dict[str, Any], key: str, source: str) -> float:
    value = rope[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Qwen3AotError(f"{source}: rope scaling field {key} is {value!r}; it must be a number.")
    return value


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention scale (the paper's eq. 21, transformers' yarn_get_mscale): 0.1 mscale ln(s) + 1,
    and 1 for s <= 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_scaling_fields(rope: dict[str, Any], max_position_embeddings: int,
                        source: str = "config.json") -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, the scaling's fields resolved) of a config.json RoPE dict (rope_parameters
    or rope_scaling), every field read as transformers 5.25 reads it for Qwen3, or refused.

    yarn: factor (null: max_position_embeddings / original_max_position_embeddings);
    original_max_position_embeddings (absent: max_position_embeddings, as transformers'
    standardize_rope_params); beta_fast, beta_slow (absent, null or 0: 32 and 1, transformers'
    `or`); truncate (absent: true; any other value by its truth); attention_factor as given, else
    yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim) when both mscale and
    mscale_all_dim are set and non-zero, else yarn_mscale(factor): a lone mscale or
    mscale_all_dim changes nothing, in transformers as here (mscale_all_dim's other use,
    scaling q.k, is DeepSeek's attention, not Qwen3's). linear: factor. dynamic (NTK) is
    refused: transformers recomputes its frequencies from the longest sequence of each forward
    call, which a compiled graph over a shared paged cache cannot reproduce."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _FIELDS:
        why = (" dynamic NTK rescales the frequencies from the longest sequence of each forward call (transformers "
               "recomputes them per call), which a compiled graph over a shared paged cache cannot reproduce;"
               if rope_type == "dynamic" else "")
        raise Qwen3AotError(f"{source}: RoPE scaling {rope_type!r} is not supported;{why} use yarn (Qwen3's "
                            f"documented long-context scaling, e.g. --rope-scaling '{YARN_EXAMPLE}'), linear or none.")
    unknown = sorted(set(rope) - _FIELDS[rope_type])
    if unknown:
        raise Qwen3AotError(f"{source}: rope scaling field(s) {', '.join(unknown)} are not read for rope_type "
                            f"{rope_type!r} (it takes {', '.join(sorted(_FIELDS[rope_type] - {'type'}))}); remove "
                            "them, or check the rope_type.")
    theta = _number(rope, "rope_theta", source) if "rope_theta" in rope else 10000.0
    if theta <= 1:
        raise Qwen3AotError(f"{source}: rope_theta {theta!r} must be greater than 1.")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise Qwen3AotError(f"{source}: partial_rotary_factor {rope['partial_rotary_factor']!r} is not supported: "
                            "Qwen3 rotates the whole head (1.0); remove the field.")
    if rope_type == "default":
        return float(theta), None
    if "factor" not in rope:
        raise Qwen3AotError(f"{source}: rope_type {rope_type!r} needs a factor (e.g. {YARN_EXAMPLE}).")
    if rope_type == "linear":
        factor = _number(rope, "factor", source)
        if factor < 1:
            raise Qwen3AotError(f"{source}: rope scaling factor {factor!r} must be at least 1.")
        return float(theta), {"rope_type": "linear", "factor": float(factor)}
    original = rope.get("original_max_position_embeddings", max_position_embeddings)
    if isinstance(original, float) and original.is_integer():
        original = int(original)
    if isinstance(original, bool) or not isinstance(original, int) or original < 1:
        raise Qwen3AotError(f"{source}: original_max_position_embeddings {original!r} must be a positive integer "
                            "(the context the model was trained to: 32768 for Qwen3).")
    factor = max_position_embeddings / original if rope["factor"] is None else _number(rope, "factor", source)
    if factor < 1:
        raise Qwen3AotError(f"{source}: rope scaling factor {factor!r} must be at least 1 (YaRN stretches the "
                            "context the model was trained to).")
    betas = []
    for key, default in (("beta_fast", 32), ("beta_slow", 1)):
        value = rope.get(key)
        if value is not None:
            _number(rope, key, source)
        betas.append(float(value or default))  # transformers: `rope.get(key) or default`, so 0 is the default too
    if not betas[0] > betas[1] > 0:
        raise Qwen3AotError(f"{source}: YaRN needs beta_fast > beta_slow > 0 (the ramp runs from beta_fast "
                            f"rotations down to beta_slow), got beta_fast {betas[0]}, beta_slow {betas[1]}.")
    if rope.get("attention_factor") is not None:
        attention_factor = float(_number(rope, "attention_factor", source))
        if attention_factor <= 0:
            raise Qwen3AotError(f"{source}: attention_factor {attention_factor} must be positive (it multiplies "
                                "cos and sin).")
    else:
        for key in ("mscale", "mscale_all_dim"):
            if rope.get(key) is not None:
                _number(rope, key, source)
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = yarn_mscale(factor)
    return float(theta), {
        "rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": original,
        "beta_fast": betas[0], "beta_slow": betas[1], "attention_factor": attention_factor,
        "truncate": bool(rope.get("truncate", True)),
    }
