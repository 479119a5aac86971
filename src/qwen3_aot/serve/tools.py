"""The server's structured outputs and tool calling: OpenAI's response_format, vLLM's
structured_outputs (and its older guided_* fields), tools and tool_choice, turned into the
engine's StructuredOutput; and the model's `<tool_call>` blocks turned into OpenAI's
message.tool_calls, whole or streamed (runtime/text/tool_calls.py)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime.core.sampling_params import Completion, SamplingParams
from qwen3_aot.runtime.core.structured_output import StructuredOutput
from qwen3_aot.runtime.core.tool_grammar import tool_call_constraint
from qwen3_aot.runtime.text.tool_calls import ToolCallStream, checked_tools, parse_tool_calls

# vLLM's structured_outputs keys and the older guided_* fields, as StructuredOutput's kinds
_VLLM_KEYS = {"json": "json", "json_object": "json_object", "regex": "regex", "choice": "choice", "grammar": "grammar"}
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
CONSTRAINT_FIELDS = ("response_format", "structured_outputs", *_GUIDED)  # a request's fields that may ask for one


def requested_constraint(body: Any, reasoning: bool) -> StructuredOutput | None:
    """The constraint a request asks for through response_format (chat), structured_outputs or
    guided_*; our error if it asks for more than one or gives a bad one."""
    found: list[tuple[str, StructuredOutput]] = []
    fmt = getattr(body, "response_format", None)
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            found.append(("response_format", StructuredOutput(json_object=True, reasoning=reasoning)))
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise Qwen3AotError("response_format json_schema needs {\"type\": \"json_schema\", \"json_schema\": "
                                    "{\"name\": ..., \"schema\": {...}}}.")
            found.append(("response_format", StructuredOutput(json=schema, reasoning=reasoning)))
        elif kind != "text":
            raise Qwen3AotError(f"response_format type must be \"text\", \"json_object\" or \"json_schema\", got "
                                f"{json.dumps(kind)}.")
    so = getattr(body, "structured_outputs", None)
    if so is not None:
        given = {k: v for k, v in so.items() if v is not None and v is not False}
        unknown = sorted(set(given) - set(_VLLM_KEYS) - {"whitespace_pattern", "disable_any_whitespace"})
        kinds = [k for k in given if k in _VLLM_KEYS]
        if unknown or len(kinds) != 1:
            raise Qwen3AotError(f"structured_outputs takes one of {', '.join(_VLLM_KEYS)}; got "
                                f"{', '.join(unknown + kinds) or 'none'}.")
        found.append(("structured_outputs", _constraint(_VLLM_KEYS[kinds[0]], given[kinds[0]], reasoning)))
    for field, kind in _GUIDED.items():
        value = getattr(body, field, None)
        if value is not None:
            found.append((field, _constraint(kind, value, reasoning)))
    if len(found) > 1:
        raise Qwen3AotError(f"give one constraint, not {', '.join(f for f, _ in found)}.")
    return found[0][1] if found else None


def _constraint(kind: str, value: Any, reasoning: bool) -> StructuredOutput:
    if kind == "json" and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise Qwen3AotError(f"the JSON schema is not valid JSON ({e}).") from None
    if kind == "json_object":
        value = bool(value)
    return StructuredOutput(**{kind: value}, reasoning=reasoning)


@dataclasses.dataclass
class ChatTools:
    """A chat request's tools: what the template gets, the forced choice ("required" or a
    function's name, else None), and whether the answers are parsed for calls (not with
    tool_choice "none", as vLLM)."""
    tools: list[dict] | None
    forced: str | None
    parse: bool

    @classmethod
    def of(cls, tools: Any, tool_choice: Any) -> "ChatTools":
        tools, choice = checked_tools(tools, tool_choice)
        if tools is None:
            return cls(None, None, False)
        return cls(tools, choice if choice not in ("auto", "none") else None, choice != "none")

    def constraint(self, reasoning: bool) -> StructuredOutput | None:
        """The grammar of a forced call (None when no call is forced)."""
        return None if self.forced is None else tool_call_constraint(self.tools, self.forced, reasoning)


def chat_constraint(body: Any, tools: ChatTools, reasoning: bool) -> StructuredOutput | None:
    """A chat request's one constraint: the one it asks for, or its forced call's."""
    asked = requested_constraint(body, reasoning)
    if asked is not None and tools.forced is not None:
        raise Qwen3AotError("tool_choice \"required\" or a named function constrains the answer to calls; give it or "
                            "a response format (response_format, structured_outputs, guided_*), not both.")
    return asked or tools.constraint(reasoning)


def constrained(params: SamplingParams, constraint: StructuredOutput | None) -> SamplingParams:
    return params if constraint is None else params.replace(structured=constraint)


def message(content: str, completion: Completion, parse: bool) -> tuple[dict, str]:
    """The message fields of an answer (content, and tool_calls when parsed) and the finish
    reason ("tool_calls" when the answer made calls)."""
    if not parse:
        return {"content": content}, completion.finish_reason
    text, calls = parse_tool_calls(content)
    if not calls:
        return {"content": text or ""}, completion.finish_reason
    return {"content": text, "tool_calls": [c.to_openai() for c in calls]}, "tool_calls"


class StreamedCalls:
    """One choice's answer deltas, with its tool calls parsed out as they close."""

    def __init__(self, parse: bool) -> None:
        self._stream = ToolCallStream() if parse else None

    def push(self, content: str, last: bool) -> list[dict]:
        if self._stream is None:
            return [{"content": content}] if content else []
        out = self._stream.push(content) if content else []
        return out + (self._stream.finish() if last else [])

    @property
    def made_calls(self) -> bool:
        return self._stream is not None and bool(self._stream.calls)
