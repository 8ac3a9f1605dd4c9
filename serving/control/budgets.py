"""Budgets that hold under concurrency: reserve the worst case at admission, settle the real cost at the end.

A budget line is one configured budget applied to one subject and period ("tenant acme, day 2026-12-01"). Every
line of a request is checked and reserved at once: a hard line refuses when spent + reserved + this request's
worst case would pass its limit, so no number of parallel requests can overspend it. A soft line never refuses;
the caller is told which soft lines are over (it logs them, counts them and applies their fallback). Settling
adds the real cost to `spent` and drops the reservation; releasing drops it alone (the engine refused the
request). Reservations expire after `ttl_s`, so a crashed replica cannot hold money forever.

Lines live in this process (LocalBudgets) or in Redis (RedisBudgets: one Lua script per call, shared by the
replicas). Spend starts from the ledger: a line seen for the first time is seeded with what the ledger already
holds for its subject and period, so budgets hold across restarts.
NOTE: workflow and task ids belong to a tenant: tenant A's workflow "support" and tenant B's are separate lines,
so one tenant cannot spend another's workflow budget by using the same id.
"""
from __future__ import annotations

import datetime as dt
import threading
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from serving.control.config import BudgetConfig
from serving.control.errors import BudgetExceeded


@dataclass(frozen=True, slots=True)
class BudgetLine:
    config: BudgetConfig  # the budget as configured
    tenant: str  # whose requests it counts
    subject: str  # the tenant, workflow or task id it applies to
    period_key: str  # "2026-12-01", "2026-12" or "total"
    period_start: float  # UNIX seconds the period began (0 for total)

    @property
    def key(self) -> str:
        return f"{self.config.scope}:{self.tenant}:{self.subject}:{self.config.period}:{self.period_key}"

    def describe(self) -> str:
        limits = []
        if self.config.usd is not None:
            usd = self.config.usd
            limits.append(f"${usd:.2f}" if usd >= 1 else f"${usd:.6g}")
        if self.config.tokens is not None:
            limits.append(f"{self.config.tokens} tokens")
        per = "in total" if self.config.period == "total" else f"per {self.config.period} ({self.period_key})"
        return f"{self.config.scope} {self.subject!r}: {self.config.mode} limit {' and '.join(limits)} {per}"


def period_of(period: str, now: float) -> tuple[str, float]:
    """(key, start) of the UTC calendar period holding `now`."""
    if period == "total":
        return "total", 0.0
    day = dt.datetime.fromtimestamp(now, dt.timezone.utc)
    if period == "day":
        start = day.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y-%m-%d"), start.timestamp()
    start = day.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start.strftime("%Y-%m"), start.timestamp()


def lines_for(budgets: list[BudgetConfig], tenant: str, workflow: str | None, task: str | None,
              now: float) -> list[BudgetLine]:
    subjects = {"tenant": tenant, "workflow": workflow, "task": task}
    lines = []
    for b in budgets:
        subject = subjects[b.scope]
        if subject is None or (b.id != "*" and b.id != subject):
            continue
        key, start = period_of(b.period, now)
        lines.append(BudgetLine(b, tenant, subject, key, start))
    return lines


@dataclass(frozen=True, slots=True)
class Amount:
    usd: float  # money
    tokens: int  # prompt + completion tokens


Seeder = Callable[[BudgetLine], Awaitable[Amount]]  # what the ledger already holds for a line


def _exceeded(line: BudgetLine, spent: Amount, reserved: Amount, need: Amount) -> bool:
    c = line.config
    return (c.usd is not None and spent.usd + reserved.usd + need.usd > c.usd + 1e-12) or \
        (c.tokens is not None and spent.tokens + reserved.tokens + need.tokens > c.tokens)


def _refusal(line: BudgetLine, spent: Amount, reserved: Amount, need: Amount) -> BudgetExceeded:
    if line.config.usd is not None and spent.usd + reserved.usd + need.usd > line.config.usd:
        detail = (f"spent ${spent.usd:.6f}, held by running requests ${reserved.usd:.6f}, this request may cost up "
                  f"to ${need.usd:.6f}")
    else:
        detail = (f"spent {spent.tokens} tokens, held by running requests {reserved.tokens}, this request may use "
                  f"up to {need.tokens}")
    return BudgetExceeded(f"budget_exceeded: {line.describe()}; {detail}")


@dataclass(slots=True)
class _LocalLine:
    spent: Amount
    reservations: dict[str, tuple[Amount, float]] = field(default_factory=dict)  # id -> (amount, expires at)

    def reserved(self, now: float) -> Amount:
        for res_id in [r for r, (_, expires) in self.reservations.items() if expires <= now]:
            del self.reservations[res_id]
        return Amount(sum(a.usd for a, _ in self.reservations.values()),
                      sum(a.tokens for a, _ in self.reservations.values()))


class LocalBudgets:
    def __init__(self, seeder: Seeder, ttl_s: float):
        self.seeder = seeder
        self.ttl_s = ttl_s
        self._lines: dict[str, _LocalLine] = {}
        self._lock = threading.Lock()

    async def _seeded(self, lines: list[BudgetLine]) -> None:
        for line in lines:
            if line.key not in self._lines:
                spent = await self.seeder(line)
                with self._lock:
                    self._lines.setdefault(line.key, _LocalLine(spent))

    async def reserve(self, lines: list[BudgetLine], res_id: str, need: Amount) -> list[BudgetLine]:
        """Reserves `need` on every line, or raises BudgetExceeded for the first hard line over (and reserves
        nothing). Returns the soft lines that are over."""
        await self._seeded(lines)
        now = time.monotonic()
        over = []
        with self._lock:
            for line in lines:
                state = self._lines[line.key]
                reserved = state.reserved(now)
                if _exceeded(line, state.spent, reserved, need):
                    if line.config.mode == "hard":
                        raise _refusal(line, state.spent, reserved, need)
                    over.append(line)
            for line in lines:
                self._lines[line.key].reservations[res_id] = (need, now + self.ttl_s)
        return over

    async def settle(self, lines: list[BudgetLine], res_id: str, actual: Amount) -> None:
        await self._seeded(lines)
        with self._lock:
            for line in lines:
                state = self._lines[line.key]
                state.reservations.pop(res_id, None)
                state.spent = Amount(state.spent.usd + actual.usd, state.spent.tokens + actual.tokens)

    async def release(self, lines: list[BudgetLine], res_id: str) -> None:
        with self._lock:
            for line in lines:
                state = self._lines.get(line.key)
                if state is not None:
                    state.reservations.pop(res_id, None)

    async def state(self, line: BudgetLine) -> tuple[Amount, Amount]:
        """(spent, reserved) of a line, for reports and tests."""
        await self._seeded([line])
        with self._lock:
            state = self._lines[line.key]
            return state.spent, state.reserved(time.monotonic())

    async def reconcile(self, find_costs) -> int:
        return 0  # reservations of this process die with it; nothing outlives a crash here

    async def close(self) -> None:
        pass
