"""The pool of KV blocks: reference counts, the free queue and the prefix cache.

Every block is in exactly one of two places: held by one or more requests
(``ref_cnt > 0``) or in the free queue (``ref_cnt == 0``). A freed block keeps
its hash and stays findable in the cache until a new allocation reuses it;
eviction happens lazily, at that moment, so a free block costs nothing to keep.

The free queue is ordered by eviction: the head goes first. Requests free their
blocks tail first, so a sequence's tail is evicted before its head, which other
requests are more likely to share.

With events on (``kv_events`` a list), every change to the set of cached hashes
is recorded (scheduler/kv_events.py) for the engine to publish.
"""
from __future__ import annotations

from typing import Iterable

from scheduler.block_hash import BlockHash
from scheduler.kv_events import AllBlocksCleared, BlockRemoved, KVCacheEvent


class KVBlock:
    """One block of the KV cache, as the pool sees it."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id  # index into the runner's KV tensors
        self.ref_cnt = 0  # requests holding this block; 0: it is in the free queue
        self.block_hash: BlockHash | None = None  # set once the block is full and cached
        self.prev_free: KVBlock | None = None  # free-queue neighbour towards the head
        self.next_free: KVBlock | None = None  # free-queue neighbour towards the tail

    def __repr__(self) -> str:
        h = None if self.block_hash is None else self.block_hash[:4].hex()
        return f"KVBlock(id={self.block_id}, ref_cnt={self.ref_cnt}, hash={h})"


class FreeBlockQueue:
    """Doubly linked list of free blocks: O(1) popleft, append and remove from the middle.

    A deque cannot drop a cached block from the middle when a prefix hit revives
    it; the links live in the blocks themselves, so no node objects are allocated.
    """

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        # Sentinels spare every operation the empty-list and end-of-list branches.
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self.num_free_blocks

    def popleft(self) -> KVBlock:
        block = self._head.next_free
        if block is self._tail:
            raise ValueError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        if block.prev_free is None or block.next_free is None:
            raise ValueError(f"{block} is not in the free queue")
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev_free
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free_blocks += 1

    def appendleft(self, block: KVBlock) -> None:
        first = self._head.next_free
        first.prev_free = block
        block.next_free = first
        block.prev_free = self._head
        self._head.next_free = block
        self.num_free_blocks += 1

    def block_ids(self) -> list[int]:
        """Free block ids, head (next evicted) first. For tests and debugging: O(n)."""
        ids = []
        block = self._head.next_free
        while block is not self._tail:
            ids.append(block.block_id)
            block = block.next_free
        return ids


class BlockPool:
    """All KV blocks, the free queue and the hash -> block map of the prefix cache."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_block_queue = FreeBlockQueue(self.blocks)
        self.cached_blocks: dict[BlockHash, KVBlock] = {}  # full, hashed blocks, held or free
        self.prefix_cache_queries = 0  # tokens looked up in the cache, at admission
        self.prefix_cache_hits = 0  # of those, tokens found
        # NOTE: None, not an empty list, while nobody listens: recording then costs one `is None` check.
        self.kv_events: list[KVCacheEvent] | None = None  # changes to cached_blocks since take_events()

    @property
    def num_free_blocks(self) -> int:
        return self.free_block_queue.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def get_new_blocks(self, num_blocks: int) -> list[KVBlock]:
        """Take blocks for a request from the head of the free queue (least recently freed).

        A taken block that still holds a cached prefix is evicted from the cache here.
        """
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"asked for {num_blocks} blocks, {self.num_free_blocks} free")
        blocks = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on cached blocks a request reuses; a free one leaves the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVBlock]) -> None:
        """Drop one reference on each block; blocks that reach 0 join the free queue in order.

        Callers pass a request's table in reverse so its tail is evicted first.
        """
        for block in ordered_blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    # NOTE: a block without a hash can never be a cache hit, so it goes
                    # to the head and is reused before any block that still can be.
                    self.free_block_queue.appendleft(block)
                else:
                    self.free_block_queue.append(block)
            elif block.ref_cnt < 0:
                raise ValueError(f"{block} freed more often than taken")

    def cache_full_block(self, block: KVBlock, block_hash: BlockHash) -> bool:
        """Make a full block findable by its hash. Called when a block's last token is computed.

        When another block already holds the same content (two requests computed the
        same prefix at once), this one stays unhashed and is reused first once freed.
        Returns whether the hash became findable now (the caller records that event).
        """
        if block.block_hash is not None or block_hash in self.cached_blocks:
            return False
        block.block_hash = block_hash
        self.cached_blocks[block_hash] = block
        return True

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self.cached_blocks.get(block_hash)

    def record_prefix_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_queried_tokens
        self.prefix_cache_hits += num_hit_tokens

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Only possible while no request holds a block.

        The query and hit counters are monotonic metrics and are not reset.
        Returns False, changing nothing, when some block is still held.
        """
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.cached_blocks.values():
            block.block_hash = None
        self.cached_blocks.clear()
        if self.kv_events is not None:
            self.kv_events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KVCacheEvent]:
        """The events recorded since the last call, oldest first; empty while events are off.

        Called by the engine after each step, to publish them.
        """
        if not self.kv_events:
            return []
        events, self.kv_events = self.kv_events, []
        return events

    def _evict(self, block: KVBlock) -> None:
        if self.cached_blocks.get(block.block_hash) is block:
            del self.cached_blocks[block.block_hash]
            if self.kv_events is not None:
                self._record_removed(block.block_hash)
        block.block_hash = None

    def _record_removed(self, block_hash: BlockHash) -> None:
        # NOTE: one allocation often evicts several blocks; back-to-back evictions share one event.
        last = self.kv_events[-1] if self.kv_events else None
        if isinstance(last, BlockRemoved):
            last.block_hashes.append(block_hash)
        else:
            self.kv_events.append(BlockRemoved(block_hashes=[block_hash]))
