"""What the ledger already holds, read when a budget line or a task is first seen and when expired reservations
are reconciled. Blocking (SQLAlchemy Core); the control plane runs them in a worker thread."""
from __future__ import annotations

import sqlalchemy as sa

from serving.control.budgets import Amount, BudgetLine
from serving.control.store import requests, tool_calls
from serving.control.tasks import TaskState


def spent(engine: sa.Engine, line: BudgetLine) -> Amount:
    r = requests.c
    where = [r.tenant == line.tenant, r.ts >= line.period_start]
    if line.config.scope == "workflow":
        where.append(r.workflow == line.subject)
    elif line.config.scope == "task":
        where.append(r.task == line.subject)
    query = sa.select(sa.func.coalesce(sa.func.sum(r.cost_usd), 0.0),
                      sa.func.coalesce(sa.func.sum(r.prompt_tokens + r.completion_tokens), 0)).where(*where)
    with engine.connect() as conn:
        usd, tokens = conn.execute(query).one()
    return Amount(float(usd), int(tokens))


def task_state(engine: sa.Engine, tenant: str, task: str) -> TaskState:
    r, t = requests.c, tool_calls.c
    with engine.connect() as conn:
        calls, first = conn.execute(sa.select(sa.func.count(), sa.func.min(r.ts - r.latency_ms / 1000.0))
                                    .where(r.tenant == tenant, r.task == task)).one()
        tools = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(t.count), 0))
                             .where(t.tenant == tenant, t.task == task)).scalar_one()
    return TaskState(calls=int(calls), tool_calls=int(tools), first_ts=float(first) if first is not None else None)


def task_cost(engine: sa.Engine, tenant: str, task: str) -> float:
    r = requests.c
    with engine.connect() as conn:
        return float(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(r.cost_usd), 0.0))
                                  .where(r.tenant == tenant, r.task == task)).scalar_one())


def costs_of(engine: sa.Engine, admission_ids: list[str]) -> dict[str, Amount]:
    r = requests.c
    with engine.connect() as conn:
        rows = conn.execute(sa.select(r.admission_id, r.cost_usd, r.prompt_tokens + r.completion_tokens)
                            .where(r.admission_id.in_(admission_ids))).fetchall()
    return {row[0]: Amount(float(row[1]), int(row[2])) for row in rows}
