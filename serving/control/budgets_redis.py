"""Budget lines in Redis, shared by every replica: the same contract as budgets.LocalBudgets, one Lua script per
call so a check and its reservation are atomic across replicas.

Per line: a hash (spent and reserved money and tokens, and whether it was seeded from the ledger), a hash of
reservations (id -> amounts), a sorted set of their expiry times, and a hash of reservations that expired before
they were settled. An expired reservation whose request did finish (its ledger row exists) is added to `spent`
by `reconcile`; its settle, if it still comes, removes the same entry first, so a cost is never counted twice.
NOTE: seeding from the ledger races with a settle that commits while the ledger is read; the race can only count
such a request twice (never drop it), so a budget errs on the side of refusing.
"""
from __future__ import annotations

import time

from serving.control.budgets import Amount, BudgetLine, Seeder, _refusal
from serving.control.ratelimit import LUA_NOW

_PREFIX = "frugal:b:"
_LINES = _PREFIX + "lines"  # every line key seen, for the reconciler
_AMOUNT = "local u, k = string.match(amounts, '([^ ]+) ([^ ]+)')\n"

# KEYS: per line: line, reservations, expiries, expired. ARGV: id, ttl, usd, tokens, then per line: usd limit (-1:
# none), token limit (-1: none), hard (1/0), expire-at (UNIX s, 0: never).
# Returns {-1, i}: line i needs seeding; {1, i, su, st, ru, rt}: hard line i refused; {0, soft lines over...}.
# Moves the expired reservations of line i out of `reserved` into its `expired` hash.
_SWEEP_LINE = """
local function sweep(line, resv, resx, expired)
  for _, gone in ipairs(redis.call('ZRANGEBYSCORE', resx, '-inf', now)) do
    local amounts = redis.call('HGET', resv, gone)
    if amounts then
""" + _AMOUNT + """
      redis.call('HINCRBYFLOAT', line, 'ru', -tonumber(u))
      redis.call('HINCRBY', line, 'rt', -tonumber(k))
      redis.call('HDEL', resv, gone)
      redis.call('HSET', expired, gone, now .. ' ' .. amounts)
    end
    redis.call('ZREM', resx, gone)
  end
end
"""

_RESERVE = LUA_NOW + _SWEEP_LINE + """
local id, ttl, usd, tok = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local n = #KEYS / 4
for i = 0, n - 1 do
  if redis.call('HEXISTS', KEYS[4*i+1], 'seeded') == 0 then return {-1, i + 1} end
  sweep(KEYS[4*i+1], KEYS[4*i+2], KEYS[4*i+3], KEYS[4*i+4])
end
local over = {0}
for i = 0, n - 1 do
  local v = redis.call('HMGET', KEYS[4*i+1], 'su', 'st', 'ru', 'rt')
  local su, st, ru, rt = tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0, tonumber(v[4]) or 0
  local ul, tl, hard = tonumber(ARGV[5 + 4*i]), tonumber(ARGV[6 + 4*i]), ARGV[7 + 4*i] == '1'
  if (ul >= 0 and su + ru + usd > ul + 1e-12) or (tl >= 0 and st + rt + tok > tl) then
    if hard then return {1, i + 1, tostring(su), tostring(st), tostring(ru), tostring(rt)} end
    table.insert(over, i + 1)
  end
end
for i = 0, n - 1 do
  local line = KEYS[4*i+1]
  redis.call('HINCRBYFLOAT', line, 'ru', usd)
  redis.call('HINCRBY', line, 'rt', tok)
  redis.call('HSET', KEYS[4*i+2], id, tostring(usd) .. ' ' .. tostring(tok))
  redis.call('ZADD', KEYS[4*i+3], now + ttl, id)
  local expire_at = tonumber(ARGV[8 + 4*i])
  if expire_at > 0 then
    for j = 1, 4 do redis.call('EXPIREAT', KEYS[4*i+j], math.floor(expire_at)) end
  end
end
return over
"""

# KEYS as above. ARGV: id, usd, tokens (0 0 to release), add to spent (1/0).
_SETTLE = """
local id, usd, tok, spend = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4] == '1'
for i = 0, #KEYS / 4 - 1 do
  local line, resv, resx, expired = KEYS[4*i+1], KEYS[4*i+2], KEYS[4*i+3], KEYS[4*i+4]
  local amounts = redis.call('HGET', resv, id)
  if amounts then
""" + _AMOUNT + """
    redis.call('HINCRBYFLOAT', line, 'ru', -tonumber(u))
    redis.call('HINCRBY', line, 'rt', -tonumber(k))
    redis.call('HDEL', resv, id)
    redis.call('ZREM', resx, id)
  else
    redis.call('HDEL', expired, id)
  end
  if spend then
    redis.call('HINCRBYFLOAT', line, 'su', usd)
    redis.call('HINCRBY', line, 'st', tok)
  end
end
return 0
"""

# KEYS: line. ARGV: usd, tokens. Seeds a line once.
_SEED = """
if redis.call('HSETNX', KEYS[1], 'seeded', '1') == 1 then
  redis.call('HINCRBYFLOAT', KEYS[1], 'su', tonumber(ARGV[1]))
  redis.call('HINCRBY', KEYS[1], 'st', tonumber(ARGV[2]))
end
return 0
"""

# KEYS: line, reservations, expiries, expired. Sweeps one line (the reconciler: no new request may come to it).
_SWEEP = LUA_NOW + _SWEEP_LINE + """
sweep(KEYS[1], KEYS[2], KEYS[3], KEYS[4])
return 0
"""

# KEYS: line, expired. ARGV: id, usd, tokens (the ledger's row for it; -1: no row, drop it). Counts it once.
_RECONCILE = """
if redis.call('HDEL', KEYS[2], ARGV[1]) == 1 and tonumber(ARGV[2]) >= 0 then
  redis.call('HINCRBYFLOAT', KEYS[1], 'su', tonumber(ARGV[2]))
  redis.call('HINCRBY', KEYS[1], 'st', tonumber(ARGV[3]))
end
return 0
"""


def _expire_at(line: BudgetLine) -> float:
    """Lines outlive their period by two days (reports and reconciliation), then Redis drops them."""
    if line.config.period == "total":
        return 0
    days = 33 if line.config.period == "month" else 1
    return line.period_start + (days + 2) * 86400


class RedisBudgets:
    def __init__(self, client, seeder: Seeder, ttl_s: float, grace_s: float = 60.0):
        self.client = client
        self.seeder = seeder
        self.ttl_s = ttl_s
        self.grace_s = grace_s  # an expired reservation is reconciled only this long after it expired
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._seed = client.register_script(_SEED)
        self._reconcile = client.register_script(_RECONCILE)
        self._sweep = client.register_script(_SWEEP)

    @staticmethod
    def _keys(lines: list[BudgetLine]) -> list[str]:
        keys = []
        for line in lines:
            base = _PREFIX + line.key
            keys += [base, base + ":resv", base + ":resx", base + ":expired"]
        return keys

    async def reserve(self, lines: list[BudgetLine], res_id: str, need: Amount) -> list[BudgetLine]:
        if not lines:
            return []
        args: list = [res_id, self.ttl_s, repr(need.usd), need.tokens]
        for line in lines:
            c = line.config
            args += [-1 if c.usd is None else repr(c.usd), -1 if c.tokens is None else c.tokens,
                     int(c.mode == "hard"), _expire_at(line)]
        while True:
            result = await self._reserve(keys=self._keys(lines), args=args)
            status = int(result[0])
            if status == -1:  # first sight of this line anywhere: seed it from the ledger, then try again
                line = lines[int(result[1]) - 1]
                seed = await self.seeder(line)
                await self._seed(keys=[_PREFIX + line.key], args=[repr(seed.usd), seed.tokens])
                await self.client.sadd(_LINES, line.key)
                continue
            if status == 1:
                line = lines[int(result[1]) - 1]
                su, st, ru, rt = (float(x) for x in result[2:6])
                raise _refusal(line, Amount(su, int(st)), Amount(ru, int(rt)), need)
            return [lines[int(i) - 1] for i in result[1:]]

    async def settle(self, lines: list[BudgetLine], res_id: str, actual: Amount) -> None:
        if lines:
            await self._settle(keys=self._keys(lines), args=[res_id, repr(actual.usd), actual.tokens, 1])

    async def release(self, lines: list[BudgetLine], res_id: str) -> None:
        if lines:
            await self._settle(keys=self._keys(lines), args=[res_id, 0, 0, 0])

    async def state(self, line: BudgetLine) -> tuple[Amount, Amount]:
        v = await self.client.hmget(_PREFIX + line.key, "su", "st", "ru", "rt")
        su, st, ru, rt = (float(x) if x is not None else 0.0 for x in v)
        return Amount(su, int(st)), Amount(ru, int(rt))

    async def reconcile(self, find_costs) -> int:
        """Counts the reservations that expired unsettled but whose request finished (a replica died between its
        ledger commit and its settle). `find_costs(ids)` -> {id: Amount} from the ledger. Returns how many."""
        now = time.time()
        count = 0
        for line_key in await self.client.smembers(_LINES):
            base = _PREFIX + line_key
            if not await self.client.exists(base):  # its period is long over and Redis dropped it
                await self.client.srem(_LINES, line_key)
                continue
            await self._sweep(keys=[base, base + ":resv", base + ":resx", base + ":expired"])
            expired = await self.client.hgetall(base + ":expired")
            old = [res_id for res_id, value in expired.items() if float(value.split(" ")[0]) < now - self.grace_s]
            if not old:
                continue
            costs = await find_costs(old)
            for res_id in old:
                amount = costs.get(res_id)
                args = [res_id, repr(amount.usd), amount.tokens] if amount else [res_id, -1, 0]
                await self._reconcile(keys=[base, base + ":expired"], args=args)
                count += amount is not None
        return count

    async def close(self) -> None:
        await self.client.aclose()
