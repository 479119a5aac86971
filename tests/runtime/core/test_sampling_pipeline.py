"""The sampling pipeline's stages (logit_bias, repetition/presence/frequency penalties, min_p,
top_k, top_p, top-N logprobs) against float64 references of their definitions
(tests/sampling_reference.py), in batches that mix rows with and without each stage."""

import math

import numpy as np
import pytest
import torch

import sampling_reference as ref
from qwen3_aot import Qwen3AotError
from qwen3_aot.runtime import SamplingParams
from qwen3_aot.runtime.core.filters import top_k_top_p
from qwen3_aot.runtime.core.penalties import TokenHistory
from qwen3_aot.runtime.core.sampler import Sampler

VOCAB = 40
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                              reason="no CUDA device"))]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mixed_rows() -> list[SamplingParams]:
    return [SamplingParams(temperature=0),
            SamplingParams(temperature=0, logit_bias={3: 5.0, 7: -100.0}),
            SamplingParams(temperature=0, repetition_penalty=1.7),
            SamplingParams(temperature=0, presence_penalty=1.5),
            SamplingParams(temperature=0, frequency_penalty=0.8),
            SamplingParams(temperature=0, logit_bias={0: 2.0}, repetition_penalty=0.6, presence_penalty=-0.5,
                           frequency_penalty=1.2),
            SamplingParams(temperature=0)]


def with_history(params: list[SamplingParams], prompts: list[list[int]], outputs: list[list[int]],
                 device: str = "cpu"):
    """A sampler whose history holds each row's prompt and output (slots for the rows with a penalty)."""
    history = TokenHistory(VOCAB, torch.device(device))
    slots = [history.acquire(pr) if p.uses_history else None for p, pr in zip(params, prompts)]
    for slot, out in zip(slots, outputs):
        if slot is not None and out:
            history.count([slot] * len(out), torch.tensor(out, device=device))
    return Sampler(history), slots


def random_history(rows: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, VOCAB, rng.integers(1, 12)).tolist() for _ in range(rows)]
    outputs = [rng.integers(0, VOCAB // 2, rng.integers(0, 15)).tolist() for _ in range(rows)]
    return prompts, outputs


@pytest.mark.parametrize("device", DEVICES)
def test_penalised_logits_follow_the_definitions_row_by_row(device):
    params = mixed_rows()
    prompts, outputs = random_history(len(params), 0)
    logits = torch.randn(len(params), VOCAB, generator=gen(0)) * 3
    sampler, slots = with_history(params, prompts, outputs, device)
    got = sampler._penalised(logits.to(device), params, slots, None).cpu()
    for i, p in enumerate(params):
        want = ref.penalised(logits[i].numpy(), p, prompts[i], outputs[i])
        np.testing.assert_allclose(got[i].double().numpy(), want, rtol=1e-6, atol=1e-5)
    # rows without a stage are left exactly as they were
    assert torch.equal(got[0], logits[0]) and torch.equal(got[6], logits[6])


def test_greedy_rows_take_the_argmax_of_the_penalised_logits():
    params = mixed_rows()
    prompts, outputs = random_history(len(params), 1)
    logits = torch.randn(len(params), VOCAB, generator=gen(1))
    # each row's favourite token was already generated, so each penalty has something to change
    for i, out in enumerate(outputs):
        out += [int(logits[i].argmax())] * 2
    sampler, slots = with_history(params, prompts, outputs)
    ids = sampler.sample(logits, params, [None] * len(params), slots).ids.tolist()
    want = [int(np.argmax(ref.penalised(logits[i].numpy(), p, prompts[i], outputs[i])))
            for i, p in enumerate(params)]
    assert ids == want
    assert ids != logits.argmax(-1).tolist()  # the penalties did change something


@pytest.mark.parametrize("device", DEVICES)
def test_the_history_counts_each_draw_on_the_device_for_the_next_step(device):
    """A big frequency penalty on flat logits: each greedy step must avoid what the earlier
    steps drew, which only the device's counts (no host list) can tell it."""
    params = [SamplingParams(temperature=0, frequency_penalty=2.0), SamplingParams(temperature=0)]
    sampler, slots = with_history(params, [[1], [1]], [[], []], device)
    logits = torch.zeros(2, VOCAB, device=device)
    logits[:, :6] = torch.tensor([0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    drawn = [sampler.sample(logits, params, [None, None], slots).ids.tolist() for _ in range(6)]
    assert [d[0] for d in drawn] == [0, 1, 2, 3, 4, 5]
    assert [d[1] for d in drawn] == [0] * 6
    assert sampler.history.output[slots[0], :6].tolist() == [1] * 6


def assert_penalised_as_defined(sampler, slots, params, prompts, outputs, device, seed):
    logits = torch.randn(len(params), VOCAB, generator=gen(seed)) * 3
    got = sampler._penalised(logits.to(device), params, slots, None).cpu()
    for i, p in enumerate(params):
        want = ref.penalised(logits[i].numpy(), p, prompts[i], outputs[i])
        np.testing.assert_allclose(got[i].double().numpy(), want, rtol=1e-6, atol=1e-5, err_msg=f"row {i}")


PENALISED = SamplingParams(temperature=0, repetition_penalty=1.7, presence_penalty=0.5, frequency_penalty=0.3)


@pytest.mark.parametrize("device", DEVICES)
def test_histories_stay_exact_as_the_pool_grows_and_the_id_lists_widen(device):
    """Nine slots (the pool starts with eight), the last one's output running past the seen-id
    lists' first width (64): the other rows' lists keep their ids, and their places past their
    length still repeat one of them (no id of theirs is 0, so a place left 0 would show)."""
    rng = np.random.default_rng(3)
    params = [PENALISED] * 9
    prompts = [rng.integers(1, VOCAB, 3).tolist() for _ in range(9)]
    outputs = [rng.integers(1, VOCAB, 2).tolist() for _ in range(8)] + [rng.integers(0, VOCAB, 150).tolist()]
    sampler, slots = with_history(params, prompts, outputs, device)
    assert sampler.history.seen.shape[1] > 64
    assert_penalised_as_defined(sampler, slots, params, prompts, outputs, device, seed=3)


@pytest.mark.parametrize("device", DEVICES)
def test_a_slot_taken_again_forgets_the_request_that_held_it(device):
    """A slot given back after a long history and taken by a short one (a repeated prompt id
    among them), batched with a longer row so that the short row's whole list is read."""
    history = TokenHistory(VOCAB, torch.device(device))
    old = history.acquire(list(range(1, 30)))
    history.count([old] * 5, torch.tensor([5, 7, 7, 32, 33], device=device))  # counts the new one must not see
    history.release(old)
    slots = [history.acquire([5, 5, 6]), history.acquire(list(range(0, 40, 2)))]
    assert slots[0] == old
    prompts, outputs = [[5, 5, 6], list(range(0, 40, 2))], [[7, 7], [1, 3, 3, 9, 9, 9, 11, 13, 2, 0]]
    for slot, out in zip(slots, outputs):
        history.count([slot] * len(out), torch.tensor(out, device=device))
    assert_penalised_as_defined(Sampler(history), slots, [PENALISED] * 2, prompts, outputs, device, seed=4)


def wilson_hilferty_chi2(df: int, z: float = 3.719) -> float:
    """The chi-square quantile at normal quantile z (3.719: p = 1e-4), by Wilson-Hilferty."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic of `counts` against `probs` and its degrees of freedom; inf when a
    token of probability 0 was drawn."""
    n = counts.sum()
    if (counts[probs == 0] > 0).any():
        return math.inf, 1
    support = probs > 0
    expected = n * probs[support]
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


# probabilities 0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05 (then nearly nothing): with k 4, top-p 0.7
# keeps 3 tokens of the top 4's mass 0.77, but 4 if p were taken of the whole mass
CUT_LOGITS = np.log(np.array([0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05] + [1e-4] * 5))


@pytest.mark.parametrize("kind", ["top_k", "top_p", "min_p", "all"])
def test_seeded_draws_follow_the_reference_distribution(kind):
    cases = {"top_k": SamplingParams(top_k=4, temperature=1.3), "top_p": SamplingParams(top_p=0.7, temperature=0.9),
             "min_p": SamplingParams(min_p=0.3), "all": SamplingParams(top_k=4, top_p=0.7, temperature=1.0)}
    p = cases[kind]
    counts = draws(p, CUT_LOGITS, 20000, seed=0)
    stat, df = chi_square(counts, ref.distribution(CUT_LOGITS, p))
    assert stat < wilson_hilferty_chi2(df), (kind, stat, df)


def test_the_chi_square_test_catches_a_wrong_k_or_p():
    """The same draws against references with k or p applied wrongly: each must be refused."""
    k_only = draws(SamplingParams(top_k=4), CUT_LOGITS, 20000, seed=0)
    for p in (SamplingParams(top_k=3), SamplingParams(top_k=5), SamplingParams()):
        stat, df = chi_square(k_only, ref.distribution(CUT_LOGITS, p))
        assert stat > wilson_hilferty_chi2(df), p
    both = draws(SamplingParams(top_k=4, top_p=0.7), CUT_LOGITS, 20000, seed=0)
    for p in (SamplingParams(top_k=3, top_p=0.7), SamplingParams(top_k=4, top_p=0.6),
              SamplingParams(top_k=4, top_p=0.9), SamplingParams(top_k=4)):
        stat, df = chi_square(both, ref.distribution(CUT_LOGITS, p))
        assert stat > wilson_hilferty_chi2(df), p
    # top_p taken of the whole mass, not of what top_k left: 4 tokens kept, not 3
    probs = np.exp(CUT_LOGITS) / np.exp(CUT_LOGITS).sum()
    unrenormalised = np.where(np.arange(len(probs)) < 4, probs, 0)
    stat, df = chi_square(both, unrenormalised / unrenormalised.sum())
    assert stat > wilson_hilferty_chi2(df)


def draws(p: SamplingParams, logits: np.ndarray, n: int, seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    batch = torch.tensor(logits, dtype=torch.float32).repeat(n, 1)
    ids, _ = Sampler()(batch, [p] * n, [None] * n)
    return np.bincount(ids, minlength=len(logits))


def test_penalties_with_sampling_follow_the_reference_distribution():
    p = SamplingParams(temperature=0.8, top_k=5, repetition_penalty=1.3, presence_penalty=0.7,
                       frequency_penalty=0.3, logit_bias={6: 1.0})
    prompt, output = [0, 6], [1, 1, 3]
    n = 20000
    sampler, slots = with_history([p], [prompt], [output])
    logits = np.pad(CUT_LOGITS, (0, VOCAB - len(CUT_LOGITS)), constant_values=-20.0)
    torch.manual_seed(1)
    batch = torch.tensor(logits, dtype=torch.float32).repeat(n, 1)
    ids = sampler.sample(batch, [p] * n, [None] * n, slots * n).ids
    stat, df = chi_square(np.bincount(ids, minlength=VOCAB), ref.distribution(logits, p, prompt, output))
    assert stat < wilson_hilferty_chi2(df)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_path_keeps_the_sort_rules_set_ties_included(seed, device):
    g = gen(seed)
    rows, vocab = 48, 300
    logits = (torch.randn(rows, vocab, generator=g) * 2).round(decimals=1)  # many exact ties
    probs = torch.softmax(logits, -1)
    k = torch.randint(1, 40, (rows,), generator=g)
    p = torch.where(torch.rand(rows, generator=g) < 0.3, 1.0, torch.rand(rows, generator=g) * 0.9 + 0.05)
    on = [t.to(device) for t in (probs, k, p)]
    fast = (top_k_top_p(*on, max_k=int(k.max())) > 0).cpu()
    sort = (top_k_top_p(*on) > 0).cpu()
    assert torch.equal(fast, sort)
    for i in range(rows):
        assert set(fast[i].nonzero()[:, 0].tolist()) == ref.kept(probs[i].numpy(), int(k[i]), float(p[i])), i


def test_topk_path_leaves_rows_without_a_cut_whole():
    probs = torch.softmax(torch.randn(3, 100, generator=gen(5)), -1)
    out = top_k_top_p(probs, torch.tensor([0, 5, 0]), torch.tensor([1.0, 0.9, 1.0]), max_k=5)
    assert torch.equal(out[0], probs[0]) and torch.equal(out[2], probs[2]) and (out[1] > 0).sum() <= 5


def test_top_logprobs_come_from_the_raw_distribution():
    logits = torch.randn(3, VOCAB, generator=gen(6))
    params = [SamplingParams(temperature=0, logprobs=3, presence_penalty=2.0, logit_bias={1: 50.0}),
              SamplingParams(temperature=2.0, top_k=3, logprobs=5), SamplingParams(temperature=0)]
    sampler, slots = with_history(params, [[1], [2], [3]], [[4], [], []])
    out = sampler.sample(logits, params, [None] * 3, slots)
    raw = torch.log_softmax(logits.double(), -1)
    want_lp, want_ids = raw.topk(5, -1)
    assert torch.equal(out.top_ids, want_ids)
    assert torch.allclose(out.top_logprobs.double(), want_lp, atol=1e-6)
    assert out.ids[0] == 1  # the bias moved the draw, not the logprobs
    assert torch.allclose(out.logprobs.double(), raw.gather(1, out.ids[:, None])[:, 0], atol=1e-6)


@pytest.mark.parametrize("kwargs, field", [
    (dict(min_p=1.5), "min_p"), (dict(min_p=-0.1), "min_p"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(logit_bias={1: 101}), "logit_bias"), (dict(logit_bias={"x": 1}), "logit_bias"),
    (dict(logit_bias=[1]), "logit_bias"), (dict(logprobs=21), "logprobs"), (dict(logprobs=-1), "logprobs")])
def test_bad_values_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(Qwen3AotError, match=field):
        SamplingParams(**kwargs)


def test_unset_fields_take_defaults_and_explicit_ones_stay():
    defaults = {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "min_p": 0.0, "repetition_penalty": 1.1}
    p = SamplingParams(top_k=5).with_defaults(defaults)
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (0.6, 5, 0.95, 1.1)
    assert SamplingParams(temperature=1.0).with_defaults(defaults).temperature == 1.0  # explicit, though OpenAI's
    plain = SamplingParams()
    assert (plain.temperature, plain.top_k, plain.top_p, plain.min_p, plain.repetition_penalty) == (1.0, 0, 1.0, 0, 1)
    assert SamplingParams(logprobs=True).logprobs == 0 and SamplingParams(logprobs=False).logprobs is None
    assert SamplingParams(logit_bias={"5": 1}).logit_bias == {5: 1.0}
