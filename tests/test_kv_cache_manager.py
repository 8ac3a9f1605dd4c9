"""KVCacheManager and block hashing: block tables, prefix reuse, tenant isolation."""
import pytest

from scheduler.block_hash import hash_block_tokens, hash_request_blocks
from scheduler.kv_cache_manager import KVCacheManager, token_slice
from scheduler.request import Request

BS = 4


def make_request(req_id, prompt, tenant_id="t", cache_salt=None, output=()):
    return Request(
        req_id=req_id,
        prompt_token_ids=list(prompt),
        max_tokens=8,
        tenant_id=tenant_id,
        cache_salt=cache_salt,
        output_token_ids=list(output),
    )


def run_prefill(manager, request, computed_blocks=None):
    """Allocate and 'compute' the whole sequence, as one scheduler step would."""
    num_cached = len(computed_blocks) * BS if computed_blocks else 0
    block_ids = manager.allocate_slots(request, request.num_tokens - num_cached, computed_blocks)
    request.num_computed_tokens = request.num_tokens
    manager.cache_blocks(request, request.num_computed_tokens)
    return block_ids


# -- hashing ----------------------------------------------------------------------------------


def test_block_hash_is_stable_and_covers_parent_tokens_and_salt():
    h = hash_block_tokens(None, [1, 2, 3, 4], "a")
    assert h == hash_block_tokens(None, [1, 2, 3, 4], "a")
    assert len(h) == 32
    assert h != hash_block_tokens(None, [1, 2, 3, 5], "a")
    assert h != hash_block_tokens(None, [1, 2, 3, 4], "b")
    assert h != hash_block_tokens(None, [1, 2, 3, 4], None)
    assert hash_block_tokens(h, [1], "a") != hash_block_tokens(None, [1], "a")
    # Length-prefixed salt: moving bytes between salt and tokens changes the hash.
    assert hash_block_tokens(None, [0], "") != hash_block_tokens(None, [], "\x00\x00\x00\x00")


def test_hash_request_blocks_skips_the_partial_block_and_chains():
    hashes = hash_request_blocks(list(range(10)), BS, "s")
    assert len(hashes) == 2
    assert hashes[1] == hash_block_tokens(hashes[0], [4, 5, 6, 7], "s")


def test_token_slice_matches_all_token_ids():
    request = make_request("r", [1, 2, 3, 4, 5], output=[6, 7, 8])
    for start in range(9):
        for end in range(start, 9):
            assert token_slice(request, start, end) == request.all_token_ids[start:end]


# -- allocation -------------------------------------------------------------------------------


def test_allocate_slots_grows_the_table_block_by_block():
    manager = KVCacheManager(num_blocks=8, block_size=BS)
    request = make_request("a", range(10))
    assert manager.allocate_slots(request, 10) == [0, 1, 2]
    request.num_computed_tokens = 10
    assert manager.allocate_slots(request, 2) == [0, 1, 2]  # 12 tokens: still 3 blocks
    assert manager.allocate_slots(request, 3) == [0, 1, 2, 3]  # 13 tokens
    assert manager.get_block_ids("a") == [0, 1, 2, 3]
    assert manager.num_free_blocks == 4
    assert manager.usage == pytest.approx(0.5)
    with pytest.raises(ValueError, match="num_new_tokens must be >= 1"):
        manager.allocate_slots(request, 0)


def test_allocate_slots_returns_none_and_changes_nothing_when_full():
    manager = KVCacheManager(num_blocks=3, block_size=BS)
    request = make_request("a", range(13))
    assert manager.can_allocate(request, 13) is False
    assert manager.allocate_slots(request, 13) is None
    assert manager.get_block_ids("a") == []
    assert manager.num_free_blocks == 3
    assert manager.allocate_slots(request, 12) == [0, 1, 2]


def test_cache_blocks_registers_only_full_blocks():
    manager = KVCacheManager(num_blocks=8, block_size=BS)
    request = make_request("a", range(10))
    run_prefill(manager, request)
    blocks = manager.req_to_blocks["a"]
    assert [b.block_hash is not None for b in blocks] == [True, True, False]
    assert blocks[1].block_hash == hash_request_blocks(list(range(10)), BS, "t")[1]


def test_prefix_hit_shares_blocks_and_counts_tokens():
    manager = KVCacheManager(num_blocks=8, block_size=BS)
    run_prefill(manager, make_request("a", range(10)))
    b = make_request("b", [*range(8), 99, 98, 97])
    computed_blocks, num_cached = manager.get_computed_blocks(b)
    assert [blk.block_id for blk in computed_blocks] == [0, 1]
    assert num_cached == 8
    assert manager.allocate_slots(b, 3, computed_blocks) == [0, 1, 3]
    assert [blk.ref_cnt for blk in manager.block_pool.blocks[:4]] == [2, 2, 1, 1]
    pool = manager.block_pool
    assert (pool.prefix_cache_queries, pool.prefix_cache_hits) == (11, 8)


def test_prefix_hit_never_covers_the_last_token():
    manager = KVCacheManager(num_blocks=8, block_size=BS)
    run_prefill(manager, make_request("a", range(8)))
    # Same 8 tokens: both blocks are cached, but the last token must be computed.
    computed_blocks, num_cached = manager.get_computed_blocks(make_request("b", range(8)))
    assert [blk.block_id for blk in computed_blocks] == [0]
    assert num_cached == 4
    _, num_cached = manager.get_computed_blocks(make_request("c", range(9)))
    assert num_cached == 8


def test_tenants_are_isolated_unless_they_share_a_salt():
    manager = KVCacheManager(num_blocks=16, block_size=BS)
    run_prefill(manager, make_request("a", range(9), tenant_id="acme"))
    assert manager.get_computed_blocks(make_request("b", range(9), tenant_id="acme"))[1] == 8
    assert manager.get_computed_blocks(make_request("c", range(9), tenant_id="globex"))[1] == 0
    run_prefill(manager, make_request("d", range(9), tenant_id="acme", cache_salt="shared"))
    hit = make_request("e", range(9), tenant_id="globex", cache_salt="shared")
    assert manager.get_computed_blocks(hit)[1] == 8


def test_generated_tokens_fill_cacheable_blocks():
    manager = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", range(6))
    run_prefill(manager, a)
    for token_id in (100, 101):  # decode two tokens: block 1 becomes full
        a.output_token_ids.append(token_id)
        manager.allocate_slots(a, 1)
        a.num_computed_tokens += 1
        manager.cache_blocks(a, a.num_computed_tokens)
    assert a.num_computed_tokens == 8
    b = make_request("b", [0, 1, 2, 3, 4, 5, 100, 101, 7])
    computed_blocks, num_cached = manager.get_computed_blocks(b)
    assert [blk.block_id for blk in computed_blocks] == [0, 1]
    assert num_cached == 8


def test_free_releases_tail_first_and_keeps_shared_blocks():
    manager = KVCacheManager(num_blocks=6, block_size=BS)
    a = make_request("a", range(10))
    run_prefill(manager, a)
    b = make_request("b", [*range(8), 50])
    computed_blocks, _ = manager.get_computed_blocks(b)
    run_prefill(manager, b, computed_blocks)
    assert manager.get_block_ids("b") == [0, 1, 3]
    manager.free(a)
    # Block 2 (partial) to the head; blocks 0 and 1 are still held by b.
    assert manager.block_pool.free_block_queue.block_ids() == [2, 4, 5]
    manager.free(b)
    assert manager.block_pool.free_block_queue.block_ids() == [3, 2, 4, 5, 1, 0]
    assert manager.num_free_blocks == 6
    manager.free(b)  # idempotent
    assert manager.get_block_ids("b") == []


def test_can_allocate_counts_revived_free_blocks():
    manager = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", range(8))
    run_prefill(manager, a)
    manager.free(a)
    assert manager.num_free_blocks == 4
    b = make_request("b", [*range(8), 1, 2, 3, 4, 5, 6, 7, 8, 9])  # 17 tokens: 5 blocks
    computed_blocks, num_cached = manager.get_computed_blocks(b)
    assert num_cached == 8
    # 3 new blocks + 2 revived from the free queue = 5 > 4.
    assert manager.can_allocate(b, 9, computed_blocks) is False
    assert manager.allocate_slots(b, 9, computed_blocks) is None
    assert manager.block_pool.free_block_queue.block_ids() == [2, 3, 1, 0]
    assert manager.can_allocate(b, 8, computed_blocks) is True  # 16 tokens: 2 new + 2 revived


def test_hashes_survive_free_until_free_block_hashes():
    manager = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", range(8))
    run_prefill(manager, a)
    hashes = manager.req_to_block_hashes["a"]
    manager.free(a)  # preemption: hashes kept for the recompute
    assert manager.req_to_block_hashes["a"] is hashes
    manager.free_block_hashes(a)
    assert "a" not in manager.req_to_block_hashes


def test_prefix_caching_disabled():
    manager = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    run_prefill(manager, make_request("a", range(9)))
    assert manager.block_pool.cached_blocks == {}
    b = make_request("b", range(9))
    computed_blocks, num_cached = manager.get_computed_blocks(b)
    assert (computed_blocks, num_cached) == ([], 0)
    manager.allocate_slots(b, 9, computed_blocks)
    assert manager.block_pool.prefix_cache_queries == 0
    assert manager.req_to_block_hashes == {}


def test_reset_prefix_cache_only_when_idle():
    manager = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", range(8))
    run_prefill(manager, a)
    assert manager.reset_prefix_cache() is False
    manager.free(a)
    assert manager.reset_prefix_cache() is True
    assert manager.get_computed_blocks(make_request("b", range(9)))[1] == 0
