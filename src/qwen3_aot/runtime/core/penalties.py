"""The stages of the sampling pipeline that change logits from what a request has seen:
logit_bias, repetition_penalty, presence/frequency penalties (their definitions, with sources,
are in SamplingParams' docstring), and the per-request token history they read.

The history lives on the device so that a step can be queued before the previous step's
tokens reach the host (EngineCore's overlap): each sampled id is counted by a scatter queued
right after the draw, in stream order before any later step reads the counts.
"""

from __future__ import annotations

import torch

from qwen3_aot.runtime.core.device_lists import on_device


class TokenHistory:
    """Per-request token counts on the device, in slots of one pool: output[slot, token] (int32,
    the times it was generated) and prompt[slot, token] (bool, in the prompt). Only requests
    with a penalty take a slot (vocab * 5 bytes each); the pool doubles when full and keeps its
    size. A slot is taken at the request's first draw and given back when it ends."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size, self.device = vocab_size, device
        self.output = torch.zeros(0, vocab_size, dtype=torch.int32, device=device)
        self.prompt = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)
        self._free: list[int] = []

    def acquire(self, prompt_ids: list[int]) -> int:
        """A slot for a new request: output counts zero, prompt marked (queued, no wait)."""
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self.output[slot].zero_()
        self.prompt[slot].zero_()
        self.prompt[slot, on_device(prompt_ids, torch.int64, self.device)] = True
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def count(self, slots: torch.Tensor, ids: torch.Tensor) -> None:
        """Add one to output[slots[i], ids[i]] for each i: the tokens just drawn."""
        self.output.index_put_((slots, ids), torch.ones_like(ids, dtype=torch.int32), accumulate=True)

    def _grow(self) -> None:
        old = self.output.shape[0]
        new = max(8, 2 * old)
        out = torch.zeros(new, self.vocab_size, dtype=torch.int32, device=self.device)
        prompt = torch.zeros(new, self.vocab_size, dtype=torch.bool, device=self.device)
        out[:old], prompt[:old] = self.output, self.prompt
        self.output, self.prompt = out, prompt
        self._free += range(new - 1, old - 1, -1)


def apply_logit_bias(logits: torch.Tensor, biases: list[dict[int, float] | None]) -> None:
    """logits[i, t] += biases[i][t], in place (OpenAI's logit_bias)."""
    rows, cols, vals = [], [], []
    for i, b in enumerate(biases):
        if b:
            rows += [i] * len(b)
            cols += b.keys()
            vals += b.values()
    dev = logits.device
    logits.index_put_((on_device(rows, torch.int64, dev), on_device(cols, torch.int64, dev)),
                      on_device(vals, torch.float32, dev), accumulate=True)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> None:
    """In place, for the tokens `seen` [N, vocab] bool (prompt or output): a positive logit
    divided by penalty [N], a negative one multiplied (transformers', vLLM's)."""
    p = penalty[:, None]
    logits.copy_(torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits))


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor,
                             frequency: torch.Tensor) -> None:
    """In place: logits -= counts * frequency + (counts > 0) * presence (OpenAI's), counts [N,
    vocab] the output tokens' counts, presence and frequency [N]."""
    logits -= counts * frequency[:, None] + (counts > 0) * presence[:, None]
