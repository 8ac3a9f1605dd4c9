"""`frugal report`: what each tenant, workflow, model or outcome cost, down to the cost per resolved task.

Rows come from the ledger (one per request), outcomes from what agents reported per task, and accelerator time
from the engine's busy and idle intervals. Request costs are busy time only; the idle part of the accelerator's
cost is reported on its own line and spread pro rata over the requests as the loaded cost, so utilisation shows
in money.
"""
from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import asdict, dataclass

import sqlalchemy as sa

from serving.control.store import engine_time, outcomes, requests

GROUPS = ("tenant", "workflow", "model", "outcome")
NONE = "(none)"
_SINCE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str) -> float:
    """'7d', '12h', '30m' -> seconds."""
    match = _SINCE.match(text.strip())
    if match is None:
        raise ValueError(f"--since must be a number and a unit (s, m, h, d, w), such as 7d or 12h; got {text!r}")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


@dataclass(slots=True)
class ReportRow:
    group: str  # the tenant, workflow, model or outcome
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_usd: float  # busy cost of its requests
    loaded_cost_usd: float  # with the accelerator's idle time spread pro rata
    tasks: int  # distinct agent tasks
    cost_per_task_usd: float | None
    loaded_cost_per_task_usd: float | None
    resolved: int  # tasks whose outcome is resolved
    cost_per_resolved_usd: float | None
    escalation_rate: float | None  # escalated tasks / tasks with an outcome
    p95_latency_ms: float | None


@dataclass(slots=True)
class Accelerator:
    uptime_s: float  # engine uptime covered by the ledger's intervals
    busy_s: float  # of which, time in engine steps
    busy_cost_usd: float
    idle_cost_usd: float

    @property
    def loaded_factor(self) -> float:
        """What a dollar of busy cost costs once idle time is paid for too."""
        return (self.busy_cost_usd + self.idle_cost_usd) / self.busy_cost_usd if self.busy_cost_usd > 0 else 1.0


def _p95(values: list[float]) -> float | None:
    if not values:
        return None
    values = sorted(values)
    rank = 0.95 * (len(values) - 1)
    low, high = math.floor(rank), math.ceil(rank)
    return values[low] + (values[high] - values[low]) * (rank - low)


def accelerator(engine: sa.Engine, since_ts: float) -> Accelerator:
    e = engine_time.c
    with engine.connect() as conn:
        rows = conn.execute(sa.select(e.start_ts, e.end_ts, e.busy_s, e.usd_per_hour).where(e.end_ts >= since_ts))
        uptime = busy = busy_cost = idle_cost = 0.0
        for start, end, busy_s, price in rows:
            span = max(0.0, end - max(start, since_ts))
            share = busy_s * span / (end - start) if end > start else 0.0
            uptime += span
            busy += share
            busy_cost += share * price / 3600
            idle_cost += max(0.0, span - share) * price / 3600
    return Accelerator(uptime, busy, busy_cost, idle_cost)


def build_report(engine: sa.Engine, by: str, since_s: float, now: float | None = None) -> tuple[list[ReportRow],
                                                                                               Accelerator]:
    if by not in GROUPS:
        raise ValueError(f"--by must be one of {', '.join(GROUPS)}, got {by!r}")
    since_ts = (now or time.time()) - since_s
    r, o = requests.c, outcomes.c
    with engine.connect() as conn:
        ledger = conn.execute(sa.select(r.tenant, r.workflow, r.task, r.model, r.prompt_tokens, r.completion_tokens,
                                        r.cached_tokens, r.cost_usd, r.latency_ms).where(r.ts >= since_ts)).fetchall()
        reported = conn.execute(sa.select(o.tenant, o.task, o.outcome).order_by(o.ts)).fetchall()
    outcome_of = {(row.tenant, row.task): row.outcome for row in reported}  # the latest report wins
    machine = accelerator(engine, since_ts)
    groups: dict[str, dict] = {}
    for row in ledger:
        task = (row.tenant, row.task) if row.task else None
        key = {"tenant": row.tenant, "workflow": row.workflow or NONE, "model": row.model,
               "outcome": outcome_of.get(task, NONE) if task else NONE}[by]
        g = groups.setdefault(key, {"requests": 0, "prompt": 0, "completion": 0, "cached": 0, "cost": 0.0,
                                    "tasks": set(), "latencies": []})
        g["requests"] += 1
        g["prompt"] += row.prompt_tokens
        g["completion"] += row.completion_tokens
        g["cached"] += row.cached_tokens
        g["cost"] += row.cost_usd
        g["latencies"].append(row.latency_ms)
        if task:
            g["tasks"].add(task)
    rows = []
    for key, g in sorted(groups.items(), key=lambda kv: -kv[1]["cost"]):
        tasks = g["tasks"]
        done = [outcome_of[t] for t in tasks if t in outcome_of]
        resolved = sum(x == "resolved" for x in done)
        loaded = g["cost"] * machine.loaded_factor
        rows.append(ReportRow(
            group=key, requests=g["requests"], prompt_tokens=g["prompt"], completion_tokens=g["completion"],
            cached_tokens=g["cached"], cost_usd=g["cost"], loaded_cost_usd=loaded, tasks=len(tasks),
            cost_per_task_usd=g["cost"] / len(tasks) if tasks else None,
            loaded_cost_per_task_usd=loaded / len(tasks) if tasks else None, resolved=resolved,
            cost_per_resolved_usd=g["cost"] / resolved if resolved else None,
            escalation_rate=sum(x == "escalated" for x in done) / len(done) if done else None,
            p95_latency_ms=_p95(g["latencies"])))
    return rows, machine


def as_json(rows: list[ReportRow], machine: Accelerator) -> dict:
    return {"rows": [asdict(row) for row in rows], "accelerator": {**asdict(machine),
                                                                   "loaded_factor": machine.loaded_factor}}


def render(rows: list[ReportRow], machine: Accelerator, by: str, since: str) -> None:
    from rich.console import Console
    from rich.table import Table

    def money(x):
        return "-" if x is None else f"${x:,.4f}"

    table = Table(title=f"frugal: cost by {by}, last {since}")
    for name in (by, "requests", "prompt", "completion", "cached", "cost", "loaded cost", "tasks", "cost/task",
                 "resolved", "cost/resolved", "escalated", "p95 ms"):
        table.add_column(name, justify="left" if name == by else "right")
    for row in rows:
        table.add_row(row.group, f"{row.requests:,}", f"{row.prompt_tokens:,}", f"{row.completion_tokens:,}",
                      f"{row.cached_tokens:,}", money(row.cost_usd), money(row.loaded_cost_usd), f"{row.tasks:,}",
                      money(row.cost_per_task_usd), f"{row.resolved:,}", money(row.cost_per_resolved_usd),
                      "-" if row.escalation_rate is None else f"{row.escalation_rate:.0%}",
                      "-" if row.p95_latency_ms is None else f"{row.p95_latency_ms:,.0f}")
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(table)
    share = machine.busy_s / machine.uptime_s if machine.uptime_s else 0.0
    console.print(f"accelerator: {machine.uptime_s / 3600:.2f} h up, {machine.busy_s / 3600:.2f} h busy "
                  f"({share:.0%}); busy cost {money(machine.busy_cost_usd)}, idle cost {money(machine.idle_cost_usd)}")
