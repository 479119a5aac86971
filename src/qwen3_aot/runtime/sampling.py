"""What a request asks for (SamplingParams) and what it gets back (Completion)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from qwen3_aot.errors import Qwen3AotError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0        # 0 is greedy
    top_k: int = 0                  # 0: no top-k cut
    top_p: float = 1.0              # in (0, 1]
    seed: int | None = None         # per-request generator: reproducible whatever the batch
    stop: tuple[str, ...] = ()      # stop strings; the text is cut before the first one
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False          # the log-probability of each chosen token

    def __post_init__(self) -> None:
        # ints checked as such: a float max_tokens would never be reached, and the engine counts on it
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise Qwen3AotError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}.")
        if not self.temperature >= 0:  # NaN too
            raise Qwen3AotError(f"temperature must be >= 0, got {self.temperature}.")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise Qwen3AotError(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}.")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise Qwen3AotError(f"seed must be an int in [0, 2**64), got {self.seed!r}.")
        if not 0 < self.top_p <= 1:
            raise Qwen3AotError(f"top_p must be in (0, 1], got {self.top_p}.")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise Qwen3AotError(f"stop strings must be non-empty strings, got {self.stop!r}.")
        if not all(_is_int(t) for t in self.stop_token_ids):
            raise Qwen3AotError(f"stop_token_ids must be ints, got {self.stop_token_ids!r}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length", "abort"]  # abort: cancelled (a stream closed early)
    prompt_tokens: int
    output_tokens: int
    logprobs: list[float] | None = None
