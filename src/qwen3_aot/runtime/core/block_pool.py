"""Who holds which KV-cache block, and which full blocks can be found again by their content
(automatic prefix caching, as vLLM's; see DESIGN.md "Sampling, grammars and the prefix cache").

A full block's key is a hash chained over (its parent block's key, its token ids[, the
request's cache_salt on the first block]), so a key names the whole prefix up to the block's
end. A hash can collide, so a hit is taken only when the block's own tokens and its parent
block (by identity: block id and the generation of its contents) are those of the prefix
being looked up, and, on the first block, the salt is the same: a weak hash costs hits,
never a wrong one.

Each block has a reference count. A block whose count drops to 0 keeps its key and contents
and waits in an LRU order of freeing; a new block comes from the blocks that hold nothing
findable (never used, or freed without a key) and only when none is left from the least
recently freed cached block, whose key is then dropped. `release` takes a sequence's blocks
deepest first, so a conversation's early blocks, shared the most, are evicted last.

The scheduler alone calls this (DESIGN.md: it alone hands out, shares and frees blocks).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Callable, Sequence

from qwen3_aot.runtime.forward.kv_cache import RESERVED_BLOCK


# (parent key or None, the block's token ids, the salt on the first block or None) -> key
HashFn = Callable[[int | None, tuple[int, ...], str | None], int]


def block_key(parent: int | None, tokens: tuple[int, ...], salt: str | None) -> int:
    """Python's tuple hash: fast, and collisions only cost hits (every hit is verified)."""
    return hash((parent, tokens, salt))


class BlockPool:
    """`num_blocks` blocks of `block_size` tokens, block 0 reserved. With `caching` off no block
    gets a key, so nothing is ever found and freed blocks are plain free blocks."""

    def __init__(self, num_blocks: int, block_size: int, caching: bool = True, hash_fn: HashFn = block_key) -> None:
        self.num_blocks, self.block_size, self.caching, self.hash_fn = num_blocks, block_size, caching, hash_fn
        self._empty = deque(b for b in range(num_blocks) if b != RESERVED_BLOCK)  # hold nothing findable
        self._lru: OrderedDict[int, None] = OrderedDict()  # count 0, keyed: least recently freed first
        self._refs = [0] * num_blocks
        self._generation = [0] * num_blocks  # bumped when a block is handed out for new contents
        self._by_key: dict[int, int] = {}
        # a keyed block's key, tokens, parent (block, generation) or None, and salt (first block)
        self._key: dict[int, tuple[int, tuple[int, ...], tuple[int, int] | None, str | None]] = {}
        self.num_evicted = 0  # cached blocks reused for new contents, since the start

    @property
    def num_free(self) -> int:
        """Blocks a new allocation can take: the empty ones and the cached ones nobody holds."""
        return len(self._empty) + len(self._lru)

    @property
    def num_cached(self) -> int:
        """Blocks that can be found by their content now (held or not)."""
        return len(self._key)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    # ---- keys ----

    def keys(self, token_ids: Sequence[int], salt: str | None, known: list[int], count: int) -> list[int]:
        """The keys of the first `count` full blocks of `token_ids`, extending `known` (the keys
        of its first len(known) blocks, kept by the caller: a sequence's tokens only grow)."""
        bs = self.block_size
        for i in range(len(known), count):
            known.append(self.hash_fn(known[-1] if known else None, tuple(token_ids[i * bs:(i + 1) * bs]),
                                      salt if i == 0 else None))
        return known

    def lookup(self, token_ids: Sequence[int], keys: list[int], salt: str | None, most: int) -> list[int]:
        """The longest run (at most `most` blocks) of cached blocks holding the first blocks of
        `token_ids`; `keys` are their keys (from `keys`). Nothing is taken: see `take`."""
        if not self.caching:
            return []
        found: list[int] = []
        bs = self.block_size
        for i, key in enumerate(keys[:most]):
            block = self._by_key.get(key)
            if block is None:
                break
            _, tokens, parent, block_salt = self._key[block]
            expected_parent = (found[-1], self._generation[found[-1]]) if found else None
            if (parent != expected_parent or tokens != tuple(token_ids[i * bs:(i + 1) * bs])
                    or (i == 0 and block_salt != salt)):
                break  # a collision, or a block computed after another copy of its parent
            found.append(block)
        return found

    def cost(self, blocks: list[int]) -> int:
        """How many free blocks taking `blocks` uses up: those nobody holds leave the LRU."""
        return sum(1 for b in blocks if self._refs[b] == 0)

    def take(self, blocks: list[int]) -> None:
        """One more reference to each of `blocks` (cached blocks found by `lookup`)."""
        for b in blocks:
            if self._refs[b] == 0:
                del self._lru[b]
            self._refs[b] += 1

    def register(self, block: int, key: int, tokens: tuple[int, ...], parent: int | None, salt: str | None) -> None:
        """A full block, its contents computed (or queued on the device before any reader),
        becomes findable under `key`; `parent`: the block before it in its sequence. A key that
        another block holds stays with it, unless that one's parent has been reused since."""
        if not self.caching or block in self._key:
            return
        holder = self._by_key.get(key)
        if holder is not None:
            if self._reachable(holder):
                return
            self._drop_key(holder)
        self._by_key[key] = block
        self._key[block] = (key, tokens, None if parent is None else (parent, self._generation[parent]),
                            salt if parent is None else None)

    # ---- allocation ----

    def allocate(self, n: int) -> list[int]:
        """`n` blocks for new contents, count 1: empty ones first, then the least recently freed
        cached ones (their keys dropped)."""
        assert n <= self.num_free, "the scheduler checks num_free first"
        out = []
        for _ in range(n):
            if self._empty:
                b = self._empty.popleft()
            else:
                b, _ = self._lru.popitem(last=False)
                self._drop_key(b)
                self.num_evicted += 1
            self._generation[b] += 1
            self._refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each of a sequence's blocks, deepest first: a block nobody
        holds any more waits in the LRU if it has a key, else is empty again."""
        for b in reversed(blocks):
            self._refs[b] -= 1
            assert self._refs[b] >= 0, f"block {b} released more often than taken"
            if self._refs[b] == 0:
                if b in self._key:
                    self._lru[b] = None
                else:
                    self._empty.append(b)

    def _reachable(self, block: int) -> bool:
        """Whether a lookup can still reach a keyed block: its parent still holds the contents
        (and key) it had when the block was registered."""
        parent = self._key[block][2]
        return parent is None or (self._generation[parent[0]] == parent[1] and parent[0] in self._key)

    def _drop_key(self, block: int) -> None:
        """Forget a block's key; one nobody holds becomes empty."""
        key = self._key.pop(block)[0]
        del self._by_key[key]
        if self._refs[block] == 0 and block in self._lru:
            del self._lru[block]
            self._empty.append(block)
