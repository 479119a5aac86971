"""What callers hold while their request runs in the loop thread: a Stream (any thread) or
an AsyncStream (asyncio), each reading its request's Outputs from its own channel.

A stream submits its request when first read (or `start`ed): one never started holds no
blocks. Closed, dropped or garbage-collected before its end, it aborts the request, whose
blocks the loop frees at its next command drain. The channel a stream hands the loop holds
no reference to the stream, so that dropping the stream is enough to collect it.

A reader that falls behind the loop (a busy event loop serving many streams) gets the Outputs
waiting for it merged into one piece, as vLLM's output collector does: a stream never lags
further behind because it is behind, and a server sends one event where it would send many.
The loop thread hands an event loop its streams' Outputs in batches (`_Mailbox`): one
`call_soon_threadsafe`, a self-pipe write that wakes the event loop, for all the Outputs a
step gives its streams, rather than one per Output."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import threading
import weakref

from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime.service.messages import Loop, Output, Submission
from qwen3_aot.runtime.core.request import Request
from qwen3_aot.runtime.core.sampling_params import Completion


class _StreamBase:
    """token_ids / logprobs / top_logprobs: the output so far, updated before each piece is handed out;
    completion: set once the request has ended (finished, stopped or aborted)."""

    def __init__(self, loop: Loop, request: Request, final_only: bool = False) -> None:
        self._loop, self._final_only = loop, final_only
        self._sub: Submission | None = None
        self._request = request
        self.token_ids: list[int] = []
        self.logprobs: list[float] | None = [] if request.params.logprobs is not None else None
        self.top_logprobs: list[dict[int, float]] | None = [] if request.params.logprobs else None
        self.completion: Completion | None = None
        self._closed = False

    @property
    def prompt_tokens(self) -> int:
        return self._request.seq.num_prompt_tokens

    def _submit(self, put) -> None:
        sub = Submission(self._request, put, self._final_only)
        self._loop.submit(sub)
        self._sub = sub  # only once taken: a refused submit is raised again by the next read

    def _absorb(self, out: Output) -> str:
        if out.error is not None:
            self._closed = True
            # a fresh error each: several threads may raise the loop's at once
            raise Qwen3AotError(str(out.error)) from out.error.__cause__
        self.token_ids += out.token_ids
        if self.logprobs is not None and out.logprobs:
            self.logprobs += out.logprobs
        if self.top_logprobs is not None and out.top_logprobs:
            self.top_logprobs += out.top_logprobs
        if out.completion is not None:
            self.completion = out.completion
        return out.text

    def _absorb_waiting(self, first: Output, channel: queue.SimpleQueue | asyncio.Queue) -> str:
        """`first` and every Output already waiting behind it, as one piece."""
        pieces = [self._absorb(first)]
        while not self._done and not channel.empty():
            pieces.append(self._absorb(channel.get_nowait()))
        return "".join(pieces)

    @property
    def _done(self) -> bool:
        return self.completion is not None or self._closed

    def cancel(self) -> None:
        """Abort the request if it is still running (its blocks are freed); reading on gives
        what came before the abort and the Completion (finish_reason "abort")."""
        if self._sub is not None and self.completion is None and not self._closed:
            self._loop.abort(self._sub)

    def close(self) -> None:
        """Cancel the request and stop reading: iteration ends here."""
        self.cancel()
        self._closed = True

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the loop may be gone already
            self.close()


class Stream(_StreamBase):
    """Text pieces as they are generated (whole characters; text that could still become a
    stop string is held back). The Completion is also StopIteration's value."""

    def start(self) -> Stream:
        """Submit the request now rather than at the first read."""
        if self._sub is None and not self._closed:
            self._queue: queue.SimpleQueue[Output] = queue.SimpleQueue()
            self._submit(self._queue.put)
        return self

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        self.start()
        while not self._done:
            piece = self._absorb_waiting(self._queue.get(), self._queue)
            if piece:
                return piece
        raise StopIteration(self.completion)

    def result(self) -> Completion:
        """Read to the end and return the Completion (waits)."""
        for _ in self:
            pass
        return self.completion


class AsyncStream(_StreamBase):
    """As Stream, for asyncio: `async for piece in stream`; reading never blocks the event
    loop (the loop thread hands Outputs over with call_soon_threadsafe)."""

    def __aiter__(self) -> AsyncStream:
        return self

    def start(self) -> AsyncStream:
        """Submit the request now rather than at the first read; called in the event loop
        that reads the stream."""
        if self._sub is None and not self._closed:
            self._queue: asyncio.Queue[Output] = asyncio.Queue()
            self._submit(functools.partial(_mailbox(asyncio.get_running_loop()).post, self._queue))
        return self

    async def __anext__(self) -> str:
        self.start()
        while not self._done:
            piece = self._absorb_waiting(await self._queue.get(), self._queue)
            if piece:
                return piece
        raise StopAsyncIteration

    async def result(self) -> Completion:
        async for _ in self:
            pass
        return self.completion

    async def aclose(self) -> None:
        self.close()


class _Mailbox:
    """Outputs on their way from the loop thread to one event loop's streams: the first one
    posted schedules a delivery of everything posted until that delivery runs."""

    def __init__(self, event_loop: asyncio.AbstractEventLoop) -> None:
        self._event_loop = weakref.ref(event_loop)  # a strong one would keep its _mailboxes key alive
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Output]] = []

    def post(self, q: asyncio.Queue, out: Output) -> None:
        event_loop = self._event_loop()
        if event_loop is None or event_loop.is_closed():  # nobody will read it: the loop thread aborts the request
            raise RuntimeError("the stream's event loop is closed")
        with self._lock:
            self._pending.append((q, out))
            if len(self._pending) > 1:  # a delivery is scheduled and has not run yet
                return
        try:
            event_loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # closed since the check: no delivery will run, so none is pending
            with self._lock:
                self._pending.clear()
            raise

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for q, out in pending:
            q.put_nowait(out)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()
_mailboxes_lock = threading.Lock()


def _mailbox(event_loop: asyncio.AbstractEventLoop) -> _Mailbox:
    with _mailboxes_lock:
        box = _mailboxes.get(event_loop)
        if box is None:
            box = _mailboxes[event_loop] = _Mailbox(event_loop)
        return box
