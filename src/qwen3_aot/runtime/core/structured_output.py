"""What a request's output must match (structured outputs): one of a JSON schema, any JSON
object, a regular expression, a choice of strings, or an EBNF grammar. Checked here for its
shape; the constraint itself is compiled by runtime/core/grammar.py (xgrammar), whose error
names what is wrong with a schema, pattern or grammar."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from qwen3_aot.errors import Qwen3AotError

KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """Exactly one of:
    json: a JSON schema (a dict, or its JSON text); json_object: any JSON object (True);
    regex: a regular expression the whole output matches; choice: the output is one of these
    strings; grammar: an EBNF grammar (xgrammar's dialect, GBNF-like, with a `root` rule).

    reasoning: the model may think first (Qwen3 with thinking on): an output that opens with
    `<think>` is free until `</think>`, and the constraint applies to what follows (vLLM's
    reasoning-aware rule). A prompt that already opened the think block starts inside it.
    Off (the default, and Qwen3 with enable_thinking=False): constrained from the first token.

    JSON is generated compact (one space after ':' and ',', none elsewhere): a grammar that
    allows any whitespace lets a model loop on it until max_tokens."""
    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    reasoning: bool = False

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise Qwen3AotError(f"a StructuredOutput takes exactly one of {', '.join(KINDS)}; got "
                                f"{', '.join(given) or 'none'}.")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    schema = json.loads(self.json)
                except json.JSONDecodeError as e:
                    raise Qwen3AotError(f"the JSON schema is not valid JSON ({e}).") from None
            else:
                schema = self.json
            if not isinstance(schema, dict):
                raise Qwen3AotError(f"a JSON schema is a JSON object, got {type(schema).__name__}.")
            object.__setattr__(self, "json", json.dumps(schema, sort_keys=True, ensure_ascii=False))
        if self.json_object is not True and self.json_object is not False:
            raise Qwen3AotError(f"json_object must be true or false, got {self.json_object!r}.")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise Qwen3AotError(f"{name} must be a non-empty string, got {value!r}.")
        if self.choice is not None:
            if isinstance(self.choice, str) or not isinstance(self.choice, (list, tuple)) or not self.choice \
                    or not all(isinstance(c, str) and c for c in self.choice):
                raise Qwen3AotError(f"choice must be a non-empty list of non-empty strings, got {self.choice!r}.")
            object.__setattr__(self, "choice", tuple(self.choice))
        if not isinstance(self.reasoning, bool):
            raise Qwen3AotError(f"reasoning must be true or false, got {self.reasoning!r}.")

    @property
    def key(self) -> tuple[str, str]:
        """(kind, text): what the compiled grammar is cached by."""
        kind = next(k for k in KINDS if getattr(self, k) not in (None, False))
        value: Any = getattr(self, kind)
        return kind, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
