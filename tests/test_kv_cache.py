"""The block pool on its own: reference counts, prefix lookup, copy-on-write, eviction order, collisions."""

from __future__ import annotations

import torch

import qgpt_code.kv_cache as kv_cache
from qgpt_code.config import ModelArgs
from qgpt_code.kv_cache import BlockPool, BlockTable, KVCache

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=64, multiple_of=16)
BS = 4  # small blocks keep the token lists readable


def new_pool(blocks: int) -> BlockPool:
    return BlockPool(KVCache(ARGS, blocks, block_size=BS))


def run(pool: BlockPool, tokens: list[int], limit: int | None = None) -> tuple[BlockTable, int]:
    """A sequence that takes its cached prefix, then 'computes' the rest (fills its blocks with the token ids)."""
    table = BlockTable()
    reused = pool.attach_prefix(table, tokens, len(tokens) - 1 if limit is None else limit)
    rest = tokens[len(table):]
    assert pool.reserve(table, len(rest))
    for i, token in enumerate(rest, start=len(table)):
        pool.cache.k[:, table.blocks[i // BS], :, i % BS] = float(token)
    pool.commit(table, rest)
    return table, reused


def stored(pool: BlockPool, table: BlockTable) -> list[int]:
    """The token ids written at each of the table's positions (what `run` wrote there)."""
    return [int(pool.cache.k[0, table.blocks[i // BS], 0, i % BS, 0]) for i in range(len(table))]


def test_full_blocks_are_shared_with_reference_counts_and_released_to_the_cache():
    pool = new_pool(16)
    first, reused = run(pool, list(range(1, 11)))  # 10 tokens: 2 full blocks and 2 tokens
    assert reused == 0 and len(first.blocks) == 3 and first.indexed == 2
    second, reused = run(pool, list(range(1, 9)) + [50, 51])  # shares both full blocks
    assert reused == 8 and second.blocks[:2] == first.blocks[:2]
    assert [pool.blocks[b].refs for b in first.blocks[:2]] == [2, 2]
    assert pool.counts() == dict(total=16, used=4, shared=2, cached=0, free=12)
    pool.release(first)
    pool.release(second)
    # Two shared full blocks, and each sequence's partial tail, stay cached; nothing is referenced.
    assert pool.counts() == dict(total=16, used=0, shared=0, cached=4, free=12)


def test_a_partly_shared_block_is_copied_not_shared():
    pool = new_pool(16)
    first, _ = run(pool, list(range(1, 11)))
    original = list(first.blocks)
    pool.release(first)
    # Diverges two tokens into the second block: block 0 shared, block 1's first two tokens copied.
    second, reused = run(pool, [1, 2, 3, 4, 5, 6, 40, 41, 42])
    assert reused == 6 and pool.copies == 1
    assert second.blocks[0] == original[0] and second.blocks[1] != original[1]
    assert pool.blocks[original[1]].refs == 0 and pool.blocks[original[1]].cached  # still there for others
    assert stored(pool, second) == [1, 2, 3, 4, 5, 6, 40, 41, 42]
    third, reused = run(pool, list(range(1, 11)) + [70])  # the original prefix is intact
    assert reused == 10 and stored(pool, third) == list(range(1, 11)) + [70]


def first_block_of(pool: BlockPool, tokens: list[int]) -> int:
    return pool.index[kv_cache.chain_key(0, tuple(tokens))]


def test_the_partial_tail_of_a_finished_sequence_serves_the_next_turn():
    pool = new_pool(16)
    first, _ = run(pool, list(range(1, 11)))
    pool.release(first)
    second, reused = run(pool, list(range(1, 11)) + [60, 61])  # the whole first sequence is reused
    assert reused == 10 and stored(pool, second) == list(range(1, 11)) + [60, 61]
    third, reused = run(pool, list(range(1, 11)))  # the same prompt again: all but its last token
    assert reused == 9


def test_equal_blocks_computed_concurrently_are_merged():
    pool = new_pool(16)
    a, _ = run(pool, list(range(1, 10)))
    b = BlockTable()
    assert pool.reserve(b, 9)
    own = list(b.blocks)
    pool.commit(b, list(range(1, 10)))  # computed before `a`'s blocks were visible to it
    assert b.blocks[:2] == a.blocks[:2] and b.blocks[2] == own[2]
    assert own[0] in pool.free and own[1] in pool.free  # its own copies went back to the pool
    assert [pool.blocks[x].refs for x in a.blocks[:2]] == [2, 2]


def test_eviction_is_least_recently_used_and_leaves_first():
    pool = new_pool(6)
    old, _ = run(pool, [1, 2, 3, 4, 5, 6, 7, 8, 9])  # full blocks A1 A2 and a one-token tail A3
    a1, a2, a3 = old.blocks
    pool.release(old)
    new, _ = run(pool, [20, 21, 22, 23, 24])  # full block B1 and a tail B2
    b1, b2 = new.blocks
    pool.release(new)
    touch, reused = run(pool, [1, 2, 3, 4, 99, 98])  # uses A1 again (it becomes recent), tail C
    assert reused == 4
    c = touch.blocks[1]
    pool.release(touch)
    assert pool.counts() == dict(total=6, used=0, shared=0, cached=6, free=0)
    # Oldest first, but never a block with cached children: A3 before its parent A2, A1 last (touched).
    assert [pool.allocate() for _ in range(6)] == [a3, a2, b2, b1, c, a1]
    assert pool.allocate() is None and pool.evictions == 6 and not pool.index


def test_referenced_blocks_are_never_evicted():
    pool = new_pool(3)
    held, _ = run(pool, [1, 2, 3, 4, 5, 6, 7, 8, 9])  # all three blocks, referenced
    assert pool.allocate() is None and not pool.reserve(BlockTable(), 1)
    assert stored(pool, held) == [1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_a_hash_collision_never_serves_another_prefix(monkeypatch):
    monkeypatch.setattr(kv_cache, "chain_key", lambda parent, tokens: 0)  # every block collides
    pool = new_pool(16)
    first, _ = run(pool, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert first.indexed == 1 and not first.shareable  # its second block collided with its first: kept private
    other, reused = run(pool, [5, 6, 7, 8, 1, 2, 3, 4, 9])
    assert reused == 0 and stored(pool, other) == [5, 6, 7, 8, 1, 2, 3, 4, 9]
    again, reused = run(pool, [1, 2, 3, 4, 5, 6, 7, 8, 10])
    assert reused == 4 and stored(pool, again) == [1, 2, 3, 4, 5, 6, 7, 8, 10]
    for table in (first, other, again):
        pool.release(table)
    assert pool.counts()["used"] == 0


def test_a_follower_copies_what_its_leader_has_computed_so_far():
    pool = new_pool(8)
    leader, _ = run(pool, list(range(1, 8)))  # 7 tokens: one full block, three in its own second block
    follower = BlockTable()
    assert pool.attach_prefix(follower, list(range(1, 8)), 6, partial=False) == 4
    assert pool.copy_from(follower, leader, 6) == 2
    assert follower.blocks[0] == leader.blocks[0] and follower.blocks[1] != leader.blocks[1]
    assert stored(pool, follower) == [1, 2, 3, 4, 5, 6]


def test_the_cache_reads_back_what_it_wrote_through_any_block_order():
    cache = KVCache(ARGS, 5, block_size=BS)
    tables = torch.tensor([[4, 0, 2], [1, 3, 3]])  # (2, 3): row 1 uses two blocks, padded
    positions = torch.tensor([[0, 5, 9], [1, 2, 6]])
    k = torch.arange(2 * 3 * ARGS.head_dim, dtype=torch.float32).view(2, 3, 1, ARGS.head_dim)
    cache.write(0, *cache.slots(tables, positions), k, -k)
    keys, values = cache.gather(0, tables)  # (2, n_kv, 12, hd)
    for row in range(2):
        for j, position in enumerate(positions[row].tolist()):
            assert torch.equal(keys[row, 0, position], k[row, j, 0])
            assert torch.equal(values[row, 0, position], -k[row, j, 0])
    assert not cache.k[1, :].any()  # another layer untouched
