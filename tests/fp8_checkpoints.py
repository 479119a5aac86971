"""FP8 checkpoints of the trained fixture, laid out as their publishers write them, and the
float64 model they mean. Quantized here by the formats' own rules, written out independently
of qwen3_aot.quantization (which the tests check against them).

- Qwen's block FP8 (Qwen3-*-FP8): config.json's quantization_config {quant_method: fp8,
  fmt: e4m3, activation_scheme: dynamic, weight_block_size: [128, 128]}; each projection's
  `weight` float8_e4m3fn and `weight_scale_inv` fp32 [ceil(N/128), ceil(K/128)], the bf16
  weight being weight * scale per block; everything else bf16; sharded with an index.
- llm-compressor's compressed-tensors FP8 (FP8_DYNAMIC scheme): quant_method
  compressed-tensors, format float-quantized, one config group targeting Linear, weights
  per output channel (`weight_scale` fp32 [N, 1]), activations dynamic per token; lm_head ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from suite_support import FIXTURE

FP8, FP8_MAX = torch.float8_e4m3fn, 448.0
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK_FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": [128, 128]}
COMPRESSED_TENSORS_CONFIG = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
                              "strategy": "token"}}},
    "ignore": ["lm_head"]}


def _is_projection(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS


def _block_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    scale = torch.empty(-(-n // 128), -(-k // 128))
    q = torch.empty(n, k, dtype=FP8)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            block = w[128 * i:128 * (i + 1), 128 * j:128 * (j + 1)].float()
            scale[i, j] = block.abs().max() / FP8_MAX
            q[128 * i:128 * (i + 1), 128 * j:128 * (j + 1)] = (block / scale[i, j]).to(FP8)
    return q, scale


def _channel_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.float().abs().amax(dim=1, keepdim=True) / FP8_MAX
    return (w.float() / scale).to(FP8), scale


def _write(path: Path, tensors: dict[str, torch.Tensor], quantization_config: dict | None, shards: int) -> Path:
    path.mkdir(parents=True)
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        part = {n: tensors[n].contiguous() for n in names[s::shards]}
        f = f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        save_file(part, str(path / f), metadata={"format": "pt"})
        weight_map.update({n: f for n in part})
    if shards > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((FIXTURE / "config.json").read_text())
    config.update(dtype="bfloat16", **({"quantization_config": quantization_config} if quantization_config else {}))
    (path / "config.json").write_text(json.dumps(config, indent=1))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (path / f).write_bytes((FIXTURE / f).read_bytes())
    return path


def write_bf16(path: Path) -> Path:
    """The fixture in bf16, the weights the FP8 checkpoints here are quantized from."""
    return _write(path, {n: t.bfloat16() for n, t in load_file(str(FIXTURE / "model.safetensors")).items()}, None, 1)


def write_block_fp8(path: Path, shards: int = 2, **config_changes) -> Path:
    """The fixture as Qwen's block-FP8 checkpoint (bf16 elsewhere); config_changes edit its
    quantization_config."""
    tensors = _quantized_fixture("weight_scale_inv", _block_fp8)
    return _write(path, tensors, {**BLOCK_FP8_CONFIG, **config_changes}, shards)


def write_compressed_tensors(path: Path) -> Path:
    """The fixture as a compressed-tensors FP8_DYNAMIC checkpoint (per-channel weight scales)."""
    tensors = _quantized_fixture("weight_scale", _channel_fp8)
    return _write(path, tensors, COMPRESSED_TENSORS_CONFIG, shards=1)


def _quantized_fixture(scale_name: str, quantize) -> dict[str, torch.Tensor]:
    """The fixture's tensors in bf16, each projection quantized by `quantize` into its FP8
    weight and its scale tensor (named `scale_name` beside the weight)."""
    tensors = {}
    for name, t in load_file(str(FIXTURE / "model.safetensors")).items():
        if _is_projection(name):
            tensors[name], tensors[name[:-len("weight")] + scale_name] = quantize(t.bfloat16())
        else:
            tensors[name] = t.bfloat16()
    return tensors


def dequantized(path: Path) -> dict[str, torch.Tensor]:
    """Every weight of an FP8 checkpoint written above, as it means it, in float64."""
    tensors = {}
    for f in path.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    out = {}
    for name, t in tensors.items():
        if name.endswith(("weight_scale_inv", "weight_scale")):
            continue
        if t.dtype != FP8:
            out[name] = t.double()
            continue
        base = name[:-len("weight")]
        if base + "weight_scale" in tensors:  # compressed-tensors, per channel
            out[name] = t.double() * tensors[base + "weight_scale"].double()
        else:  # Qwen's, per 128x128 block
            scale = tensors[base + "weight_scale_inv"].double()
            full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:t.shape[0], :t.shape[1]]
            out[name] = t.double() * full
    return out


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Dynamic FP8 activations as Qwen's `activation_scheme: dynamic` means them (vLLM's
    per_token_group_quant_fp8): each token's inputs in groups of 128, each group scaled by its
    amax / 448 and rounded to the nearest e4m3; returned dequantized, in x's dtype."""
    k = x.shape[-1]
    groups = torch.nn.functional.pad(x, (0, -k % 128)).unflatten(-1, (-1, 128))
    amax = groups.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return ((groups / scale).to(FP8).to(x.dtype) * scale).flatten(-2)[..., :k]


def float64_reference(path: Path, activations: bool = True):
    """transformers' Qwen3 in float64 with the checkpoint's dequantized weights; activations:
    each quantized projection's input quantized as `quantize_activations` says (the dynamic
    scheme, in 128-input groups for both formats, as qwen3-aot runs them)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = json.loads((path / "config.json").read_text())
    config.pop("quantization_config")
    model = Qwen3ForCausalLM(Qwen3Config(**config)).double().eval()
    missing, unexpected = model.load_state_dict(dequantized(path), strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied: lm_head is the embedding
    if activations:
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in PROJECTIONS:
                module.register_forward_pre_hook(lambda _m, args: (quantize_activations(args[0]),))
    return model
