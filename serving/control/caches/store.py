"""Where cached answers live: the in-process store (this file) and the Redis store (store_redis.py).

Both keep two kinds of entry under keys that start with the tenant's namespace (keys.py):
- exact entries: one entry per exact key;
- semantic entries: per scope, a bounded set of (entry id, vector, entry), searched by a dot product over the
  scope's vectors only.
Both can drop every entry of a tenant, or every entry of a tenant that carries a tag.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from serving.control.caches.entry import CacheEntry


def tenant_ns_of(key: str) -> str:
    """The tenant namespace every exact and scope key starts with."""
    return key.split(":", 1)[0]


class CacheStore(Protocol):
    async def get(self, key: str, now: float) -> CacheEntry | None:
        """The live exact entry under `key`, or None."""

    async def put(self, key: str, entry: CacheEntry, now: float) -> None:
        """Stores an exact entry (replacing one under the same key)."""

    async def scan(self, scope_key: str, now: float) -> tuple[list[str], np.ndarray]:
        """The live semantic entry ids of one scope and their vectors ([len(ids), dimension] float32)."""

    async def get_many(self, scope_key: str, entry_ids: list[str], now: float) -> list[CacheEntry | None]:
        """The live semantic entries of one scope, in the order asked (None where gone)."""

    async def add(self, scope_key: str, entry_id: str, entry: CacheEntry, vector: np.ndarray, now: float) -> None:
        """Stores a semantic entry; the scope's oldest entries go past its bound."""

    async def invalidate_tenant(self, tenant_ns: str) -> int:
        """Drops every entry of a tenant; returns how many."""

    async def invalidate_tag(self, tenant_ns: str, tag: str) -> int:
        """Drops every entry of a tenant that carries `tag`; returns how many."""


@dataclass(slots=True)
class _Scope:
    entry_ids: list[str] = field(default_factory=list)  # oldest first
    entries: list[CacheEntry] = field(default_factory=list)  # entries[i] belongs to entry_ids[i]
    vectors: np.ndarray | None = None  # [len(entry_ids), dimension] float32, row i for entry_ids[i]

    def drop(self, keep: list[int]) -> int:
        num_dropped = len(self.entry_ids) - len(keep)
        if num_dropped:
            self.entry_ids = [self.entry_ids[i] for i in keep]
            self.entries = [self.entries[i] for i in keep]
            self.vectors = self.vectors[keep] if keep else None
        return num_dropped


class LocalStore:
    """Everything in this process's memory, bounded: least recently used exact entries and scopes go first,
    and a scope keeps its newest `max_entries_per_scope` entries.

    NOTE: not thread-safe; it is used from the event loop only, and no method awaits while it changes state.
    """

    def __init__(self, max_entries: int = 10_000, max_entries_per_scope: int = 512, max_scopes: int = 4096):
        self.max_entries = max_entries
        self.max_entries_per_scope = max_entries_per_scope
        self.max_scopes = max_scopes
        self._exact: OrderedDict[str, CacheEntry] = OrderedDict()  # exact key -> entry, least recent first
        self._exact_by_tenant: dict[str, set[str]] = {}  # tenant namespace -> exact keys
        self._scopes: OrderedDict[str, _Scope] = OrderedDict()  # scope key -> scope, least recent first
        self._scopes_by_tenant: dict[str, set[str]] = {}  # tenant namespace -> scope keys

    # -- exact ---------------------------------------------------------------------------------------------------
    async def get(self, key: str, now: float) -> CacheEntry | None:
        entry = self._exact.get(key)
        if entry is None:
            return None
        if entry.expires_at <= now:
            self._drop_exact(key)
            return None
        self._exact.move_to_end(key)
        return entry

    async def put(self, key: str, entry: CacheEntry, now: float) -> None:
        self._exact[key] = entry
        self._exact.move_to_end(key)
        self._exact_by_tenant.setdefault(tenant_ns_of(key), set()).add(key)
        while len(self._exact) > self.max_entries:
            self._drop_exact(next(iter(self._exact)))

    def _drop_exact(self, key: str) -> None:
        del self._exact[key]
        tenant_ns = tenant_ns_of(key)
        keys = self._exact_by_tenant[tenant_ns]
        keys.discard(key)
        if not keys:
            del self._exact_by_tenant[tenant_ns]

    # -- semantic ------------------------------------------------------------------------------------------------
    def _live(self, scope_key: str, now: float) -> _Scope | None:
        scope = self._scopes.get(scope_key)
        if scope is None:
            return None
        scope.drop([i for i, e in enumerate(scope.entries) if e.expires_at > now])
        if not scope.entry_ids:
            self._drop_scope(scope_key)
            return None
        self._scopes.move_to_end(scope_key)
        return scope

    async def scan(self, scope_key: str, now: float) -> tuple[list[str], np.ndarray]:
        scope = self._live(scope_key, now)
        if scope is None:
            return [], np.zeros((0, 0), dtype=np.float32)
        return list(scope.entry_ids), scope.vectors

    async def get_many(self, scope_key: str, entry_ids: list[str], now: float) -> list[CacheEntry | None]:
        scope = self._live(scope_key, now)
        if scope is None:
            return [None] * len(entry_ids)
        by_id = dict(zip(scope.entry_ids, scope.entries))
        return [by_id.get(i) for i in entry_ids]

    async def add(self, scope_key: str, entry_id: str, entry: CacheEntry, vector: np.ndarray, now: float) -> None:
        vector = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        scope = self._live(scope_key, now)
        if scope is None:
            scope = self._scopes[scope_key] = _Scope()
            self._scopes_by_tenant.setdefault(tenant_ns_of(scope_key), set()).add(scope_key)
        keep = [i for i, e in enumerate(scope.entry_ids) if e != entry_id]  # the same question: replaced
        keep = keep[max(0, len(keep) - self.max_entries_per_scope + 1):]  # NOTE: oldest first, at insertion
        scope.drop(keep)
        scope.entry_ids.append(entry_id)
        scope.entries.append(entry)
        scope.vectors = vector.copy() if scope.vectors is None else np.concatenate([scope.vectors, vector])
        while len(self._scopes) > self.max_scopes:
            self._drop_scope(next(iter(self._scopes)))

    def _drop_scope(self, scope_key: str) -> None:
        del self._scopes[scope_key]
        tenant_ns = tenant_ns_of(scope_key)
        keys = self._scopes_by_tenant[tenant_ns]
        keys.discard(scope_key)
        if not keys:
            del self._scopes_by_tenant[tenant_ns]

    # -- invalidation --------------------------------------------------------------------------------------------
    async def invalidate_tenant(self, tenant_ns: str) -> int:
        num_dropped = 0
        for key in list(self._exact_by_tenant.get(tenant_ns, ())):
            self._drop_exact(key)
            num_dropped += 1
        for scope_key in list(self._scopes_by_tenant.get(tenant_ns, ())):
            num_dropped += len(self._scopes[scope_key].entry_ids)
            self._drop_scope(scope_key)
        return num_dropped

    async def invalidate_tag(self, tenant_ns: str, tag: str) -> int:
        num_dropped = 0
        for key in [k for k in self._exact_by_tenant.get(tenant_ns, ()) if tag in self._exact[k].tags]:
            self._drop_exact(key)
            num_dropped += 1
        for scope_key in list(self._scopes_by_tenant.get(tenant_ns, ())):
            scope = self._scopes[scope_key]
            num_dropped += scope.drop([i for i, e in enumerate(scope.entries) if tag not in e.tags])
            if not scope.entry_ids:
                self._drop_scope(scope_key)
        return num_dropped
