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


MAX_LOGPROBS = 20  # alternatives per token, vLLM's default max_logprobs
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values: [-100, 100]

# The fields a checkpoint's generation_config.json may give defaults for, with OpenAI's (or
# vLLM's, for those OpenAI lacks) defaults underneath. A field given as None is unset: it takes
# the default, and `with_defaults` may replace it; a value given explicitly always stays.
DEFAULTABLE = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What a request asks for. The sampling pipeline (runtime/core/sampler.py) applies them in
    vLLM's order: logprobs from the raw logits -> logit_bias -> repetition_penalty ->
    presence/frequency penalties -> (grammar mask) -> temperature -> min_p -> top_k -> top_p.

    temperature: softmax(logits / temperature); 0 (or below GREEDY_TEMPERATURE) is greedy.
    top_k: keep the top_k most likely tokens (and those tied with the k-th; vLLM's rule); 0 or -1: no cut.
    top_p: then keep the fewest most likely tokens whose mass reaches top_p of what top_k left
        (tokens tied at the boundary kept together); in (0, 1].
    min_p: vLLM's: after temperature, drop tokens whose probability is below min_p times the
        most likely token's; in [0, 1].
    presence_penalty / frequency_penalty: OpenAI's definitions (platform.openai.com/docs/
        advanced-usage, "frequency and presence penalties"): over the tokens generated so far,
        logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty; in [-2, 2].
    repetition_penalty: transformers' RepetitionPenaltyLogitsProcessor (CTRL, arXiv:1909.05858),
        as vLLM applies it: for every token in the prompt or the output so far, a positive
        logit is divided by it, a negative one multiplied; > 0, 1 is none.
    logit_bias: OpenAI's: {token id: bias}, the bias added to that token's logit before any
        penalty; ids in the vocabulary (checked by the engine), biases in [-100, 100].
    logprobs: None: none; N (0..20): the chosen token's log-probability and the N most likely
        alternatives', from the model's own distribution log_softmax(raw logits), before
        logit_bias, penalties, temperature and filters (vLLM's default). True means 0, False None.
    prompt_logprobs: None: none; N (0..20): each prompt token's log-probability given the tokens
        before it (the first token's is None) and its N most likely alternatives (vLLM's name),
        from the same raw distribution; computed in chunks of at most PROMPT_LOGPROB_ROWS
        positions a step (runtime/core/scheduler.py), never [prompt_len, vocab] at once.
    temperature, top_k, top_p, min_p and repetition_penalty may be left unset (None): they take
    DEFAULTABLE's value, unless `with_defaults` (the checkpoint's generation_config.json, see
    runtime/core/generation_defaults.py) gives another. An explicit value always wins.
    """
    max_tokens: int = 64
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None         # per-request generator: reproducible whatever the batch
    stop: tuple[str, ...] = ()      # stop strings; the text is cut before the first one
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    cache_salt: str | None = None   # joins the prefix cache's key: only requests of one salt share blocks
    # -- structured outputs: what the output must match (runtime/core/grammar.py)
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        unset = frozenset(name for name in DEFAULTABLE if getattr(self, name) is None)
        object.__setattr__(self, "_unset", unset)
        for name in unset:
            self._set(name, DEFAULTABLE[name])
        # ints checked as such: a float max_tokens would never be reached, and the engine counts on it
        self._set("max_tokens", _int("max_tokens", self.max_tokens, ">= 1", lambda v: v >= 1))
        self._set("temperature", _real("temperature", self.temperature, ">= 0", lambda v: v >= 0))
        top_k = _int("top_k", self.top_k, ">= 0 (0 or -1: no top-k cut)", lambda v: v >= -1)
        self._set("top_k", max(top_k, 0))
        self._set("top_p", _real("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1))
        self._set("min_p", _real("min_p", self.min_p, "in [0, 1]", lambda v: 0 <= v <= 1))
        self._set("repetition_penalty", _real("repetition_penalty", self.repetition_penalty, "> 0 (1: none)",
                                              lambda v: v > 0))
        for name in ("presence_penalty", "frequency_penalty"):
            self._set(name, _real(name, getattr(self, name), "in [-2, 2]", lambda v: -2 <= v <= 2))
        self._set("logit_bias", _logit_bias(self.logit_bias))
        lp = self.logprobs
        lp = None if lp is False else 0 if lp is True else lp
        if lp is not None:
            lp = _int("logprobs", lp, f"in [0, {MAX_LOGPROBS}] (or true/false)", lambda v: 0 <= v <= MAX_LOGPROBS)
        self._set("logprobs", lp)
        plp = self.prompt_logprobs
        if plp is not None:
            plp = _int("prompt_logprobs", plp, f"in [0, {MAX_LOGPROBS}]", lambda v: 0 <= v <= MAX_LOGPROBS)
        self._set("prompt_logprobs", plp)
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
        if not isinstance(self.ignore_eos, bool):
            raise Qwen3AotError(f"ignore_eos must be true or false, got {self.ignore_eos!r}.")

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def with_defaults(self, defaults: dict[str, Any]) -> "SamplingParams":
        """A copy whose unset fields (see the class docstring) take `defaults`' values (a
        generation_config's, from `generation_defaults`); the fields set explicitly stay."""
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in self._unset:
            given[name] = defaults.get(name)
        return SamplingParams(**given)

    def replace(self, **fields: Any) -> "SamplingParams":
        """dataclasses.replace that keeps the unset fields unset (so `with_defaults` still applies)."""
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        given.update({name: None for name in self._unset})
        return SamplingParams(**{**given, **fields})

    @property
    def unset(self) -> frozenset[str]:
        """The fields left unset, which took their default."""
        return self._unset

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def uses_history(self) -> bool:
        """Whether a penalty needs the tokens seen so far (kept on the device: core/penalties.py)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def filters(self) -> bool:
        """Whether min_p, top_k or top_p cut the distribution."""
        return self.min_p > 0 or self.top_k > 0 or self.top_p < 1


def _logit_bias(bias: object) -> dict[int, float] | None:
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise Qwen3AotError(f"logit_bias must be a dict of token id to bias, got {type(bias).__name__}.")
    out = {}
    for token, value in bias.items():
        tid = int(token) if isinstance(token, str) and token.strip().lstrip("-").isdigit() else token
        if not _is_int(tid):
            raise Qwen3AotError(f"logit_bias keys must be token ids (ints), got {token!r}.")
        out[int(tid)] = _real(f"logit_bias[{token}]", value, f"in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]",
                              lambda v: -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS)
    return out or None


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
    # with SamplingParams(logprobs=N): per output token, {token id: logprob} of the N most likely
    # tokens and the chosen one (vLLM's layout), from the model's own distribution
    top_logprobs: list[dict[int, float]] | None = None
    # with SamplingParams(prompt_logprobs=N): per prompt token, its logprob (None for the first)
    # and {token id: logprob} of the N most likely and itself (None for the first)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    reasoning: str | None = None  # Qwen3's thinking, when asked to keep it apart from `text` (chat)
    # prompt tokens whose K/V came from the prefix cache: how the prompt was computed, not what
    # came out, so two completions of the same output compare equal whatever the cache held
    cached_tokens: int = dataclasses.field(default=0, compare=False)
    tool_calls: list | None = None  # chat with tools: the calls parsed from the output (text/tool_calls.py ToolCall)
