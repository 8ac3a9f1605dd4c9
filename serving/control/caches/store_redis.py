"""The Redis store: the same entries as LocalStore, shared by every replica.

Layout (prefix `frugal:c:`; `{ns}` is the tenant namespace as a hash tag, so one tenant's keys share a cluster
slot and every script touches one slot):
    x:{ns}:<scope>:<digest>  exact entry (JSON), EX its TTL
    sv:{ns}:<scope>          semantic vectors: hash entry id -> base64 float32
    se:{ns}:<scope>          semantic entries: hash entry id -> JSON
    so:{ns}:<scope>          semantic expiry: sorted set entry id -> expires_at (the oldest go past the bound)
    n:{ns}                   what the tenant owns (for invalidate_tenant)
    t:{ns}:<tag digest>      what carries a tag (for invalidate_tag)
Every write and invalidation is one Lua script, so a reader never sees half an entry.

NOTE: a semantic lookup fetches the scope's vectors and scans them here (one round trip, then one for the best
entries): fine for the bounded scope size (`max_entries_per_scope`, 512 x 2 KB by default); a larger corpus would
want a vector index (RediSearch) instead.
NOTE: vectors are base64 text, so the store works on the control plane's client (decode_responses=True) as well
as on a bytes client.
"""
from __future__ import annotations

import base64
import hashlib
import math

import numpy as np

from serving.control.caches.entry import CacheEntry
from serving.control.caches.store import tenant_ns_of

_SPLIT = """
local function split(s)
  local parts = {}
  for part in string.gmatch(s, '[^|]+') do parts[#parts + 1] = part end
  return parts
end
local function extend(key, ttl)
  if redis.call('TTL', key) < ttl then redis.call('EXPIRE', key, ttl) end
end
"""

# KEYS: entry, tenant index, tag sets... ARGV: json, ttl s, member
_PUT = _SPLIT + """
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
redis.call('SADD', KEYS[2], ARGV[3])
for i = 3, #KEYS do
  redis.call('SADD', KEYS[i], ARGV[3])
  redis.call('SADD', KEYS[2], 'k|' .. KEYS[i])
  extend(KEYS[i], ttl)
end
extend(KEYS[2], ttl)
return 1
"""

# KEYS: sv, se, so, tenant index, tag sets... ARGV: id, vector, json, expires_at, now, max entries, ttl s
_ADD = _SPLIT + """
local sv, se, so = KEYS[1], KEYS[2], KEYS[3]
local id, ttl, max_entries = ARGV[1], tonumber(ARGV[7]), tonumber(ARGV[6])
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', so, '-inf', ARGV[5])) do
  redis.call('HDEL', sv, gone)
  redis.call('HDEL', se, gone)
  redis.call('ZREM', so, gone)
end
redis.call('HSET', sv, id, ARGV[2])
redis.call('HSET', se, id, ARGV[3])
redis.call('ZADD', so, ARGV[4], id)
while redis.call('ZCARD', so) > max_entries do
  local oldest = redis.call('ZPOPMIN', so)[1]
  redis.call('HDEL', sv, oldest)
  redis.call('HDEL', se, oldest)
end
for i = 1, 3 do extend(KEYS[i], ttl) end
redis.call('SADD', KEYS[4], 's|' .. sv .. '|' .. se .. '|' .. so)
for i = 5, #KEYS do
  redis.call('SADD', KEYS[i], 'e|' .. sv .. '|' .. se .. '|' .. so .. '|' .. id)
  redis.call('SADD', KEYS[4], 'k|' .. KEYS[i])
  extend(KEYS[i], ttl)
end
extend(KEYS[4], ttl)
return 1
"""

# KEYS: tenant index. Returns the number of entries dropped.
_INVALIDATE_TENANT = _SPLIT + """
local count = 0
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local p = split(member)
  if p[1] == 'x' then
    count = count + redis.call('DEL', p[2])
  elseif p[1] == 's' then
    count = count + redis.call('HLEN', p[3])
    redis.call('DEL', p[2], p[3], p[4])
  else
    redis.call('DEL', p[2])
  end
end
redis.call('DEL', KEYS[1])
return count
"""

# KEYS: tag set. Returns the number of entries dropped.
_INVALIDATE_TAG = _SPLIT + """
local count = 0
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local p = split(member)
  if p[1] == 'x' then
    count = count + redis.call('DEL', p[2])
  else
    redis.call('HDEL', p[2], p[5])
    count = count + redis.call('HDEL', p[3], p[5])
    redis.call('ZREM', p[4], p[5])
  end
end
redis.call('DEL', KEYS[1])
return count
"""


def _encode_vector(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype=np.float32).tobytes()).decode()


def _decode_vector(raw: str | bytes) -> np.ndarray:
    return np.frombuffer(base64.b64decode(raw), dtype=np.float32)


def _text(raw: str | bytes) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


class RedisStore:
    def __init__(self, client, max_entries_per_scope: int = 512, prefix: str = "frugal:c:"):
        self.client = client  # a redis.asyncio client (text or bytes responses)
        self.max_entries_per_scope = max_entries_per_scope
        self.prefix = prefix
        self._put = client.register_script(_PUT)
        self._add = client.register_script(_ADD)
        self._invalidate_tenant = client.register_script(_INVALIDATE_TENANT)
        self._invalidate_tag = client.register_script(_INVALIDATE_TAG)

    # -- key names -----------------------------------------------------------------------------------------------
    def _name(self, kind: str, key: str) -> str:
        tenant_ns, _, rest = key.partition(":")
        return f"{self.prefix}{kind}:{{{tenant_ns}}}:{rest}" if rest else f"{self.prefix}{kind}:{{{tenant_ns}}}"

    def _tag_names(self, tenant_ns: str, tags) -> list[str]:
        return [self._name("t", f"{tenant_ns}:{hashlib.sha256(t.encode()).hexdigest()[:32]}") for t in tags]

    @staticmethod
    def _ttl_s(entry: CacheEntry, now: float) -> int:
        return max(1, math.ceil(entry.expires_at - now))

    # -- exact ---------------------------------------------------------------------------------------------------
    async def get(self, key: str, now: float) -> CacheEntry | None:
        raw = await self.client.get(self._name("x", key))
        if raw is None:
            return None
        entry = CacheEntry.from_json(raw)
        return entry if entry.expires_at > now else None

    async def put(self, key: str, entry: CacheEntry, now: float) -> None:
        name = self._name("x", key)
        tenant_ns = tenant_ns_of(key)
        await self._put(keys=[name, self._name("n", tenant_ns), *self._tag_names(tenant_ns, entry.tags)],
                        args=[entry.to_json(), self._ttl_s(entry, now), f"x|{name}"])

    # -- semantic ------------------------------------------------------------------------------------------------
    async def scan(self, scope_key: str, now: float) -> tuple[list[str], np.ndarray]:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zrangebyscore(self._name("so", scope_key), f"({now!r}", "+inf")
            pipe.hgetall(self._name("sv", scope_key))
            live, vectors = await pipe.execute()
        entry_ids, rows = [], []
        by_id = {_text(k): v for k, v in vectors.items()}
        for entry_id in map(_text, live):
            if entry_id in by_id:
                entry_ids.append(entry_id)
                rows.append(_decode_vector(by_id[entry_id]))
        if not rows:
            return [], np.zeros((0, 0), dtype=np.float32)
        return entry_ids, np.stack(rows)

    async def get_many(self, scope_key: str, entry_ids: list[str], now: float) -> list[CacheEntry | None]:
        if not entry_ids:
            return []
        raws = await self.client.hmget(self._name("se", scope_key), entry_ids)
        entries = [CacheEntry.from_json(raw) if raw is not None else None for raw in raws]
        return [e if e is not None and e.expires_at > now else None for e in entries]

    async def add(self, scope_key: str, entry_id: str, entry: CacheEntry, vector: np.ndarray, now: float) -> None:
        tenant_ns = tenant_ns_of(scope_key)
        keys = [self._name("sv", scope_key), self._name("se", scope_key), self._name("so", scope_key),
                self._name("n", tenant_ns), *self._tag_names(tenant_ns, entry.tags)]
        await self._add(keys=keys, args=[entry_id, _encode_vector(vector), entry.to_json(), repr(entry.expires_at),
                                         repr(now), self.max_entries_per_scope, self._ttl_s(entry, now)])

    # -- invalidation --------------------------------------------------------------------------------------------
    async def invalidate_tenant(self, tenant_ns: str) -> int:
        return int(await self._invalidate_tenant(keys=[self._name("n", tenant_ns)]))

    async def invalidate_tag(self, tenant_ns: str, tag: str) -> int:
        return int(await self._invalidate_tag(keys=self._tag_names(tenant_ns, [tag])))
