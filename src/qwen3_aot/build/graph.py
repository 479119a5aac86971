"""torch.export of the one flat-batch forward, with its dynamic dimensions."""

from __future__ import annotations

import dataclasses

import torch

from qwen3_aot.driver import FlatBatchDriver
from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.model import Qwen3ForCausalLM
from qwen3_aot.weights import dtype_name


EXAMPLE_TOKENS, EXAMPLE_SEQS, EXAMPLE_BLOCKS = 6, 2, 4  # the sizes of example_inputs' batch


@dataclasses.dataclass(frozen=True)
class GraphLimits:
    """The dynamic ranges compiled into the graph; the runtime must stay inside them."""

    block_size: int = 16
    max_num_tokens: int = 8192   # tokens in one step (prefill chunk + decodes)
    max_num_seqs: int = 1024     # sequences in one step
    max_model_len: int = 0       # 0: the model's context (Qwen3Config.context_length)
    max_num_blocks: int = 1 << 22

    def __post_init__(self) -> None:
        # export traces one example batch (EXAMPLE_*): every range must hold it, or torch.export
        # fails deep inside with a constraint violation
        least = {"block_size": 1, "max_num_tokens": EXAMPLE_TOKENS, "max_num_seqs": EXAMPLE_SEQS,
                 "max_model_len": 0, "max_num_blocks": EXAMPLE_BLOCKS}
        for name, low in least.items():
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                flag = "--" + name.replace("_", "-")
                raise Qwen3AotError(f"{flag} {value!r} is not allowed: it must be an integer of at least {low}"
                                    + (" (0: the model's context length)." if name == "max_model_len" else "."))

    def resolved(self, model_max_len: int) -> "GraphLimits":
        """These limits with max_model_len settled: 0 becomes `model_max_len`, the model's context
        (Qwen3Config.context_length: max_position_embeddings, or what its rope scaling stretches it to)."""
        n = self.max_model_len or model_max_len
        if n > model_max_len:
            raise Qwen3AotError(f"--max-model-len {n} exceeds the model's context of {model_max_len} tokens (its "
                                "max_position_embeddings, or the length its rope scaling stretches it to). Use at most "
                                f"{model_max_len}, or stretch the context with YaRN, e.g. --rope-scaling "
                                "'{\"rope_type\": \"yarn\", \"factor\": 4.0, \"original_max_position_embeddings\": "
                                "32768}' for Qwen3's documented 131,072 tokens.")
        if n <= self.block_size:
            raise Qwen3AotError(f"max_model_len {n} must exceed the block size {self.block_size} (the graph is "
                                "traced with sequences of two blocks); lower --block-size.")
        return dataclasses.replace(self, max_model_len=n)

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)


def example_inputs(model: Qwen3ForCausalLM, limits: GraphLimits) -> tuple:
    """Two sequences of three tokens each: every dynamic size >= 2, so none is specialised."""
    dev = model.device
    k_caches, v_caches = FlatBatchDriver.of(model, limits.block_size).new_kv_cache(num_blocks=4)
    return (
        torch.tensor([5, 6, 7, 8, 9, 10], device=dev),
        torch.tensor([0, 1, 2, 0, 1, 2], device=dev),
        torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.int32, device=dev),
        torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=dev),
        torch.tensor([2, 5], device=dev),
        k_caches,
        v_caches,
    )


def dynamic_shapes(num_layers: int, limits: GraphLimits) -> dict:
    Dim = torch.export.Dim
    tokens = Dim("tokens", min=1, max=limits.max_num_tokens)
    seqs = Dim("seqs", min=1, max=limits.max_num_seqs)
    blocks_per_seq = Dim("blocks_per_seq", min=1, max=limits.max_blocks_per_seq)
    rows = Dim("logit_rows", min=1, max=limits.max_num_tokens)
    num_blocks = Dim("num_blocks", min=1, max=limits.max_num_blocks)
    return {
        "input_ids": {0: tokens}, "positions": {0: tokens}, "seq_ids": {0: tokens},
        "block_tables": {0: seqs, 1: blocks_per_seq}, "logits_indices": {0: rows},
        "k_caches": [{0: num_blocks}] * num_layers, "v_caches": [{0: num_blocks}] * num_layers,
    }


def export_forward(model: Qwen3ForCausalLM, limits: GraphLimits, small_batch: bool = False
                   ) -> torch.export.ExportedProgram:
    """The forward as one graph; small_batch: its small-batch form (`model.small_batch_layers`),
    the same inputs and weights (under the same names, so both graphs share one copy)."""
    was, model.small_batch = model.small_batch, small_batch
    try:
        with torch.no_grad():
            return torch.export.export(model, example_inputs(model, limits),
                                       dynamic_shapes=dynamic_shapes(model.config.num_hidden_layers, limits))
    finally:
        model.small_batch = was


def input_specs(model: Qwen3ForCausalLM, limits: GraphLimits) -> list[dict]:
    """What the manifest says about each graph input: shape (ints or dim names) and dtype."""
    cfg = model.config
    cache = ["num_blocks", limits.block_size, cfg.num_key_value_heads, cfg.head_dim]
    dt = dtype_name(model.dtype)
    return [
        {"name": "input_ids", "shape": ["tokens"], "dtype": "int64"},
        {"name": "positions", "shape": ["tokens"], "dtype": "int64"},
        {"name": "seq_ids", "shape": ["tokens"], "dtype": "int32"},
        {"name": "block_tables", "shape": ["seqs", "blocks_per_seq"], "dtype": "int32"},
        {"name": "logits_indices", "shape": ["logit_rows"], "dtype": "int64"},
        {"name": "k_caches", "list_of": cfg.num_hidden_layers, "shape": cache, "dtype": dt, "mutated": True},
        {"name": "v_caches", "list_of": cfg.num_hidden_layers, "shape": cache, "dtype": dt, "mutated": True},
    ]
