"""Rate limits: token buckets for requests and tokens per minute, per key and per tenant.

A bucket holds up to one minute's allowance and refills continuously. A request takes from every bucket that
applies to it at once or from none (so a refusal costs the caller nothing), and a token bucket is charged the
worst case (prompt plus max_tokens) at admission, then credited back what the request did not use. Buckets live
in this process, or in Redis (one Lua script per call, so several replicas share them atomically).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from serving.control.errors import RateLimitExceeded


@dataclass(frozen=True, slots=True)
class Charge:
    bucket: str  # bucket key, e.g. "key:ab12:tpm"
    per_minute: int  # the limit, also the bucket's capacity
    amount: int  # what this request takes
    what: str  # for the message: "requests per minute for key ab12"


def _refusal(charge: Charge, wait_s: float) -> RateLimitExceeded:
    if charge.amount > charge.per_minute:
        return RateLimitExceeded(f"rate_limit_exceeded: this request needs {charge.amount}, more than the "
                                 f"{charge.per_minute} {charge.what} allow", retry_after_s=60.0)
    return RateLimitExceeded(f"rate_limit_exceeded: {charge.per_minute} {charge.what}; retry in {wait_s:.1f} s",
                             retry_after_s=max(wait_s, 0.001))


class LocalLimiter:
    def __init__(self):
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at monotonic time)
        self._lock = threading.Lock()

    def _level(self, charge: Charge, now: float) -> float:
        tokens, at = self._buckets.get(charge.bucket, (float(charge.per_minute), now))
        return min(float(charge.per_minute), tokens + (now - at) * charge.per_minute / 60.0)

    async def take(self, charges: list[Charge]) -> None:
        """Takes every charge, or raises RateLimitExceeded (naming the first bucket short) and takes none."""
        now = time.monotonic()
        with self._lock:
            levels = [self._level(c, now) for c in charges]
            for charge, level in zip(charges, levels):
                if level < charge.amount:
                    raise _refusal(charge, (charge.amount - level) * 60.0 / charge.per_minute)
            for charge, level in zip(charges, levels):
                self._buckets[charge.bucket] = (level - charge.amount, now)

    async def give_back(self, charges: list[Charge]) -> None:
        now = time.monotonic()
        with self._lock:
            for charge in charges:
                level = self._level(charge, now)
                self._buckets[charge.bucket] = (min(float(charge.per_minute), level + charge.amount), now)


# Every script here reads the clock from Redis (TIME), so replicas with skewed clocks agree.
LUA_NOW = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) + tonumber(t[2]) / 1000000\n"

# A bucket's level now: what it held, refilled since, capped at one minute's allowance.
_LEVEL = LUA_NOW + """
local function level(key, capacity)
  local state = redis.call('HMGET', key, 't', 'at')
  local tokens = tonumber(state[1]) or capacity
  local at = tonumber(state[2]) or now
  return math.min(capacity, tokens + math.max(0, now - at) * capacity / 60)
end
local function store(key, tokens)
  redis.call('HSET', key, 't', tokens, 'at', now)
  redis.call('EXPIRE', key, 120)
end
"""

# KEYS: bucket keys. ARGV: per bucket: capacity, amount. Returns {0, 0} when taken, else the 1-based index of the
# first bucket short and its wait in milliseconds.
_TAKE = _LEVEL + """
local levels = {}
for i, key in ipairs(KEYS) do
  local capacity, amount = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local current = level(key, capacity)
  if current < amount then
    return {i, math.ceil((amount - current) * 60000 / capacity)}
  end
  levels[i] = current - amount
end
for i, key in ipairs(KEYS) do store(key, levels[i]) end
return {0, 0}
"""

_GIVE = _LEVEL + """
for i, key in ipairs(KEYS) do
  local capacity, amount = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  store(key, math.min(capacity, level(key, capacity) + amount))
end
return 0
"""


class RedisLimiter:
    """The same buckets in Redis, one script call per admission."""

    def __init__(self, client, prefix: str = "frugal:rl:"):
        self.client = client
        self.prefix = prefix
        self._take = client.register_script(_TAKE)
        self._give = client.register_script(_GIVE)

    def _args(self, charges: list[Charge]) -> tuple[list[str], list]:
        keys = [self.prefix + c.bucket for c in charges]
        args: list = []
        for c in charges:
            args += [c.per_minute, c.amount]
        return keys, args

    async def take(self, charges: list[Charge]) -> None:
        if not charges:
            return
        keys, args = self._args(charges)
        index, wait_ms = await self._take(keys=keys, args=args)
        if int(index):
            raise _refusal(charges[int(index) - 1], int(wait_ms) / 1000.0)

    async def give_back(self, charges: list[Charge]) -> None:
        if charges:
            keys, args = self._args(charges)
            await self._give(keys=keys, args=args)
