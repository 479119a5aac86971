"""1,000 short requests at concurrency 64 through the openai client (a bounded loop on
127.0.0.1): none lost, none failed, each greedy output the same as that request run alone."""

from __future__ import annotations

import asyncio

import pytest

from qwen3_aot.runtime import SamplingParams

pytestmark = pytest.mark.xdist_group("tiny_server")  # one pytest-xdist worker starts the tiny server
REQUESTS, CONCURRENCY = 1000, 64


@pytest.mark.deadline(120)
def test_a_thousand_requests_at_concurrency_64_lose_nothing_and_match_alone(tiny_server, tiny_engine):
    words = "assert expression def class return import yield lambda while print".split()
    distinct = [(" ".join(words[i % 10:i % 10 + 1 + i % 4]), 1 + i % 4) for i in range(40)]  # (prompt, max_tokens)
    alone = {(p, n): tiny_engine.generate(p, SamplingParams(max_tokens=n, temperature=0))[0] for p, n in distinct}
    work = [distinct[i % len(distinct)] for i in range(REQUESTS)]
    answers: list = [None] * REQUESTS
    errors: list[BaseException] = []

    async def main() -> None:
        client = tiny_server.async_client()
        next_job = iter(range(REQUESTS))

        async def worker() -> None:
            for i in next_job:  # shared: each index is taken by exactly one worker
                prompt, n = work[i]
                try:
                    answers[i] = await client.completions.create(model="tiny", prompt=prompt, max_tokens=n,
                                                                 temperature=0)
                except Exception as e:  # counted, and the worker goes on
                    errors.append(e)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        await client.close()

    asyncio.run(main())
    assert errors == []
    assert sum(a is not None for a in answers) == REQUESTS
    for (prompt, n), a in zip(work, answers):
        want = alone[prompt, n]
        assert (a.choices[0].text, a.choices[0].finish_reason, a.usage.completion_tokens) == (
            want.text, want.finish_reason, want.output_tokens), prompt
