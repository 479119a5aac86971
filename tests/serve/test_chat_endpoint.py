"""/v1/chat/completions over the real-tokenizer checkpoint (Qwen's BPE and chat template):
messages through the template, chat_template_kwargs, reasoning apart from content, streamed
deltas that join to the whole answer, all equal to the engine's chat in-process."""

from __future__ import annotations

import openai
import pytest

from qwen3_aot.runtime import SamplingParams
from qwen3_aot.runtime.text.reasoning import split_reasoning

MESSAGES = [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "Translate 猫 and 🐈 to French, then write `def f(): pass`."}]
pytestmark = pytest.mark.xdist_group("qwen_artifact")  # one pytest-xdist worker builds the real-tokenizer artifact


def chat(server, **kw):
    return server.client().chat.completions.create(model="qwen", messages=MESSAGES, **kw)


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}], ids=["thinking", "no thinking"])
def test_chat_equals_the_engines_chat_streamed_or_not(qwen_server, qwen_engine, kwargs):
    want = qwen_engine.chat(MESSAGES, SamplingParams(max_tokens=24, temperature=0), **kwargs)
    reasoning, content = split_reasoning(want.text)
    r = chat(qwen_server, max_tokens=24, temperature=0, extra_body={"chat_template_kwargs": kwargs})
    m = r.choices[0].message
    assert (m.role, m.content, m.reasoning_content) == ("assistant", content, reasoning)
    prompt = qwen_engine.apply_chat_template(MESSAGES, **kwargs)
    assert r.usage.prompt_tokens == len(qwen_engine.tokenizer.encode(prompt)) == want.prompt_tokens
    assert r.usage.completion_tokens == want.output_tokens and r.choices[0].finish_reason == want.finish_reason
    chunks = list(chat(qwen_server, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True},
                       extra_body={"chat_template_kwargs": kwargs}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == content
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == (reasoning or "")
    assert chunks[-1].usage.completion_tokens == want.output_tokens


def test_chat_continuous_usage_stats_counts_each_choices_tokens_so_far(qwen_server, qwen_engine):
    """vLLM's continuous_usage_stats in chat: the role chunk says 0 completion tokens, each later
    chunk its choice's tokens so far (counted by the chunks' logprobs), the last chunk the whole."""
    want = qwen_engine.chat(MESSAGES, SamplingParams(max_tokens=10, temperature=0))
    chunks = list(chat(qwen_server, max_tokens=10, temperature=0, n=2, logprobs=True, stream=True,
                       stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counted = [0, 0]
    for c in chunks[:-1]:
        i = c.choices[0].index
        counted[i] += len(c.choices[0].logprobs.content) if c.choices[0].logprobs else 0
        assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (want.prompt_tokens, counted[i])
    assert [c.usage.completion_tokens for c in chunks[:2]] == [0, 0] and counted == [want.output_tokens] * 2
    assert chunks[-1].usage.completion_tokens == 2 * want.output_tokens


def test_chat_logprobs_are_the_engines(qwen_server, qwen_engine):
    want = qwen_engine.chat(MESSAGES, SamplingParams(max_tokens=8, temperature=0, logprobs=True))
    lp = chat(qwen_server, max_tokens=8, temperature=0, logprobs=True).choices[0].logprobs.content
    assert [x.logprob for x in lp] == pytest.approx(want.logprobs, abs=1e-5)
    assert [x.token for x in lp] == [qwen_engine.tokenizer.decode([t]) for t in want.token_ids]


@pytest.mark.parametrize("body, says", [
    ({"messages": [{"content": "hi"}]}, "role"),
    ({"messages": []}, "messages"),
    ({"messages": MESSAGES, "tools": [{"type": "retrieval"}]}, "only function tools"),
    ({"messages": MESSAGES, "top_logprobs": 21, "logprobs": True}, "top_logprobs must be an int in [0, 20]"),
    ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
], ids=["no role", "no messages", "tools", "top_logprobs", "max_tokens=0"])
def test_bad_chat_requests_get_400_then_a_good_one_is_served(qwen_server, body, says):
    status, reply = qwen_server.post("/v1/chat/completions", body)
    assert status == 400 and says in reply["error"]["message"], reply
    assert chat(qwen_server, max_tokens=2).usage.completion_tokens <= 2


def test_the_openai_client_sees_a_bad_chat_request_as_BadRequestError(qwen_server):
    with pytest.raises(openai.BadRequestError):
        chat(qwen_server, max_tokens=2, temperature=-1)


def test_the_second_identical_chat_finds_its_prompt_in_the_prefix_cache(qwen_server):
    messages = [{"role": "system", "content": "You count sheep, one line each."},
                {"role": "user", "content": "Count the sheep of the prefix-cache test, from one."}]

    def ask(**kw):
        return qwen_server.client().chat.completions.create(model="qwen", messages=messages, max_tokens=4,
                                                            temperature=0, **kw)

    first = ask()
    second = ask()
    streamed = list(ask(stream=True, stream_options={"include_usage": True}))[-1]
    prompt = first.usage.prompt_tokens
    full = (prompt - 1) // 16 * 16  # every full block but the last token's (16: the artifact's block size)
    assert first.usage.prompt_tokens_details.cached_tokens < full
    assert second.usage.prompt_tokens_details.cached_tokens == full > 0
    assert streamed.usage.prompt_tokens_details.cached_tokens == full
    assert second.choices[0].message.content == first.choices[0].message.content
    m = qwen_server.metrics()
    assert 0 < m["qwen3_aot_prefix_cache_hits_total"] <= m["qwen3_aot_prefix_cache_queries_total"]
    assert f"(cached {full})" in qwen_server.log_text()
