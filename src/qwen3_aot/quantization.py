"""FP8 weights: the checkpoint formats read, the quantization a build makes, our one layout.

Read: Qwen's block FP8 (config `quantization_config.quant_method: fp8`, `fmt: e4m3`,
`activation_scheme: dynamic`, `weight_block_size: [128, 128]`; each quantized linear's
`weight` float8_e4m3fn and `weight_scale_inv` fp32 [ceil(N/128), ceil(K/128)], the weight
being `weight * scale` block by block) and llm-compressor's compressed-tensors FP8
(`quant_method: compressed-tensors`, `format: float-quantized`, 8-bit float symmetric weights
with a `weight_scale` per output channel [N, 1], per tensor [1], or per 128x128 block, and
activations none or dynamic). Which linears are quantized comes from the checkpoint: every
q/k/v/o/gate/up/down projection not in its `ignored_layers` / `ignore`; the embedding, the
norms and lm_head stay in the checkpoint's dtype. Anything else is refused by name.

Built: `export --quantize fp8` turns a bf16/fp16 checkpoint's projections into Qwen's block
FP8 (128x128 blocks, scale = amax / 448, round to nearest), then reads them as above.

Ours (custom_ops/fp8_linear.py has the math): each quantized weight float8_e4m3fn [N, K] under
our name, and `<name>_scale` fp32 [N, ceil(K/128)], every format's scales repeated out to it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterator

import torch

from qwen3_aot.errors import Qwen3AotError

# (not imported from custom_ops/fp8_linear.py, which imports these: the runtime reads weights
# without importing triton or the ops)
GROUP = 128          # inputs per scale, of the weights and of the quantized activations
FP8_MAX = 448.0      # the largest finite float8_e4m3fn
FP8 = torch.float8_e4m3fn

SCALE_SUFFIX = "_scale"  # our name of a quantized weight's scales: "layers.3.qkv_proj_scale"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK = [GROUP, GROUP]
SUPPORTED = ("Qwen's block FP8 (quant_method fp8, fmt e4m3, activation_scheme dynamic, weight_block_size "
             "[128, 128]) and compressed-tensors FP8 (format float-quantized, 8-bit float symmetric weights per "
             "channel, per tensor or per 128x128 block, activations dynamic or none)")
METHODS = ("fp8", "compressed-tensors", "quantize fp8")  # the last: made by the build from a float checkpoint


@dataclasses.dataclass(frozen=True)
class CheckpointQuantization:
    """What a checkpoint's quantization_config says, checked: how to find each quantized
    weight's scale and how to read it."""
    method: str                 # one of METHODS
    strategy: str               # "block", "channel" or "tensor": the checkpoint's scale shape
    scale_name: str             # the scale tensor's name beside "weight": weight_scale_inv or weight_scale
    ignore: tuple[str, ...]     # module names (or "re:" regular expressions) left unquantized

    def quantized(self, module: str) -> bool:
        """Whether the HF module ("model.layers.0.self_attn.q_proj") holds FP8 weights."""
        if module.rsplit(".", 1)[-1] not in PROJECTIONS:
            return False
        for pattern in self.ignore:
            if pattern.startswith("re:") and re.fullmatch(pattern[3:], module) or pattern == module:
                return False
        return True

    def source(self) -> dict[str, Any]:
        """What a linked artifact records to read the checkpoint's scales at load (`from_source`)."""
        return {**dataclasses.asdict(self), "ignore": list(self.ignore)}

    @classmethod
    def from_source(cls, d: dict[str, Any]) -> "CheckpointQuantization":
        return cls(**{**d, "ignore": tuple(d["ignore"])})

    def manifest_entry(self, layers: list[str]) -> dict[str, Any]:
        return {"method": self.method, "source_strategy": self.strategy, "weight_dtype": "float8_e4m3fn",
                "block_size": BLOCK if self.strategy == "block" else None,
                "scale_layout": f"one fp32 scale per weight row and group of {GROUP} inputs",
                "activations": f"dynamic, per token and group of {GROUP} inputs (quantized for the FP8 GEMM of "
                               "many rows; weight-only in the small-batch graph)",
                "layers": sorted(layers)}


BUILT = CheckpointQuantization("quantize fp8", "block", "weight_scale_inv", ())


def parse(hf: dict[str, Any], source: str) -> CheckpointQuantization | None:
    """The checkpoint's quantization (None: a float checkpoint), or our error naming what it
    says and what is supported."""
    qc = hf.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise Qwen3AotError(f"{source}: quantization_config is {qc!r}, not an object; supported: {SUPPORTED}.")
    method = qc.get("quant_method")
    if method == "fp8":
        return _parse_block_fp8(qc, source)
    if method == "compressed-tensors":
        return _parse_compressed_tensors(qc, source)
    raise Qwen3AotError(f"{source}: quantization_config.quant_method is {method!r}; qwen3-aot reads {SUPPORTED}. "
                        "Use a bf16 checkpoint (optionally with --quantize fp8) instead.")


def _refuse(source: str, what: str) -> Qwen3AotError:
    return Qwen3AotError(f"{source}: quantization_config {what}; qwen3-aot reads {SUPPORTED}.")


def _parse_block_fp8(qc: dict[str, Any], source: str) -> CheckpointQuantization:
    if qc.get("fmt", "e4m3") != "e4m3":
        raise _refuse(source, f"has fmt {qc.get('fmt')!r} (only e4m3 is supported)")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise _refuse(source, f"has activation_scheme {qc.get('activation_scheme')!r} (static activation scales "
                              "are not supported, only dynamic)")
    if qc.get("weight_block_size") != BLOCK:
        raise _refuse(source, f"has weight_block_size {qc.get('weight_block_size')!r} (only {BLOCK} is supported)")
    ignore = list(qc.get("ignored_layers") or []) + list(qc.get("modules_to_not_convert") or [])
    return CheckpointQuantization("fp8", "block", "weight_scale_inv", tuple(ignore))


def _parse_compressed_tensors(qc: dict[str, Any], source: str) -> CheckpointQuantization:
    if qc.get("format") != "float-quantized":
        raise _refuse(source, f"has format {qc.get('format')!r} (only float-quantized is supported)")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise _refuse(source, f"has {len(groups)} config_groups (one, for the Linear layers, is supported)")
    group = next(iter(groups.values()))
    w, a = group.get("weights") or {}, group.get("input_activations")
    if group.get("targets") != ["Linear"]:
        raise _refuse(source, f"targets {group.get('targets')!r} (only ['Linear'] is supported)")
    if (w.get("num_bits"), w.get("type"), w.get("symmetric", True), w.get("dynamic", False)) != \
            (8, "float", True, False):
        raise _refuse(source, f"has weights {w} (only 8-bit float, symmetric, static scales are supported)")
    strategy = w.get("strategy")
    if strategy not in ("channel", "tensor", "block"):
        raise _refuse(source, f"has weight strategy {strategy!r} (channel, tensor or block are supported)")
    if strategy == "block" and w.get("block_structure") != BLOCK:
        raise _refuse(source, f"has block_structure {w.get('block_structure')!r} (only {BLOCK} is supported)")
    if a is not None and (a.get("num_bits"), a.get("type"), a.get("dynamic")) != (8, "float", True):
        raise _refuse(source, f"has input_activations {a} (static activation scales are not supported, only "
                              "dynamic 8-bit float ones or none)")
    return CheckpointQuantization("compressed-tensors", strategy, "weight_scale", tuple(qc.get("ignore") or []))


def scale_names(quant: CheckpointQuantization, weight_names: list[str]) -> dict[str, str]:
    """Each quantized HF weight ("...q_proj.weight") -> the name of its scale tensor."""
    return {n: n[: -len("weight")] + quant.scale_name for n in weight_names
            if n.endswith(".weight") and quant.quantized(n[: -len(".weight")])}


def row_scales(shape: tuple[int, ...], scale: torch.Tensor, quant: CheckpointQuantization, name: str) -> torch.Tensor:
    """A checkpoint's scale tensor for a weight of `shape` [N, K] as our fp32 [N, ceil(K/128)], checked."""
    n, k = shape
    kb = -(-k // GROUP)
    expected = {"block": [(-(-n // GROUP), kb)], "channel": [(n, 1), (n,)], "tensor": [(), (1,)]}[quant.strategy]
    if tuple(scale.shape) not in expected:
        raise Qwen3AotError(f"tensor {name} has shape {tuple(scale.shape)}; a {quant.strategy} scale of a weight of "
                            f"shape {(n, k)} has shape {expected[0]}. The checkpoint is damaged or not {quant.method}.")
    if not scale.is_floating_point() or scale.dtype == FP8:
        raise Qwen3AotError(f"tensor {name} is {scale.dtype}; scales must be fp32 (or bf16/fp16).")
    s = scale.float()
    if not (torch.isfinite(s).all() and (s > 0).all()):
        raise Qwen3AotError(f"tensor {name} holds non-finite or non-positive scales; the checkpoint is damaged: "
                            "download it again.")
    if quant.strategy == "block":
        return s.repeat_interleave(GROUP, dim=0)[:n].contiguous()
    return s.reshape(-1, 1).expand(n, kb).contiguous()


def quantize_block_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (any float) -> (float8_e4m3fn [N, K], fp32 [ceil(N/128), ceil(K/128)]): Qwen's
    block FP8, scale = amax / 448 per 128x128 block (1 for an all-zero block), round to nearest."""
    n, k = w.shape
    nb, kb = -(-n // GROUP), -(-k // GROUP)
    padded = torch.nn.functional.pad(w.float(), (0, kb * GROUP - k, 0, nb * GROUP - n))
    amax = padded.view(nb, GROUP, kb, GROUP).abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    per_element = scale.repeat_interleave(GROUP, 0).repeat_interleave(GROUP, 1)[:n, :k]
    return (w.float() / per_element).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_checkpoint_tensors(hf: dict[str, torch.Tensor], device: torch.device | str = "cpu"
                                ) -> dict[str, torch.Tensor]:
    """A float checkpoint's tensors with every projection in Qwen's block FP8 (weight and
    weight_scale_inv), as `export --quantize fp8` reads them; computed on `device` (a GPU does
    an 8B model's in seconds), returned on the CPU. The same bits on any device: amax is exact,
    and torch's fp32 division and conversion to FP8 round correctly (to nearest) on both."""
    out = dict(hf)
    for name in scale_names(BUILT, list(hf)):
        q, scale = quantize_block_fp8(hf[name].to(device))
        out[name], out[name[: -len("weight")] + "weight_scale_inv"] = q.cpu(), scale.cpu()
    return out


def model_state_items(names: Iterator[tuple[str, tuple[str, ...]]], get: Callable[[str], torch.Tensor],
                      quant: CheckpointQuantization, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Our tensors from HF ones (`names` as weights.model_state_names gives them): float ones
    in `dtype`; a quantized projection's FP8 parts concatenated, with their scales as ours."""
    for ours, parts in names:
        flags = {quant.quantized(p[: -len(".weight")]) for p in parts}
        if len(flags) > 1:
            raise Qwen3AotError(f"the checkpoint quantizes some of {', '.join(parts)} and not others; qwen3-aot fuses "
                                "them into one projection and needs all or none quantized.")
        if not flags.pop():
            yield ours, torch.cat([get(p) for p in parts]).to(dtype).contiguous()
            continue
        weights = [get(p) for p in parts]
        for p, w in zip(parts, weights):
            if w.dtype != FP8:
                raise Qwen3AotError(f"tensor {p} is {w.dtype}; the checkpoint's quantization_config ({quant.method}) "
                                    "makes it a quantized layer, stored as float8_e4m3fn.")
        scales = [row_scales(tuple(w.shape), get(p[: -len("weight")] + quant.scale_name), quant, p[: -len("weight")] +
                             quant.scale_name) for p, w in zip(parts, weights)]
        yield ours, torch.cat(weights).contiguous()
        yield ours + SCALE_SUFFIX, torch.cat(scales).contiguous()


def quantized_layers(state: dict[str, torch.Tensor]) -> list[str]:
    """Our names of the quantized projections in a state dict."""
    return sorted(k[: -len(SCALE_SUFFIX)] for k in state if k.endswith(SCALE_SUFFIX))


def rows_repeat_by_block(scale: torch.Tensor) -> bool:
    """Whether our scales [N, ceil(K/128)] are one per 128x128 weight block (N a multiple of 128,
    every row of a block of 128 rows with the same scales): what a 128x128 block-scaled GEMM
    reads. True of Qwen's block FP8 and of `export --quantize fp8` when each fused part's rows
    are a multiple of 128 (every Qwen3's are); not of per-channel scales."""
    n = scale.shape[0]
    return n % GROUP == 0 and bool((scale.view(n // GROUP, GROUP, -1) == scale[::GROUP, None]).all())
