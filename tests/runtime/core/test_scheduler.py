"""The continuous-batching scheduler, driven as the engine drives it but with made-up
tokens: budgets and limits hold, blocks are never shared, preemption loses nothing."""

import torch

from qwen3_aot.runtime.forward.kv_cache import RESERVED_BLOCK, KVCache
from qwen3_aot.runtime.core.scheduler import Scheduler, Sequence

BLOCK = 4


def make(num_blocks: int, max_num_seqs: int = 8, budget: int = 16) -> Scheduler:
    cfg = {"num_hidden_layers": 1, "num_key_value_heads": 1, "head_dim": 1}
    return Scheduler(KVCache(cfg, num_blocks, BLOCK, torch.float32, torch.device("cpu")), max_num_seqs, budget)


def token(seq: Sequence, position: int) -> int:
    """The 'model': a token that depends on the sequence and position only, as greedy decoding does."""
    return (seq.seq_id * 1000 + position) % 997


def run(sched: Scheduler, arrivals: dict[int, list[Sequence]], max_new: int) -> list[list[tuple[Sequence, int, int]]]:
    """Step until all is done, adding arrivals[step] before each step; check every invariant.
    Returns each step's (sequence, first position, number of tokens)."""
    cache, steps, finished, step = sched.cache, [], [], 0
    start_free = cache.num_free
    while sched.has_work() or any(s >= step for s in arrivals):
        for seq in arrivals.get(step, []):
            sched.add(seq)
        step += 1
        batch = sched.schedule()
        assert batch, "work left but nothing scheduled"
        assert sum(n for _, n in batch) <= sched.max_num_batched_tokens
        assert len(batch) <= sched.max_num_seqs and len(sched.running) <= sched.max_num_seqs
        assert len({id(s) for s, _ in batch}) == len(batch)
        owned = [b for s in sched.running for b in s.block_table]
        assert len(owned) == len(set(owned)) and RESERVED_BLOCK not in owned
        assert len(owned) + cache.num_free == cache.num_blocks - 1
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
    assert cache.num_free == start_free and not sched.has_work()
    return steps


def seqs(lengths: list[int], first_id: int = 0) -> list[Sequence]:
    return [Sequence(first_id + i, list(range(1, n + 1))) for i, n in enumerate(lengths)]


def test_prefills_and_decodes_share_steps_and_long_prompts_are_chunked():
    sched = make(num_blocks=64, budget=8)
    steps = run(sched, {0: seqs([3, 5]), 2: seqs([20], 2), 4: seqs([2, 6], 3)}, max_new=6)
    mixed = [b for b in steps if any(start >= s.num_prompt_tokens for s, start, _ in b)
             and any(n > 1 for _, _, n in b)]
    assert mixed, "no step held both a decode and a prefill"
    chunks = [n for b in steps for s, start, n in b if s.seq_id == 2 and start < 20]
    assert len(chunks) > 1 and sum(chunks) == 20  # the 20-token prompt went in pieces


def test_preemption_loses_and_duplicates_nothing():
    sched = make(num_blocks=9, budget=16)  # 8 usable blocks = 32 tokens for 6 sequences of up to 18
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
    start = sched.cache.num_free
    assert [s for s, _ in sched.schedule()] == [a] and sched.cache.num_free == start - 3
    sched.remove(b)
    sched.remove(a)
    assert sched.cache.num_free == start and not sched.has_work() and a.block_table == []
