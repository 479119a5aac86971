"""The engine requests behind one HTTP request (its prompts times n), read as one stream of events.

Each engine request is consumed by its own task, which puts what it yields on one queue, so a
response can interleave several choices, and a client that goes away (seen by a task that waits
for the ASGI disconnect message) aborts them all at once: cancelling a task closes its engine
stream, which frees its blocks. `cancel` does not wait, because it is called from code that
Starlette may itself be cancelling (an await there would be cancelled again).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime.core.request import Request
from qwen3_aot.runtime.core.sampling_params import Completion
from qwen3_aot.runtime.service.engine import Engine
from qwen3_aot.runtime.service.streams import AsyncStream
from qwen3_aot.serve.metrics import Metrics

_closing: set[asyncio.Future] = set()  # streams being closed in the background (asyncio keeps weak references)


@dataclass
class Event:
    """What one engine request produced since its last event; `completion` is set on its last."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[dict[int, float]] | None = None
    completion: Completion | None = None


class ClientGone(Exception):
    """The client disconnected: the generation was aborted."""


class Generation:
    """Submits every job, a request made (checked and tokenized) by `engine.make_request`, at
    construction, then hands out their events as they come. `on_done` is called once per job
    as it ends."""

    def __init__(self, engine: Engine, jobs: list[Request], metrics: Metrics,
                 receive: Callable[[], Awaitable[dict]], on_done: Callable[[], None]) -> None:
        self.arrival = time.perf_counter()
        self.first_token_s: float | None = None
        self.completions: list[Completion | None] = [None] * len(jobs)
        # each job's tokens so far, for the log line: a cancelled job has no Completion
        self.prompt_tokens: list[int] = [0] * len(jobs)
        self.output_tokens: list[int] = [0] * len(jobs)
        self._metrics, self._on_done = metrics, on_done
        self._queue: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        self._closed = [False] * len(jobs)
        self._tasks = []
        for i, job in enumerate(jobs):
            stream = engine.stream_async(job)
            # submitted here rather than by the task's first read, which runs only once the event
            # loop gets to it (behind whatever else is ready: 1-2 ms at light load on a CPU); a
            # refusal (the engine has ended) is raised again by that read, so it reaches the
            # response as before
            with contextlib.suppress(Qwen3AotError):
                stream.start()
            self.prompt_tokens[i] = stream.prompt_tokens
            self._tasks.append(task := asyncio.create_task(self._produce(i, stream)))
            task.add_done_callback(lambda _, i=i, stream=stream: self._job_done(i, stream))
        self._watcher = asyncio.create_task(self._watch(receive))

    async def events(self) -> AsyncIterator[Event]:
        """Every event of every job, in the order they came; ClientGone if the client left."""
        left = len(self._tasks)
        try:
            while left:
                e = await self._queue.get()
                if isinstance(e, BaseException):
                    raise e
                if e.completion is not None:
                    left -= 1
                yield e
        finally:
            self.cancel()

    async def collect(self) -> list[Completion]:
        async for _ in self.events():
            pass
        return list(self.completions)

    def cancel(self) -> None:
        """Abort what is still running; returns at once (the tasks close their streams)."""
        for t in (*self._tasks, self._watcher):
            t.cancel()

    async def _produce(self, index: int, stream: AsyncStream) -> None:
        seen, last = 0, self.arrival
        try:
            async for piece in stream:
                total, lps, top = len(stream.token_ids), stream.logprobs, stream.top_logprobs
                self.output_tokens[index] = total
                now = time.perf_counter()
                new = total - seen
                if new and self.first_token_s is None:
                    self.first_token_s = now - self.arrival
                    self._metrics.ttft.observe(self.first_token_s)
                elif new:
                    for _ in range(new):  # a piece can carry several tokens: spread the gap over them
                        self._metrics.itl.observe((now - last) / new)
                if new:
                    last = now
                # only the new tokens: copying the whole output each piece is quadratic in its length
                self._queue.put_nowait(Event(index, piece, stream.token_ids[seen:total],
                                             None if lps is None else lps[seen:total],
                                             None if top is None else top[seen:total]))
                seen = total
            c = stream.completion
            self.completions[index] = c
            self.output_tokens[index] = c.output_tokens
            self._metrics.e2e.observe(time.perf_counter() - self.arrival)
            self._metrics.finished.labels(c.finish_reason).inc()
            self._queue.put_nowait(Event(index, "", c.token_ids[seen:],
                                         None if c.logprobs is None else c.logprobs[seen:],
                                         None if c.top_logprobs is None else c.top_logprobs[seen:], c))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the engine failed: the response reports it
            self._queue.put_nowait(e)
        finally:
            self._closed[index] = True
            await stream.aclose()  # aborts the request if it is still running, and frees its blocks

    def _job_done(self, index: int, stream: AsyncStream) -> None:
        self._on_done()
        if not self._closed[index]:  # cancelled before it first ran, so its finally never did
            _closing.add(task := asyncio.ensure_future(stream.aclose()))
            task.add_done_callback(_closing.discard)

    async def _watch(self, receive: Callable[[], Awaitable[dict]]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if any(not t.done() for t in self._tasks):
            self._queue.put_nowait(ClientGone())
            for t in self._tasks:
                t.cancel()
