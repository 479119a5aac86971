"""Qwen3's `<tool_call>` blocks parsed from crafted answers, whole and streamed; tools and
tool_choice checked. The expected calls are written out by hand from the hermes format."""

from __future__ import annotations

import json

import pytest

from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime.text.reasoning import split_reasoning
from qwen3_aot.runtime.text.tool_calls import ToolCallStream, checked_tools, parse_tool_calls

ADD = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
WEATHER = '<tool_call>\n{"name": "weather", "arguments": {"city": "Zürich"}}\n</tool_call>'
MALFORMED = '<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call>'
CASES = {
    "one call": (ADD, None, [("add", {"a": 1, "b": 2})]),
    "several": (ADD + "\n" + WEATHER, None, [("add", {"a": 1, "b": 2}), ("weather", {"city": "Zürich"})]),
    "text before": ("Let me add them.\n\n" + ADD, "Let me add them.", [("add", {"a": 1, "b": 2})]),
    "malformed stays text": ("Sure. " + MALFORMED, "Sure. " + MALFORMED, []),
    "malformed beside a good one": (MALFORMED + "\n" + WEATHER, MALFORMED, [("weather", {"city": "Zürich"})]),
    "no name": ('<tool_call>\n{"arguments": {}}\n</tool_call>', '<tool_call>\n{"arguments": {}}\n</tool_call>', []),
    "unclosed call at the end": ('<tool_call>\n{"name": "add", "arguments": {"a": 1}}', None, [("add", {"a": 1})]),
    "unclosed and cut": ('ok <tool_call>\n{"name": "ad', 'ok <tool_call>\n{"name": "ad', []),
    "arguments as a JSON string": ('<tool_call>{"name": "f", "arguments": "{\\"x\\": [1]}"}</tool_call>', None,
                                   [("f", {"x": [1]})]),
    "plain answer": ("  Just text, 猫 <tool_ not a call.\n", "Just text, 猫 <tool_ not a call.", []),
}


def calls_of(calls) -> list:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("name", CASES)
def test_parse_tool_calls(name):
    text, content, calls = CASES[name]
    got_content, got = parse_tool_calls(text)
    assert got_content == content
    assert calls_of(got) == calls
    assert all(c.id.startswith("call_") and len(c.id) > 10 for c in got)
    assert len({c.id for c in got}) == len(got)


def test_thinking_then_a_call():
    text = "<think>\nI should call add; <tool_call> is how.\n</think>\n\n" + ADD
    reasoning, answer = split_reasoning(text)
    assert reasoning == "I should call add; <tool_call> is how."
    content, calls = parse_tool_calls(answer)
    assert content is None and calls_of(calls) == [("add", {"a": 1, "b": 2})]


def reassembled(pieces: list[str]) -> tuple[str, list]:
    """OpenAI's client-side reassembly of a stream's deltas."""
    stream, deltas = ToolCallStream(), []
    for p in pieces:
        deltas += stream.push(p)
    deltas += stream.finish()
    content, calls = "", {}
    for d in deltas:
        content += d.get("content", "")
        for tc in d.get("tool_calls", []):
            call = calls.setdefault(tc["index"], {"name": "", "arguments": "", "id": None})
            if "id" in tc:
                assert call["id"] is None and tc["type"] == "function" and call["arguments"] == ""
                call["id"] = tc["id"]
            call["name"] += tc.get("function", {}).get("name", "")
            call["arguments"] += tc.get("function", {}).get("arguments", "")
        assert "<tool_call>" not in d.get("content", "") or "<tool_call>" in content  # never half a block
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("name", CASES)
def test_streamed_split_at_every_boundary_reassembles(name):
    text, content, calls = CASES[name]
    whole = parse_tool_calls(text)
    for cut in range(len(text) + 1):
        for pieces in ([text[:cut], text[cut:]], [text[:cut], *text[cut:]]):  # two pieces; then char by char
            got_content, got_calls = reassembled(pieces)
            assert (got_content or None) == whole[0], (cut, pieces)
            assert [(c["name"], c["arguments"]) for c in got_calls] == [(c.name, c.arguments) for c in whole[1]]
    # every byte boundary of the UTF-8 text, as a byte-level stream decodes it (a cut inside a
    # character holds it back until it is whole)
    data = text.encode()
    for cut in range(len(data) + 1):
        head = data[:cut].decode(errors="ignore")
        assert reassembled([head, text[len(head):]])[0] == (whole[0] or "")


def test_no_half_block_reaches_the_content_while_streaming():
    stream = ToolCallStream()
    out = []
    for ch in "Hi <tool_call>\n{\"name\": \"add\", \"arguments\": {}}\n</tool_call>":
        out += stream.push(ch)
        assert all("<" not in d.get("content", "") for d in out)
    assert "".join(d.get("content", "") for d in out) == "Hi"
    assert out[-2]["tool_calls"][0]["function"] == {"name": "add", "arguments": ""}


TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("tools, choice, message", [
    ([{"type": "retrieval"}], None, "only function tools"),
    (TOOLS, {"type": "function", "function": {"name": "mul"}}, "'mul'|\"mul\", which is not among the tools"),
    (TOOLS, "sometimes", "tool_choice must be"),
    (None, "required", "needs tools"),
    ([{"type": "function", "function": {"parameters": {}}}], None, "needs a name"),
])
def test_bad_tools_are_our_error(tools, choice, message):
    with pytest.raises(Qwen3AotError, match=message):
        checked_tools(tools, choice)


def test_tool_choice_kinds():
    assert checked_tools(TOOLS, None) == (TOOLS, "auto")
    assert checked_tools(TOOLS, "none") == (TOOLS, "none")
    assert checked_tools(TOOLS, {"type": "function", "function": {"name": "add"}}) == (TOOLS, "add")
