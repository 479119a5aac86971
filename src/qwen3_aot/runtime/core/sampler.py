"""Next tokens from a step's logits, for a batch of requests with their own parameters, on
the logits' device: only the chosen ids (and their logprobs) go to the host."""

from __future__ import annotations

import torch

from qwen3_aot.runtime.core.sampling_params import SamplingParams


class Sampler:
    """Greedy rows take the argmax. The others sample from softmax(logits / temperature), cut
    to the top_k most likely tokens and then to the smallest set whose probability reaches
    top_p (renormalised after the top-k cut, as transformers does), by the exponential race:
    argmax(p / E) with E ~ Exp(1) is a draw from p. A seeded request draws its E from its own
    generator, vocab-size numbers per step, so its tokens do not depend on its batch mates;
    unseeded rows share the device's default generator.

    Logprobs are those of the chosen token under the model's own distribution,
    log_softmax(logits), before temperature, top-k and top-p.
    """

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> tuple[list[int], list[float] | None]:
        """logits [N, vocab] fp32, one row per request; returns the N ids and, if any request
        asks for them, the N logprobs."""
        ids, logprobs = self.sample(logits, params, generators)
        return ids.tolist(), None if logprobs is None else logprobs.tolist()

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As __call__, the results left on the logits' device: nothing here waits for it (the
        per-row parameters go over from pinned memory), so the host can queue more work."""
        ids = logits.argmax(-1)
        if not all(p.greedy for p in params):
            greedy = _on_device([p.greedy for p in params], torch.bool, logits.device)
            ids = torch.where(greedy, ids, self._sample(logits, params, generators))
        if not any(p.logprobs for p in params):
            return ids, None
        return ids, torch.log_softmax(logits, -1).gather(1, ids[:, None])[:, 0]

    def _sample(self, logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> torch.Tensor:
        dev = logits.device
        temperature = _on_device([1.0 if p.greedy else p.temperature for p in params], torch.float32, dev)
        probs = torch.softmax(logits / temperature[:, None], -1)
        if any(p.top_k > 0 or p.top_p < 1 for p in params):
            probs = top_k_top_p(probs, _on_device([p.top_k for p in params], torch.int64, dev),
                                _on_device([p.top_p for p in params], torch.float32, dev))
        noise = torch.empty_like(probs).exponential_()
        for row, g in enumerate(generators):
            if g is not None:
                noise[row].exponential_(generator=g)
        return (probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(-1)


def top_k_top_p(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero all but each row's top_k (0: all) most likely tokens, then all but the smallest
    set of those whose mass reaches top_p of what is left. Not renormalised."""
    sorted_p, order = probs.sort(-1, descending=True)
    rank = torch.arange(probs.shape[-1], device=probs.device)
    k = torch.where(top_k > 0, top_k, probs.shape[-1])
    sorted_p = sorted_p.masked_fill(rank >= k[:, None], 0.0)
    cum = sorted_p.cumsum(-1)
    mass = torch.where(top_p[:, None] < 1, top_p[:, None] * cum[:, -1:], float("inf"))  # 1: keep all
    sorted_p = sorted_p.masked_fill(cum - sorted_p >= mass, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


def _on_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor on `device` without waiting for it: torch.tensor(..., device="cuda")
    copies from pageable memory and synchronises the stream, i.e. waits for every queued kernel."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
