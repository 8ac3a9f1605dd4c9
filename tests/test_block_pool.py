"""BlockPool and FreeBlockQueue: exact block ids and exact free-queue order."""
import pytest

from scheduler.block_hash import hash_block_tokens
from scheduler.block_pool import BlockPool, FreeBlockQueue, KVBlock


def h(i: int) -> bytes:
    return hash_block_tokens(None, [i], None)


def test_free_queue_starts_in_id_order():
    queue = FreeBlockQueue([KVBlock(i) for i in range(4)])
    assert queue.block_ids() == [0, 1, 2, 3]
    assert len(queue) == 4


def test_free_queue_popleft_append_appendleft_remove():
    blocks = [KVBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    assert queue.popleft() is blocks[0]
    queue.remove(blocks[2])  # from the middle
    assert queue.block_ids() == [1, 3, 4]
    queue.append(blocks[2])
    queue.appendleft(blocks[0])
    assert queue.block_ids() == [0, 1, 3, 4, 2]
    queue.remove(blocks[2])  # the last one
    queue.remove(blocks[0])  # the first one
    assert queue.block_ids() == [1, 3, 4]
    assert len(queue) == 3


def test_free_queue_errors():
    blocks = [KVBlock(0)]
    queue = FreeBlockQueue(blocks)
    queue.popleft()
    with pytest.raises(ValueError, match="no free blocks"):
        queue.popleft()
    with pytest.raises(ValueError, match="not in the free queue"):
        queue.remove(blocks[0])


def test_get_new_blocks_pops_from_the_head():
    pool = BlockPool(6)
    blocks = pool.get_new_blocks(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert all(b.ref_cnt == 1 for b in blocks)
    assert pool.free_block_queue.block_ids() == [3, 4, 5]
    assert pool.num_free_blocks == 3
    assert pool.usage == pytest.approx(0.5)
    with pytest.raises(ValueError, match="asked for 4 blocks, 3 free"):
        pool.get_new_blocks(4)


def test_unhashed_blocks_return_to_the_head_in_table_order():
    pool = BlockPool(6)
    blocks = pool.get_new_blocks(3)
    pool.free_blocks(reversed(blocks))
    # Freed tail first, each to the head: the original order comes back.
    assert pool.free_block_queue.block_ids() == [0, 1, 2, 3, 4, 5]
    assert all(b.ref_cnt == 0 for b in blocks)


def test_cached_blocks_go_to_the_tail_tail_of_sequence_first():
    pool = BlockPool(6)
    blocks = pool.get_new_blocks(3)
    pool.cache_full_block(blocks[0], h(0))
    pool.cache_full_block(blocks[1], h(1))
    pool.free_blocks(reversed(blocks))
    # Block 2 (partial, no hash) is reused first; then the never-used ones; then
    # the sequence's tail (1) before its head (0).
    assert pool.free_block_queue.block_ids() == [2, 3, 4, 5, 1, 0]
    assert blocks[0].block_hash == h(0)  # freed blocks keep their hash
    assert pool.get_cached_block(h(0)) is blocks[0]


def test_lazy_eviction_in_lru_order():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(4)
    for i, block in enumerate(blocks):
        pool.cache_full_block(block, h(i))
    pool.free_blocks(reversed(blocks))
    assert pool.free_block_queue.block_ids() == [3, 2, 1, 0]
    assert len(pool.cached_blocks) == 4  # nothing evicted yet
    (block,) = pool.get_new_blocks(1)
    assert block.block_id == 3
    assert block.block_hash is None
    assert pool.get_cached_block(h(3)) is None
    assert pool.get_cached_block(h(2)) is blocks[2]
    assert [b.block_id for b in pool.get_new_blocks(2)] == [2, 1]
    assert list(pool.cached_blocks) == [h(0)]


def test_touch_revives_a_free_cached_block_from_the_middle():
    pool = BlockPool(5)
    blocks = pool.get_new_blocks(3)
    for i, block in enumerate(blocks):
        pool.cache_full_block(block, h(i))
    pool.free_blocks(reversed(blocks))
    assert pool.free_block_queue.block_ids() == [3, 4, 2, 1, 0]
    pool.touch([blocks[0], blocks[1]])
    assert pool.free_block_queue.block_ids() == [3, 4, 2]
    assert [b.ref_cnt for b in blocks] == [1, 1, 0]
    pool.touch([blocks[0]])  # a block already held only gains a reference
    assert blocks[0].ref_cnt == 2
    pool.free_blocks([blocks[0]])
    assert blocks[0].ref_cnt == 1
    assert pool.free_block_queue.block_ids() == [3, 4, 2]


def test_free_more_often_than_taken_raises():
    pool = BlockPool(2)
    (block,) = pool.get_new_blocks(1)
    pool.free_blocks([block])
    with pytest.raises(ValueError, match="freed more often"):
        pool.free_blocks([block])


def test_duplicate_content_keeps_the_first_block_cached():
    pool = BlockPool(4)
    first, second = pool.get_new_blocks(2)
    pool.cache_full_block(first, h(7))
    pool.cache_full_block(second, h(7))
    assert pool.get_cached_block(h(7)) is first
    assert second.block_hash is None
    pool.cache_full_block(first, h(8))  # already cached: no re-keying
    assert first.block_hash == h(7)
    pool.free_blocks([second, first])
    assert pool.free_block_queue.block_ids() == [1, 2, 3, 0]


def test_evicting_a_block_does_not_drop_another_blocks_entry():
    pool = BlockPool(2)
    first, second = pool.get_new_blocks(2)
    pool.cache_full_block(first, h(1))
    # Hand-corrupt nothing: a stale hash on a block not in the map must not evict the map's block.
    second.block_hash = h(1)
    pool.free_blocks([second, first])
    pool.get_new_blocks(1)  # pops `second`
    assert pool.get_cached_block(h(1)) is first


def test_prefix_counters_and_reset():
    pool = BlockPool(3)
    assert pool.prefix_cache_hit_rate == 0.0
    pool.record_prefix_lookup(10, 4)
    pool.record_prefix_lookup(10, 0)
    assert (pool.prefix_cache_queries, pool.prefix_cache_hits) == (20, 4)
    assert pool.prefix_cache_hit_rate == pytest.approx(0.2)
    (block,) = pool.get_new_blocks(1)
    pool.cache_full_block(block, h(0))
    assert pool.reset_prefix_cache() is False  # a block is still held
    pool.free_blocks([block])
    assert pool.reset_prefix_cache() is True
    assert pool.get_cached_block(h(0)) is None
    assert block.block_hash is None
    assert (pool.prefix_cache_queries, pool.prefix_cache_hits) == (20, 4)  # metrics stay monotonic
