"""The control plane without a model: keys, rate limits, budgets that hold under concurrency, agent task budgets,
settlement into the ledger, and the same over real Redis and PostgreSQL servers."""
import asyncio
import time

import pytest
import sqlalchemy as sa

from serving.control import queries
from serving.control.budgets import Amount
from serving.control.config import control_config
from serving.control.context import Caller
from serving.control.errors import BudgetExceeded, InvalidApiKey, ModelNotAllowed, RateLimitExceeded, TaskNotFound
from serving.control.plane import ControlPlane
from serving.control.store import requests
from serving.engine.async_engine import EngineDone
from serving.engine.outputs import RequestMetrics, RequestOutput

MODEL = "m"
# Token prices make every cost exact: $1 per million prompt and $2 per million output tokens.
TOKEN_PRICED = {"models": {MODEL: {"usd_per_m_input": 1.0, "usd_per_m_output": 2.0}}}


def make_plane(tmp_path, redis_url=None, database_url=None, **control) -> ControlPlane:
    raw = {"data_dir": str(tmp_path), "pricing": TOKEN_PRICED, **control}
    if redis_url:
        raw["redis_url"] = redis_url
    if database_url:
        raw["database_url"] = database_url
    return ControlPlane.open(control_config(raw), MODEL, solo_s_per_token=lambda: 0.01)


def finish(admission, completion_tokens: int, busy_s: float = 0.0, reason: str = "stop", error=None):
    """What the engine would report for each of the admission's engine requests."""
    metrics = RequestMetrics(arrival_time=time.monotonic(), first_token_time=time.monotonic(), busy_s=busy_s)
    out = RequestOutput(req_id=admission.request_id, prompt=None, prompt_token_ids=[1] * admission.prompt_tokens,
                        token_ids=[5] * completion_tokens, finished=True, finish_reason=reason, metrics=metrics,
                        error=error)
    admission.expect()(EngineDone(admission.request_id, accepted=True, output=out))


def run(coro):
    return asyncio.run(coro)


def ledger_rows(plane):
    with plane.db.connect() as conn:
        return conn.execute(sa.select(requests)).fetchall()


async def _serve_one(plane, ctx, request_id, prompt_tokens=10, max_tokens=10, completion=10):
    admission = await plane.admit(ctx, request_id, MODEL, prompt_tokens, max_tokens)
    await asyncio.sleep(0.001)
    finish(admission, completion)
    return await admission.settled()


def test_auth_none_is_tenant_default_and_settles_into_the_ledger(tmp_path):
    async def main():
        plane = make_plane(tmp_path)
        ctx = await plane.authenticate(Caller(api_key="anything", workflow_id="wf", task_id=None,
                                              on_behalf_of="acme"))
        assert (ctx.tenant, ctx.key_id, ctx.workflow_id) == ("default", None, "wf")
        settlement = await _serve_one(plane, ctx, "req-1", prompt_tokens=100, completion=50)
        assert settlement.cost_usd == pytest.approx((100 * 1.0 + 50 * 2.0) / 1e6)
        rows = ledger_rows(plane)
        await plane.close()
        return settlement, rows

    settlement, rows = run(main())
    (row,) = rows
    assert (row.request_id, row.tenant, row.workflow, row.status, row.prompt_tokens, row.completion_tokens) == \
        ("req-1", "default", "wf", "ok", 100, 50)
    assert row.cost_usd == pytest.approx(settlement.cost_usd)


def test_keys_are_hashed_resolve_the_tenant_and_revoke(tmp_path):
    async def main():
        plane = make_plane(tmp_path, auth="keys", key_cache_s=0)
        key, record = plane.keys.create("acme", models=[MODEL], rpm=100)
        other, _ = plane.keys.create("globex")
        admin, _ = plane.keys.create("ops", role="admin")
        with pytest.raises(InvalidApiKey, match="missing"):
            await plane.authenticate(Caller(None, None, None))
        with pytest.raises(InvalidApiKey):
            await plane.authenticate(Caller(key[:-1] + ("x" if key[-1] != "x" else "y"), None, None))
        ctx = await plane.authenticate(Caller(key, None, None))
        assert (ctx.tenant, ctx.key_id, ctx.allowed_models) == ("acme", record.key_id, (MODEL,))
        plane.check_model(ctx, MODEL)
        with pytest.raises(ModelNotAllowed):
            plane.check_model(ctx, "gpt-4o")
        assert (await plane.authenticate(Caller(other, None, None, on_behalf_of="acme"))).tenant == "globex"
        assert (await plane.authenticate(Caller(admin, None, None, on_behalf_of="acme"))).tenant == "acme"
        plane.keys.revoke(record.key_id)
        with pytest.raises(InvalidApiKey, match="revoked"):
            await plane.authenticate(Caller(key, None, None))
        with pytest.raises(KeyError):
            plane.keys.revoke("nope")
        await plane.close()
        return key

    key = run(main())
    db_bytes = b"".join(p.read_bytes() for p in tmp_path.glob("frugal.db*"))
    assert key.encode() not in db_bytes and key.split("_")[2].encode() not in db_bytes


def test_rate_limits_refuse_with_retry_after_and_take_nothing(tmp_path):
    async def main():
        plane = make_plane(tmp_path, auth="keys", tenants={"acme": {"tpm": 100}})
        key, _ = plane.keys.create("acme", rpm=3)
        ctx = await plane.authenticate(Caller(key, None, None))
        for i in range(3):
            await _serve_one(plane, ctx, f"r{i}", prompt_tokens=5, max_tokens=5, completion=5)
        with pytest.raises(RateLimitExceeded) as e:
            await plane.admit(ctx, "r3", MODEL, 5, 5)
        assert 0 < e.value.retry_after_s <= 20 and "requests per minute for key" in e.value.message
        other, _ = plane.keys.create("acme")
        ctx2 = await plane.authenticate(Caller(other, None, None))
        with pytest.raises(RateLimitExceeded, match="more than the 100 tokens per minute"):
            await plane.admit(ctx2, "big", MODEL, 60, 60)
        await plane.close()

    run(main())


async def _race(plane, ctx, num_requests: int):
    """Starts num_requests requests at once; each that is admitted costs exactly its worst case."""
    async def one(i):
        try:
            admission = await plane.admit(ctx, f"r{i}", MODEL, 100, 100)
        except BudgetExceeded as e:
            return e
        await asyncio.sleep(0.01)
        finish(admission, 100)
        return await admission.settled()
    return await asyncio.gather(*(one(i) for i in range(num_requests)))


# 100 prompt + 100 output tokens cost $0.0003; a $0.015 budget holds exactly 50 of them.
BUDGET = {"budgets": [{"scope": "tenant", "id": "default", "usd": 0.015, "period": "day", "mode": "hard"}]}


def _check_race(results, plane_rows_cost):
    served = [r for r in results if not isinstance(r, BudgetExceeded)]
    refused = [r for r in results if isinstance(r, BudgetExceeded)]
    assert len(served) == 50 and len(refused) == 150
    assert refused[0].message.startswith("budget_exceeded: tenant 'default': hard limit $0.015 per day")
    assert "per day" in refused[0].message
    assert plane_rows_cost <= 0.015 + 1e-12


def test_a_hard_budget_holds_under_200_concurrent_requests(tmp_path):
    async def main():
        plane = make_plane(tmp_path, **BUDGET)
        ctx = await plane.authenticate(Caller(None, None, None))
        results = await _race(plane, ctx, 200)
        spent = sum(r.cost_usd for r in ledger_rows(plane))
        await plane.close()
        return results, spent

    _check_race(*run(main()))


def test_spend_survives_a_restart(tmp_path):
    async def main():
        plane = make_plane(tmp_path, **BUDGET)
        ctx = await plane.authenticate(Caller(None, None, None))
        for i in range(40):
            await _serve_one(plane, ctx, f"a{i}", 100, 100, 100)
        await plane.close()
        again = make_plane(tmp_path, **BUDGET)  # a new process: spend comes back from the ledger
        results = await _race(again, ctx, 20)
        await again.close()
        return results

    results = run(main())
    assert sum(not isinstance(r, BudgetExceeded) for r in results) == 10


def test_a_refused_or_failed_request_releases_its_reservation(tmp_path):
    async def main():
        plane = make_plane(tmp_path, **BUDGET)
        ctx = await plane.authenticate(Caller(None, None, None))
        line = plane._lines(ctx)[0]
        admission = await plane.admit(ctx, "refused", MODEL, 100, 100)
        admission.expect()(EngineDone("refused", accepted=False, output=None, error="queue full"))
        assert (await admission.settled()).status == "refused"
        spent, reserved = await plane.budgets.state(line)
        assert spent == Amount(0.0, 0) and reserved == Amount(0.0, 0)
        admission = await plane.admit(ctx, "cancelled", MODEL, 100, 100)
        finish(admission, 3, reason="abort")
        admission.close()  # nobody waits: a client that left
        for _ in range(100):
            if ledger_rows(plane):
                break
            await asyncio.sleep(0.01)
        spent, reserved = await plane.budgets.state(line)
        rows = ledger_rows(plane)
        await plane.close()
        return spent, reserved, rows

    spent, reserved, rows = run(main())
    assert reserved == Amount(0.0, 0) and spent.tokens == 103
    assert [(r.request_id, r.status) for r in rows] == [("cancelled", "cancelled")]


def test_soft_budget_applies_its_fallback(tmp_path):
    async def main():
        plane = make_plane(tmp_path, budgets=[{"scope": "tenant", "id": "*", "tokens": 250, "mode": "soft",
                                               "fallback": {"max_tokens": 8}}])
        ctx = await plane.authenticate(Caller(None, None, None))
        first = await plane.admit(ctx, "a", MODEL, 100, 100)
        second = await plane.admit(ctx, "b", MODEL, 100, 100)  # 400 tokens reserved > 250: soft, not refused
        await plane.close()
        return first, second, plane.num_soft_exceeded

    first, second, num_soft = run(main())
    assert (first.max_tokens, first.soft_over) == (100, [])
    assert second.max_tokens == 8 and "soft limit 250 tokens" in second.soft_over[0] and num_soft == 1


def test_agent_task_budgets(tmp_path):
    async def main():
        plane = make_plane(tmp_path, tasks={"max_calls": 3, "max_tool_calls": 2, "max_tokens": 1000})
        ctx = await plane.authenticate(Caller(None, None, "t1"))
        with pytest.raises(TaskNotFound):
            await plane.report_tool_calls(ctx, "t1")
        with pytest.raises(TaskNotFound):
            await plane.report_outcome(ctx, "t1", None, "resolved", 0.9)
        await _serve_one(plane, ctx, "c1", 100, 100, 100)
        assert (await plane.report_tool_calls(ctx, "t1", 2)).tool_calls == 2
        with pytest.raises(BudgetExceeded, match="max_tool_calls 2"):
            await plane.report_tool_calls(ctx, "t1")
        with pytest.raises(BudgetExceeded, match="task 't1': hard limit 1000 tokens in total"):
            await plane.admit(ctx, "huge", MODEL, 500, 500)
        await _serve_one(plane, ctx, "c2", 100, 100, 100)
        await _serve_one(plane, ctx, "c3", 100, 100, 100)
        with pytest.raises(BudgetExceeded, match="max_calls 3"):
            await plane.admit(ctx, "c4", MODEL, 1, 1)
        other = await plane.authenticate(Caller(None, None, "t2"))
        await _serve_one(plane, other, "d1", 1, 1, 1)  # another task has its own counts
        await plane.report_outcome(ctx, "t1", "wf", "resolved", 0.9)
        with pytest.raises(ValueError, match="outcome must be one of"):
            await plane.report_outcome(ctx, "t1", "wf", "solved", None)
        await plane.close()

    run(main())


def test_task_wall_time(tmp_path):
    async def main():
        plane = make_plane(tmp_path, tasks={"max_wall_s": 0.2})
        ctx = await plane.authenticate(Caller(None, None, "slow"))
        await _serve_one(plane, ctx, "c1")
        await asyncio.sleep(0.3)
        with pytest.raises(BudgetExceeded, match="max_wall_s 0.2 s"):
            await plane.admit(ctx, "c2", MODEL, 1, 1)
        await plane.close()

    run(main())


def test_shared_redis_and_postgres_hold_a_budget_across_replicas(tmp_path, redis_url, postgres_url):
    async def main():
        import redis.asyncio as aioredis

        await aioredis.from_url(redis_url).flushall()
        planes = [make_plane(tmp_path / str(i), redis_url=redis_url, database_url=postgres_url, **BUDGET)
                  for i in range(2)]
        with planes[0].db.begin() as conn:
            conn.execute(requests.delete())
        ctx = await planes[0].authenticate(Caller(None, None, None))
        results = await asyncio.gather(_race(planes[0], ctx, 100), _race(planes[1], ctx, 100))
        spent = sum(r.cost_usd for r in ledger_rows(planes[0]))
        for plane in planes:
            await plane.close()
        return [r for half in results for r in half], spent

    _check_race(*run(main()))


def test_redis_rate_limits_and_tasks(tmp_path, redis_url):
    async def main():
        import redis.asyncio as aioredis

        await aioredis.from_url(redis_url).flushall()
        plane = make_plane(tmp_path, redis_url=redis_url, tenants={"*": {"rpm": 2}}, tasks={"max_calls": 1})
        ctx = await plane.authenticate(Caller(None, None, "t"))
        await _serve_one(plane, ctx, "a")
        with pytest.raises(BudgetExceeded, match="max_calls 1"):
            await plane.admit(ctx, "b", MODEL, 1, 1)
        free = await plane.authenticate(Caller(None, None, None))
        await _serve_one(plane, free, "c")  # the refused call gave its rate-limit charge back
        with pytest.raises(RateLimitExceeded, match="requests per minute for tenant default"):
            await plane.admit(free, "d", MODEL, 1, 1)
        await plane.close()

    run(main())


def test_redis_reservations_of_a_dead_replica_expire_and_reconcile(tmp_path, redis_url):
    async def main():
        import redis.asyncio as aioredis

        await aioredis.from_url(redis_url).flushall()
        plane = make_plane(tmp_path, redis_url=redis_url, reservation_ttl_s=0.2, **BUDGET)
        plane.budgets.grace_s = 0.0
        ctx = await plane.authenticate(Caller(None, None, None))
        line = plane._lines(ctx)[0]
        await plane.admit(ctx, "crashed", MODEL, 100, 100)  # never settled: its replica "died" mid-request
        committed = await plane.admit(ctx, "committed", MODEL, 100, 100)
        finish(committed, 100)
        await committed.settled()
        # The second one died between its ledger commit and its settle: simulate by reserving again.
        row_only = await plane.admit(ctx, "row-only", MODEL, 100, 100)
        await plane.ledger.commit_request(_row(row_only, cost=0.0003))
        spent, reserved = await plane.budgets.state(line)
        assert reserved.usd == pytest.approx(0.0006)
        await asyncio.sleep(0.3)
        await plane.admit(ctx, "later", MODEL, 1, 1)  # sweeps the expired reservations
        counted = await plane.budgets.reconcile(plane._in_thread(queries.costs_of))
        spent_after, _ = await plane.budgets.state(line)
        await plane.close()
        return counted, spent, spent_after

    counted, spent, spent_after = run(main())
    assert counted == 1  # the one with a ledger row; the crashed one never answered anyone
    assert spent_after.usd == pytest.approx(spent.usd + 0.0003)


def _row(admission, cost):
    from serving.control.ledger import LedgerRow

    return LedgerRow(ts=time.time(), request_id=admission.request_id, admission_id=admission.admission_id,
                     replica="dead", tenant=admission.ctx.tenant, key_id=None, workflow=None, task=None, model=MODEL,
                     route="self-hosted:m", prompt_tokens=100, completion_tokens=100, cached_tokens=0, cost_usd=cost,
                     busy_s=0.0, ttft_ms=None, latency_ms=1.0, status="ok", error_code=None)
