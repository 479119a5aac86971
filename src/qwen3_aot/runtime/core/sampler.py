"""Next tokens from a step's logits, for a batch of requests with their own parameters, on
the logits' device: only the chosen ids (and their logprobs) go to the host.

The pipeline, in vLLM's order (each stage runs only when a row of the batch needs it, and a
row that does not is left as it was):
raw fp32 logits -> logprobs and top-N alternatives (the model's own distribution)
-> logit_bias -> repetition_penalty -> presence/frequency penalties    (core/penalties.py)
-> constraint (a grammar's allowed tokens: the `Constraint` hook)
-> greedy rows: argmax; the others: temperature -> min_p -> top_k -> top_p (core/filters.py)
-> draw.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from qwen3_aot.runtime.core.device_lists import on_device
from qwen3_aot.runtime.core.filters import TOPK_PATH_MAX_K, min_p_mask, top_k_top_p
from qwen3_aot.runtime.core.penalties import TokenHistory, apply_logit_bias, apply_penalties
from qwen3_aot.runtime.core.sampling_params import SamplingParams

__all__ = ["Constraint", "Sampled", "Sampler", "top_k_top_p"]


class Constraint(Protocol):
    """The grammar stage's hook: after the penalties, before temperature, set to -inf (in
    place) each row's logits outside its allowed set; rows it does not constrain untouched."""

    def apply(self, logits: torch.Tensor) -> None: ...


@dataclasses.dataclass
class Sampled:
    """A step's draw, on the device: ids [N]; with logprobs asked by some row, the chosen
    tokens' logprobs [N] and, with N alternatives asked, the top ids and logprobs [N, max N]."""
    ids: torch.Tensor
    logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


class Sampler:
    """Greedy rows take the argmax of their (biased, penalised, constrained) logits. The others
    sample from softmax(logits / temperature) cut by min_p, top_k and top_p, by the exponential
    race: argmax(p / E) with E ~ Exp(1) is a draw from p. A seeded request draws its E from its
    own generator, vocab-size numbers per step, so its tokens do not depend on its batch mates;
    unseeded rows share the device's default generator.

    Logprobs are those of the model's own distribution, log_softmax(raw logits), before bias,
    penalties, temperature and filters (vLLM's default).

    `history`: the device's token counts for the penalties (TokenHistory); a row that uses a
    penalty must come with its slot there.
    """

    def __init__(self, history: TokenHistory | None = None) -> None:
        self.history = history

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> tuple[list[int], list[float] | None]:
        """logits [N, vocab] fp32, one row per request; returns the N ids and, if any request
        asks for them, the N logprobs."""
        out = self.sample(logits, params, generators)
        return out.ids.tolist(), None if out.logprobs is None else out.logprobs.tolist()

    def sample(self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
               slots: list[int | None] | None = None, constraint: Constraint | None = None) -> Sampled:
        """As __call__, the results left on the logits' device: nothing here waits for it (the
        per-row parameters go over from pinned memory), so the host can queue more work.
        `slots`: each row's TokenHistory slot (None for rows without a penalty)."""
        dev = logits.device
        asked = [p.logprobs for p in params if p.logprobs is not None]
        logprobs = top_logprobs = top_ids = None
        if asked:  # the model's own distribution, before anything below changes the logits
            logprobs = torch.log_softmax(logits, -1)
            if max(asked) > 0:
                top_logprobs, top_ids = logprobs.topk(max(asked), -1)
        x = self._penalised(logits, params, slots, constraint)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if len(sampled) == len(params):
            ids = self._draw(x, params, generators)
        elif not sampled:
            ids = x.argmax(-1)
        else:  # only the sampled rows pay for the draw's passes over the vocabulary
            rows = on_device(sampled, torch.int64, dev)
            ids = x.argmax(-1).index_copy(0, rows, self._draw(x.index_select(0, rows), [params[i] for i in sampled],
                                                              [generators[i] for i in sampled]))
        out = Sampled(ids, None if logprobs is None else logprobs.gather(1, ids[:, None])[:, 0], top_ids, top_logprobs)
        if slots is not None and any(s is not None for s in slots):
            rows = [i for i, s in enumerate(slots) if s is not None]
            self.history.count([slots[i] for i in rows], ids[on_device(rows, torch.int64, dev)])
        return out

    def _penalised(self, logits: torch.Tensor, params: list[SamplingParams], slots: list[int | None] | None,
                   constraint: Constraint | None) -> torch.Tensor:
        """The logits after logit_bias, the penalties and the constraint: `logits` itself when
        no row needs any (a copy otherwise: the raw logits may be a CUDA graph's output)."""
        bias = any(p.logit_bias for p in params)
        history = any(p.uses_history for p in params)
        if not (bias or history or constraint is not None):
            return logits
        x = logits.clone()
        if bias:
            apply_logit_bias(x, [p.logit_bias for p in params])
        if history:
            if slots is None or any(s is None for s, p in zip(slots, params) if p.uses_history):
                raise RuntimeError("a row with a penalty needs its TokenHistory slot (EngineCore._sample gives one)")
            self._penalise(x, params, slots)
        if constraint is not None:
            constraint.apply(x)
        return x

    def _penalise(self, x: torch.Tensor, params: list[SamplingParams], slots: list[int | None]) -> None:
        """The penalties, in place, on the columns each penalised row has seen (its history)."""
        dev = x.device
        rows = [i for i, p in enumerate(params) if p.uses_history]
        rp = [params[i] for i in rows]
        repetition = presence = frequency = None
        if any(p.repetition_penalty != 1.0 for p in rp):
            repetition = on_device([p.repetition_penalty for p in rp], torch.float32, dev)
        if any(p.presence_penalty or p.frequency_penalty for p in rp):
            presence = on_device([p.presence_penalty for p in rp], torch.float32, dev)
            frequency = on_device([p.frequency_penalty for p in rp], torch.float32, dev)
        seen, counts = self.history.gather([slots[i] for i in rows], counts=presence is not None)
        apply_penalties(x, on_device(rows, torch.int64, dev), seen, counts, repetition, presence, frequency)

    def _draw(self, logits: torch.Tensor, params: list[SamplingParams],
              generators: list[torch.Generator | None]) -> torch.Tensor:
        """A draw for each row, all of them sampled (none greedy)."""
        dev = logits.device
        temperature = on_device([p.temperature for p in params], torch.float32, dev)
        probs = torch.softmax(logits / temperature[:, None], -1)
        if any(p.min_p > 0 for p in params):
            probs = min_p_mask(probs, on_device([p.min_p for p in params], torch.float32, dev))
        cutting = [p for p in params if p.top_k > 0 or p.top_p < 1]
        if cutting:
            # torch.topk instead of a sort when every row that cuts has a small k
            small = all(0 < p.top_k <= TOPK_PATH_MAX_K for p in cutting)
            probs = top_k_top_p(probs, on_device([p.top_k for p in params], torch.int64, dev),
                                on_device([p.top_p for p in params], torch.float32, dev),
                                max_k=max(p.top_k for p in cutting) if small else None)
        noise = torch.empty_like(probs).exponential_()
        for row, g in enumerate(generators):
            if g is not None:
                noise[row].exponential_(generator=g)
        return (probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(-1)
