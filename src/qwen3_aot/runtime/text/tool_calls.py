"""Tool calls in Qwen3's output (the "hermes" format of its chat template and vLLM's hermes
parser), whole or as they stream, and the grammar that forces them.

Qwen3 calls a tool by writing `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
several calls one after the other. A block whose JSON is not a call (not JSON, no string
`name`, `arguments` not an object) stays in the text, as vLLM leaves it; so does a block never
closed whose rest is not a call. The content is the text outside the calls, stripped of the
whitespace around it (None when nothing is left); arguments are given as compact JSON text
(`json.dumps`), so that a streamed call reassembles to the whole one. Reasoning is split off
before (text/reasoning.py): only the answer is parsed.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

from qwen3_aot.errors import Qwen3AotError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's function.arguments)
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_call(body: str) -> ToolCall | None:
    """The call a block's body holds, or None if it holds none."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(value["name"], json.dumps(args, ensure_ascii=False))


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole answer."""
    outside, calls, rest = [], [], text
    while (start := rest.find(CALL_OPEN)) >= 0:
        outside.append(rest[:start])
        body_start = start + len(CALL_OPEN)
        end = rest.find(CALL_CLOSE, body_start)
        body = rest[body_start:] if end < 0 else rest[body_start:end]
        call = parse_call(body)
        if call is None:
            outside.append(rest[start:] if end < 0 else rest[start:end + len(CALL_CLOSE)])
        else:
            calls.append(call)
        rest = "" if end < 0 else rest[end + len(CALL_CLOSE):]
    outside.append(rest)
    content = "".join(outside).strip()
    return content or None, calls


class ToolCallStream:
    """`parse_tool_calls` for text that arrives in pieces: `push(piece)` and, at the end,
    `finish()` each give OpenAI delta fields: {"content": ...} and {"tool_calls": [...]}, in
    order. A call goes out once its block closes: first its index, id, type and name, then its
    arguments; until then nothing of the block reaches the content. `calls`: those sent."""

    def __init__(self) -> None:
        self._buf = ""
        self._in_call = False
        self._started = False  # content has been sent (leading whitespace is dropped)
        self._space = ""  # whitespace held back: sent only if more content follows
        self.calls: list[ToolCall] = []

    def push(self, piece: str) -> list[dict]:
        self._buf += piece
        out: list[dict] = []
        while True:
            if not self._in_call:
                start = self._buf.find(CALL_OPEN)
                if start < 0:
                    keep = _partial_suffix(self._buf, CALL_OPEN)
                    self._content(self._buf[:len(self._buf) - keep], out)
                    self._buf = self._buf[len(self._buf) - keep:]
                    return out
                self._content(self._buf[:start], out)
                self._buf, self._in_call = self._buf[start + len(CALL_OPEN):], True
            end = self._buf.find(CALL_CLOSE)
            if end < 0:
                return out
            self._block(self._buf[:end], closed=True, out=out)
            self._buf, self._in_call = self._buf[end + len(CALL_CLOSE):], False

    def finish(self) -> list[dict]:
        out: list[dict] = []
        if self._in_call:
            self._block(self._buf, closed=False, out=out)
        else:
            self._content(self._buf, out)
        self._buf = ""
        return out

    def _block(self, body: str, closed: bool, out: list[dict]) -> None:
        call = parse_call(body)
        if call is None:
            self._content(CALL_OPEN + body + (CALL_CLOSE if closed else ""), out)
            return
        index = len(self.calls)
        self.calls.append(call)
        out.append({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                    "function": {"name": call.name, "arguments": ""}}]})
        out.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]})

    def _content(self, text: str, out: list[dict]) -> None:
        if not self._started:
            text = text.lstrip()
            if not text:
                return
            self._started = True
        text = self._space + text
        body = text.rstrip()
        self._space = text[len(body):]
        if body:
            out.append({"content": body})


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (held back: it may be one)."""
    return next((n for n in range(min(len(text), len(tag) - 1), 0, -1) if tag.startswith(text[-n:])), 0)


# ---- the request side: tools, tool_choice and the grammar that forces a call ----

def checked_tools(tools: Any, tool_choice: Any) -> tuple[list[dict] | None, str | None]:
    """(tools as the template takes them, the forced function's name or "required" or
    "auto"/"none"); our error naming what is wrong with them."""
    if tools is None:
        if tool_choice not in (None, "none", "auto"):
            raise Qwen3AotError(f"tool_choice {_short(tool_choice)} needs tools; give the tools it may call.")
        return None, None
    if not isinstance(tools, list):
        raise Qwen3AotError(f"tools must be a list of {{\"type\": \"function\", \"function\": {{...}}}}, got "
                            f"{type(tools).__name__}.")
    names = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise Qwen3AotError(f"tools[{i}] has type {_short(kind)}; only function tools "
                                "({\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": {...}}}) "
                                "are supported.")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise Qwen3AotError(f"tools[{i}].function needs a name (a non-empty string).")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise Qwen3AotError(f"tools[{i}].function.parameters must be a JSON schema object.")
        names.append(fn["name"])
    if tool_choice is None:
        return tools, "auto"
    if tool_choice in ("auto", "none", "required"):
        return tools, tool_choice
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in names:
            raise Qwen3AotError(f"tool_choice names the function {_short(name)}, which is not among the tools "
                                f"({', '.join(names)}).")
        return tools, name
    raise Qwen3AotError(f"tool_choice must be \"auto\", \"none\", \"required\" or {{\"type\": \"function\", "
                        f"\"function\": {{\"name\": ...}}}}, got {_short(tool_choice)}.")


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str)) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
