"""The Engine on a tiny Qwen3 with Qwen's real tokenizer and chat template: chat is generate
of the rendered template, reasoning kept apart on request, and streaming detokenisation and
stop strings on real merges (a random model emits CJK, emoji and multi-byte pieces)."""

import dataclasses

import pytest

from qwen3_aot import Qwen3AotError, runtime
from qwen3_aot.runtime import SamplingParams
from qwen3_aot.runtime.text.chat_template import ChatTemplate
from qwen3_aot.runtime.text.reasoning import split_reasoning

pytestmark = pytest.mark.xdist_group("qwen_artifact")  # one pytest-xdist worker builds the real-tokenizer artifact
REPLACEMENT = "\ufffd"
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "你好! Qu'est-ce que 🐍?"}]
HOT = SamplingParams(max_tokens=48, temperature=1.0, seed=3, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(qwen_artifact):
    with runtime.load(qwen_artifact, num_blocks=64) as eng:
        yield eng


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}, {"add_generation_prompt": False}])
def test_chat_is_generate_of_the_rendered_template(engine, qwen_artifact, kwargs):
    prompt = engine.apply_chat_template(MESSAGES, **kwargs)
    assert prompt == ChatTemplate.from_dir(qwen_artifact).render(MESSAGES, **kwargs)
    assert prompt.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>")
    assert ("<think>\n\n</think>" in prompt) == (kwargs.get("enable_thinking") is False)
    ids = engine.tokenizer.encode(prompt)
    assert ids[:3] == [151644, 8948, 198]  # <|im_start|> system \n: the special token is one id
    assert engine.chat(MESSAGES, HOT, **kwargs) == engine.generate(prompt, HOT)[0]


def test_separate_reasoning_splits_what_generate_returns(engine):
    prompt = engine.apply_chat_template(MESSAGES)
    plain = engine.generate(prompt, HOT)[0]
    split = engine.chat(MESSAGES, HOT, separate_reasoning=True)
    assert (split.reasoning, split.text) == split_reasoning(plain.text)
    assert split.token_ids == plain.token_ids


def test_a_template_less_artifact_refuses_chat(tiny_artifact):
    with runtime.load(tiny_artifact, num_blocks=20) as eng, pytest.raises(Qwen3AotError, match="no chat template"):
        eng.chat(MESSAGES)


def test_bad_messages_get_our_error(engine):
    for bad in ("hi", [{"role": "user"}], [{"content": "hi"}], [{"role": 3, "content": "hi"}]):
        with pytest.raises(Qwen3AotError):
            engine.chat(bad)


def splitting_seed(engine, prompt: str) -> SamplingParams:
    """Sampling whose output holds a token that is part of a multi-byte character (the first
    of a few seeds that gives one: the model is random, its checkpoint seeded)."""
    for seed in range(32):
        params = dataclasses.replace(HOT, seed=seed)
        ids = engine.generate(prompt, params)[0].token_ids
        if any(REPLACEMENT in engine.tokenizer.decode([t]) for t in ids):
            return params
    pytest.fail("no seed made the random model emit part of a multi-byte character")


def test_streaming_real_merges_gives_the_whole_decode(engine):
    prompt = engine.apply_chat_template(MESSAGES)
    params = splitting_seed(engine, prompt)
    c = engine.generate(prompt, params)[0]
    s = engine.stream(prompt, params)
    pieces = list(s)
    # a random model can emit bytes that never form a character (U+FFFD in the whole decode
    # too); what streaming must not do is cut a character that the next tokens complete
    assert "".join(pieces) == c.text == s.completion.text == engine.tokenizer.decode(c.token_ids)


def test_stop_string_inside_multibyte_text(engine):
    prompt = engine.apply_chat_template(MESSAGES)
    full = engine.generate(prompt, HOT)[0].text
    wide = [i for i, ch in enumerate(full) if ord(ch) > 0x2000 and i > 4]
    assert wide, "no wide character in the output: pick another seed"
    stop = full[wide[0] - 1:wide[0] + 1]  # ends on a character made of several byte tokens
    c = engine.generate(prompt, dataclasses.replace(HOT, stop=(stop,)))[0]
    assert c.text == full[:full.index(stop)] and c.finish_reason == "stop"
    assert "".join(engine.stream(prompt, dataclasses.replace(HOT, stop=(stop,)))) == c.text
