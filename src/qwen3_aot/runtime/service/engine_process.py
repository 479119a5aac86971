"""The engine's loop in a process of its own, behind the interface of EngineLoop.

One Python process shares one GIL among its threads. A server's event loop serving hundreds
of streams holds it most of the time, and the loop thread, which needs it between the GPU's
steps (to schedule, take tokens, build the next inputs), waits for it: the GPU idles. vLLM
runs its engine core in a process apart for this reason; so does `load(engine_process=True)`
(what `qwen3-aot serve` uses).

The child process loads the core and runs an EngineLoop on it; its main thread applies the
commands the parent sends (add, abort, stop; whatever is queued goes as one message) and the
loop thread sends back, after each pass, one message with every Output the pass gave and the
stats. In the parent, ProcessLoop checks
and makes requests as the loop does (its own tokenizer; the child makes each one again from
its token ids); a sender thread writes the commands, so that no caller, and not the receiver
thread, ever waits on a full pipe; the receiver thread hands each Output to its Submission's
channel, so the streams of runtime/service/streams.py work unchanged. A child that dies ends every
request in flight with our error; a parent that dies closes the socket, which ends the child.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime.service.loop import EngineLoop
from qwen3_aot.runtime.service.messages import EngineInfo, EngineStats, Output, Submission
from qwen3_aot.runtime.core.request import Prompt, Request, make_request, request_limits
from qwen3_aot.runtime.core.sampling_params import SamplingParams
from qwen3_aot.runtime.text.tokenizer import Tokenizer

START_TIMEOUT_S = 900.0  # the child's import of torch, the load, the CUDA-graph capture (32B: tens of seconds)
CPU = torch.device("cpu")  # the parent's requests are never sampled: their generators stay off the GPU


class ProcessLoop:
    """Starts the child and waits until its core is loaded; our error if it could not be
    (with the child's message when the error was ours, such as a bad option)."""

    def __init__(self, path: Path, device: torch.device, options: dict,
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        # a fresh interpreter, not multiprocessing's spawn, which would import the caller's
        # __main__ again (a script without a __main__ guard would load a second engine)
        ours, theirs = socket.socketpair()
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root,
                                                                          os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen(
            [sys.executable, "-c", f"from qwen3_aot.runtime.service.engine_process import child_main; "
                                   f"child_main({theirs.fileno()})"], pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._conn.send((str(path), str(device), options))
        try:  # the tokenizer while the child loads (a large tokenizer.json takes half a second to parse)
            self.tokenizer = Tokenizer.from_dir(path)
            first = self._first_message(start_timeout_s)
        except BaseException:
            self.process.kill()
            self.process.wait(10)
            raise
        if first[0] == "failed":
            self.process.wait(10)
            raise Qwen3AotError(first[1])
        _, self.info, self.stats = first
        self.info: EngineInfo
        self.stats: EngineStats
        self._ids = itertools.count()
        # orders commands and submissions against the end; reentrant, as EngineLoop's: a stream
        # garbage-collected inside the locked region of the same thread aborts through it
        self._lock = threading.RLock()
        self._ended: Qwen3AotError | None = None
        self._subs: dict[int, Submission] = {}  # by the parent's sequence id
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_commands, name="qwen3-aot-engine-sender", daemon=True)
        self._sender.start()
        self.thread = threading.Thread(target=self._receive, name="qwen3-aot-engine-receiver", daemon=True)
        self.thread.start()

    def _first_message(self, timeout_s: float) -> tuple:
        died = "the engine process exited with code {} while loading; its output above says why."
        waited = 0.0
        while not self._conn.poll(0.5):
            waited += 0.5
            if self.process.poll() is not None:
                raise Qwen3AotError(died.format(self.process.returncode))
            if waited >= timeout_s:
                self.process.kill()
                raise Qwen3AotError(f"the engine process did not load the artifact within {timeout_s:.0f} s.")
        try:
            return self._conn.recv()
        except EOFError:
            raise Qwen3AotError(died.format(self.process.wait(10))) from None

    # ---- any thread ----

    def make_request(self, prompt: Prompt, params: SamplingParams | None) -> Request:
        with self._lock:
            if self._ended is not None:
                raise self._ended
        return make_request(next(self._ids), prompt, params, self.tokenizer, self.info.config["vocab_size"],
                            request_limits(self.info.max_model_len, self.info.cache_capacity), CPU)

    def submit(self, sub: Submission) -> None:
        seq = sub.request.seq
        with self._lock:
            if self._ended is not None:
                raise self._ended
            self._subs[seq.seq_id] = sub
            self._commands.put(("add", seq.seq_id, seq.token_ids, sub.request.params, sub.final_only))

    def abort(self, sub: Submission) -> None:
        """Cancel a submitted request; a no-op once it ended (or once the loop has)."""
        with self._lock:
            if self._ended is None and sub.request.seq.seq_id in self._subs:
                self._commands.put(("abort", sub.request.seq.seq_id))

    def stop(self, timeout: float = 30.0) -> None:
        """End the child (requests in flight end as aborted) and wait for it; idempotent."""
        with self._lock:
            if self._ended is None:
                self._ended = Qwen3AotError("the engine is closed; load the artifact again to generate.")
                self._commands.put(("stop",))
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)

    # ---- the sender and receiver threads ----

    def _send_commands(self) -> None:
        while True:
            commands = pending(self._commands)
            try:
                self._conn.send(commands)
            except OSError:  # the child is gone: the receiver ends everything
                return
            if commands[-1][0] == "stop":
                return

    def _receive(self) -> None:
        reason = None
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "ended":
                    reason = message[1]
                    break
                _, outputs, self.stats = message
                for seq_id, out in outputs:
                    self._deliver(seq_id, out)
        except (EOFError, OSError):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
            reason = f"the engine process ended unexpectedly (exit code {self.process.returncode})"
        self._end(reason)

    def _deliver(self, seq_id: int, out: Output) -> None:
        sub = self._subs.pop(seq_id, None) if out.last else self._subs.get(seq_id)
        if sub is None:
            return
        try:
            sub.put(out)
        except Exception:  # noqa: BLE001  (e.g. its event loop closed: nobody reads it any more)
            if not out.last:
                self.abort(sub)

    def _end(self, reason: str | None) -> None:
        """No more submissions. A clean stop has aborted everything in flight; on a failure
        every request still waiting for its end gets our error."""
        with self._lock:
            if reason is not None:
                self._ended = Qwen3AotError(f"{reason}; load the artifact again.")
            elif self._ended is None:
                self._ended = Qwen3AotError("the engine is closed; load the artifact again to generate.")
            self._commands.put(("stop",))  # a child whose loop failed waits for this to exit
            subs, self._subs = list(self._subs.values()), {}
        for sub in subs:
            if reason is None:
                sub.request.finish_reason = "abort"
                out = Output(completion=sub.request.completion())
            else:
                out = Output(error=self._ended)
            with contextlib.suppress(Exception):
                sub.put(out)


def pending(commands: queue.SimpleQueue) -> list[tuple]:
    """The next command (waiting for one) and every command queued behind it, up to a stop: one
    message for a burst. The sender thread competes for the GIL with a busy event loop, which
    lets go of it once per switch interval (5 ms), and each send lets go of it again, so one
    command a message can feed a burst to the child a few requests per interval, to be admitted
    a few per step: what the H200 run of BENCHMARKS.md's "Prefix caching" (2026-12-07) showed."""
    out = [commands.get()]
    while out[-1][0] != "stop":
        try:
            out.append(commands.get_nowait())
        except queue.Empty:
            break
    return out


# ---- the child process ----

def child_main(fd: int) -> None:
    """The child's entry: the artifact, device and options come first on the connection."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the parent, which stops us
    conn = Connection(fd)
    path, device, options = conn.recv()
    try:
        child = _Child(conn, path, device, options)
    except Qwen3AotError as e:
        conn.send(("failed", str(e)))
        return
    except BaseException as e:  # noqa: BLE001  (the parent must hear why, not wait)
        conn.send(("failed", f"the engine process could not load {path} ({type(e).__name__}: {e})."))
        raise
    child.run()


class _Child:
    """The loop thread builds the core and sends; the main thread receives commands until stop
    (or the parent's end)."""

    def __init__(self, conn, path: str, device: str, options: dict) -> None:
        from qwen3_aot import runtime

        self.conn, self.outbox, self.sent_stats = conn, [], None
        self.send_lock = threading.Lock()  # the loop thread's flushes, the main thread's refusals
        self.subs: dict[int, Submission] = {}  # by the parent's sequence id
        # the parent checked the files
        self.loop = EngineLoop(lambda: runtime.load_core(path, device, verify_files=False, **options),
                               torch.device(device), flush=self.flush)
        self.send(("ready", self.loop.info, self.loop.stats))

    def post(self, seq_id: int, out: Output) -> None:  # the loop thread
        if out.last:
            self.subs.pop(seq_id, None)
        self.outbox.append((seq_id, out))

    def flush(self) -> None:  # the loop thread
        stats = self.loop.stats
        if self.outbox or stats != self.sent_stats:
            outputs, self.outbox, self.sent_stats = self.outbox, [], stats
            self.send(("outputs", outputs, stats))

    def send(self, message: tuple) -> None:
        with self.send_lock, contextlib.suppress(OSError):  # the parent is gone: the main thread sees it too
            self.conn.send(message)

    def run(self) -> None:
        watcher = threading.Thread(target=self._tell_end, daemon=True)
        watcher.start()
        stopped = False
        while not stopped:
            try:
                commands = self.conn.recv()  # a list: the parent sends what it has queued at once
            except (EOFError, OSError):  # the parent is gone
                break
            # a message's adds reach the loop together (submit_all), so that a burst is admitted
            # in one step; an abort or stop goes after the adds before it, in the parent's order
            adds: list[tuple[int, Submission]] = []  # (the parent's sequence id, its submission)
            for command in commands:
                if command[0] == "add":
                    adds += self._make(*command[1:])
                    continue
                self._submit(adds)
                adds = []
                if command[0] == "stop":
                    stopped = True
                    break
                if command[0] == "abort" and command[1] in self.subs:
                    self.loop.abort(self.subs[command[1]])
            self._submit(adds)
        self.loop.stop()
        watcher.join(30)

    def _make(self, seq_id: int, token_ids: list[int], params: SamplingParams,
              final_only: bool) -> list[tuple[int, Submission]]:
        """The request made again from its ids, with its Submission to the loop (none if the loop has ended)."""
        put = lambda out: self.post(seq_id, out)  # noqa: E731
        try:
            sub = Submission(self.loop.make_request(token_ids, params), put, final_only)
        except Qwen3AotError as e:  # the loop has ended: the parent hears why with "ended"
            self._refuse([seq_id], e)
            return []
        self.subs[seq_id] = sub
        return [(seq_id, sub)]

    def _submit(self, adds: list[tuple[int, Submission]]) -> None:
        if not adds:
            return
        try:
            self.loop.submit_all([sub for _, sub in adds])
        except Qwen3AotError as e:
            self._refuse([seq_id for seq_id, _ in adds], e)

    def _refuse(self, seq_ids: list[int], error: Qwen3AotError) -> None:
        for seq_id in seq_ids:
            self.subs.pop(seq_id, None)
        self.send(("outputs", [(seq_id, Output(error=error)) for seq_id in seq_ids], self.loop.stats))

    def _tell_end(self) -> None:
        """Once the loop thread has ended: why, for the parent (None after a stop)."""
        self.loop.thread.join()
        self.send(("ended", self.loop.failure))
