"""Sampling fields through the official openai client on the real-tokenizer checkpoint (whose
generation_config.json carries Qwen3's own defaults: temperature 0.6, top_k 20, top_p 0.95):
the checkpoint's defaults, penalties, min_p, logit_bias and top logprobs on both endpoints,
streamed or not, equal to the engine in-process; and the protocol defects of issue 29."""

from __future__ import annotations

import time

import openai
import pytest
import torch

from qwen3_aot.runtime import SamplingParams
from qwen3_aot.runtime.text.reasoning import split_reasoning

pytestmark = pytest.mark.xdist_group("qwen_artifact")  # one pytest-xdist worker builds the real-tokenizer artifact

PROMPT = "The cat sat on the mat, and then"
MESSAGES = [{"role": "user", "content": "Name three colours."}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture
def server(qwen_server):
    return qwen_server  # tests/serve/conftest.py: one server for the modules on the real-tokenizer artifact


@pytest.fixture
def engine(qwen_engine):
    return qwen_engine


def complete(server, **kw):
    return server.client().completions.create(model="qwen", **kw)


def chat(server, **kw):
    return server.client().chat.completions.create(model="qwen", messages=MESSAGES, **kw)


def test_the_checkpoints_defaults_apply_to_fields_left_out(server, engine):
    assert "temperature=0.6" in server.log_text() and "top_k=20" in server.log_text()  # the start-up line
    kw = dict(prompt=PROMPT, max_tokens=16, seed=3)
    left_out = complete(server, **kw, extra_body={"ignore_eos": True}).choices[0].text
    explicit = complete(server, **kw, temperature=0.6, top_p=0.95, extra_body={"top_k": 20, "ignore_eos": True})
    openai_defaults = complete(server, **kw, temperature=1.0, top_p=1.0, extra_body={"top_k": -1, "ignore_eos": True})
    assert left_out == explicit.choices[0].text != openai_defaults.choices[0].text
    want = engine.generate(PROMPT, engine.default_sampling_params(max_tokens=16, seed=3, ignore_eos=True))[0]
    assert left_out == want.text
    assert engine.default_sampling_params(temperature=1.0).temperature == 1.0  # an explicit value wins


def test_generation_config_none_restores_openais_defaults(engine):
    from fastapi.testclient import TestClient

    from qwen3_aot.serve.app import build_app

    with TestClient(build_app(engine, "qwen", generation_config="none")) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)
        got = client.completions.create(model="qwen", prompt=PROMPT, max_tokens=16, seed=3,
                                        extra_body={"ignore_eos": True}).choices[0].text
    assert got == engine.generate(PROMPT, SamplingParams(max_tokens=16, seed=3, ignore_eos=True))[0].text


def penalised(engine) -> tuple[dict, dict, SamplingParams]:
    """OpenAI's fields, vLLM's extra ones, and the engine's parameters they mean."""
    bias_id = engine.tokenizer.encode(" blue")[0]
    fields = dict(presence_penalty=1.5, frequency_penalty=0.5, logit_bias={str(bias_id): 3.0}, seed=11, max_tokens=12)
    extra = {"repetition_penalty": 1.2, "min_p": 0.05, "ignore_eos": True}
    params = engine.default_sampling_params(max_tokens=12, presence_penalty=1.5, frequency_penalty=0.5,
                                            logit_bias={bias_id: 3.0}, seed=11, repetition_penalty=1.2, min_p=0.05,
                                            ignore_eos=True)
    return fields, extra, params


def test_penalties_min_p_and_bias_on_completions_streamed_or_not(server, engine):
    fields, extra, params = penalised(engine)
    want = engine.generate(PROMPT, params)[0].text
    assert want != engine.generate(PROMPT, engine.default_sampling_params(max_tokens=12, seed=11,
                                                                          ignore_eos=True))[0].text
    assert complete(server, prompt=PROMPT, **fields, extra_body=extra).choices[0].text == want
    chunks = complete(server, prompt=PROMPT, stream=True, **fields, extra_body=extra)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want


def test_penalties_min_p_and_bias_on_chat_streamed_or_not(server, engine):
    fields, extra, params = penalised(engine)
    want = split_reasoning(engine.chat(MESSAGES, params, enable_thinking=False).text)[1]
    body = {**extra, **NO_THINKING}
    assert chat(server, **fields, extra_body=body).choices[0].message.content == want
    chunks = chat(server, stream=True, **fields, extra_body=body)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want


def test_top_logprobs_are_the_raw_distributions_on_both_endpoints(server, engine, qwen_checkpoint):
    from transformers import Qwen3ForCausalLM

    want = engine.generate(PROMPT, SamplingParams(max_tokens=6, temperature=0, logprobs=3))[0]
    ids = engine.tokenizer.encode(PROMPT)
    hf = Qwen3ForCausalLM.from_pretrained(qwen_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        raw = torch.log_softmax(hf(torch.tensor([ids + want.token_ids])).logits[0, len(ids) - 1:-1].double(), -1)
    top_lp, top_ids = raw.topk(3, -1)
    for k, alts in enumerate(want.top_logprobs):
        assert set(top_ids[k].tolist()) <= set(alts) and len(alts) <= 4
        for t, lp in zip(top_ids[k].tolist(), top_lp[k].tolist()):
            assert alts[t] == pytest.approx(lp, abs=1e-4)
    text = [{engine_token(engine, t): lp for t, lp in alts.items()} for alts in want.top_logprobs]
    lp = complete(server, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3).choices[0].logprobs
    assert [{k: pytest.approx(v, abs=1e-5) for k, v in d.items()} for d in text] == lp.top_logprobs
    streamed = [d for c in complete(server, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3, stream=True)
                if c.choices and c.choices[0].logprobs for d in c.choices[0].logprobs.top_logprobs]
    assert [{k: pytest.approx(v, abs=1e-5) for k, v in d.items()} for d in text] == streamed
    for stream in (False, True):
        r = chat(server, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, stream=stream,
                 extra_body=NO_THINKING)
        content = [x for c in r for x in (c.choices[0].logprobs.content if c.choices and c.choices[0].logprobs
                                          else [])] if stream else r.choices[0].logprobs.content
        assert len(content) == 6
        for x in content:
            lps = [a.logprob for a in x.top_logprobs]
            assert len(lps) == 3 and lps == sorted(lps, reverse=True) and lps[0] >= x.logprob - 1e-6


def engine_token(engine, token_id: int) -> str:
    raw = engine.tokenizer.token_bytes(token_id)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def test_logprob_tokens_inside_a_character_carry_their_own_bytes(server, engine):
    half = engine.tokenizer._tok.token_to_id("ä")  # byte-level BPE's char for the byte 0xe4 alone
    body = {"logit_bias": {str(half): 100}, "max_tokens": 2, "temperature": 0}
    lp = chat(server, logprobs=True, **body, extra_body=NO_THINKING).choices[0].logprobs.content
    assert [(x.token, x.bytes) for x in lp] == [("bytes:\\xe4", [0xE4])] * 2
    tokens = complete(server, prompt=PROMPT, logprobs=0, **body).choices[0].logprobs.tokens
    assert tokens == ["bytes:\\xe4"] * 2


def test_chat_with_n_counts_the_prompt_once(server):
    kw = dict(max_tokens=2, temperature=1.0, seed=1, extra_body={"ignore_eos": True})
    one = chat(server, **kw).usage
    three = chat(server, n=3, **kw).usage
    assert three.prompt_tokens == one.prompt_tokens and three.completion_tokens == 6
    last = list(chat(server, n=3, stream=True, stream_options={"include_usage": True}, **kw))[-1]
    assert last.usage.prompt_tokens == one.prompt_tokens


def test_unknown_fields_are_served_and_named_in_a_warning(server):
    r = complete(server, prompt=PROMPT, max_tokens=2, extra_body={"foo_bar": 1, "parallel_tool_calls": False})
    assert r.choices[0].text is not None
    warned = [x for x in server.log_text().splitlines() if "WARNING" in x and "foo_bar" in x]
    assert warned and "parallel_tool_calls" in warned[-1]


def test_a_cancelled_request_logs_the_tokens_it_had(server):
    chunks = complete(server, prompt=PROMPT, max_tokens=1000, temperature=0, stream=True,
                      extra_body={"ignore_eos": True})
    seen = 0
    for c in chunks:
        seen += 1
        if seen == 4:
            rid = c.id
            break
    chunks.response.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        lines = [x for x in server.log_text().splitlines() if rid in x and "tokens in" in x]
        if lines:
            break
        time.sleep(0.1)
    assert lines, "no log line for the cancelled request"
    out = int(lines[0].split(" out ")[1].split(",")[0])
    assert out >= 3 and " in 0 " not in lines[0]


def test_echo_with_max_tokens_0_gives_the_prompts_logprobs(server, engine):
    """What lm-evaluation-harness's loglikelihood requests send: echo, logprobs, max_tokens 0."""
    ids = engine.tokenizer.encode(PROMPT)
    want = engine.generate(PROMPT, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2))[0]
    r = complete(server, prompt=PROMPT, echo=True, logprobs=2, max_tokens=0, temperature=0)
    c = r.choices[0]
    assert c.text == PROMPT and r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    assert c.logprobs.token_logprobs[1:] == pytest.approx(want.prompt_logprobs[1:], abs=1e-5)
    assert c.logprobs.tokens == [engine_token(engine, t) for t in ids]
    assert all(len(d) >= 2 for d in c.logprobs.top_logprobs[1:])
    by_ids = complete(server, prompt=ids, echo=True, logprobs=0, max_tokens=0).choices[0]
    assert by_ids.text == PROMPT and by_ids.logprobs.token_logprobs == c.logprobs.token_logprobs
    more = complete(server, prompt=PROMPT, echo=True, logprobs=1, max_tokens=3, temperature=0).choices[0]
    generated = engine.generate(PROMPT, SamplingParams(max_tokens=3, temperature=0))[0]
    assert more.text == PROMPT + generated.text and len(more.logprobs.tokens) == len(ids) + 3
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        complete(server, prompt=PROMPT, max_tokens=0)  # without echo, nothing to return
