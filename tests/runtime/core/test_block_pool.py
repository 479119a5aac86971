"""The prefix cache's block bookkeeping, as specified (DESIGN.md, vLLM's design doc "prefix
caching"): keys chained over (parent, tokens[, salt]); hits verified, so a colliding hash is
no hit; reference counts; freed blocks keep their keys in an LRU of freeing order, reused
only when no empty block is left; a sequence frees its blocks deepest first."""

from qwen3_aot.runtime.core.block_pool import BlockPool
from qwen3_aot.runtime.core.scheduler import Scheduler, Sequence

BS = 4


def cache_prompt(pool: BlockPool, tokens: list[int], salt: str | None = None) -> list[int]:
    """Allocate and register a sequence's full blocks as the scheduler does; returns them."""
    n = len(tokens) // BS
    blocks = pool.allocate(n)
    keys = pool.keys(tokens, salt, [], n)
    for i, b in enumerate(blocks):
        pool.register(b, keys[i], tuple(tokens[i * BS:(i + 1) * BS]), blocks[i - 1] if i else None, salt)
    return blocks


def find(pool: BlockPool, tokens: list[int], salt: str | None = None) -> list[int]:
    n = len(tokens) // BS
    return pool.lookup(tokens, pool.keys(tokens, salt, [], n), salt, n)


def test_a_prefix_is_found_block_by_block_up_to_the_first_difference():
    pool = BlockPool(16, BS)
    a = list(range(1, 13))                                 # 3 full blocks
    blocks = cache_prompt(pool, a)
    assert find(pool, a) == blocks
    assert find(pool, a[:8] + [99, 10, 11, 12]) == blocks[:2]  # differs inside block 2
    assert find(pool, [0] + a[1:]) == []                   # differs in the first token
    assert find(pool, a[:4] + [5, 6, 7, 8] + a[8:]) == blocks  # the same tokens: the same blocks


def test_reference_counts_and_the_free_count():
    pool = BlockPool(8, BS)
    free = pool.num_free
    blocks = cache_prompt(pool, list(range(8)))
    assert pool.num_free == free - 2 and [pool.ref_count(b) for b in blocks] == [1, 1]
    assert pool.cost(blocks) == 0                          # held: taking them costs no free block
    pool.take(blocks)
    assert [pool.ref_count(b) for b in blocks] == [2, 2] and pool.num_free == free - 2
    pool.release(blocks)
    pool.release(blocks)
    assert [pool.ref_count(b) for b in blocks] == [0, 0]
    assert pool.num_free == free and pool.num_cached == 2  # free, and still findable
    assert pool.cost(blocks) == 2                          # nobody holds them: taking them uses free blocks
    pool.take(blocks)
    assert pool.num_free == free - 2


def test_eviction_takes_empty_blocks_first_then_the_least_recently_freed_deepest_first():
    pool = BlockPool(9, BS)                                # 8 usable blocks
    a = cache_prompt(pool, list(range(100, 108)))          # 2 blocks
    b = cache_prompt(pool, list(range(200, 212)))          # 3 blocks
    pool.release(a)                                        # freed first: a1 then a0 (deepest first)
    pool.release(b)                                        # then b2, b1, b0
    assert pool.num_free == 8 and pool.num_cached == 5
    fresh = pool.allocate(3)                               # the 3 never-used blocks, no cached one touched
    assert not set(fresh) & set(a + b) and pool.num_cached == 5 and pool.num_evicted == 0
    assert pool.allocate(1) == [a[1]]                      # then the least recently freed: a's deepest
    assert find(pool, list(range(100, 108))) == a[:1]
    assert pool.allocate(2) == [a[0], b[2]]
    assert find(pool, list(range(200, 212))) == b[:2] and pool.num_cached == 2 and pool.num_evicted == 3
    pool.release(fresh)                                    # no keys: empty again, used before any cached one
    assert sorted(pool.allocate(3)) == sorted(fresh) and pool.num_cached == 2


def test_a_block_taken_again_leaves_the_lru_and_goes_back_to_its_end():
    pool = BlockPool(4, BS)                                # 3 usable
    a = cache_prompt(pool, list(range(4)))
    b = cache_prompt(pool, list(range(10, 14)))
    pool.release(a)
    pool.release(b)                                        # LRU: a, b
    pool.take(a)                                           # a is held again
    pool.release(a)                                        # LRU: b, a
    pool.allocate(1)                                       # the never-used block
    assert pool.allocate(1) == b and find(pool, list(range(4))) == a


def test_salts_never_share_blocks():
    pool = BlockPool(16, BS)
    tokens = list(range(12))
    salted = cache_prompt(pool, tokens, salt="tenant-a")
    assert find(pool, tokens, salt="tenant-a") == salted
    assert find(pool, tokens, salt="tenant-b") == [] and find(pool, tokens) == []
    plain = cache_prompt(pool, tokens)
    assert find(pool, tokens) == plain and not set(plain) & set(salted)


def test_a_hash_collision_is_no_hit():
    # every key the same: each lookup meets a block of other tokens, or of another parent
    pool = BlockPool(16, BS, hash_fn=lambda parent, tokens, salt: 7)
    a = cache_prompt(pool, list(range(8)))
    assert find(pool, list(range(8))) == a[:1]            # block 1's key is block 0's: registered once only
    assert find(pool, list(range(50, 58))) == []           # other tokens under the same key
    assert find(pool, list(range(8)), salt="s") == []      # another salt under the same key
    # a block whose parent differs: same tokens, same (colliding) key, other prefix
    pool = BlockPool(16, BS, hash_fn=lambda parent, tokens, salt: hash(tokens))
    x = cache_prompt(pool, [1, 2, 3, 4, 9, 9, 9, 9])
    assert find(pool, [5, 6, 7, 8, 9, 9, 9, 9]) == []
    y = cache_prompt(pool, [5, 6, 7, 8, 9, 9, 9, 9])
    assert find(pool, [5, 6, 7, 8, 9, 9, 9, 9]) == y[:1]   # its block 1 key is x's: not taken from x
    assert find(pool, [1, 2, 3, 4, 9, 9, 9, 9]) == x


def test_a_finished_sequence_frees_its_blocks_deepest_first():
    pool = BlockPool(8, BS)
    sched = Scheduler(pool, max_num_seqs=2, max_num_batched_tokens=64)
    seq = Sequence(0, list(range(13)))                     # 3 full blocks and one token
    sched.add(seq)
    sched.schedule()
    seq.num_computed = 13
    blocks = list(seq.block_table)
    sched.remove(seq)
    pool.allocate(pool.num_free - 3)                       # only the 3 cached full blocks are left
    assert [pool.allocate(1)[0] for _ in range(3)] == [blocks[2], blocks[1], blocks[0]]


def test_caching_off_finds_nothing():
    pool = BlockPool(8, BS, caching=False)
    tokens = list(range(8))
    cache_prompt(pool, tokens)
    assert find(pool, tokens) == [] and pool.num_cached == 0
