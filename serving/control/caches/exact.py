"""The exact cache: the same normalised request (scope, messages, sampling parameters) gets the stored answer."""
from __future__ import annotations

import time
from typing import Callable

from serving.control.caches.config import ExactCacheConfig
from serving.control.caches.entry import CachedResponse, CacheEntry, CacheHit
from serving.control.caches.keys import CacheRequest, exact_key, scope_of
from serving.control.caches.store import CacheStore

# NOTE: an answer cut by an error or a cancellation is not the answer the request would get again.
STORED_FINISH_REASONS = ("stop", "length")


class ExactCache:
    def __init__(self, config: ExactCacheConfig, store: CacheStore, clock: Callable[[], float] = time.time):
        self.config = config
        self.store = store
        self.clock = clock  # UNIX seconds; shared by every replica, so never a monotonic clock

    async def get(self, request: CacheRequest) -> CacheHit | None:
        """Called after optimisation, before routing: the stored answer, or None."""
        if not self.config.enabled or not request.cacheable:
            return None
        now = self.clock()
        entry = await self.store.get(exact_key(request), now)
        if entry is None or entry.scope_key != scope_of(request).key:
            return None
        return CacheHit(kind="exact", response=entry.response, similarity=1.0, age_s=now - entry.created_at)

    async def put(self, request: CacheRequest, response: CachedResponse) -> bool:
        """Called once the request is done; returns whether the answer was stored."""
        if not self.config.enabled or not request.cacheable or response.finish_reason not in STORED_FINISH_REASONS:
            return False
        now = self.clock()
        entry = CacheEntry(scope_key=scope_of(request).key, response=response, tags=tuple(sorted(set(request.tags))),
                           created_at=now, expires_at=now + self.config.ttl_s)
        await self.store.put(exact_key(request), entry, now)
        return True
