"""Structured outputs (xgrammar) on the real-tokenizer checkpoint. Its weights are random, so
nothing it writes unconstrained is JSON or matches a pattern: a constraint that holds proves
itself. Checked with the `jsonschema` library and Python's `re`, never with our own code."""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
import torch

from qwen3_aot import runtime
from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime import SamplingParams
from qwen3_aot.runtime.core.structured_output import StructuredOutput
from qwen3_aot.runtime.text.reasoning import split_reasoning

pytest.importorskip("xgrammar")
pytestmark = pytest.mark.xdist_group("qwen_artifact")  # one pytest-xdist worker builds the real-tokenizer artifact

# short keys: a random model spells a forced literal a character at a time, and CPU time goes
# by tokens (nested objects, arrays, enums, required fields and bounded integers all the same)
SCHEMA = {"type": "object",
          "properties": {"n": {"type": "string", "pattern": "^[a-z]{1,4}$"},
                         "a": {"type": "integer", "minimum": 0, "maximum": 120},
                         "k": {"enum": ["cat", "dog", "bird"]},
                         "t": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                         "p": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5},
                                                                "ok": {"type": "boolean"}},
                               "required": ["x", "ok"]}},
          "required": ["n", "a", "k", "t", "p"]}
# Strings are bounded by a pattern, not maxLength: xgrammar 0.2.9's bounded-length strings
# admit control characters (tab, \x01, ...), which JSON forbids unescaped.
REGEX = r"[a-z]{2,4}-\d{3}"
CHOICES = ["yes", "no", "maybe so", "I don't know"]


@pytest.fixture(scope="module")
def engine(qwen_artifact):
    with runtime.load(qwen_artifact, num_blocks=256) as eng:
        yield eng


def constrained(n: int, max_tokens: int, **kind) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=max_tokens, seed=i, structured=StructuredOutput(**kind)) for i in range(n)]


def test_json_schema_50_samples_validate(engine):
    """46 greedy answers to different prompts (argmax: cheap on CPU) and 4 seeded samples, in
    batches of their own: a batch with a sampled row draws noise over the 151,936-token vocabulary
    for every row, greedy ones too, which made the greedy rows most of this test's CPU time."""
    out = engine.generate([f"Pet number {i} as JSON:" for i in range(46)],
                          SamplingParams(max_tokens=64, temperature=0, structured=StructuredOutput(json=SCHEMA)))
    out += engine.generate(["Describe a pet as JSON:"] * 4, constrained(4, 64, json=SCHEMA))
    for c in out:
        assert c.finish_reason == "stop", c.text  # the grammar ended it, not max_tokens
        jsonschema.validate(json.loads(c.text), SCHEMA)
    assert len({c.text for c in out}) > 30  # not one forced answer


def test_json_object_regex_and_choice_hold(engine):
    for c in engine.generate([f"Code {i}:" for i in range(50)],
                             SamplingParams(max_tokens=16, temperature=0, structured=StructuredOutput(regex=REGEX))):
        assert c.finish_reason == "stop" and re.fullmatch(REGEX, c.text), c.text
    answers = engine.generate([f"Question {i}?" for i in range(50)],
                              SamplingParams(max_tokens=16, temperature=0, structured=StructuredOutput(choice=CHOICES)))
    assert all(c.finish_reason == "stop" and c.text in CHOICES for c in answers)
    assert len({c.text for c in answers}) > 1
    for c in engine.generate(["JSON:"] * 4, constrained(4, 12, json_object=True)):
        assert c.finish_reason == "length" or isinstance(json.loads(c.text), dict), c.text
        assert c.text.startswith("{")
    grammar = 'root ::= "x" [0-9] [0-9] ("," [0-9] [0-9])? "y"'
    for c in engine.generate(["Grammar:"] * 8, constrained(8, 16, grammar=grammar)):
        assert re.fullmatch(r"x\d\d(,\d\d)?y", c.text), c.text


def test_unconstrained_batches_take_the_old_path(engine):
    before = engine._loop.core.masked_steps
    free = engine.generate(["Hello"] * 4, [SamplingParams(max_tokens=6, seed=i) for i in range(4)])
    assert engine._loop.core.masked_steps == before
    engine.generate(["Hello"], constrained(1, 4, choice=CHOICES))
    assert engine._loop.core.masked_steps > before  # the counter does count
    assert all(c.output_tokens == 6 for c in free)


def test_logprobs_are_the_models_own_not_the_masks(engine):
    """A mask renormalised over the allowed tokens would give the forced answer's tokens a
    logprob near 0; the model's own distribution over 151,936 tokens gives them far less."""
    c = engine.generate("Well?", SamplingParams(max_tokens=8, temperature=0, logprobs=True,
                                                structured=StructuredOutput(choice=["yes"])))[0]
    assert c.text == "yes" and len(c.logprobs) == c.output_tokens
    assert c.logprobs[0] < -5


@pytest.mark.parametrize("kind, message", [({"json": {"type": "objec"}}, "JSON schema"),
                                           ({"regex": "a("}, "regex"),
                                           ({"grammar": 'root ::= "a" | b'}, "grammar")])
def test_a_bad_constraint_is_our_error_naming_it(engine, kind, message):
    with pytest.raises(Qwen3AotError, match=f"the {message} cannot be used as a constraint: .+"):
        engine.generate("x", SamplingParams(max_tokens=4, structured=StructuredOutput(**kind)))
    with pytest.raises(Qwen3AotError, match="exactly one of"):
        StructuredOutput(regex="a", choice=["b"])


def test_thinking_rule(engine):
    """Reasoning on: the first token may open a think block, which is free until </think>;
    then the grammar starts from its beginning. Off: the grammar from the first token."""
    core = engine._loop.core
    tok = engine.tokenizer
    think, end = tok.token_id("<think>"), tok.token_id("</think>")
    on = core.grammars.state(StructuredOutput(json=SCHEMA, reasoning=True), tok.encode("Q:"))
    off = core.grammars.state(StructuredOutput(json=SCHEMA), tok.encode("Q:"))
    import xgrammar as xgr

    masks = xgr.allocate_token_bitmask(2, core.config["vocab_size"])
    on.fill(masks, 0)
    off.fill(masks, 1)
    bits = torch.arange(32, dtype=torch.int32)
    allowed = lambda row: set(torch.nonzero(((masks[row, :, None] >> bits) & 1).flatten())[:, 0].tolist())  # noqa: E731
    first_off = allowed(1)
    assert allowed(0) == first_off | {think} and think not in first_off
    for t in [think, *tok.encode("Let me think: {not json"), end]:
        assert not on.accept(t)
        assert on.masks_next == (t == end)
    on.fill(masks, 0)
    assert allowed(0) == first_off  # the grammar from its start, after </think>
    inside = core.grammars.state(StructuredOutput(json=SCHEMA, reasoning=True), tok.encode("<think>\nhm"))
    assert inside.phase == "reasoning"  # a prompt that opened the block starts inside it


def test_chat_with_thinking_on_constrains_the_answer_after_the_think_block(engine):
    messages = [{"role": "user", "content": "A pet as JSON, please."}]
    with ThreadPoolExecutor(6) as pool:  # one batch
        done = list(pool.map(lambda seed: engine.chat(messages, SamplingParams(
            max_tokens=64, seed=seed, structured=StructuredOutput(json=SCHEMA)), separate_reasoning=True), range(6)))
    assert any(c.reasoning is None for c in done)
    for c in done:
        if c.reasoning is None:  # no think block: constrained from the first token
            jsonschema.validate(json.loads(c.text), SCHEMA)
        elif c.finish_reason == "stop":  # the block closed: the answer after it is constrained
            jsonschema.validate(json.loads(c.text), SCHEMA)
    off = engine.chat(messages, SamplingParams(max_tokens=64, seed=0, structured=StructuredOutput(json=SCHEMA)),
                      enable_thinking=False)
    assert split_reasoning(off.text)[0] is None
    jsonschema.validate(json.loads(off.text), SCHEMA)


@pytest.mark.deadline(120)
def test_16_threads_mixing_constrained_and_free_with_preemption_equal_each_alone(qwen_artifact):
    """A cache of 8 blocks of 16 tokens holds 3 or 4 of these sequences: the others wait
    or are preempted and recomputed, and each matcher keeps the tokens it took."""
    small = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "n": {"type": "integer", "minimum": 0,
                                                                                     "maximum": 99}},
             "required": ["kind", "n"]}
    jobs = []
    for i in range(16):
        kind = [{"json": small}, {"regex": REGEX}, {"choice": CHOICES}, None][i % 4]
        jobs.append((f"Request {i}: answer", SamplingParams(max_tokens=24, seed=100 + i, ignore_eos=kind is None,
                                                             structured=StructuredOutput(**kind) if kind else None)))
    with runtime.load(qwen_artifact, num_blocks=8) as eng:
        alone = [eng.generate(p, s)[0] for p, s in jobs]
        results: list = [None] * len(jobs)

        def run(i: int) -> None:
            results[i] = eng.generate(*jobs[i])[0]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(100)
        assert not any(t.is_alive() for t in threads), "a request hung"
        assert eng.stats().num_preemptions > 0
    for i, (got, want) in enumerate(zip(results, alone)):
        assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason), i
    for (_, s), c in zip(jobs, alone):
        if s.structured is not None and s.structured.json:
            jsonschema.validate(json.loads(c.text), small)


def test_engine_chat_with_tools_returns_the_calls(engine):
    add = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                            "b": {"type": "integer", "minimum": 0, "maximum": 9}},
           "required": ["a", "b"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "add", "parameters": add}},
             {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}}]
    messages = [{"role": "user", "content": "2 + 3?"}]
    for choice in ("required", {"type": "function", "function": {"name": "add"}}):
        c = engine.chat(messages, SamplingParams(max_tokens=96, seed=2), tools=tools, tool_choice=choice,
                        enable_thinking=False)
        assert c.tool_calls, c.text
        for call in c.tool_calls:
            assert call.name in ("add", "noop") and (choice == "required" or call.name == "add")
            jsonschema.validate(json.loads(call.arguments), add if call.name == "add" else {"type": "object"})
        assert "<tool_call>" not in c.text or c.finish_reason == "length"  # only an unfinished block stays text
    free = engine.chat(messages, SamplingParams(max_tokens=8, seed=2), tools=tools, tool_choice="none",
                       enable_thinking=False)
    assert free.tool_calls is None
    with pytest.raises(Qwen3AotError, match="not among the tools"):
        engine.chat(messages, tools=tools, tool_choice={"type": "function", "function": {"name": "mul"}})
