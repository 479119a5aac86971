"""Penalties and logit_bias through the engine core, batched with requests that use none:
greedy output equal to transformers' generate with the definitions' float64 reference as its
logits processor (tests/sampling_reference.py), overlap on and off; seeded sampling the same
with overlap on and off."""

import dataclasses

import pytest
import torch

import sampling_reference as ref
from greedy_reference import prompts, tokenizer
from suite_support import FIXTURE
from qwen3_aot import runtime
from qwen3_aot.runtime import SamplingParams


NEW = 16
SHORT_GREEDY = SamplingParams(max_tokens=NEW, temperature=0)


# which prompt each row takes: ones whose greedy continuation each penalty changes
PROMPTS = [2, 3, 1, 4, 5]


def penalised_rows(banned: int) -> list[SamplingParams]:
    """`banned`: the first token of row 3's plain greedy output, which its logit_bias forbids."""
    return [dataclasses.replace(SHORT_GREEDY, repetition_penalty=1.5), SHORT_GREEDY,
            dataclasses.replace(SHORT_GREEDY, presence_penalty=1.5, frequency_penalty=1.0),
            dataclasses.replace(SHORT_GREEDY, logit_bias={banned: -100.0, 11: 8.0}),
            dataclasses.replace(SHORT_GREEDY, repetition_penalty=0.8, frequency_penalty=-0.3, presence_penalty=0.5)]


def row_prompts() -> list[str]:
    return [prompts()[i] for i in PROMPTS]


class DefinitionProcessor:
    """transformers' logits processor applying the float64 reference to each row of a batch of one."""

    def __init__(self, params: SamplingParams, prompt_len: int) -> None:
        self.params, self.prompt_len = params, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        ids = input_ids[0].tolist()
        x = ref.penalised(scores[0].numpy(), self.params, ids[:self.prompt_len], ids[self.prompt_len:])
        return torch.tensor(x, dtype=torch.float64)[None].to(scores.dtype)


@pytest.fixture(scope="module")
def hf_penalised() -> tuple[list[SamplingParams], list[list[int]], list[list[int]]]:
    """The rows, and transformers' greedy output of each with the reference processor and without."""
    from transformers import LogitsProcessorList, Qwen3ForCausalLM

    hf = Qwen3ForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32).eval()
    encoded = [tokenizer().encode(p).ids for p in row_prompts()]
    plain = [hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW)[0, len(ids):].tolist()
             for ids in encoded]
    rows = penalised_rows(banned=plain[3][0])
    out = []
    for ids, params in zip(encoded, rows):
        proc = LogitsProcessorList([DefinitionProcessor(params, len(ids))])
        got = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW, logits_processor=proc)
        out.append(got[0, len(ids):].tolist())
    return rows, out, plain


@pytest.fixture(scope="module")
def core(runtime_artifact):
    return runtime.load_core(runtime_artifact, num_blocks=100)


def test_penalised_greedy_is_transformers_with_the_definitions(core, hf_penalised):
    params, want, plain = hf_penalised
    for overlap in (True, False):
        core.overlap = overlap
        out = core.generate(row_prompts(), params)
        assert [c.token_ids for c in out] == want, overlap
    core.overlap = True
    assert [i for i in range(len(params)) if want[i] == plain[i]] == [1]  # each penalty changed its row
    assert len(core.sampler.history._free) == core.sampler.history.output.shape[0]  # every slot given back


def test_seeded_penalised_sampling_is_the_same_with_overlap_on_and_off(core):
    params = [SamplingParams(max_tokens=12, temperature=0.9, top_k=20, top_p=0.95, presence_penalty=1.5,
                             repetition_penalty=1.05, seed=s) for s in range(3)] + \
             [SamplingParams(max_tokens=12, temperature=0.7, min_p=0.1, seed=9), SHORT_GREEDY]
    runs = []
    for overlap in (True, False):
        core.overlap = overlap
        runs.append([c.token_ids for c in core.generate(row_prompts(), params)])
    core.overlap = True
    assert runs[0] == runs[1]
    assert len({tuple(t) for t in runs[0][:3]}) > 1


def test_prompt_logprobs_are_transformers_computed_a_few_rows_a_step(core, monkeypatch):
    """prompt_logprobs=3 on two long prompts beside a plain one, with at most 16 prompt rows a
    step (so each prompt takes several chunked steps): each prompt token's logprob and top 3
    equal transformers' log_softmax, and the sampled outputs are unchanged."""
    from transformers import Qwen3ForCausalLM

    from qwen3_aot.runtime.core import scheduler

    monkeypatch.setattr(scheduler, "PROMPT_LOGPROB_ROWS", 16)
    steps = []
    core.observers.append(steps.append)
    try:
        texts = [prompts()[15], prompts()[0], prompts()[13]]
        asking = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=3)
        out = core.generate(texts, [asking, SHORT_GREEDY, asking])
    finally:
        core.observers.remove(steps.append)
    assert max(s.tokens for s in steps) <= 16 + len(tokenizer().encode(texts[1]).ids)
    hf = Qwen3ForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32).eval()
    plain = core.generate(texts, SHORT_GREEDY)
    for c, text, p in zip(out, texts, plain):
        ids = tokenizer().encode(text).ids
        assert c.token_ids == p.token_ids[:len(c.token_ids)]
        if c is out[1]:
            assert c.prompt_logprobs is None
            continue
        with torch.no_grad():
            raw = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].double(), -1)
        want = raw.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert c.prompt_logprobs[0] is None and c.prompt_top_logprobs[0] is None
        assert len(c.prompt_logprobs) == len(ids)
        assert torch.allclose(torch.tensor(c.prompt_logprobs[1:], dtype=torch.float64), want, atol=1e-4)
        top_lp, top_ids = raw.topk(3, -1)
        for k in range(len(ids) - 1):
            alts = c.prompt_top_logprobs[k + 1]
            assert set(top_ids[k].tolist()) <= set(alts) and ids[k + 1] in alts
