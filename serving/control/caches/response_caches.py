"""The two caches behind one interface for the request path: look up exact, then semantic; store into both."""
from __future__ import annotations

import time
from typing import Callable

from serving.control.caches.config import CachesConfig
from serving.control.caches.entry import CachedResponse, CacheHit
from serving.control.caches.exact import ExactCache
from serving.control.caches.keys import CacheRequest, tenant_namespace
from serving.control.caches.semantic import SemanticCache
from serving.control.caches.store import CacheStore, LocalStore


class ResponseCaches:
    def __init__(self, config: CachesConfig, store: CacheStore, embedder=None,
                 clock: Callable[[], float] = time.time):
        self.config = config
        self.backend = store  # where both caches keep their entries
        self.exact = ExactCache(config.exact, store, clock)
        self.semantic = SemanticCache(config.semantic, store, embedder, clock)

    @classmethod
    def open(cls, config: CachesConfig, redis_client=None, embedder=None,
             clock: Callable[[], float] = time.time) -> ResponseCaches:
        """In this process, or in Redis (the control plane's redis.asyncio client) when one is given."""
        if redis_client is None:
            store = LocalStore(config.exact.max_entries, config.semantic.max_entries_per_scope,
                               config.semantic.max_scopes)
        else:
            from serving.control.caches.store_redis import RedisStore

            store = RedisStore(redis_client, config.semantic.max_entries_per_scope)
        return cls(config, store, embedder, clock)

    @property
    def enabled(self) -> bool:
        return self.config.exact.enabled or self.config.semantic.enabled

    async def lookup(self, request: CacheRequest) -> CacheHit | None:
        """Called after optimisation, before routing: a hit answers the request without the model."""
        hit = await self.exact.get(request)
        if hit is None:
            hit = await self.semantic.get(request)
        return hit

    async def store(self, request: CacheRequest, response: CachedResponse) -> None:
        """Called once a request that missed is done (its cost known)."""
        await self.exact.put(request, response)
        await self.semantic.put(request, response)

    async def invalidate_tenant(self, tenant: str) -> int:
        """Drops every entry of the tenant, in both caches; returns how many."""
        return await self.backend.invalidate_tenant(tenant_namespace(tenant))

    async def invalidate_tag(self, tenant: str, tag: str) -> int:
        """Drops the tenant's entries that carry `tag`, in both caches; returns how many."""
        return await self.backend.invalidate_tag(tenant_namespace(tenant), tag)
