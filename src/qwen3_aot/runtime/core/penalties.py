"""The stages of the sampling pipeline that change logits from what a request has seen:
logit_bias, repetition_penalty, presence/frequency penalties (their definitions, with sources,
are in SamplingParams' docstring), and the per-request token history they read.

The history lives on the device so that a step can be queued before the previous step's
tokens reach the host (EngineCore's overlap): each sampled id is counted, and appended to its
request's seen ids, by scatters queued right after the draw, in stream order before any later
step reads them.
"""

from __future__ import annotations

import torch

from qwen3_aot.runtime.core.device_lists import on_device


class TokenHistory:
    """What each request has seen, on the device, in slots of one pool:

    - output[slot, token] (int32): the times `token` was generated (frequency and presence).
    - seen[slot, :]: the ids the penalties touch, as a list: the prompt's distinct ids, then
      each generated id in draw order (repeats included). Past the slot's length its places
      repeat its first id: a whole row (up to the longest of a batch) is then a list of seen
      ids, with nothing to mask, since penalising an id twice writes the same value twice.

    A step's penalties read and write only these columns (hundreds to a few thousand per row
    against a vocabulary of 151,936). The host knows each slot's length (it queues every
    append), so the lists widen without waiting for the device. Only requests with a penalty
    take a slot; the pool doubles when full and keeps its size. A slot is taken at the
    request's first draw and given back when it ends."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size, self.device = vocab_size, device
        self.output = torch.zeros(0, vocab_size, dtype=torch.int32, device=device)
        self.seen = torch.zeros(0, 0, dtype=torch.int64, device=device)
        self._length: list[int] = []  # each slot's ids in `seen`
        self._free: list[int] = []

    def acquire(self, prompt_ids: list[int]) -> int:
        """A slot for a new request: output counts zero, `seen` the prompt's distinct ids
        (queued, no wait). The prompt may not be empty: its first id fills the unused places."""
        distinct = list(dict.fromkeys(prompt_ids))
        if not distinct:
            raise ValueError("a token history needs a prompt of at least one id")
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self._widen(len(distinct))
        self.output[slot].zero_()
        self.seen[slot, :len(distinct)] = on_device(distinct, torch.int64, self.device)
        self.seen[slot, len(distinct):] = distinct[0]
        self._length[slot] = len(distinct)
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def count(self, slots: list[int], ids: torch.Tensor) -> None:
        """For each i, add one to output[slots[i], ids[i]] and append ids[i] to that slot's
        seen ids: the tokens just drawn, left on the device (a slot may come more than once)."""
        places = []
        for slot in slots:
            places.append(self._length[slot])
            self._length[slot] += 1
        self._widen(max(self._length[s] for s in slots))
        index = on_device(slots, torch.int64, self.device)
        self.output.index_put_((index, ids), torch.ones_like(ids, dtype=torch.int32), accumulate=True)
        self.seen.index_put_((index, on_device(places, torch.int64, self.device)), ids.to(torch.int64))

    def gather(self, slots: list[int], counts: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The slots' seen ids [len(slots), w], w the longest of theirs (a shorter slot's row
        ends in repeats of its first id), and, if `counts`, the output counts at those ids."""
        index = on_device(slots, torch.int64, self.device)
        seen = self.seen[:, :max(self._length[s] for s in slots)].index_select(0, index)
        return seen, self.output[index[:, None], seen] if counts else None

    def _grow(self) -> None:
        old = self.output.shape[0]
        new = max(8, 2 * old)
        out = torch.zeros(new, self.vocab_size, dtype=torch.int32, device=self.device)
        seen = torch.zeros(new, self.seen.shape[1], dtype=torch.int64, device=self.device)
        out[:old], seen[:old] = self.output, self.seen
        self.output, self.seen = out, seen
        self._length += [0] * (new - old)
        self._free += range(new - 1, old - 1, -1)

    def _widen(self, width: int) -> None:
        """Room for `width` ids a slot, doubling: the new places repeat each slot's first id."""
        old = self.seen.shape[1]
        if width <= old:
            return
        seen = torch.zeros(self.seen.shape[0], max(width, 2 * old, 64), dtype=torch.int64, device=self.device)
        seen[:, :old] = self.seen
        if old:
            seen[:, old:] = self.seen[:, :1]
        self.seen = seen


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


def apply_penalties(logits: torch.Tensor, rows: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor | None,
                    repetition: torch.Tensor | None, presence: torch.Tensor | None,
                    frequency: torch.Tensor | None) -> None:
    """In place, on the columns seen [R, w] of the rows `rows` [R] of logits (a row's prompt's
    and output's ids, repeats allowed), with x = logits[row, t]:
    repetition_penalty (transformers', vLLM's): x / repetition if x > 0, else x * repetition;
    then presence/frequency (OpenAI's): x -= count * frequency + (count > 0) * presence, counts
    [R, w] the output counts of those ids. A None penalty is skipped (counts may then be None).
    Each new value depends only on its column, so an id listed twice is written twice alike."""
    at = (rows[:, None], seen)
    x = logits[at]
    if repetition is not None:
        p = repetition[:, None]
        x = torch.where(x > 0, x / p, x * p)
    if presence is not None:
        x -= counts * frequency[:, None] + (counts > 0) * presence[:, None]
    logits[at] = x
