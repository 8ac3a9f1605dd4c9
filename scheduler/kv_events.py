"""What changed in the prefix cache, as events a prefix-aware router can follow.

When events are enabled (``KVCacheManager.enable_kv_events``) the block pool
records one event per change to the set of findable blocks: a run of blocks
became cached (``BlockStored``), cached blocks were evicted (``BlockRemoved``),
or the whole cache was reset (``AllBlocksCleared``). Replaying them in order
from an empty set gives exactly ``BlockPool.cached_blocks``. The engine drains
them after each step and publishes them (serving/engine/kv_events.py), in the
event vocabulary vLLM uses, so routers built for vLLM's events can follow ours.

Hashes here are our full sha256 digests; the publisher converts them to what
goes on the wire.
"""
from __future__ import annotations

from dataclasses import dataclass

from scheduler.block_hash import BlockHash

# NOTE: vLLM names the tier a block lives in; ours is the one the model attends from, which vLLM calls "GPU"
# whatever the device (its CPU backend says "GPU" too). Routers weigh other tiers (offloaded "CPU") lower.
MEDIUM_GPU = "GPU"


@dataclass(slots=True)
class BlockStored:
    """Consecutive full blocks of one sequence became findable in the prefix cache."""

    block_hashes: list[BlockHash]  # hashes of the newly cached blocks, in sequence order
    parent_block_hash: BlockHash | None  # hash of the block before the first one; None: they start a sequence
    token_ids: list[int]  # the blocks' tokens, block_size of them per block, concatenated
    block_size: int  # tokens per block
    extra_keys: list[str | None]  # per block, the extra key mixed into its hash (the request's hash_salt)
    lora_id: int | None = None  # adapter the blocks were computed with; frugal serves none
    medium: str = MEDIUM_GPU  # the cache tier the blocks live in


@dataclass(slots=True)
class BlockRemoved:
    """Cached blocks were evicted: their hashes are no longer findable."""

    block_hashes: list[BlockHash]  # the evicted blocks' hashes, in eviction order
    medium: str = MEDIUM_GPU  # the cache tier they left


@dataclass(slots=True)
class AllBlocksCleared:
    """The prefix cache was reset: nothing is findable any more."""


KVCacheEvent = BlockStored | BlockRemoved | AllBlocksCleared
