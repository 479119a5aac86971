"""Prefix caching in the engine (trained fixture, CPU): what a request gets is what it gets with
caching off, greedy and seeded, while the cache does serve the shared blocks; under 32
threads over a cache small enough to evict and preempt, every output is the same request's
alone with caching off, and at the end no block is held."""

import dataclasses
import random
import time

import pytest

from qwen3_aot import runtime
from qwen3_aot.runtime import SamplingParams
from suite_support import prompt_ids, run_threads

BS = 16  # the fixture artifact's block size
DEADLINE_S = 120
GREEDY = SamplingParams(max_tokens=16, temperature=0)
SEEDED = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=3)


@pytest.fixture(scope="module")
def texts() -> tuple[list[int], list[int]]:
    """Two stretches of the training text as token ids (257 and 180 tokens)."""
    a, b = prompt_ids([(2000, 600), (30000, 400)])
    return a, b


@pytest.fixture(scope="module")
def core_off(runtime_artifact):
    return runtime.load_core(runtime_artifact, num_blocks=200, prefix_caching=False)


@pytest.fixture(scope="module")
def core_on(runtime_artifact):
    return runtime.load_core(runtime_artifact, num_blocks=200)


@pytest.mark.parametrize("params,shift", [(GREEDY, 0), (SEEDED, 1)], ids=["greedy", "seeded"])
def test_outputs_with_and_without_caching_are_identical(core_on, core_off, texts, params, shift):
    a, b = (t[shift:] for t in texts)  # prompts of their own: none of them cached before
    cases = {  # name: (prompt, prompt tokens the cache must give it, run after the ones before)
        "first": (a[:40], 0),
        "the same prompt again": (a[:40], 32),
        "a multiple of the block size": (a[:48], 32),          # its last block is computed, for the logits
        "the same, again": (a[:48], 32),
        **{f"{k} blocks shared, then differs inside a block": (a[:BS * k] + b[:5 + k], BS * k) for k in (1, 2, 3)},
        "longer, sharing 3 blocks": (a[:BS * 3] + b[:40], BS * 3),
        "the longer one's own blocks": (a[:BS * 3] + b[:40] + a[200:210], BS * 5),
    }
    for name, (prompt, cached) in cases.items():
        [want] = core_off.generate(prompt, params)
        [got] = core_on.generate(prompt, params)
        assert got == want, name
        assert got.cached_tokens == cached and want.cached_tokens == 0, name
    assert core_off.scheduler.prefix_cache_queries == 0 and core_off.blocks.num_cached == 0


def test_n_choices_of_one_prompt_share_its_blocks(core_on, core_off, texts):
    """n=4 (four seeds of one prompt, added together): the first computes the prompt, the
    other three take its full blocks in the same step."""
    prompt = texts[1][:70]                                  # 4 full blocks and 6 tokens
    params = [dataclasses.replace(SEEDED, seed=s) for s in range(4)]
    want = core_off.generate([prompt] * 4, params)
    queries, hits = core_on.scheduler.prefix_cache_queries, core_on.scheduler.prefix_cache_hits
    got = core_on.generate([prompt] * 4, params)
    assert got == want
    assert [g.cached_tokens for g in got] == [0, 64, 64, 64]
    assert (core_on.scheduler.prefix_cache_queries - queries, core_on.scheduler.prefix_cache_hits - hits) \
        == (4 * 70, 3 * 64)


def test_a_salt_shares_only_with_its_own_salt(core_on, texts):
    prompt = texts[0][100:150]
    salted = dataclasses.replace(GREEDY, cache_salt="tenant-a")
    assert core_on.generate(prompt, salted)[0].cached_tokens == 0
    assert core_on.generate(prompt, dataclasses.replace(GREEDY, cache_salt="tenant-b"))[0].cached_tokens == 0
    assert core_on.generate(prompt, GREEDY)[0].cached_tokens == 0
    assert core_on.generate(prompt, salted)[0].cached_tokens == 48


def test_32_threads_sharing_prefixes_over_a_small_cache(runtime_artifact, core_off, texts):
    """A 2-block system prefix for all, one of 4 second-level prefixes each, then their own
    text; 30 blocks for 32 requests of up to 8 blocks: blocks evicted and sequences preempted."""
    a, b = texts
    system = a[:32]
    branches = [b[20 * i:20 * i + 24] for i in range(4)]

    def request(k: int) -> tuple[list[int], SamplingParams]:
        rng = random.Random(k)
        own = a[40 + 5 * k:40 + 5 * k + rng.randrange(1, 30)]
        return system + branches[k % 4] + own, GREEDY if k % 2 else dataclasses.replace(SEEDED, seed=k)

    alone = [core_off.generate(*request(k))[0] for k in range(32)]
    with runtime.load(runtime_artifact, num_blocks=31) as engine:
        def caller(k: int) -> runtime.Completion:
            prompt, params = request(k)
            if k % 3 == 0:
                s = engine.stream(prompt, params)
                text = "".join(s)
                assert text == s.completion.text
                return s.completion
            return engine.generate(prompt, params)[0]

        got = run_threads(caller, 32)
        for k in range(32):
            assert got[k] == alone[k], k
        stats = engine.stats()
        assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
        assert sum(c.cached_tokens for c in got) > 0
        deadline = time.monotonic() + 10
        while engine.has_unfinished() or engine.stats().num_free_blocks != 30:
            assert time.monotonic() < deadline, "blocks still held after every request ended"
            time.sleep(0.01)
        core = engine._loop.core  # the loop is idle: reading its pool races with nothing
        assert all(core.blocks.ref_count(blk) == 0 for blk in range(core.blocks.num_blocks))
        assert core.blocks.num_free == 30 and core.blocks.num_cached > 0 and core.blocks.num_evicted > 0


def test_a_prompt_is_hashed_by_the_thread_that_makes_its_request(core_on, core_off, texts):
    """The lookup keys come with the request (`make_request`, any thread), so admitting it hashes
    no block of its prompt on the step path; with caching off nothing is hashed."""
    a, _ = texts
    request = core_on.make_request(a, GREEDY)
    assert len(request.seq.block_keys) == (len(a) - 1) // BS
    hashed = []
    pool_hash = core_on.blocks.hash_fn
    core_on.blocks.hash_fn = lambda *key: hashed.append(key) or pool_hash(*key)
    try:
        core_on.add(request)
        core_on.step()  # admits it: the lookup finds the keys there
        assert request.seq.num_computed > 0 and not hashed
    finally:
        core_on.blocks.hash_fn = pool_hash
        core_on.abort(request)
        while core_on.has_unfinished():
            core_on.step()
    assert core_off.make_request(a, GREEDY).seq.block_keys == []
