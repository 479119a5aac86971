"""The OpenAI API's request and response shapes, and their translation to and from the engine.

Requests are pydantic models with OpenAI's field names (plus vLLM's extra sampling fields
top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids), validated strictly: "0.5" is not
a temperature. A field we know but cannot honour (suffix, ...) is refused with a
message; a field we do not know is ignored and named in a warning log line (vLLM's behaviour);
values are checked by SamplingParams, so a bad one gets the engine's own message. Sampling
fields left out take the checkpoint's generation_config defaults (`--generation-config auto`),
then OpenAI's. Responses are plain dicts in OpenAI's JSON layout.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime.core.sampling_params import MAX_LOGPROBS, SamplingParams

Prompt = Union[str, list[int]]


def _prompt_shape(value: Any) -> str:
    first = value[0] if isinstance(value, list) and value else None
    if isinstance(value, str):
        return "text"
    return "texts" if isinstance(first, str) else "id lists" if isinstance(first, list) else "ids"


# The prompt's shape told by its first element, so that pydantic validates one member of the
# union: tried in turn, each failing member lists an error per element first, which made a list
# of a million ids cost a second of the event loop's time
PromptField = Annotated[Union[Annotated[str, Tag("text")], Annotated[list[str], Tag("texts")],
                              Annotated[list[int], Tag("ids")], Annotated[list[list[int]], Tag("id lists")]],
                        Discriminator(_prompt_shape)]


class _Request(BaseModel):
    # extra="allow" keeps unknown fields in model_extra, so that the server can name them in its log
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk also carries its choice's usage so far


class _Sampling(_Request):
    """The fields both endpoints share."""
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    cache_salt: str | None = None  # vLLM's: only requests of the same salt share prefix-cache blocks
    # structured outputs (serve/tools.py): vLLM's structured_outputs and its older guided_* fields
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """vLLM's rule: continuous_usage_stats counts only with include_usage."""
        return self.include_usage and self.stream_options.continuous_usage_stats

    def ignored_fields(self) -> list[str]:
        """The fields sent that this server does not know (it ignores them; the route logs them)."""
        return sorted(self.model_extra or ())

    def _refuse_unsupported(self) -> None:
        if self.n < 1:
            raise Qwen3AotError(f"n must be >= 1, got {self.n}.")
        if self.stream_options is not None and not self.stream:
            raise Qwen3AotError("stream_options is only allowed with stream=true.")

    def sampling(self, max_tokens: int, logprobs: int | None, choice: int,
                 defaults: dict[str, Any] | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
        """The engine's parameters for choice number `choice` of n: with a seed, choice j samples
        with seed + j, so that n > 1 gives n different (and reproducible) samples. Fields left
        out take `defaults` (the checkpoint's generation_config), then OpenAI's."""
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        top_k = 0 if self.top_k == -1 else self.top_k  # vLLM's -1: no top-k cut
        seed = None if self.seed is None else self.seed + choice
        params = SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_k=top_k, top_p=self.top_p,
                                min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                                presence_penalty=self.presence_penalty or 0.0,
                                frequency_penalty=self.frequency_penalty or 0.0, logit_bias=self.logit_bias,
                                seed=seed, stop=stop, stop_token_ids=tuple(self.stop_token_ids or ()),
                                ignore_eos=self.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                cache_salt=self.cache_salt)
        return params.with_defaults(defaults or {})


class CompletionRequest(_Sampling):
    prompt: PromptField
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @property
    def scores_only(self) -> bool:
        """echo with max_tokens 0: the prompt's logprobs alone (lm-evaluation-harness's
        loglikelihood requests). The engine takes one token, which the response leaves out."""
        return self.echo and self.max_tokens == 0

    def prompts(self) -> list[Prompt]:
        """One prompt (text or token ids) or a list of them, as a list."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise Qwen3AotError("prompt is empty; give a string, a list of token ids, or a list of those.")
        return list(p)

    def check(self) -> None:
        self._refuse_unsupported()
        if self.echo and self.stream:
            raise Qwen3AotError("echo is supported with stream=false only; send the request unstreamed.")
        if self.suffix:
            raise Qwen3AotError("suffix is not supported by this server; leave it out.")
        if self.best_of not in (None, self.n):
            raise Qwen3AotError(f"best_of other than n is not supported (got best_of={self.best_of}, n={self.n}).")


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = None  # default: the rest of the context
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def check(self) -> None:
        self._refuse_unsupported()
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise Qwen3AotError(f"top_logprobs must be an int in [0, {MAX_LOGPROBS}], got {self.top_logprobs}.")
        if self.top_logprobs is not None and not self.logprobs:
            raise Qwen3AotError("top_logprobs needs logprobs=true.")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise Qwen3AotError("give max_tokens or max_completion_tokens, not both.")

    @property
    def logprobs_asked(self) -> int | None:
        """SamplingParams' logprobs: None, or the alternatives per token (top_logprobs, 0 if unset)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict[str, Any]]:
        """The messages as the chat template reads them: content as one string (OpenAI's list of
        text parts joined), every other field as sent (Qwen3's template reads reasoning_content)."""
        out = []
        for i, m in enumerate(self.messages):
            if not isinstance(m.get("role"), str):
                raise Qwen3AotError(f"messages[{i}] has no role; each message needs a role and a content.")
            content = m.get("content")
            if isinstance(content, list):
                if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                    raise Qwen3AotError(f"messages[{i}].content: only text parts ({{\"type\": \"text\", ...}}) "
                                        "are supported by this server.")
                content = "".join(str(p.get("text", "")) for p in content)
            elif content is not None and not isinstance(content, str):
                raise Qwen3AotError(f"messages[{i}].content must be a string or a list of text parts.")
            out.append({**m, "content": content})
        return out


# ---- responses ----

def sse_event(body: dict) -> str:
    """One server-sent event carrying `body` as JSON. Text stays UTF-8, except the three line
    ends that JSON leaves raw (U+0085, U+2028, U+2029) but Python's str.splitlines, httpx's line
    reader among its users, splits on: raw, they would cut the event's JSON in two."""
    return f"data: {json.dumps(body, ensure_ascii=False).translate(_UNICODE_LINE_ENDS)}\n\n"


_UNICODE_LINE_ENDS = {c: f"\\u{c:04x}" for c in (0x85, 0x2028, 0x2029)}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def error_body(message: str, status: int, param: str | None = None) -> dict:
    """OpenAI's error JSON; type and code as vLLM fills them (the error's class and status)."""
    kinds = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 413: "RequestTooLargeError",
             429: "RateLimitError", 500: "InternalServerError", 503: "ServiceUnavailableError"}
    return {"error": {"message": message, "type": kinds.get(status, "Error"), "param": param, "code": status}}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = 0) -> dict:
    """OpenAI's usage; cached_tokens: prompt tokens whose KV the prefix cache gave (None: not
    known yet, as in a streamed chunk's usage so far, and left out)."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


@dataclass
class Response:
    """What every response and chunk of one request has in common."""
    id: str
    model: str
    object: str
    created: int

    @classmethod
    def new(cls, prefix: str, model: str, object: str) -> "Response":
        return cls(new_id(prefix), model, object, int(time.time()))

    def body(self, choices: list[dict], **more: Any) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, **more}


class TokenText:
    """Each token's text and bytes, for logprobs (OpenAI gives a string per token). A token that
    is part of a UTF-8 character has no text of its own: its string is OpenAI's "bytes:\\xNN..."
    and its chat `bytes` are its own, not those of U+FFFD."""

    def __init__(self, tokenizer: Any) -> None:
        self._bytes = tokenizer.token_bytes

    def token(self, token_id: int) -> tuple[str, list[int]]:
        raw = self._bytes(token_id)
        try:
            return raw.decode("utf-8"), list(raw)
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)

    def completion_logprobs(self, token_ids: list[int], logprobs: list[float],
                            top: list[dict[int, float]] | None = None, offset: int = 0) -> dict:
        """The completions endpoint's layout: parallel lists, top_logprobs holding the N most
        likely tokens and the chosen one (the chosen alone with logprobs=0), text_offset counted
        from `offset` (where the text of a stream's earlier chunks ended) over the tokens' texts."""
        tokens = [self.token(t)[0] for t in token_ids]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        if top is None:
            top_lps = [None if lp is None else {t: lp} for t, lp in zip(tokens, logprobs)]
        else:
            top_lps = [None if alts is None else {self.token(i)[0]: lp for i, lp in alts.items()} for alts in top]
        return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": top_lps, "text_offset": offsets}

    def chat_logprobs(self, token_ids: list[int], logprobs: list[float],
                      top: list[dict[int, float]] | None = None, n: int = 0) -> dict:
        """The chat endpoint's layout: one entry per token with its UTF-8 bytes and its `n` most
        likely alternatives (top_logprobs)."""
        content = []
        for k, (i, lp) in enumerate(zip(token_ids, logprobs)):
            text, raw = self.token(i)
            alts = [] if top is None else sorted(((a, v) for a, v in top[k].items()), key=lambda x: -x[1])[:n]
            content.append({"token": text, "logprob": lp, "bytes": raw,
                            "top_logprobs": [dict(zip(("token", "bytes"), self.token(a)), logprob=v) for a, v in alts]})
        return {"content": content}
