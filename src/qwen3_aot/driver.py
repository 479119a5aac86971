"""A minimal driver for any forward with the flat-batch signature of
`Qwen3ForCausalLM.forward`: the eager model, `torch.compile` of it, an ExportedProgram's
module, or a loaded artifact. It runs one prefill of all sequences, then decode steps of
the whole batch, with consecutive cache blocks per sequence: enough for tests, parity
checks and baselines (the runtime's engine schedules for real)."""

from __future__ import annotations

from typing import Callable

import torch

from qwen3_aot.config import Qwen3Config
from qwen3_aot.errors import Qwen3AotError

KVCache = tuple[list[torch.Tensor], list[torch.Tensor]]


class FlatBatchDriver:
    def __init__(self, forward: Callable[..., torch.Tensor], config: Qwen3Config, dtype: torch.dtype,
                 device: torch.device | str, block_size: int = 16) -> None:
        self.forward, self.config, self.dtype = forward, config, dtype
        self.device, self.block_size = torch.device(device), block_size

    @classmethod
    def of(cls, model: torch.nn.Module, block_size: int = 16) -> "FlatBatchDriver":
        """The eager model (qwen3_aot.model.Qwen3ForCausalLM) as its own forward."""
        return cls(model, model.config, model.dtype, model.device, block_size)

    def new_kv_cache(self, num_blocks: int) -> KVCache:
        """Whole, freshly allocated tensors per layer: AOTInductor clones an input it cannot
        prove aligned, and a cache write would then land in the clone."""
        cfg = self.config
        shape = (num_blocks, self.block_size, cfg.num_key_value_heads, cfg.head_dim)
        new = lambda: torch.zeros(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        return [new() for _ in range(cfg.num_hidden_layers)], [new() for _ in range(cfg.num_hidden_layers)]

    def block_tables(self, lengths: list[int]) -> tuple[torch.Tensor, int]:
        """Consecutive blocks for each sequence, enough for `lengths` tokens; and the block count."""
        need = [-(-n // self.block_size) for n in lengths]
        table = torch.zeros(len(lengths), max(need), dtype=torch.int32)
        start = 0
        for s, n in enumerate(need):
            table[s, :n] = torch.arange(start, start + n)
            start += n
        return table.to(self.device), start

    def prefill_inputs(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids, positions and seq_ids of one flat batch holding every sequence whole."""
        dev = self.device
        ids = torch.tensor([t for s in sequences for t in s], dtype=torch.int64, device=dev)
        pos = torch.cat([torch.arange(len(s)) for s in sequences]).to(dev)
        seq = torch.cat([torch.full((len(s),), i, dtype=torch.int32) for i, s in enumerate(sequences)]).to(dev)
        return ids, pos, seq

    def check_lengths(self, lengths: list[int]) -> None:
        if not lengths or min(lengths) < 1:
            raise Qwen3AotError("every sequence needs at least one token.")
        if max(lengths) > self.config.context_length:
            raise Qwen3AotError(f"a sequence of {max(lengths)} tokens exceeds the model's context "
                                f"({self.config.context_length} tokens: max_position_embeddings, or the length its "
                                "rope scaling stretches it to); shorten it.")

    @torch.inference_mode()
    def logits(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """fp32 logits [len, vocab] for every position of every sequence, in one paged batch."""
        lengths = [len(s) for s in sequences]
        self.check_lengths(lengths)
        table, blocks = self.block_tables(lengths)
        ids, pos, seq = self.prefill_inputs(sequences)
        out = self.forward(ids, pos, seq, table, torch.arange(len(ids), device=self.device),
                           *self.new_kv_cache(blocks))
        return list(out.split(lengths))

    @torch.inference_mode()
    def generate_greedy(self, sequences: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Exactly `max_new_tokens` greedy tokens per sequence (no eos stop)."""
        lengths = [len(s) for s in sequences]
        self.check_lengths([n + max_new_tokens for n in lengths])
        table, blocks = self.block_tables([n + max_new_tokens for n in lengths])
        caches = self.new_kv_cache(blocks)
        ids, pos, seq = self.prefill_inputs(sequences)
        last = torch.tensor(lengths, device=self.device).cumsum(0) - 1
        tokens = self.forward(ids, pos, seq, table, last, *caches).argmax(-1)
        out = [tokens]
        n = len(sequences)
        seq = torch.arange(n, dtype=torch.int32, device=self.device)
        pos = torch.tensor(lengths, device=self.device)
        rows = torch.arange(n, device=self.device)
        for _ in range(max_new_tokens - 1):
            tokens = self.forward(tokens, pos, seq, table, rows, *caches).argmax(-1)
            out.append(tokens)
            pos = pos + 1
        return torch.stack(out, dim=1).tolist()
