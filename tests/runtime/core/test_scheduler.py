"""The continuous-batching scheduler, driven as the engine drives it but with made-up
tokens: budgets and limits hold, a block is held exactly by the sequences whose tables
name it (shared only through the prefix cache), preemption loses nothing."""

import dataclasses
from collections import Counter

import pytest
import torch

from qwen3_aot.runtime.core.block_pool import BlockPool
from qwen3_aot.runtime.core.scheduler import Scheduler, Sequence
from qwen3_aot.runtime.forward.kv_cache import RESERVED_BLOCK

BLOCK = 4


def make(num_blocks: int, max_num_seqs: int = 8, budget: int = 16, caching: bool = True) -> Scheduler:
    return Scheduler(BlockPool(num_blocks, BLOCK, caching), max_num_seqs, budget)


def token(seq: Sequence, position: int) -> int:
    """The 'model': a token that depends on the sequence and position only, as greedy decoding does."""
    return (seq.seq_id * 1000 + position) % 997


def run(sched: Scheduler, arrivals: dict[int, list[Sequence]], max_new: int) -> list[list[tuple[Sequence, int, int]]]:
    """Step until all is done, adding arrivals[step] before each step; check every invariant.
    Returns each step's (sequence, first position, number of tokens)."""
    pool, steps, finished, step = sched.pool, [], [], 0
    start_free = pool.num_free
    while sched.has_work() or any(s >= step for s in arrivals):
        for seq in arrivals.get(step, []):
            sched.add(seq)
        step += 1
        batch = sched.schedule()
        assert batch, "work left but nothing scheduled"
        assert sum(n for _, n in batch) <= sched.max_num_batched_tokens
        assert len(batch) <= sched.max_num_seqs and len(sched.running) <= sched.max_num_seqs
        assert len({id(s) for s, _ in batch}) == len(batch)
        held = Counter(b for s in sched.running for b in s.block_table)
        assert all(len(set(s.block_table)) == len(s.block_table) for s in sched.running)
        assert RESERVED_BLOCK not in held and all(pool.ref_count(b) == n for b, n in held.items())
        assert len(held) + pool.num_free == pool.num_blocks - 1
        for seq, n in batch:
            assert seq in sched.running and n >= 1
            assert len(seq.block_table) * BLOCK >= seq.num_computed + n
        tables = sched.block_tables([seq for seq, _ in batch])  # what the engine feeds the forward
        for row, (seq, _) in zip(tables, batch):
            assert row[:len(seq.block_table)].tolist() == seq.block_table
            assert (row[len(seq.block_table):] == RESERVED_BLOCK).all()
        assert sorted(s.slot for s in sched.running) == sorted(set(s.slot for s in sched.running))
        steps.append([(seq, seq.num_computed, n) for seq, n in batch])
        for seq, n in batch:
            seq.num_computed += n
            if seq.num_computed == len(seq.token_ids):
                seq.token_ids.append(token(seq, len(seq.token_ids)))
                if len(seq.output_ids) == max_new:
                    sched.remove(seq)
                    finished.append(seq)
    everyone = [s for seqs in arrivals.values() for s in seqs]
    assert sorted(id(s) for s in finished) == sorted(id(s) for s in everyone)  # each exactly once
    for s in everyone:
        assert s.output_ids == [token(s, p) for p in range(s.num_prompt_tokens, s.num_prompt_tokens + max_new)]
    assert pool.num_free == start_free and not sched.has_work()
    assert all(pool.ref_count(b) == 0 for b in range(pool.num_blocks))
    return steps


def seqs(lengths: list[int], first_id: int = 0) -> list[Sequence]:
    return [Sequence(first_id + i, list(range(1, n + 1))) for i, n in enumerate(lengths)]


CACHING = pytest.mark.parametrize("caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])


@CACHING
def test_prefills_and_decodes_share_steps_and_long_prompts_are_chunked(caching):
    long = seqs([20], 2)
    steps = run(make(num_blocks=64, budget=8, caching=caching), {0: seqs([3, 5]), 2: long, 4: seqs([2, 6], 3)},
                max_new=6)
    mixed = [b for b in steps if any(start >= s.num_prompt_tokens for s, start, _ in b)
             and any(n > 1 for _, _, n in b)]
    assert mixed, "no step held both a decode and a prefill"
    chunks = [n for b in steps for s, start, n in b if s is long[0] and start < 20]
    # the 20-token prompt went in pieces, after what the cache held (its first block is seq 1's)
    assert len(chunks) > 1 and long[0].num_cached_tokens + sum(chunks) == 20
    assert long[0].num_cached_tokens == (BLOCK if caching else 0)


@CACHING
def test_preemption_loses_and_duplicates_nothing(caching):
    sched = make(num_blocks=9, budget=16, caching=caching)  # 8 usable blocks = 32 tokens for 6 sequences of up to 18
    victims = []
    preempt = sched._preempt

    def record(seq):
        victims.append((seq, list(sched.running)))
        preempt(seq)

    sched._preempt = record
    run(sched, {0: seqs([6, 10, 3, 8]), 1: seqs([5, 12], 4)}, max_new=6)
    assert sched.num_preemptions == len(victims) > 0
    assert all(seq is running[-1] for seq, running in victims)  # always the newest


def test_max_num_seqs_bounds_the_running_set():
    sched = make(num_blocks=64, max_num_seqs=3, budget=64)
    steps = run(sched, {0: seqs([4] * 7)}, max_new=3)
    assert max(len(b) for b in steps) == 3


def test_remove_frees_the_blocks_of_running_and_waiting_sequences():
    sched = make(num_blocks=16, max_num_seqs=1)
    a, b = seqs([9, 9])
    sched.add(a)
    sched.add(b)
    start = sched.pool.num_free
    assert [s for s, _ in sched.schedule()] == [a] and sched.pool.num_free == start - 3
    sched.remove(b)
    sched.remove(a)
    assert sched.pool.num_free == start and not sched.has_work() and a.block_table == []


def test_a_request_asking_prompt_logprobs_computes_its_whole_prompt():
    """Prompt logprobs need every prompt position's logits: such a request takes no cached block."""
    from qwen3_aot.runtime import SamplingParams
    from qwen3_aot.runtime.core.request import make_request
    from qwen3_aot.runtime.text.tokenizer import Tokenizer

    @dataclasses.dataclass(frozen=True)
    class WithPromptLogprobs(SamplingParams):  # the field SamplingParams is getting
        prompt_logprobs: int | None = 0

    prompt = list(range(1, 40))
    requests = [make_request(i, prompt, params, Tokenizer(None, ()), 100, [], torch.device("cpu"))
                for i, params in enumerate([SamplingParams(), WithPromptLogprobs(), SamplingParams()])]
    assert [r.seq.reads_prefix_cache for r in requests] == [True, False, True]
    sched = make(num_blocks=40, budget=200)
    sched.add(requests[0].seq)
    sched.schedule()
    sched.add(requests[1].seq)
    sched.add(requests[2].seq)
    assert [(s.seq_id, n) for s, n in sched.schedule()][1:] == [(1, 39), (2, 3)]  # 2 took 9 cached blocks of 4
