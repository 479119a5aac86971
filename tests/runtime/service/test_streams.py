"""How Outputs travel from the loop thread to streams: merged for a reader that is behind,
handed to an event loop in batches, never posted to a closed event loop; and a request made
(checked and tokenized) once, then streamed."""

import asyncio
import threading
import time

import pytest

from qwen3_aot import runtime
from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime.service.messages import Output
from qwen3_aot.runtime.service.streams import _Mailbox
from greedy_reference import GREEDY, prompts

DEADLINE_S = 60


@pytest.fixture(scope="module")
def engine(runtime_artifact):
    with runtime.load(runtime_artifact) as eng:
        yield eng


def test_a_stream_read_after_its_request_ended_gets_it_in_one_piece(engine):
    want = engine.generate(prompts()[2], GREEDY)[0]
    taken = engine.stats().generation_tokens
    s = engine.stream(prompts()[2], GREEDY).start()
    deadline = time.monotonic() + DEADLINE_S
    # the request runs to its end before the stream is read
    while engine.stats().generation_tokens - taken < want.output_tokens or engine.has_unfinished():
        assert time.monotonic() < deadline, "the request did not end"
        time.sleep(0.01)
    pieces = list(s)
    assert pieces == [want.text], "every Output waiting was merged into one piece"
    assert s.completion == want


def test_an_async_reader_that_is_behind_gets_merged_pieces_and_loses_nothing(engine):
    want = engine.generate(prompts()[5], GREEDY)[0]

    async def read_slowly():
        s = engine.stream_async(prompts()[5], GREEDY)
        pieces = []
        async for piece in s:
            pieces.append(piece)
            await asyncio.sleep(0.2)  # a busy event loop: the loop thread runs ahead
        return pieces, s.completion

    pieces, completion = asyncio.run(asyncio.wait_for(read_slowly(), DEADLINE_S))
    assert completion == want and "".join(pieces) == want.text
    assert len(pieces) < want.output_tokens / 2


def test_the_mailbox_wakes_the_event_loop_once_for_what_was_posted_meanwhile():
    async def main():
        event_loop = asyncio.get_running_loop()
        wakeups = []
        real = event_loop.call_soon_threadsafe
        event_loop.call_soon_threadsafe = lambda *a: (wakeups.append(a), real(*a))[1]
        box, queues = _Mailbox(event_loop), [asyncio.Queue() for _ in range(8)]
        posted = [(q, Output(text=f"{i}:{j}")) for j in range(5) for i, q in enumerate(queues)]
        poster = threading.Thread(target=lambda: [box.post(q, o) for q, o in posted])
        poster.start()
        poster.join(DEADLINE_S)  # the event loop is not running meanwhile: all wait in one batch
        await asyncio.sleep(0)
        assert len(wakeups) == 1
        for i, q in enumerate(queues):
            assert [q.get_nowait().text for _ in range(5)] == [f"{i}:{j}" for j in range(5)] and q.empty()
        box.post(queues[0], Output(text="next"))  # after a delivery the next post wakes it again
        await asyncio.sleep(0)
        assert len(wakeups) == 2 and queues[0].get_nowait().text == "next"
        return box

    box = asyncio.run(main())
    with pytest.raises(RuntimeError, match="closed"):  # the loop thread then aborts the request
        box.post(asyncio.Queue(), Output())


def test_generate_callers_are_woken_once_per_request(engine, monkeypatch):
    """generate and generate_async wait for Completions: the loop hands each request one
    Output, its last, and the Completion is the same as a streamed request's."""
    from qwen3_aot.runtime.service import streams

    taken = []
    real = streams._StreamBase._absorb
    monkeypatch.setattr(streams._StreamBase, "_absorb", lambda self, out: (taken.append(out), real(self, out))[1])
    want = [engine.stream(p, GREEDY).result() for p in prompts()[:3]]
    streamed = len(taken)
    taken.clear()
    assert engine.generate(prompts()[:3], GREEDY) == want
    assert len(taken) == 3 and all(o.completion is not None for o in taken) and streamed > 3
    taken.clear()
    assert asyncio.run(asyncio.wait_for(engine.generate_async(prompts()[1], GREEDY), DEADLINE_S)) == want[1]
    assert len(taken) == 1


def test_a_request_made_once_is_tokenized_once_streams_once_and_equals_the_prompts(engine, monkeypatch):
    want = engine.generate(prompts()[3], GREEDY)[0]
    encoded = []
    encode = engine.tokenizer.encode
    monkeypatch.setattr(engine.tokenizer, "encode", lambda text: encoded.append(text) or encode(text))
    made = [engine.make_request(prompts()[3], GREEDY) for _ in range(2)]
    assert encoded == [prompts()[3]] * 2, "one encode per make_request"
    assert engine.stream(made[0]).result() == want

    async def read(request):
        return await engine.stream_async(request).result()

    assert asyncio.run(asyncio.wait_for(read(made[1]), DEADLINE_S)) == want
    assert len(encoded) == 2, "streaming a made request tokenizes nothing"
    for again in (lambda: engine.stream(made[0]), lambda: engine.stream_async(made[1])):
        with pytest.raises(Qwen3AotError, match="streams once"):
            again()
    with pytest.raises(Qwen3AotError, match="its own SamplingParams"):
        engine.stream(engine.make_request(prompts()[3]), GREEDY)
    with pytest.raises(Qwen3AotError, match="empty"):
        engine.make_request("", GREEDY)
