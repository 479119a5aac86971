"""Continuous batching: which tokens of which sequences go into the next forward.

Every step, the running sequences go first, oldest first: a decoding sequence takes one
token, one whose prompt is still being read takes as much of it as the token budget allows
(chunked prefill). Waiting sequences then join, first come first served, while the budget,
`max_num_seqs` and the free blocks allow. A sequence gets KV blocks as it grows; when a
running sequence needs a block and none is free, the newest running sequence is preempted:
its blocks are freed and it goes back to the front of the queue, to be recomputed later
from its prompt and the tokens generated so far (nothing it generated is lost).

Prefix caching (block_pool.py): a sequence joining takes the longest run of cached full
blocks holding its first tokens (at most all but its last token's block, so that the step
computes at least one token and yields its logits) and is fed only what follows them; it
counts against the free blocks only for what it must allocate (and the cached blocks nobody
held). The full blocks a step fills become findable as the step is scheduled, so a later
sequence of the same step (another choice of one prompt) already takes them: the attention
op writes every new token's K/V before it reads any (custom_ops/paged_attention.py).

The scheduler alone changes a sequence: which of its tokens are computed, its blocks, its
tokens (`append`) and its end (`remove`). The engine asks it what to run (`schedule`,
`schedule_ahead`) and hands it what came back (`computed`, `append`).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from qwen3_aot.runtime.core.block_pool import BlockPool
from qwen3_aot.runtime.forward.kv_cache import RESERVED_BLOCK


# The most prompt positions a step computes logits for, for requests with prompt_logprobs:
# [512, 151936] fp32 is 311 MB, where a 2,048-token prompt at once would be 1.2 GB.
PROMPT_LOGPROB_ROWS = 512


class Sequence:
    """A request's tokens and its place in the cache. `num_computed` tokens have their K/V
    in the blocks of `block_table`; the rest are fed to the next forward. `cache_salt` joins
    its first block's key (only requests of the same salt share blocks); `reads_prefix_cache`
    False: it computes its whole prompt (its blocks still become findable)."""

    def __init__(self, seq_id: int, prompt: list[int], cache_salt: str | None = None,
                 reads_prefix_cache: bool = True) -> None:
        self.seq_id = seq_id
        self.token_ids = list(prompt)
        self.num_prompt_tokens = len(prompt)
        self.num_computed = 0
        self.block_table: list[int] = []
        self.slot: int | None = None  # its row of Scheduler.tables while running
        self.cache_salt, self.reads_prefix_cache = cache_salt, reads_prefix_cache
        self.num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache when it first joined
        self.block_keys: list[int] = []  # the keys of its first full blocks (BlockPool.keys)
        self.num_registered = 0          # its first blocks that are findable (or were offered)
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
    instead of converting nested lists, which costs milliseconds a step at hundreds of sequences."""

    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int,
                 max_blocks_per_seq: int | None = None) -> None:
        self.pool = pool
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # vLLM's prefix_cache_queries / _hits: tokens of the sequences that joined (again, after a
        # preemption, too) and of those, the ones found in the cache
        self.prefix_cache_queries = self.prefix_cache_hits = 0
        width = min(max_blocks_per_seq or pool.num_blocks, pool.num_blocks)
        self.tables = np.full((max_num_seqs, width), RESERVED_BLOCK, dtype=np.int32)
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def hash_prompt(self, seq: Sequence) -> None:
        """Compute the keys a lookup of a new sequence's prompt needs, before `add`: they touch
        nothing shared, so the thread that makes the request pays for them rather than the
        step that admits it (a burst of 64 prompts of 3,000 tokens is about 12,000 block
        hashes, milliseconds in front of the burst's first forward otherwise)."""
        if self.pool.caching and seq.reads_prefix_cache:
            self.pool.keys(seq.token_ids, seq.cache_salt, seq.block_keys, self._lookup_blocks(seq))

    def remove(self, seq: Sequence) -> None:
        """The sequence finished or was cancelled: forget it and free its blocks."""
        self._register_full_blocks(seq, seq.num_computed)
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
        need = sum(max(0, self.pool.blocks_for(s.num_computed + 1) - len(s.block_table)) for s in continuing)
        if not continuing or need > self.pool.num_free:
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
            self._register_full_blocks(seq, seq.num_computed + n)
            batch.append((seq, n))
            budget -= n
            i += 1
        # no newcomers in a step that had to preempt: they would take the blocks just freed
        while (self.num_preemptions == preemptions and self.waiting and budget > 0
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            cached = self._cached_prefix(seq)
            start = len(cached) * self.pool.block_size
            n = min(len(seq.token_ids) - start, budget)
            if seq.logits_from is not None:
                n = min(n, logit_rows)
                if n == 0:
                    break
                logit_rows -= n
            if self.pool.blocks_for(start + n) - len(cached) + self.pool.cost(cached) > self.pool.num_free:
                break
            self.pool.take(cached)
            seq.block_table, seq.num_computed, seq.num_registered = list(cached), start, len(cached)
            self._grow(seq, n)
            self._count_query(seq, start)
            self.running.append(self.waiting.popleft())
            seq.slot = self._free_slots.pop()
            self.tables[seq.slot, :len(seq.block_table)] = seq.block_table
            self._register_full_blocks(seq, start + n)
            batch.append((seq, n))
            budget -= n
        return batch

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks holding the longest run of `seq`'s first full blocks, short of
        the block of its last token."""
        if not (self.pool.caching and seq.reads_prefix_cache):
            return []
        most = self._lookup_blocks(seq)
        keys = self.pool.keys(seq.token_ids, seq.cache_salt, seq.block_keys, most)
        return self.pool.lookup(seq.token_ids, keys, seq.cache_salt, most)

    def _lookup_blocks(self, seq: Sequence) -> int:
        return (len(seq.token_ids) - 1) // self.pool.block_size

    def _count_query(self, seq: Sequence, cached_tokens: int) -> None:
        if self.pool.caching and seq.reads_prefix_cache:
            self.prefix_cache_queries += len(seq.token_ids)
            self.prefix_cache_hits += cached_tokens
        if seq.num_cached_tokens is None:  # the first time; a recomputation after a preemption is not the prompt's
            seq.num_cached_tokens = min(cached_tokens, seq.num_prompt_tokens)

    def _register_full_blocks(self, seq: Sequence, computed: int) -> None:
        """Make `seq`'s full blocks findable once their tokens are known and computed (or in a
        forward being scheduled now): the first `computed` tokens."""
        bs = self.pool.block_size
        full = min(computed, len(seq.token_ids), len(seq.block_table) * bs) // bs
        if not self.pool.caching or full <= seq.num_registered:
            return
        keys = self.pool.keys(seq.token_ids, seq.cache_salt, seq.block_keys, full)
        table, tokens = seq.block_table, seq.token_ids
        for i in range(seq.num_registered, full):
            self.pool.register(table[i], keys[i], tuple(tokens[i * bs:(i + 1) * bs]),
                               table[i - 1] if i else None, seq.cache_salt)
        seq.num_registered = full

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
        need = self.pool.blocks_for(seq.num_computed + n) - len(seq.block_table)
        if need > self.pool.num_free:
            return False
        if need > 0:
            new = self.pool.allocate(need)
            if seq.slot is not None:
                self.tables[seq.slot, len(seq.block_table):len(seq.block_table) + need] = new
            seq.block_table += new
        return True

    def _preempt(self, seq: Sequence) -> None:
        self._register_full_blocks(seq, seq.num_computed)  # its recomputation may find them
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = seq.num_registered = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        """Drop a sequence's references to its blocks (deepest first) and free its slot."""
        self.pool.release(seq.block_table)
        seq.block_table = []
        if seq.slot is not None:
            self.tables[seq.slot] = RESERVED_BLOCK
            self._free_slots.append(seq.slot)
            seq.slot = None
