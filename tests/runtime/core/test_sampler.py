"""The batched sampler: greedy rows, temperature, top-k, top-p, per-request seeds, logprobs."""

import pytest
import torch

from qwen3_aot import Qwen3AotError
from qwen3_aot.runtime import SamplingParams
from qwen3_aot.runtime.core.sampler import Sampler, top_k_top_p

GREEDY = SamplingParams(temperature=0)


def logits_of(probs: list[float], rows: int = 1) -> torch.Tensor:
    return torch.tensor(probs).log().repeat(rows, 1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_greedy_rows_take_the_argmax_whatever_their_batch_mates():
    logits = torch.randn(6, 300, generator=gen(0))
    params = [GREEDY, SamplingParams(temperature=2.0), SamplingParams(top_k=1, temperature=5.0),
              GREEDY, SamplingParams(top_p=0.5), GREEDY]
    ids, logprobs = Sampler()(logits, params, [None] * 6)
    assert logprobs is None
    want = logits.argmax(-1).tolist()
    assert [ids[i] for i in (0, 2, 3, 5)] == [want[i] for i in (0, 2, 3, 5)]

    # only the sampled rows go through the draw (its passes over the vocabulary), in their order
    drawn = []
    sampler = Sampler()
    draw = sampler._draw
    sampler._draw = lambda x, ps, gs: drawn.append((x.clone(), ps)) or draw(x, ps, gs)
    sampler(logits, params, [None] * 6)
    (x, ps), = drawn
    assert torch.equal(x, logits[[1, 4]]) and ps == [params[1], params[4]]


def test_top_k_1_on_the_sampling_path_is_the_argmax():
    logits = torch.randn(64, 300, generator=gen(1))
    probs = torch.softmax(logits / 3.0, -1)
    cut = top_k_top_p(probs, torch.ones(64, dtype=torch.long), torch.ones(64))
    assert ((cut > 0).sum(-1) == 1).all() and torch.equal(cut.argmax(-1), logits.argmax(-1))


def test_top_k_and_top_p_keep_the_right_tokens():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]] * 5)
    kept = top_k_top_p(probs, torch.tensor([2, 0, 0, 2, 0]), torch.tensor([1.0, 0.5, 0.7, 0.6, 1.0])) > 0
    assert kept.tolist() == [
        [False, True, False, True],    # top_k 2
        [False, True, False, False],   # top_p 0.5: the 0.5 token reaches it alone
        [False, True, False, True],    # top_p 0.7: 0.5 + 0.3
        [False, True, False, False],   # top_k 2 leaves 0.8; the 0.5 token is 0.625 of it >= top_p 0.6
        [True, True, True, True],      # no cut
    ]


def test_sampling_follows_the_distribution():
    p = [0.1, 0.6, 0.3, 0.0]
    torch.manual_seed(0)
    n = 4000
    ids, _ = Sampler()(logits_of(p, n), [SamplingParams(temperature=1.0)] * n, [None] * n)
    freq = torch.bincount(torch.tensor(ids), minlength=4).float() / n
    assert torch.allclose(freq, torch.tensor(p), atol=0.03)
    # temperature 0.5 squares the odds: 1 : 36 : 9
    ids, _ = Sampler()(logits_of(p, n), [SamplingParams(temperature=0.5)] * n, [None] * n)
    freq = torch.bincount(torch.tensor(ids), minlength=4).float() / n
    assert torch.allclose(freq, torch.tensor([1, 36, 9, 0]) / 46, atol=0.03)


def test_a_seeded_row_does_not_depend_on_its_batch_mates():
    logits = torch.randn(5, 300, generator=gen(2))
    mine = SamplingParams(temperature=1.5, seed=11)
    alone = [Sampler()(logits[2:3], [mine], [g])[0][0] for g in [gen(11)] for _ in range(8)]
    g = gen(11)
    mates = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5), mine, GREEDY,
             SamplingParams(top_p=0.8, seed=3)]
    batched = [Sampler()(logits, mates, [None, None, g, None, gen(3)])[0][2] for _ in range(8)]
    assert batched == alone
    assert len(set(alone)) > 1  # it does sample


def test_logprobs_are_the_models_own_log_softmax():
    logits = torch.randn(3, 50, generator=gen(4))
    params = [GREEDY, SamplingParams(temperature=3.0, logprobs=True), SamplingParams(top_k=4)]
    ids, logprobs = Sampler()(logits, params, [None] * 3)
    want = torch.log_softmax(logits, -1)[torch.arange(3), torch.tensor(ids)]
    assert torch.allclose(torch.tensor(logprobs), want)


@pytest.mark.parametrize("kwargs", [dict(max_tokens=0), dict(max_tokens=2.5), dict(top_p=0.0), dict(top_p=1.5),
                                    dict(temperature=-1), dict(temperature=float("nan")), dict(top_k=-2),
                                    dict(top_k=1.5), dict(seed=2**64), dict(seed=-1), dict(stop=("",)),
                                    dict(stop=(3,)), dict(stop_token_ids=("1",))])
def test_bad_sampling_params_are_refused(kwargs):
    with pytest.raises(Qwen3AotError):
        SamplingParams(**kwargs)
