"""Per-request KV block tables on top of the block pool, with prefix reuse.

The scheduler asks three questions of this class, in this order, each step:
what prefix of a new request is already cached (``get_computed_blocks``), can
the request's next tokens get blocks (``allocate_slots``, None when they cannot),
and, after the model ran, which blocks became full and can be shared
(``cache_blocks``). ``free`` gives a request's blocks back.
"""
from __future__ import annotations

from scheduler.block_hash import BlockHash, hash_block_tokens
from scheduler.block_pool import BlockPool, KVBlock
from scheduler.kv_events import BlockStored, KVCacheEvent
from scheduler.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks)
        self.req_to_blocks: dict[str, list[KVBlock]] = {}  # req_id -> block table
        self.req_to_block_ids: dict[str, list[int]] = {}  # req_id -> the same table as ids, kept for the runner
        self.req_to_num_cached_blocks: dict[str, int] = {}  # req_id -> leading table blocks already in the cache
        # NOTE: hashes outlive a preemption (the tokens do not change), so a recompute does not rehash.
        self.req_to_block_hashes: dict[str, list[BlockHash]] = {}  # req_id -> hashes of its full blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def enable_kv_events(self) -> None:
        """Start recording prefix-cache events (scheduler/kv_events.py). Called once, before any request, so
        the events describe the whole cache; off (and free) by default."""
        if self.block_pool.kv_events is None:
            self.block_pool.kv_events = []

    def take_events(self) -> list[KVCacheEvent]:
        """The prefix-cache events since the last call, oldest first. Called by the engine after each step."""
        return self.block_pool.take_events()

    def get_block_ids(self, req_id: str) -> list[int]:
        return self.req_to_block_ids.get(req_id, [])

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest cached prefix of the request, as blocks and a token count.

        Called when a waiting request is considered for admission; takes no reference
        (``allocate_slots`` does). Does not count towards the hit rate: a lookup whose
        admission then fails would be counted again next step.
        """
        if not self.enable_prefix_caching:
            return [], 0
        block_hashes = self._update_block_hashes(request)
        # NOTE: never the whole sequence: the last token must be computed so the
        # runner has logits to sample from.
        max_num_blocks = (request.num_tokens - 1) // self.block_size
        computed_blocks = []
        for block_hash in block_hashes[:max_num_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            computed_blocks.append(block)
        return computed_blocks, len(computed_blocks) * self.block_size

    def can_allocate(self, request: Request, num_new_tokens: int, computed_blocks: list[KVBlock] | None = None) -> bool:
        num_new_blocks = self._num_new_blocks(request, num_new_tokens, computed_blocks)
        # Reviving a cached block that sits in the free queue takes it from there too.
        num_revived = sum(1 for block in computed_blocks if block.ref_cnt == 0) if computed_blocks else 0
        return num_new_blocks + num_revived <= self.block_pool.num_free_blocks

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: list[KVBlock] | None = None
    ) -> list[int] | None:
        """Grow the request's table to cover its computed tokens plus ``num_new_tokens``.

        ``computed_blocks`` (from ``get_computed_blocks``, possibly empty) marks an
        admission: the cached blocks start the table and the lookup counts towards
        the hit rate. A preempted request is admitted again, so it counts again.
        Returns the whole table as block ids, or None (changing nothing) when the
        free blocks do not suffice.
        """
        if num_new_tokens <= 0:
            raise ValueError(f"num_new_tokens must be >= 1, got {num_new_tokens}")
        req_id = request.req_id
        if computed_blocks is None:
            # Fast path, most decode steps: the last block still has room.
            block_ids = self.req_to_block_ids.get(req_id)
            if block_ids and request.num_computed_tokens + num_new_tokens <= len(block_ids) * self.block_size:
                return block_ids
        if not self.can_allocate(request, num_new_tokens, computed_blocks):
            return None
        num_new_blocks = self._num_new_blocks(request, num_new_tokens, computed_blocks)
        blocks = self.req_to_blocks.setdefault(req_id, [])
        block_ids = self.req_to_block_ids.setdefault(req_id, [])
        if computed_blocks is not None:
            if blocks:
                raise ValueError(f"request {req_id} already holds blocks; computed_blocks is for admission only")
            self.block_pool.touch(computed_blocks)
            blocks.extend(computed_blocks)
            block_ids.extend(block.block_id for block in computed_blocks)
            self.req_to_num_cached_blocks[req_id] = len(computed_blocks)
            if self.enable_prefix_caching:
                self.block_pool.record_prefix_lookup(request.num_tokens, len(computed_blocks) * self.block_size)
        if num_new_blocks > 0:
            new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
            blocks.extend(new_blocks)
            block_ids.extend(block.block_id for block in new_blocks)
        return block_ids

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the blocks that became full of computed tokens, generated ones included.

        Called after every step a request took part in.
        """
        if not self.enable_prefix_caching:
            return
        req_id = request.req_id
        num_full_blocks = num_computed_tokens // self.block_size
        num_cached_blocks = self.req_to_num_cached_blocks.get(req_id, 0)
        if num_full_blocks <= num_cached_blocks:
            return
        block_hashes = self._update_block_hashes(request)
        blocks = self.req_to_blocks[req_id]
        events = self.block_pool.kv_events
        stored: BlockStored | None = None  # the event of the run of blocks cached just before block i
        for i in range(num_cached_blocks, num_full_blocks):
            if not self.block_pool.cache_full_block(blocks[i], block_hashes[i]):
                stored = None  # already findable under another block: announced before
                continue
            if events is None:
                continue
            if stored is None:
                stored = BlockStored(block_hashes=[], parent_block_hash=block_hashes[i - 1] if i else None,
                                     token_ids=[], block_size=self.block_size, extra_keys=[])
                events.append(stored)
            stored.block_hashes.append(block_hashes[i])
            stored.token_ids.extend(token_slice(request, i * self.block_size, (i + 1) * self.block_size))
            stored.extra_keys.append(request.hash_salt)
        self.req_to_num_cached_blocks[req_id] = num_full_blocks

    def free(self, request: Request) -> None:
        """Give back all the request's blocks (at finish, abort or preemption).

        Tail first, so the prefix other requests may share is evicted last.
        """
        req_id = request.req_id
        blocks = self.req_to_blocks.pop(req_id, None)
        self.req_to_block_ids.pop(req_id, None)
        self.req_to_num_cached_blocks.pop(req_id, None)
        if blocks:
            self.block_pool.free_blocks(reversed(blocks))

    def free_block_hashes(self, request: Request) -> None:
        """Forget the request's block hashes. Called once it is finished, not on preemption."""
        self.req_to_block_hashes.pop(request.req_id, None)

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()

    def _num_new_blocks(self, request: Request, num_new_tokens: int, computed_blocks: list[KVBlock] | None) -> int:
        num_computed_blocks = len(computed_blocks) if computed_blocks else 0
        num_tokens = request.num_computed_tokens + num_computed_blocks * self.block_size + num_new_tokens
        num_required_blocks = -(-num_tokens // self.block_size)
        num_held_blocks = len(self.req_to_blocks.get(request.req_id, ())) + num_computed_blocks
        return max(0, num_required_blocks - num_held_blocks)

    def _update_block_hashes(self, request: Request) -> list[BlockHash]:
        """Hashes of all the request's full blocks; only blocks not hashed before are hashed now."""
        block_hashes = self.req_to_block_hashes.setdefault(request.req_id, [])
        num_full_blocks = request.num_tokens // self.block_size
        if len(block_hashes) < num_full_blocks:
            bs = self.block_size
            salt = request.hash_salt
            parent = block_hashes[-1] if block_hashes else None
            for i in range(len(block_hashes), num_full_blocks):
                parent = hash_block_tokens(parent, token_slice(request, i * bs, (i + 1) * bs), salt)
                block_hashes.append(parent)
        return block_hashes


def token_slice(request: Request, start: int, end: int) -> list[int]:
    """``request.all_token_ids[start:end]`` without building all_token_ids, which copies the whole sequence."""
    prompt = request.prompt_token_ids
    num_prompt_tokens = len(prompt)
    if end <= num_prompt_tokens:
        return prompt[start:end]
    output = request.output_token_ids
    if start >= num_prompt_tokens:
        return output[start - num_prompt_tokens:end - num_prompt_tokens]
    return prompt[start:] + output[:end - num_prompt_tokens]
