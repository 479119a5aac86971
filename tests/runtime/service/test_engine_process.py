"""The Engine with its loop in a process of its own (`load(engine_process=True)`): the same
answers as each request alone in-process, from many threads and asyncio tasks at once; aborts
that free blocks; a killed engine process, a failing step in it, or a close that reach every
caller, never a hang; load errors in the child that come back as our error."""

import asyncio
import os
import queue
import textwrap
import threading
import time

import pytest

from qwen3_aot import Qwen3AotError, runtime
from qwen3_aot.runtime import SamplingParams
from qwen3_aot.runtime.service.engine_process import _Child, pending
from qwen3_aot.runtime.service.loop import EngineLoop
from qwen3_aot.runtime.service.messages import Submission
from greedy_reference import GREEDY, prompts
from test_engine_concurrency import assert_a_failing_step_ends_every_caller, run_threads, wait_until

PARAMS = [GREEDY, SamplingParams(max_tokens=24, temperature=1.5, top_p=0.9, seed=11)]
LONG = SamplingParams(max_tokens=300, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(runtime_artifact):
    # 40 blocks of 16 tokens for up to 32 requests: preemption inside the child too
    with runtime.load(runtime_artifact, engine_process=True, num_blocks=40) as eng:
        yield eng


@pytest.fixture(scope="module")
def alone(runtime_artifact) -> dict[tuple[int, int], runtime.Completion]:
    """Each request run by itself on an in-process core."""
    core = runtime.load_core(runtime_artifact, num_blocks=40)
    return {(i, j): core.generate(p, PARAMS[j])[0] for i, p in enumerate(prompts()[:8]) for j in range(len(PARAMS))}


def test_threads_and_asyncio_tasks_get_what_each_request_gets_alone(engine, alone):
    def caller(k: int):
        i, j = k % 8, k % len(PARAMS)
        if k % 2:
            got = engine.generate(prompts()[i], PARAMS[j])[0]
        else:
            stream = engine.stream(prompts()[i], PARAMS[j])
            list(stream)
            got = stream.completion
        assert got.token_ids == alone[i, j].token_ids, f"caller {k}"
        assert got.finish_reason == alone[i, j].finish_reason

    async def tasks():
        async def one(k: int):
            i, j = k % 8, (k + 1) % len(PARAMS)
            stream = engine.stream_async(prompts()[i], PARAMS[j])
            async for _ in stream:
                pass
            assert stream.completion.token_ids == alone[i, j].token_ids, f"task {k}"
        await asyncio.wait_for(asyncio.gather(*(one(k) for k in range(16))), timeout=120)

    run_threads(lambda k: caller(k) if k < 16 else asyncio.run(tasks()), 17)
    assert engine.stats().num_preemptions > 0, "40 blocks for these requests: the child's scheduler preempts"
    wait_until(lambda: engine.stats().num_free_blocks == engine.stats().num_blocks, "every block to come back")
    assert engine.stats().generation_tokens >= sum(c.output_tokens for c in alone.values())


def test_a_closed_stream_aborts_its_request_in_the_child(engine):
    before = engine.stats().generation_tokens
    stream = engine.stream(prompts()[0], LONG).start()
    wait_until(lambda: engine.stats().generation_tokens > before, "the request to start")
    stream.close()
    wait_until(lambda: engine.stats().num_running == 0 and engine.stats().num_free_blocks == engine.stats().num_blocks,
               "the aborted request's blocks to come back")
    assert engine.stats().generation_tokens - before < LONG.max_tokens, "the abort cut it short"


def test_a_stream_collected_inside_the_loops_locked_region_aborts_without_a_deadlock(engine):
    """A stream's __del__ aborts its request, and the garbage collector runs it in whatever
    thread allocates, which may be one holding the process loop's lock (inside submit, say):
    the abort takes that lock again in the same thread. A plain lock would hang here."""
    loop = engine._loop
    stream = engine.stream(prompts()[0], LONG).start()
    done = threading.Event()

    def collected_while_locked():
        with loop._lock:
            stream.__del__()
        done.set()

    threading.Thread(target=collected_while_locked, daemon=True).start()
    if not done.wait(10):
        loop._lock.release()  # a plain lock (the bug) can be freed from here: the module's engine then closes
        pytest.fail("the abort inside the locked region deadlocked")
    wait_until(lambda: engine.stats().num_running == 0 and engine.stats().num_free_blocks == engine.stats().num_blocks,
               "the aborted request's blocks to come back")


def test_a_killed_engine_process_ends_every_caller_with_our_error(runtime_artifact):
    eng = runtime.load(runtime_artifact, engine_process=True)
    streams = [eng.stream(p, LONG).start() for p in prompts()[:4]]
    wait_until(lambda: eng.stats().num_running > 0, "the requests to start")
    eng._loop.process.kill()

    def read(k: int):
        with pytest.raises(Qwen3AotError, match="engine process ended unexpectedly"):
            streams[k].result()

    run_threads(read, 4)
    wait_until(lambda: not eng.running, "the engine to end")
    with pytest.raises(Qwen3AotError, match="load the artifact again"):
        eng.generate("x")
    eng.close()


def test_close_aborts_what_is_in_flight_and_the_process_exits_0(runtime_artifact):
    eng = runtime.load(runtime_artifact, engine_process=True)
    stream = eng.stream(prompts()[1], LONG).start()
    wait_until(lambda: eng.stats().num_running > 0, "the request to start")
    t = time.monotonic()
    eng.close()
    assert eng._loop.process.returncode == 0
    assert time.monotonic() - t < 30
    assert stream.result().finish_reason == "abort"
    with pytest.raises(Qwen3AotError, match="closed"):
        eng.generate("x")


def test_a_failing_step_in_the_child_reaches_every_caller_as_our_error(runtime_artifact, tmp_path, monkeypatch):
    # the fault goes into the child through a sitecustomize on its PYTHONPATH (the child
    # inherits our environment): its forward fails from the fourth call on
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        from qwen3_aot.runtime.forward import compiled

        calls, forward = [0], compiled.CompiledForward.run

        def failing(self, *args):
            calls[0] += 1
            if calls[0] > 3:
                raise RuntimeError("device lost")
            return forward(self, *args)

        compiled.CompiledForward.run = failing
    """))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    eng = runtime.load(runtime_artifact, engine_process=True, cuda_graphs=False)  # every step through forward
    assert_a_failing_step_ends_every_caller(eng, LONG)
    eng.close()
    assert eng._loop.process.returncode == 0, "the child exits once the parent has heard why"


def test_the_childs_load_errors_are_ours(runtime_artifact):
    with pytest.raises(Qwen3AotError, match="at least 2 blocks"):
        runtime.load(runtime_artifact, engine_process=True, num_blocks=1)


def test_the_commands_queued_at_once_go_to_the_child_as_one_message_ending_at_a_stop():
    commands = queue.SimpleQueue()
    burst = [("add", i, [1, 2, 3], GREEDY, False) for i in range(64)] + [("abort", 3), ("stop",)]
    for c in [*burst, ("add", 99, [1], GREEDY, False)]:
        commands.put(c)
    assert pending(commands) == burst
    assert commands.get_nowait()[1] == 99  # after a stop nothing is sent
    commands.put(("abort", 5))
    assert pending(commands) == [("abort", 5)]


def test_the_child_hands_a_messages_adds_to_its_loop_as_one_submission_in_the_parents_order():
    """An idle loop woken by a message's first add would step with it alone and take the rest a
    few per step (issue 31): the child makes every request of the message, then submits them
    together; an abort waits for the adds before it, so it finds its request."""
    calls = []

    class Loop:  # records what the child asks of it; a request stands for its prompt's first id
        failure = None
        thread = threading.Thread(target=lambda: None)
        thread.start()

        def make_request(self, token_ids, params):
            calls.append(("make", token_ids[0]))
            return token_ids[0]

        def submit(self, sub):
            calls.append(("submit", sub.request))

        def submit_all(self, subs):
            calls.append(("submit_all", [sub.request for sub in subs]))

        def abort(self, sub):
            calls.append(("abort", sub.request))

        def stop(self):
            calls.append(("stop",))

    class Conn:  # two messages: three adds, an abort of the second and one more add; then a stop
        def __init__(self):
            self.messages = [[("add", k, [k], GREEDY, False) for k in range(3)]
                             + [("abort", 1), ("add", 3, [3], GREEDY, False)], [("stop",)]]

        def recv(self):
            return self.messages.pop(0)

        def send(self, message):
            pass

    child = _Child.__new__(_Child)  # its loop and connection are the fakes above
    child.conn, child.loop, child.subs, child.outbox = Conn(), Loop(), {}, []
    child.send_lock, child.sent_stats = threading.Lock(), None
    child.run()
    assert calls == [("make", 0), ("make", 1), ("make", 2), ("submit_all", [0, 1, 2]), ("abort", 1),
                     ("make", 3), ("submit_all", [3]), ("stop",)]


def test_requests_submitted_together_join_one_step(runtime_artifact):
    core = runtime.load_core(runtime_artifact)
    records = []
    core.observers.append(records.append)
    loop = EngineLoop(lambda: core, core.device)
    try:
        done = queue.SimpleQueue()
        subs = [Submission(loop.make_request(p, GREEDY), done.put, final_only=True) for p in prompts()[:8]]
        loop.submit_all(subs)
        for _ in subs:
            assert done.get(timeout=60).completion is not None
    finally:
        loop.stop()
    assert records[0].prefills == len(subs), records[:3]


def test_a_request_submitted_while_the_loop_waits_for_a_step_joins_the_next_one(runtime_artifact):
    """The loop takes the tokens of the step in flight (waiting for the device), then drains
    what came meanwhile, then launches: a request submitted during that wait joins the very
    next forward, not the one after it (a whole step of its time to first token)."""
    core = runtime.load_core(runtime_artifact)
    records, marks = [], []
    core.observers.append(records.append)
    loop = EngineLoop(lambda: core, core.device)
    take, done = core.take, queue.SimpleQueue()
    first = Submission(loop.make_request(prompts()[0], SamplingParams(max_tokens=8, ignore_eos=True)), done.put,
                       final_only=True)
    second = Submission(loop.make_request(prompts()[1], GREEDY), done.put, final_only=True)

    def taking():  # the loop thread, in its wait for the step in flight
        took = take()
        if not marks and first.request.seq.num_output_tokens >= 2:
            loop.submit(second)
            marks.append(len(records))  # the index of the next forward's record
        return took

    core.take = taking
    try:
        loop.submit(first)
        for _ in range(2):
            assert done.get(timeout=60).completion is not None
    finally:
        loop.stop()
    assert marks and records[marks[0]].prefills == 1 and records[marks[0]].decodes == 1, records


def test_tokens_are_handed_out_before_the_next_step_is_launched(runtime_artifact):
    """A step's tokens reach their streams before the loop schedules and launches the next
    forward, which on a GPU holds them for its inputs and kernel launches (a mixed step's)."""
    core = runtime.load_core(runtime_artifact)
    loop = EngineLoop(lambda: core, core.device)
    take, launch = core.take, core.launch
    taken, at_launch, outputs = [0], [], queue.SimpleQueue()

    def taking():
        took = take()
        taken[0] += len(took)
        return took

    def launching():
        at_launch.append((taken[0], outputs.qsize()))
        return launch()

    core.take, core.launch = taking, launching
    sub = Submission(loop.make_request(prompts()[0], SamplingParams(max_tokens=6, ignore_eos=True)), outputs.put)
    try:
        loop.submit(sub)
        wait_until(lambda: sub.request.finished and outputs.qsize() == 6, "the request's six Outputs")
    finally:
        loop.stop()
    assert len(at_launch) >= 6 and all(t == n for t, n in at_launch), at_launch
