"""The loop thread: the one owner of an EngineCore (its scheduler, KV cache, compiled
forward, CUDA graphs and sampler), fed by callers in any thread through one command queue.

Before every step the loop drains the queue (adds, aborts), so the requests of every caller
join the same continuous batch; it steps while there is work and sleeps on the queue when
there is none. After each step it hands every request that took tokens an `Output` through
the request's own channel (`Submission.put`, thread-safe): the text now safe to show, the
new token ids and logprobs, and at the end the Completion. Every piece reaches the channel,
whoever reads it and however late, so a stream read late loses nothing.

A failure inside a step ends the loop: every request in flight, and every later submission,
gets our error instead of a hang. `stop` ends it cleanly: requests in flight end as aborted.

EngineLoop and ProcessLoop (runtime/service/engine_process.py, this loop in a process of its
own, whose `flush` sends what each pass of the loop gave out) implement service.messages.Loop.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from typing import Callable

import torch

from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime.core.engine_core import EngineCore
from qwen3_aot.runtime.core.request import Prompt, Request
from qwen3_aot.runtime.core.sampling_params import SamplingParams
from qwen3_aot.runtime.service.messages import EngineInfo, EngineStats, Output, Submission
from qwen3_aot.runtime.text.tokenizer import Tokenizer

log = logging.getLogger("qwen3_aot")


class EngineLoop:
    """Starts the loop thread, which builds the core (`make_core`, on `device`) and then runs
    it; returns once the core is built, raising what building it raised.

    The core is built in the thread that steps it: on a CPU, torch's OpenMP pool belongs to the
    thread that first runs parallel work, and a second pool (the loop thread's, beside the
    loading thread's) makes libgomp see more threads than cores and stop spinning, which ran
    a CPU core at half its speed (bench/cpu_threads_probe.py).

    `flush`: called by the loop thread after each pass (a step's Outputs or a command's
    handed out, the stats snapshot taken) and once at its end."""

    def __init__(self, make_core: Callable[[], EngineCore], device: torch.device,
                 flush: Callable[[], None] | None = None) -> None:
        self.core: EngineCore | None = None
        self._make_core, self._device = make_core, device
        self._flush = flush or (lambda: None)
        self.stats = EngineStats()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # orders submissions against the loop's end; reentrant because a stream garbage-collected
        # inside the locked region of the same thread aborts through it
        self._lock = threading.RLock()
        self._ended: BaseException | None = None  # why no more submissions are taken
        self.failure: str | None = None  # set when a step failed: "the engine's loop failed (...)"
        self._live: dict[int, Submission] = {}  # by sequence id: only the loop thread touches it
        self._steps = 0
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="qwen3-aot-engine", daemon=True)
        self.thread.start()
        try:
            while not self._built.wait(0.1):  # a timed wait lets Ctrl-C through
                pass
        except BaseException:
            self.stop(timeout=0)  # the thread stops once the core is built
            raise
        if self._build_error is not None:
            raise self._build_error
        core = self.core
        self.info = EngineInfo(core.artifact, core.config, core.device, core.max_model_len, core.block_size,
                               core.cache.capacity, core.load_seconds)
        self.tokenizer: Tokenizer = core.tokenizer

    # ---- any thread ----

    def make_request(self, prompt: Prompt, params: SamplingParams | None) -> Request:
        """Check a prompt and its parameters and make its request (our error if bad, or once
        the loop has ended)."""
        with self._lock:
            if self._ended is not None:
                raise self._ended
            core = self.core
        return core.make_request(prompt, params)

    def submit(self, sub: Submission) -> None:
        self.submit_all([sub])

    def submit_all(self, subs: list[Submission]) -> None:
        """Submit several requests as one command, which the loop applies whole before a step:
        submitted one by one, an idle loop wakes at the first and steps with it alone, and a
        busy one takes the rest a few per step as they come (the engine process's child hands
        over each message's adds so, issue 31)."""
        if subs:
            self._command("add", subs)

    def abort(self, sub: Submission) -> None:
        """Cancel a submitted request; a no-op once it ended (or once the loop has)."""
        with contextlib.suppress(Qwen3AotError):
            self._command("abort", sub)

    def stop(self, timeout: float = 30.0) -> None:
        """End the loop (requests in flight end as aborted) and wait for it; idempotent."""
        with self._lock:
            if self._ended is None:
                self._ended = Qwen3AotError("the engine is closed; load the artifact again to generate.")
                self._commands.put(("stop", None))
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    def _command(self, kind: str, sub: Submission | list[Submission]) -> None:
        with self._lock:
            if self._ended is not None:
                raise self._ended
            self._commands.put((kind, sub))

    # ---- the loop thread ----

    def _run(self) -> None:
        with torch.cuda.device(self._device) if self._device.type == "cuda" else contextlib.nullcontext():
            try:
                self.core = self._make_core()
            except BaseException as e:  # noqa: BLE001  (the constructor raises it)
                self._build_error = e
                self._built.set()
                return
            finally:
                self._make_core = None  # what it holds goes with the core
            self._snapshot()
            self._built.set()
            self._loop()

    def _loop(self) -> None:
        core = self.core
        error: BaseException | None = None
        try:
            with torch.inference_mode():
                while self._drain(block=not core.has_unfinished()):
                    if core.has_unfinished():
                        # a step in two halves: the tokens of the step in flight are handed out
                        # before the next forward is scheduled and launched (a mixed step's
                        # inputs and kernel launches would hold them back), and what was
                        # submitted while the loop waited for them joins that forward, not
                        # the one after it (unless `take` queued a decode step ahead: then
                        # the newcomer joins the step after that one, as before)
                        took = core.take()
                        self._steps += 1
                        self._publish(took)
                        if took:
                            self._flush()
                        if not self._drain(block=False):
                            break
                        took = core.launch()
                        if took:  # overlap off: this step's own tokens
                            self._publish(took)
                    self._flush()
        except BaseException as e:  # noqa: BLE001  (a dying loop must tell every caller)
            log.exception("the engine loop failed")
            error = e.with_traceback(None)  # logged; its frames would keep the core's memory alive
        self._end(error)
        self._flush()
        on_cuda = core.device.type == "cuda"
        del core  # the last reference: the KV cache, weights and graphs are freed here
        if on_cuda:
            torch.cuda.empty_cache()  # back to the GPU, not only to torch's caching allocator

    def _drain(self, block: bool) -> bool:
        """Apply the queued commands (waiting for one if `block`); False on stop."""
        while True:
            try:
                kind, sub = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                return False
            if kind == "add":
                for one in sub:
                    self.core.add(one.request)
                    self._live[one.request.seq.seq_id] = one
            elif kind == "abort" and sub.request.seq.seq_id in self._live:
                self._abort(self._live.pop(sub.request.seq.seq_id))
            self._snapshot()

    def _publish(self, took: list[Request]) -> None:
        self._snapshot()
        for r in took:
            sub = self._live.get(r.seq.seq_id)
            if sub is None or sub.final_only and not r.finished:
                continue
            out = r.seq.token_ids[r.seq.num_prompt_tokens + sub.published:]  # the new ones only: O(1) a step
            logprobs = None if r.logprobs is None else r.logprobs[sub.published:]
            top = None if r.top_logprobs is None else r.top_logprobs[sub.published:]
            sub.published += len(out)
            if r.finished:
                del self._live[r.seq.seq_id]
            self._put(sub, Output(r.text.release(final=r.finished), out, logprobs, top,
                                  r.completion() if r.finished else None))

    def _abort(self, sub: Submission) -> None:
        self.core.abort(sub.request)
        self._put(sub, Output(completion=sub.request.completion()))

    def _put(self, sub: Submission, output: Output) -> None:
        try:
            sub.put(output)
        except Exception:  # noqa: BLE001  (e.g. its event loop closed: nobody reads it any more)
            if not output.last:
                self._live.pop(sub.request.seq.seq_id, None)
                self.core.abort(sub.request)

    def _snapshot(self) -> None:
        core = self.core
        sched, blocks = core.scheduler, core.blocks
        self.stats = EngineStats(len(sched.running), len(sched.waiting), blocks.num_blocks - 1, blocks.num_free,
                                 sched.num_preemptions, core.prompt_tokens, core.generation_tokens, self._steps,
                                 sched.prefix_cache_queries, sched.prefix_cache_hits, blocks.num_cached)

    def _end(self, error: BaseException | None) -> None:
        """No more submissions; everything in flight or queued ends: aborted on stop, our
        error if the loop failed."""
        with self._lock:
            if error is not None:
                self.failure = f"the engine's loop failed ({type(error).__name__}: {error})"
                self._ended = Qwen3AotError(f"{self.failure}; load the artifact again.")
                self._ended.__cause__ = error
            queued = []
            while True:
                try:
                    queued.append(self._commands.get_nowait())
                except queue.Empty:
                    break
        subs = list(self._live.values()) + [one for kind, added in queued if kind == "add" for one in added]
        self._live.clear()
        for sub in subs:
            if error is None:
                with contextlib.suppress(Exception):
                    self._abort(sub)
            else:
                with contextlib.suppress(Exception):
                    sub.put(Output(error=self._ended))
        if error is None:
            self._snapshot()
        self.core = None  # the cache, weights and graphs go with the last reference
