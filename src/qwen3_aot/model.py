"""The separated Qwen3 graph: plain torch and our custom ops, nothing else.

One forward serves prefill and decode alike: it takes a flat batch of T new
tokens from S sequences (see `Qwen3ForCausalLM.forward`) and a paged KV cache
that the caller owns and that the forward writes in place. This module is what
torch.export and AOTInductor compile. The decoder layers are written once
(`decoder_layers`), with the attention as a parameter: the paged op here, ONNX's
Attention over a past/present cache in build/onnx_graph.py. To run the model
eagerly (tests, the uncompiled baseline), wrap it in qwen3_aot.driver.FlatBatchDriver.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import qwen3_aot.custom_ops  # noqa: F401  (registers torch.ops.qwen3_aot.*)
from qwen3_aot.config import Qwen3Config
from qwen3_aot.custom_ops.qkv_rope import rope_cos_sin
from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.quantization import GROUP, SCALE_SUFFIX, quantized_layers, rows_repeat_by_block
from qwen3_aot.weights import checkpoint_quantization, load_checkpoint, parse_dtype

# The registered ops: what torch.export keeps as single nodes and AOTInductor compiles. A
# model may be given another backend with the same functions (tests pass the Triton
# kernels themselves, to run them eagerly on CPU under the interpreter).
OPS = torch.ops.qwen3_aot

# layer i's attention of its q [T, Hq, D], k and v [T, Hkv, D]: [T, Hq * D] (or [T, Hq, D])
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _param(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def rope_table(cfg: Qwen3Config, max_positions: int, device: torch.device | str) -> torch.Tensor:
    """The model's fp32 cos/sin table (custom_ops/qkv_rope.rope_cos_sin): the one function every
    graph (the paged one, the small-batch one, ONNX's) and the float64 reference take it from."""
    return rope_cos_sin(cfg.head_dim, cfg.rope_theta, max_positions, device, cfg.rope_scaling)


class DecoderLayer(nn.Module):
    """One layer's weights, named as weights.to_model_state names them; each projection named in
    `fp8` is float8_e4m3fn with its scales beside it (quantization.py, custom_ops/fp8_linear.py),
    and those in `block_scaled` have one scale per 128x128 block (set when the weights are in)."""
    block_scaled: frozenset[str] = frozenset()

    def __init__(self, cfg: Qwen3Config, dtype: torch.dtype, device: torch.device | str,
                 fp8: frozenset[str] = frozenset()) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        p = dict(dtype=dtype, device=device)
        self.input_norm = _param(h, **p)
        self.qkv_proj = _param(cfg.q_size + 2 * cfg.kv_size, h, **p)
        self.q_norm = _param(cfg.head_dim, **p)
        self.k_norm = _param(cfg.head_dim, **p)
        self.o_proj = _param(h, cfg.q_size, **p)
        self.post_norm = _param(h, **p)
        self.gate_up_proj = _param(2 * i, h, **p)
        self.down_proj = _param(h, i, **p)
        for name in fp8:
            w = getattr(self, name)
            setattr(self, name, _param(*w.shape, dtype=torch.float8_e4m3fn, device=device))
            setattr(self, name + SCALE_SUFFIX, _param(w.shape[0], -(-w.shape[1] // GROUP), dtype=torch.float32,
                                                      device=device))


class Qwen3ForCausalLM(nn.Module):
    # which layers the forward runs: `decoder_layers`, or `small_batch_layers` for the second
    # graph of an artifact, the one small decode batches replay (build/graph.py exports both)
    small_batch = False

    # the manifest's record of the FP8 weights (quantization.CheckpointQuantization.manifest_entry), None: float
    quantization: dict[str, Any] | None = None

    def __init__(self, cfg: Qwen3Config, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu", ops: Any = OPS, fp8_layers: list[str] = ()) -> None:
        """fp8_layers: our names of the projections held in FP8 ("layers.0.qkv_proj")."""
        super().__init__()
        self.config, self.ops = cfg, ops
        p = dict(dtype=dtype, device=device)
        self.embed_tokens = _param(cfg.vocab_size, cfg.hidden_size, **p)
        fp8 = [frozenset(n.split(".", 2)[2] for n in fp8_layers if n.startswith(f"layers.{i}."))
               for i in range(cfg.num_hidden_layers)]
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype, device, fp8[i]) for i in range(cfg.num_hidden_layers))
        self.norm = _param(cfg.hidden_size, **p)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(cfg.vocab_size, cfg.hidden_size, **p)
        cos_sin_device = "cpu" if str(device) == "meta" else device
        # one row per position: the model's whole context here; the build cuts it to the
        # artifact's max_model_len (`set_positions`)
        self.register_buffer("cos_sin", rope_table(cfg, cfg.context_length, cos_sin_device), persistent=False)

    def set_positions(self, max_positions: int, config: Qwen3Config | None = None) -> None:
        """Make the RoPE table cover positions 0 .. max_positions - 1 (the artifact's
        max_model_len: a 131,072-row table of head_dim 128 is 64 MB), of `config`'s RoPE (a new
        rope scaling given at export) or this model's."""
        self.config = config or self.config
        self.cos_sin = rope_table(self.config, max_positions, self.cos_sin.device)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype | None = None,
                        device: torch.device | str | None = None, ops: Any = OPS,
                        quantize: str | None = None) -> "Qwen3ForCausalLM":
        """Load a Hugging Face Qwen3 checkpoint directory (safetensors only); an FP8 one keeps
        its projections in FP8, and quantize="fp8" makes a float one's so (quantization.py)."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise Qwen3AotError("device cuda was asked for, but torch sees no CUDA GPU here; use device='cpu'.")
        cfg, state = load_checkpoint(path, dtype, quantize)
        quant = checkpoint_quantization(path, quantize)
        layers = quantized_layers(state)
        if layers and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            raise Qwen3AotError(f"{path}: FP8 weights need a GPU of compute capability 8.9 or more (Ada, Hopper); "
                                f"this one is {torch.cuda.get_device_name(device)}. Use a bf16 checkpoint here.")
        model = cls(cfg, parse_dtype(dtype or cfg.dtype), device="meta", ops=ops, fp8_layers=layers)
        model.quantization = quant.manifest_entry(layers) if quant and layers else None
        model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
        for layer in model.layers:
            layer.block_scaled = frozenset(n[: -len(SCALE_SUFFIX)] for n, s in layer.named_parameters()
                                           if n.endswith(SCALE_SUFFIX) and rows_repeat_by_block(s))
        model.cos_sin = model.cos_sin.to(device)
        return model.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens if self.config.tie_word_embeddings else self.lm_head

    # Where a tensor-parallel rank's graph (build/tensor_parallel.py) differs from this one,
    # which holds every head and the whole vocabulary: its embedding rows are one slice of the
    # vocabulary, o_proj's and down_proj's products are partial sums over its heads and its
    # slice of the MLP, and its logits one slice of the vocabulary.
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed_tokens)

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        return partial

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor,
                block_tables: torch.Tensor, logits_indices: torch.Tensor,
                k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> torch.Tensor:
        """Logits [N, vocab] (fp32) for the rows `logits_indices` of a flat batch.

        input_ids, positions: [T] int64, the new tokens and their positions in their sequences;
        seq_ids: [T] int32, which row of block_tables each token belongs to (a sequence's
            tokens contiguous, in position order);
        block_tables: [S, max_blocks] int32, the cache blocks of each sequence;
        logits_indices: [N] int64, the token rows whose logits are wanted;
        k_caches, v_caches: per layer [num_blocks, block_size, kv_heads, head_dim], written in place.
        """
        scale = 1.0 / math.sqrt(self.config.head_dim)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self.ops.paged_attention(q, k, v, k_caches[i], v_caches[i], positions, seq_ids, block_tables,
                                            scale)

        if self.small_batch:
            x, residual = small_batch_layers(self, input_ids, positions, seq_ids, block_tables, k_caches, v_caches,
                                             scale)
        else:
            x, residual = decoder_layers(self, input_ids, positions, attend)
        return final_logits(self, x, residual, logits_indices).float()


def decoder_layers(model: Qwen3ForCausalLM, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend, *,
                   ops: Any = None, upcast: Callable[[torch.Tensor], torch.Tensor] = _same,
                   cos_sin: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every decoder layer over a flat batch of tokens (input_ids, positions [T]), in the
    order of the numerics contract (docs/ARCHITECTURE.md); returns the last layer's output
    and the residual stream, not yet added. The graphs call it as it is; the build's float64
    reference (build/reference.py) passes its ops, an `upcast` applied to each weight as it
    is used (and to the embedded rows), and its float64 RoPE table."""
    cfg, ops = model.config, ops or model.ops
    eps = cfg.rms_norm_eps
    cos_sin = model.cos_sin if cos_sin is None else cos_sin
    x = upcast(model.embed(input_ids))  # the rows first: never the whole table
    residual = x
    for i, layer in enumerate(model.layers):
        if i == 0:
            h = ops.rms_norm(x, upcast(layer.input_norm), eps)
        else:
            h, residual = ops.add_rms_norm(x, residual, upcast(layer.input_norm), eps)
        if hasattr(layer, "qkv_proj" + SCALE_SUFFIX):
            q, k, v = ops.qk_norm_rope(project(layer, "qkv_proj", h, ops, upcast), upcast(layer.q_norm),
                                       upcast(layer.k_norm), cos_sin, positions, cfg.num_attention_heads,
                                       cfg.num_key_value_heads, eps)
        else:
            q, k, v = ops.qkv_rope(h, upcast(layer.qkv_proj), upcast(layer.q_norm), upcast(layer.k_norm), cos_sin,
                                   positions, cfg.num_attention_heads, cfg.num_key_value_heads, eps)
        x = model.all_reduce(project(layer, "o_proj", attend(i, q, k, v).flatten(1), ops, upcast))
        h, residual = ops.add_rms_norm(x, residual, upcast(layer.post_norm), eps)
        gate, up = project(layer, "gate_up_proj", h, ops, upcast).chunk(2, dim=-1)
        x = model.all_reduce(project(layer, "down_proj", F.silu(gate) * up, ops, upcast))
    return x, residual


def project(layer: DecoderLayer, name: str, x: torch.Tensor, ops: Any,
            upcast: Callable[[torch.Tensor], torch.Tensor] = _same, few_rows: bool = False) -> torch.Tensor:
    """x through the layer's projection `name`: F.linear, or FP8's op where the weight is FP8
    (dynamic activation quantization and the FP8 GEMM; few_rows: weight-only, the rows
    kernel up to 4 rows and the tiles kernel above, as small_linear is for float weights)."""
    w, scale = getattr(layer, name), getattr(layer, name + SCALE_SUFFIX, None)
    if scale is not None:
        return ops.fp8_linear(x, w, scale, not few_rows, name in layer.block_scaled)
    return ops.small_linear(x, w) if few_rows else F.linear(x, upcast(w))


def _fp8_small_batch_layer(model: "Qwen3ForCausalLM", layer: DecoderLayer, x: torch.Tensor, residual: torch.Tensor,
                           first: bool, attend: Callable[[torch.Tensor], torch.Tensor]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer of `small_batch_layers` with FP8 projections: its norms unfused (the weight-only
    kernels read FP8 weights, custom_ops/fp8_linear.py), the same paged-cache epilogue."""
    ops, eps = model.ops, model.config.rms_norm_eps
    if first:
        h = ops.rms_norm(x, layer.input_norm, eps)
    else:
        h, residual = ops.add_rms_norm(x, residual, layer.input_norm, eps)
    x = model.all_reduce(project(layer, "o_proj", attend(project(layer, "qkv_proj", h, ops, few_rows=True)).flatten(1),
                                 ops, few_rows=True))
    h, residual = ops.add_rms_norm(x, residual, layer.post_norm, eps)
    gate, up = project(layer, "gate_up_proj", h, ops, few_rows=True).float().chunk(2, dim=-1)
    act = (F.silu(gate) * up).to(h.dtype)  # fp32, rounded once, as small_linear's silu_mul
    return model.all_reduce(project(layer, "down_proj", act, ops, few_rows=True)), residual


def small_batch_layers(model: Qwen3ForCausalLM, input_ids: torch.Tensor, positions: torch.Tensor,
                       seq_ids: torch.Tensor, block_tables: torch.Tensor, k_caches: list[torch.Tensor],
                       v_caches: list[torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`decoder_layers` for a few tokens (small decode batches), over the paged cache of
    `forward`: the same math and roundings in fewer kernels. Each RMSNorm is computed inside
    the projection after it, SiLU(gate) * up inside the gate/up projection, the new k and v
    are written into the cache by the q/k norm's epilogue, and every projection is a kernel
    made for a few rows (custom_ops/small_linear.py), where cuBLAS's tiles for many rows left
    most of the bandwidth unused."""
    cfg, ops = model.config, model.ops
    eps = cfg.rms_norm_eps
    x = model.embed(input_ids)
    residual = x
    for i, layer in enumerate(model.layers):
        if any(name.endswith(SCALE_SUFFIX) for name, _ in layer.named_parameters()):
            def attend(qkv: torch.Tensor, i: int = i, layer: DecoderLayer = layer) -> torch.Tensor:
                q = ops.qk_norm_rope_cache(qkv, layer.q_norm, layer.k_norm, model.cos_sin, positions, seq_ids,
                                           block_tables, k_caches[i], v_caches[i], cfg.num_attention_heads,
                                           cfg.num_key_value_heads, eps)
                return ops.paged_attention_cached(q, k_caches[i], v_caches[i], positions, seq_ids, block_tables, scale)

            x, residual = _fp8_small_batch_layer(model, layer, x, residual, i == 0, attend)
            continue
        if i == 0:
            qkv = ops.rms_norm_linear(x, layer.input_norm, layer.qkv_proj, eps, False)
        else:
            qkv, residual = ops.add_rms_norm_linear(x, residual, layer.input_norm, layer.qkv_proj, eps, False)
        q = ops.qk_norm_rope_cache(qkv, layer.q_norm, layer.k_norm, model.cos_sin, positions, seq_ids, block_tables,
                                   k_caches[i], v_caches[i], cfg.num_attention_heads, cfg.num_key_value_heads, eps)
        attention = ops.paged_attention_cached(q, k_caches[i], v_caches[i], positions, seq_ids, block_tables, scale)
        x = model.all_reduce(ops.small_linear(attention.flatten(1), layer.o_proj))
        act, residual = ops.add_rms_norm_linear(x, residual, layer.post_norm, layer.gate_up_proj, eps, True)
        x = model.all_reduce(ops.small_linear(act, layer.down_proj))
    return x, residual


def final_logits(model: Qwen3ForCausalLM, x: torch.Tensor, residual: torch.Tensor, rows: torch.Tensor, *,
                 ops: Any = None, upcast: Callable[[torch.Tensor], torch.Tensor] = _same) -> torch.Tensor:
    """Logits, in the activations' dtype, of the token rows `rows`: the last residual add,
    the final norm, lm_head."""
    h, _ = (ops or model.ops).add_rms_norm(x.index_select(0, rows), residual.index_select(0, rows),
                                           upcast(model.norm), model.config.rms_norm_eps)
    return model.gather_vocab(F.linear(h, upcast(model.lm_head_weight())))
