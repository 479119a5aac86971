"""/v1/completions over the tiny CPU artifact, with the real openai client: the answers equal
the engine's in-process, streamed or not; bad requests get a 400 with the engine's message."""

from __future__ import annotations

import json

import openai
import pytest

from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime import SamplingParams

pytestmark = pytest.mark.xdist_group("tiny_server")  # one pytest-xdist worker starts the tiny server
PROMPT = 'The extended form, "assert expression1,'


def complete(server, **kw):
    return server.client().completions.create(model="tiny", **kw)


def stream(server, **kw) -> tuple[str, list]:
    chunks = list(server.client().completions.create(model="tiny", stream=True, **kw))
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


def test_greedy_completion_equals_the_engine_and_counts_its_tokens(tiny_server, tiny_engine):
    want = tiny_engine.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0))[0]
    r = complete(tiny_server, prompt=PROMPT, max_tokens=24, temperature=0)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(tiny_engine.tokenizer.encode(PROMPT)) == want.prompt_tokens
    assert r.usage.completion_tokens == len(want.token_ids) and r.usage.total_tokens == want.prompt_tokens + len(
        want.token_ids)
    assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")


def test_streamed_pieces_concatenate_to_the_text_and_usage_comes_last(tiny_server):
    whole = complete(tiny_server, prompt=PROMPT, max_tokens=32, temperature=0)
    text, chunks = stream(tiny_server, prompt=PROMPT, max_tokens=32, temperature=0,
                          stream_options={"include_usage": True})
    assert text == whole.choices[0].text and len(chunks) > 3
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 2) + ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 32
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_ends_with_done_and_no_usage_unless_asked(tiny_server):
    c = tiny_server.connection()
    c.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 4, "stream": True}),
              {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    events = [x for x in r.read().decode().split("\n\n") if x]
    c.close()
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])


def test_continuous_usage_stats_puts_each_choices_usage_so_far_in_every_chunk(tiny_server, tiny_engine):
    """vLLM's stream_options.continuous_usage_stats (guidellm asks for it): every chunk carries its
    choice's prompt tokens and its completion tokens so far, which the chunks' own logprobs count
    (one entry a token, OpenAI's definition); the last chunk is still the whole request's usage,
    and without include_usage the option gives nothing (vLLM's rule)."""
    prompts = [PROMPT, "def f(x):"]
    prompt_tokens = [len(tiny_engine.tokenizer.encode(p)) for p in prompts]
    _, chunks = stream(tiny_server, prompt=prompts, n=2, max_tokens=12, temperature=0, logprobs=0,
                       stream_options={"include_usage": True, "continuous_usage_stats": True})
    counted = [0] * 4
    for c in chunks[:-1]:
        i = c.choices[0].index
        counted[i] += len(c.choices[0].logprobs.tokens)
        assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (prompt_tokens[i // 2], counted[i])
        assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    assert counted == [12] * 4
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 48
    assert chunks[-1].usage.prompt_tokens == sum(prompt_tokens)
    _, chunks = stream(tiny_server, prompt=PROMPT, max_tokens=4, stream_options={"continuous_usage_stats": True})
    assert all(c.usage is None for c in chunks)


def test_stop_string_cuts_the_text_as_the_engine_does(tiny_server, tiny_engine):
    free = tiny_engine.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0))[0].text
    stop = free[6:9]  # a string the greedy output does reach
    want = tiny_engine.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0, stop=(stop,)))[0]
    assert want.finish_reason == "stop" and stop not in want.text
    r = complete(tiny_server, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want.text, "stop")
    assert stream(tiny_server, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop)[0] == want.text


def test_max_tokens_ends_with_length(tiny_server):
    r = complete(tiny_server, prompt=PROMPT, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_seed_reproduces_sampling_and_equals_the_engine(tiny_server, tiny_engine):
    kw = dict(prompt=PROMPT, max_tokens=24, temperature=1.0, extra_body={"ignore_eos": True})
    a, b = (complete(tiny_server, seed=7, **kw).choices[0].text for _ in range(2))
    other = complete(tiny_server, seed=8, **kw).choices[0].text
    want = tiny_engine.generate(PROMPT, SamplingParams(max_tokens=24, temperature=1.0, seed=7, ignore_eos=True))[0]
    assert a == b == want.text and other != a


def test_logprobs_are_the_engines_streamed_or_not(tiny_server, tiny_engine):
    want = tiny_engine.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0, logprobs=True))[0]
    lp = complete(tiny_server, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0).choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(want.logprobs, abs=1e-5)
    assert lp.tokens == [tiny_engine.tokenizer.decode([t]) for t in want.token_ids]
    assert [list(d.values())[0] for d in lp.top_logprobs] == lp.token_logprobs
    _, chunks = stream(tiny_server, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0)
    streamed = [x for c in chunks for x in c.choices[0].logprobs.token_logprobs]
    offsets = [x for c in chunks for x in c.choices[0].logprobs.text_offset]
    assert streamed == pytest.approx(want.logprobs, abs=1e-5) and offsets == lp.text_offset


def test_token_ids_and_lists_of_prompts_and_n(tiny_server, tiny_engine):
    ids = tiny_engine.tokenizer.encode(PROMPT)
    p = SamplingParams(max_tokens=8, temperature=0)
    want = [c.text for c in tiny_engine.generate([PROMPT, "def f(x):"], p)]
    assert complete(tiny_server, prompt=ids, max_tokens=8, temperature=0).choices[0].text == want[0]
    r = complete(tiny_server, prompt=[PROMPT, "def f(x):"], max_tokens=8, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [want[0], want[0], want[1], want[1]]
    assert r.usage.prompt_tokens == len(ids) + len(tiny_engine.tokenizer.encode("def f(x):"))
    sampled = complete(tiny_server, prompt="ab", max_tokens=16, temperature=1.0, seed=3, n=2,
                       extra_body={"ignore_eos": True})
    assert sampled.choices[0].text != sampled.choices[1].text  # choice j samples with seed + j
    text, chunks = stream(tiny_server, prompt=[PROMPT, "def f(x):"], max_tokens=8, temperature=0)
    by_index = {}
    for c in chunks:
        by_index[c.choices[0].index] = by_index.get(c.choices[0].index, "") + c.choices[0].text
    assert by_index == {0: want[0], 1: want[1]}


def engine_message(engine, prompt, **params) -> str:
    try:
        engine.make_request(prompt, SamplingParams(**params))
    except Qwen3AotError as e:
        return str(e)
    raise AssertionError(f"the engine takes {prompt!r} {params}")


@pytest.mark.parametrize("prompt, params", [
    (PROMPT, {"max_tokens": 0}),
    (PROMPT, {"temperature": -1.0}),
    (PROMPT, {"top_p": 0.0}),
    (PROMPT, {"max_tokens": 100000}),
    ([5, 99999], {}),
    ("", {}),
    (PROMPT, {"stop_token_ids": [10 ** 6]}),
], ids=["max_tokens=0", "temperature<0", "top_p=0", "too long", "token id outside vocab", "empty", "stop id"])
def test_each_bad_request_gets_400_with_the_engines_message_then_a_good_one_is_served(tiny_server, tiny_engine,
                                                                                       prompt, params):
    message = engine_message(tiny_engine, prompt, **params)
    status, body = tiny_server.post("/v1/completions", {"prompt": prompt, **params})
    assert status == 400 and body["error"]["message"] == message
    assert set(body["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as e:
        complete(tiny_server, prompt=prompt, extra_body=params)
    assert e.value.status_code == 400 and message in str(e.value)
    assert complete(tiny_server, prompt=PROMPT, max_tokens=3).usage.completion_tokens == 3


@pytest.mark.parametrize("body, says", [
    ({"prompt": PROMPT, "temperature": "0.5"}, "temperature"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": {"role": "user", "content": "hi"}}, "prompt"),
    ({"prompt": PROMPT, "logprobs": 21}, "logprobs must be an int in [0, 20]"),
    ({"prompt": PROMPT, "frequency_penalty": 2.5}, "frequency_penalty must be a number in [-2, 2]"),
    ({"prompt": PROMPT, "presence_penalty": -3}, "presence_penalty must be a number in [-2, 2]"),
    ({"prompt": PROMPT, "repetition_penalty": 0}, "repetition_penalty must be a number > 0"),
    ({"prompt": PROMPT, "min_p": 2}, "min_p must be a number in [0, 1]"),
    ({"prompt": PROMPT, "logit_bias": {"5": 101}}, "logit_bias[5] must be a number in [-100, 100]"),
    ({"prompt": PROMPT, "logit_bias": {"999999": 1}}, "logit_bias token ids [999999] are outside the vocabulary"),
    ('{"prompt": ', "the request body is not valid JSON"),
], ids=["string temperature", "no prompt", "dict prompt", "logprobs>20", "frequency", "presence", "repetition",
        "min_p", "bias value", "bias id", "broken json"])
def test_malformed_and_unsupported_requests_get_400_not_422(tiny_server, body, says):
    status, reply = tiny_server.post("/v1/completions", body)
    assert status == 400 and says in reply["error"]["message"], reply
    assert reply["error"]["type"] == "BadRequestError" and reply["error"]["code"] == 400
    assert reply["error"]["param"] != "0"


def test_unknown_model_is_404_and_models_lists_ours(tiny_server):
    with pytest.raises(openai.NotFoundError):
        tiny_server.client().completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert [m.id for m in tiny_server.client().models.list()] == ["tiny"]
    assert tiny_server.client().models.retrieve("tiny").id == "tiny"  # GET /v1/models/{id}
    with pytest.raises(openai.NotFoundError):
        tiny_server.client().models.retrieve("gpt-4")
    assert tiny_server.get("/health")[0] == 200


def test_chat_without_a_template_is_a_400_saying_so(tiny_server):
    with pytest.raises(openai.BadRequestError) as e:
        tiny_server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert "chat template" in str(e.value) and "/v1/completions" in str(e.value)  # what an HTTP user can do


def test_one_log_line_per_request(tiny_server):
    r = complete(tiny_server, prompt=PROMPT, max_tokens=3)
    lines = [x for x in tiny_server.log_text().splitlines() if r.id in x]
    assert len(lines) == 1 and "tokens in" in lines[0] and "out 3" in lines[0] and "first token" in lines[0]



def test_serve_no_prefix_caching_reaches_the_engine(monkeypatch, tmp_path):
    """The flag becomes load's prefix_caching=False (what that does: tests/runtime/core/test_prefix_caching.py)."""
    import qwen3_aot.serve
    from qwen3_aot import cli

    seen = []
    monkeypatch.setattr(qwen3_aot.serve, "run", lambda artifact, **kw: seen.append(kw))
    cli.main(["serve", str(tmp_path), "--no-prefix-caching"])
    cli.main(["serve", str(tmp_path)])
    assert seen[0]["prefix_caching"] is False and "prefix_caching" not in seen[1]


def test_token_id_prompts_are_made_on_the_event_loop_and_text_or_constraints_in_a_worker_thread():
    """A small body of token-id prompts with no constraint has nothing to tokenize or parse: its
    engine requests are made on the event loop, without the worker thread's round trip (GIL
    hand-offs that time to first token paid). Text, a constraint, a big body, or more ids times
    n than INLINE_IDS (work that would stall every other stream) keep the thread."""
    from types import SimpleNamespace

    from qwen3_aot.serve.app import BIG_BODY_BYTES, INLINE_IDS, _ids_only
    from qwen3_aot.serve.protocol import CompletionRequest

    def inline(size: int | None = 100, **body) -> bool:
        req = CompletionRequest.model_validate({"model": "m", **body})
        headers = {} if size is None else {"content-length": str(size)}
        return _ids_only(req, req.prompts(), SimpleNamespace(headers=headers))

    assert inline(prompt=[1, 2, 3]) and inline(prompt=[[1, 2], [3]])
    assert not inline(prompt="text") and not inline(prompt=["a", "b"])
    assert not inline(prompt=[1, 2], guided_regex="a+") and not inline(prompt=[1, 2], structured_outputs={"regex": "a"})
    assert not inline(size=BIG_BODY_BYTES + 1, prompt=[1, 2]) and not inline(size=None, prompt=[1, 2])
    ids = [7] * (INLINE_IDS // 4)
    assert inline(prompt=ids, n=4) and not inline(prompt=ids, n=5) and not inline(prompt=[ids, ids, ids, ids, [7]])
