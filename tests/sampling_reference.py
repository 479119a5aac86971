"""The sampling pipeline's definitions written plainly, one row at a time, in float64: what the
sampler's tests compare with. Each follows the source named in SamplingParams' docstring."""

from __future__ import annotations

import numpy as np

from qwen3_aot.runtime import SamplingParams


def penalised(logits: np.ndarray, p: SamplingParams, prompt: list[int], output: list[int]) -> np.ndarray:
    """One row's logits after logit_bias (OpenAI), repetition_penalty (transformers'
    RepetitionPenaltyLogitsProcessor over prompt + output) and presence/frequency penalties
    (OpenAI's, over the output)."""
    x = logits.astype(np.float64).copy()
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    if p.repetition_penalty != 1.0:
        for t in set(prompt) | set(output):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        c = output.count(t)
        x[t] -= c * p.frequency_penalty + p.presence_penalty
    return x


def kept(probs: np.ndarray, top_k: int, top_p: float, min_p: float = 0.0) -> set[int]:
    """The tokens min_p, then top_k, then top_p keep (ties at a boundary kept together):
    min_p drops tokens below min_p * the largest; a token survives top_k when fewer than k
    tokens are strictly more probable; then top_p keeps a token when the mass of the top-k
    tokens strictly more probable than it is below top_p times the top k's mass."""
    p = probs.astype(np.float64)
    alive = p >= min_p * p.max()
    greater = p[None, :] > p[:, None]  # greater[t, s]: s is strictly more probable than t
    if top_k > 0:
        alive &= (greater & alive[None, :]).sum(1) < top_k
        total = np.sort(p[alive])[::-1][:top_k].sum()
    else:
        total = p[alive].sum()
    if top_p < 1:
        alive &= (greater * (p * alive)[None, :]).sum(1) < top_p * total
    return set(np.flatnonzero(alive).tolist())


def distribution(logits: np.ndarray, p: SamplingParams, prompt: list[int] = (), output: list[int] = ()) -> np.ndarray:
    """The probability of each token being drawn for one row."""
    x = penalised(logits, p, list(prompt), list(output)) / p.temperature
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    keep = np.zeros(len(probs), bool)
    keep[list(kept(probs, p.top_k, p.top_p, p.min_p))] = True
    out = np.where(keep, probs, 0.0)
    return out / out.sum()
