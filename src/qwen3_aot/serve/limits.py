"""What one request may ask of the server, checked before any work is done for it.

A client must not be able to stall or bloat the server for everyone: a body over
--max-request-bytes gets 413 before it is parsed; a text prompt with more UTF-8 bytes than the
context could hold (max_model_len times the most bytes one token stands for) gets 400 without
being tokenized (tokenizing megabytes takes seconds and hundreds of MB); n, the prompts of a
list, the messages of a chat and its stop strings are bounded, each with a 400 naming its
limit; and a request that asks for more generations than --max-queue can ever hold gets a 400
saying so, not the 429 of a server that is only busy now. vLLM leaves these counts unbounded
and has no flag for them, so they are constants here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass
from typing import Any, Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime.service.engine import Engine

# cli.py's --help for serve and README's Serving section name these values
ROLES = ("system", "developer", "user", "assistant", "tool")  # OpenAI's; a role is rendered into the prompt
MAX_N = 128  # OpenAI's limit on n
MAX_PROMPTS = 2048  # the most inputs OpenAI takes in one request (its embeddings endpoint's limit)
MAX_STOP = 16  # OpenAI takes 4; vLLM users send more. Each is searched for after every token
MAX_STOP_CHARS = 1024
MIN_REQUEST_BYTES = 4 << 20
REQUEST_BYTES_PER_TOKEN = 64  # a context's worth of JSON-escaped text (up to 6 bytes a character), with room


def default_max_request_bytes(max_model_len: int) -> int:
    """--max-request-bytes by default: 64 bytes per token of the context, at least 4 MiB."""
    return max(MIN_REQUEST_BYTES, REQUEST_BYTES_PER_TOKEN * max_model_len)


@dataclass(frozen=True)
class Limits:
    """max_prompt_bytes: the most UTF-8 bytes a text prompt may have (None: no bound known);
    max_messages: a chat of more messages than the context has tokens cannot be real."""
    max_model_len: int
    max_queue: int
    max_request_bytes: int
    max_prompt_bytes: int | None

    @classmethod
    def for_engine(cls, engine: Engine, max_queue: int, max_request_bytes: int | None = None) -> "Limits":
        if max_request_bytes is not None and max_request_bytes < 1:
            raise Qwen3AotError(f"--max-request-bytes must be at least 1, got {max_request_bytes}.")
        per_token = engine.tokenizer.max_bytes_per_token()
        return cls(engine.max_model_len, max_queue,
                   default_max_request_bytes(engine.max_model_len) if max_request_bytes is None else max_request_bytes,
                   None if per_token is None else per_token * engine.max_model_len)

    @property
    def max_messages(self) -> int:
        return self.max_model_len

    def check_sampling(self, n: int, stop: str | list[str] | None) -> None:
        if n > MAX_N:
            raise Qwen3AotError(f"n={n} is more than this server's limit of {MAX_N} choices per request; ask for "
                                "fewer.")
        stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if len(stops) > MAX_STOP:
            raise Qwen3AotError(f"{len(stops)} stop strings is more than this server's limit of {MAX_STOP}; send "
                                "fewer.")
        longest = max(map(len, stops), default=0)
        if longest > MAX_STOP_CHARS:
            raise Qwen3AotError(f"a stop string of {longest} characters is longer than this server's limit of "
                                f"{MAX_STOP_CHARS}; shorten it.")

    def check_prompts(self, prompts: list[str | list[int]]) -> None:
        """Each prompt's size, before it is tokenized or converted."""
        if len(prompts) > MAX_PROMPTS:
            raise Qwen3AotError(f"{len(prompts)} prompts is more than this server's limit of {MAX_PROMPTS} per "
                                "request; split them over several requests.")
        for p in prompts:
            if isinstance(p, str):
                self.check_text(p)
            elif len(p) >= self.max_model_len:
                raise prompt_fills_context(len(p), self.max_model_len)

    def check_text(self, text: str) -> None:
        """A text that cannot fit the context, refused without tokenizing it."""
        if self.max_prompt_bytes is None or len(text) * 4 <= self.max_prompt_bytes:  # 4: UTF-8's most a character
            return
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > self.max_prompt_bytes:
            raise Qwen3AotError(f"the prompt has {size} bytes of UTF-8, more than the context ({self.max_model_len} "
                                f"tokens of at most {self.max_prompt_bytes // self.max_model_len} bytes each) can "
                                "hold; shorten it.")

    def check_messages(self, messages: list[dict[str, Any]]) -> None:
        if len(messages) > self.max_messages:
            raise Qwen3AotError(f"{len(messages)} messages is more than this server's limit of {self.max_messages} "
                                "(its context's tokens); send fewer.")
        for i, m in enumerate(messages):
            role = m.get("role")
            if isinstance(role, str) and role not in ROLES:
                raise Qwen3AotError(f"messages[{i}].role {role[:100]!r} is not a role this server takes; use one of "
                                    f"{', '.join(ROLES)}.")

    def check_count(self, count: int) -> None:
        """A request of `count` generations (prompts times n) that the queue can never hold."""
        if count > self.max_queue:
            raise Qwen3AotError(f"this request is too large: it asks for {count} generations (prompts times n), more "
                                f"than this server ever holds at once (its --max-queue, {self.max_queue}); send "
                                "fewer prompts or a smaller n.")


def prompt_fills_context(tokens: int, max_model_len: int) -> Qwen3AotError:
    return Qwen3AotError(f"the prompt ({tokens} tokens) fills the context ({max_model_len} tokens); shorten it.")


class BodyLimit:
    """ASGI middleware: a request body of more than `limit` bytes ends in 413 as soon as its
    Content-Length says so or, sent in chunks, as soon as that many have come, before any of it
    is parsed. The 413 is an HTTPException raised where the app reads the body, so that the
    app's handler answers it in OpenAI's error JSON and logs it. `after_big` is called once a
    request whose body had more than `big` bytes has been answered."""

    def __init__(self, app: ASGIApp, limit: int, big: int, after_big: Callable[[], None]) -> None:
        self.app, self.limit, self.big, self.after_big = app, limit, big, after_big

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        received = 0

        async def bounded() -> Message:
            nonlocal received
            if declared is not None and declared.isdigit() and int(declared) > self.limit:
                raise self._too_large(int(declared))
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise self._too_large(received, " at least")
            return message

        try:
            await self.app(scope, bounded, send)
        finally:
            if received > self.big or (declared is not None and declared.isdigit() and int(declared) > self.big):
                self.after_big()

    def _too_large(self, size: int, at_least: str = "") -> HTTPException:
        return HTTPException(413, f"the request body has{at_least} {size} bytes, more than this server's "
                                  f"--max-request-bytes ({self.limit}); send a smaller request.")


def release_freed_memory() -> None:
    """Hand the heap's free memory back to the system (glibc's malloc_trim; elsewhere nothing).
    Parsing and tokenizing a big request allocates hundreds of MB, in the worker thread's malloc
    arena as much as the event loop's; freed, glibc kept it (the server's resident memory stayed
    that much higher after every such request) until trimmed. It takes a few ms, so it runs in a
    worker thread after big requests only."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None
