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


THINK_TURNS = [  # (user, reasoning, answer): a conversation whose turns think first
    ("Plan a three-day trip to Lyon for two people who like food and old streets.",
     "They like food and old streets. Lyon: Vieux Lyon for the streets, the bouchons for food, Les Halles "
     "Paul Bocuse for a market morning. Three days: old town, market and Croix-Rousse, then Fourviere.",
     "Day 1: Vieux Lyon and a bouchon dinner. Day 2: Les Halles, then the Croix-Rousse traboules. "
     "Day 3: Fourviere hill and the Roman theatres."),
    ("Make day two cheaper.", "Les Halles is pricey; the Saint-Antoine open-air market is cheaper and by the river.",
     "Day 2: the Saint-Antoine market for lunch, then the Croix-Rousse traboules on foot."),
    ("What should we pack for November?", "November in Lyon: cool, 5-12 C, often rain.",
     "Layers, a warm coat, an umbrella and shoes for wet cobbles."),
    ("Thanks! One restaurant tip?", "A classic bouchon, booked ahead.", "Try Daniel et Denise, and book ahead."),
]


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}], ids=["thinking", "no thinking"])
def test_multi_turn_chat_finds_the_history_up_to_the_previous_answer(engine, kwargs):
    """Qwen3's template drops an earlier turn's <think> text (and renders no empty think block)
    when it renders the history, so the next prompt leaves what the cache holds after the
    previous turn's generation prompt: the cache gives every earlier full block of the prompt
    and none of the previous answer (README, "Prefix caching"). Each turn's generation is
    forced (fed as prompt), so that the cache holds what a turn that generated it would."""
    bs, end = engine.block_size, engine.tokenizer.encode("<|im_end|>")
    # a system prompt of its own: nothing another test left in the cache starts like it
    system = f"You plan trips{' and think first' if not kwargs else ''}. Answer in a few lines."
    convo, held, previous_prompt, rows = [{"role": "system", "content": system}], None, 0, []
    one = SamplingParams(max_tokens=1, temperature=0)
    for user, reasoning, answer in THINK_TURNS:
        convo.append({"role": "user", "content": user})
        ids = engine.tokenizer.encode(engine.apply_chat_template(convo, **kwargs))
        cached = engine.generate(ids, one)[0].cached_tokens
        if held is not None:
            same = next((i for i, (x, y) in enumerate(zip(ids, held)) if x != y), min(len(ids), len(held)))
            assert cached == min(same, len(ids) - 1) // bs * bs  # the definition: full blocks of the common prefix
            assert same <= previous_prompt  # nothing of the previous turn's generation is found
            rows.append((len(ids), cached, len(held) - previous_prompt))
        reply = (f"<think>\n{reasoning}\n</think>\n\n" if not kwargs else "") + answer
        generated = engine.tokenizer.encode(reply) + end
        engine.generate(ids + generated, one)  # what generating the reply leaves in the cache
        held, previous_prompt = ids + generated, len(ids)
        convo.append({"role": "assistant", "content": reply})
    print(f"\n{kwargs or 'thinking'}: (prompt tokens, cached, tokens the previous turn generated)", rows)
