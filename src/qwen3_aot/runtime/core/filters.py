"""The stages of the sampling pipeline that cut the tempered distribution: min_p, then top_k,
then top_p (definitions in SamplingParams' docstring).

Top-k and top-p are computed as one threshold per row, over the row's probabilities sorted in
descending order: a token is kept when its probability reaches the threshold, so tokens tied
at a boundary are kept or dropped together, and the kept set does not depend on how a sort
orders ties. When every row that cuts has a small k, the sorted values needed are only the
top k (torch.topk), not the whole vocabulary's sort.
"""

from __future__ import annotations

import torch

# Above this k, torch.topk is no cheaper than sorting the row.
TOPK_PATH_MAX_K = 1024


def min_p_mask(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the tokens whose probability is below min_p [N] times the row's largest
    (vLLM's min_p); a row with min_p 0 keeps all."""
    top = probs.amax(-1, keepdim=True)
    return probs.masked_fill_(probs < min_p[:, None] * top, 0.0)


def top_k_top_p(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                max_k: int | None = None) -> torch.Tensor:
    """Zero all but each row's top_k [N] (0: all) most likely tokens (ties with the k-th kept),
    then all but the fewest most likely of those whose mass reaches top_p [N] of the top k's
    mass (ties at the boundary kept). Not renormalised. `max_k`: the largest k of a row that
    cuts, when every row that cuts has 0 < k <= max_k (the caller knows it from the host): then
    only torch.topk(max_k) is taken, not a sort of the vocabulary."""
    vocab = probs.shape[-1]
    if max_k is not None and max_k <= TOPK_PATH_MAX_K:
        ranked = probs.topk(min(max_k, vocab), -1).values  # sorted, descending
    else:
        ranked = probs.sort(-1, descending=True).values
    return probs.masked_fill(probs < cut_threshold(ranked, top_k, top_p)[:, None], 0.0)


def cut_threshold(ranked: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Each row's smallest kept probability, from its probabilities in descending order (all
    of them, or at least the top k of rows with k > 0; rows with k 0 and p 1 keep everything:
    threshold 0)."""
    width = ranked.shape[-1]
    rank = torch.arange(width, device=ranked.device)
    k = torch.where(top_k > 0, top_k.clamp(max=width), width)
    in_k = ranked.masked_fill(rank >= k[:, None], 0.0)
    cum = in_k.cumsum(-1)
    mass = top_p * cum[:, -1]
    # the first rank whose cumulative mass reaches top_p (the last kept); p = 1 keeps all k
    last = torch.where(top_p < 1, (cum < mass[:, None]).sum(-1), k - 1).clamp(max=width - 1)
    last = torch.minimum(last, k - 1)
    threshold = ranked.gather(1, last[:, None])[:, 0]
    return torch.where((top_k > 0) | (top_p < 1), threshold, torch.zeros_like(threshold))
