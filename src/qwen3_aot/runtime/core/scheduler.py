"""Continuous batching: which tokens of which sequences go into the next forward.

Every step, the running sequences go first, oldest first: a decoding sequence takes one
token, one whose prompt is still being read takes as much of it as the token budget allows
(chunked prefill). Waiting sequences then join, first come first served, while the budget,
`max_num_seqs` and the free blocks allow. A sequence gets KV blocks as it grows; when a
running sequence needs a block and none is free, the newest running sequence is preempted:
its blocks are freed and it goes back to the front of the queue, to be recomputed later
from its prompt and the tokens generated so far (nothing it generated is lost).

The scheduler alone changes a sequence: which of its tokens are computed, its blocks, its
tokens (`append`) and its end (`remove`). The engine asks it what to run (`schedule`,
`schedule_ahead`) and hands it what came back (`computed`, `append`).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from qwen3_aot.runtime.forward.kv_cache import RESERVED_BLOCK, KVCache


# The most prompt positions a step computes logits for, for requests with prompt_logprobs:
# [512, 151936] fp32 is 311 MB, where a 2,048-token prompt at once would be 1.2 GB.
PROMPT_LOGPROB_ROWS = 512


class Sequence:
    """A request's tokens and its place in the cache. `num_computed` tokens have their K/V
    in the blocks of `block_table`; the rest are fed to the next forward."""

    def __init__(self, seq_id: int, prompt: list[int]) -> None:
        self.seq_id = seq_id
        self.token_ids = list(prompt)
        self.num_prompt_tokens = len(prompt)
        self.num_computed = 0
        self.block_table: list[int] = []
        self.slot: int | None = None  # its row of Scheduler.tables while running
        # prompt positions whose logits its request still needs (prompt_logprobs), from this
        # one on; None: none. Each step computes the logits of at most PROMPT_LOGPROB_ROWS of them.
        self.logits_from: int | None = None

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


# One scheduled piece of work: a sequence and how many of its uncomputed tokens to feed.
Batch = list[tuple[Sequence, int]]


class Scheduler:
    """`tables` mirrors the block tables of the running sequences, one row (slot) each, kept
    up to date as blocks are handed out: a step gathers its rows in one numpy indexing
    instead of converting nested lists (1.2 ms for 256 sequences on a CI-class CPU)."""

    def __init__(self, cache: KVCache, max_num_seqs: int, max_num_batched_tokens: int,
                 max_blocks_per_seq: int | None = None) -> None:
        self.cache = cache
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        width = min(max_blocks_per_seq or cache.num_blocks, cache.num_blocks)
        self.tables = np.full((max_num_seqs, width), RESERVED_BLOCK, dtype=np.int32)
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """The sequence finished or was cancelled: forget it and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def block_tables(self, seqs: list[Sequence]) -> np.ndarray:
        """[len(seqs), longest table] int32: the running sequences' block tables, in order,
        padded with RESERVED_BLOCK (a released slot's row is reset to it)."""
        width = max(len(s.block_table) for s in seqs)
        return self.tables[[s.slot for s in seqs], :width]

    def computed(self, batch: Batch) -> None:
        """The batch's tokens are in the cache now (its forward is queued on the device)."""
        for seq, n in batch:
            seq.num_computed += n

    def append(self, seq: Sequence, token: int) -> None:
        """A token sampled for the sequence: it is fed to a later step."""
        seq.token_ids.append(token)

    def schedule_ahead(self, live: list[Sequence], continuing: list[Sequence]) -> Batch | None:
        """The next decode of `continuing` (those of `live` not ending on the token in flight),
        scheduled before their newest tokens are known: only when `live` is exactly the running
        set, nothing waits to join, and each continuing sequence gets a block for one more
        position without preempting (None, nothing changed, otherwise)."""
        if self.waiting or len(live) != len(self.running) or any(a is not b for a, b in zip(live, self.running)):
            return None
        need = sum(max(0, self.cache.blocks_for(s.num_computed + 1) - len(s.block_table)) for s in continuing)
        if not continuing or need > self.cache.num_free:
            return None
        for seq in continuing:
            self._grow(seq, 1)
        return [(seq, 1) for seq in continuing]

    def schedule(self) -> Batch:
        batch: Batch = []
        budget = self.max_num_batched_tokens
        logit_rows = PROMPT_LOGPROB_ROWS  # the extra logits rows a step may compute for prompt logprobs
        preemptions = self.num_preemptions
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            if seq.logits_from is not None and seq.num_computed < seq.num_prompt_tokens:
                n = min(n, logit_rows)
                logit_rows -= n
                if n == 0:
                    i += 1
                    continue
            if not self._make_room(seq, n):
                break
            batch.append((seq, n))
            budget -= n
            i += 1
        # no newcomers in a step that had to preempt: they would take the blocks just freed
        while (self.num_preemptions == preemptions and self.waiting and budget > 0
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            n = min(len(seq.token_ids), budget)
            if seq.logits_from is not None:
                n = min(n, logit_rows)
                if n == 0:
                    break
                logit_rows -= n
            if not self._grow(seq, n):
                break
            self.running.append(self.waiting.popleft())
            seq.slot = self._free_slots.pop()
            self.tables[seq.slot, :len(seq.block_table)] = seq.block_table
            batch.append((seq, n))
            budget -= n
        return batch

    def _make_room(self, seq: Sequence, n: int) -> bool:
        """Blocks for `n` more tokens of `seq`, preempting the newest running sequences as
        needed; False when that came to `seq` itself."""
        while not self._grow(seq, n):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _grow(self, seq: Sequence, n: int) -> bool:
        """Give `seq` the blocks for `n` more tokens; False (and nothing changed) when too few are free."""
        need = self.cache.blocks_for(seq.num_computed + n) - len(seq.block_table)
        if need > self.cache.num_free:
            return False
        if need > 0:
            new = self.cache.allocate(need)
            if seq.slot is not None:
                self.tables[seq.slot, len(seq.block_table):len(seq.block_table) + need] = new
            seq.block_table += new
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        """Free a sequence's blocks and its slot."""
        self.cache.free(seq.block_table)
        seq.block_table = []
        if seq.slot is not None:
            self.tables[seq.slot] = RESERVED_BLOCK
            self._free_slots.append(seq.slot)
            seq.slot = None
