"""What a request asks for (SamplingParams) and what it gets back (Completion)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Literal

from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime.core.structured_output import StructuredOutput

# Below this temperature a row is sampled greedily: softmax(logits / t) overflows to one-hot
# (or NaN) long before t reaches 0, and vLLM draws the same line.
GREEDY_TEMPERATURE = 1e-5


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0        # 0 (or below GREEDY_TEMPERATURE) is greedy
    top_k: int = 0                  # 0 or -1: no top-k cut
    top_p: float = 1.0              # in (0, 1]
    seed: int | None = None         # per-request generator: reproducible whatever the batch
    stop: tuple[str, ...] = ()      # stop strings; the text is cut before the first one
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False          # the log-probability of each chosen token
    cache_salt: str | None = None   # joins the prefix cache's key: only requests of one salt share blocks
    # -- structured outputs: what the output must match (runtime/core/grammar.py)
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        # ints checked as such: a float max_tokens would never be reached, and the engine counts on it
        self._set("max_tokens", _int("max_tokens", self.max_tokens, ">= 1", lambda v: v >= 1))
        self._set("temperature", _real("temperature", self.temperature, ">= 0", lambda v: v >= 0))
        top_k = _int("top_k", self.top_k, ">= 0 (0 or -1: no top-k cut)", lambda v: v >= -1)
        self._set("top_k", max(top_k, 0))
        self._set("top_p", _real("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1))
        if self.seed is not None:
            self._set("seed", _int("seed", self.seed, "in [0, 2**64)", lambda v: 0 <= v < 2**64))
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in stop):
            raise Qwen3AotError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}.")
        self._set("stop", tuple(stop))
        ids = () if self.stop_token_ids is None else self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(_is_int(t) for t in ids):
            raise Qwen3AotError(f"stop_token_ids must be a list of ints, got {self.stop_token_ids!r}.")
        self._set("stop_token_ids", tuple(int(t) for t in ids))
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str) or not self.cache_salt):
            raise Qwen3AotError(f"cache_salt must be a non-empty string (or None), got {self.cache_salt!r}.")
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise Qwen3AotError(f"structured must be a StructuredOutput, got {type(self.structured).__name__}.")
        for flag in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, flag), bool):
                raise Qwen3AotError(f"{flag} must be true or false, got {getattr(self, flag)!r}.")

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1


def _is_int(x: object) -> bool:
    """An int, numpy's included; not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _int(name: str, value: object, rule: str, ok: Any) -> int:
    if not _is_int(value) or not ok(int(value)):
        raise Qwen3AotError(f"{name} must be an int {rule}, got {value!r}.")
    return int(value)


def _real(name: str, value: object, rule: str, ok: Any) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) \
            or not ok(float(value)):
        raise Qwen3AotError(f"{name} must be a number {rule}, got {value!r}.")
    return float(value)


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length", "abort"]  # abort: cancelled (a stream closed early)
    prompt_tokens: int
    output_tokens: int
    logprobs: list[float] | None = None
    reasoning: str | None = None  # Qwen3's thinking, when asked to keep it apart from `text` (chat)
    # prompt tokens whose K/V came from the prefix cache: how the prompt was computed, not what
    # came out, so two completions of the same output compare equal whatever the cache held
    cached_tokens: int = dataclasses.field(default=0, compare=False)
    tool_calls: list | None = None  # chat with tools: the calls parsed from the output (text/tool_calls.py ToolCall)
