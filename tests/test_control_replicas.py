"""Two daemons sharing PostgreSQL (the ledger, the keys) and Redis (budget and rate-limit counters): a hard budget
holds across both under 200 concurrent requests, and a replica killed with SIGKILL under load leaves a consistent
state behind: every response a client received has its ledger row, the dead replica's reservations expire, and
the budget's spend equals the ledger's once they are reconciled."""
import asyncio
import datetime as dt
import threading
import time

import httpx
import pytest
import redis
import sqlalchemy as sa

from daemon_process import DaemonProcess
from serving.control.store import requests as ledger
from test_control_daemon import RACE_ALLOWED, RACE_MAX_TOKENS, RACE_PROMPT, _race, check_race, create_key

pytestmark = pytest.mark.slow

RESERVATION_TTL_S = 3.0


def control(postgres_url, redis_url) -> dict:
    return {"auth": "keys", "database_url": postgres_url, "redis_url": redis_url,
            "reservation_ttl_s": RESERVATION_TTL_S,
            "budgets": [{"scope": "tenant", "id": "race", "period": "day", "mode": "hard",
                         "tokens": RACE_ALLOWED * (len(RACE_PROMPT) + RACE_MAX_TOKENS)},
                        {"scope": "tenant", "id": "crash", "period": "day", "mode": "hard", "tokens": 10**9}]}


def make_daemon(tmp_path_factory, name, postgres_url, redis_url) -> DaemonProcess:
    return DaemonProcess(tmp_path_factory.mktemp(name), http=True, control=control(postgres_url, redis_url),
                         engine={"kv_cache_memory_bytes": "48MiB", "max_model_len": 256, "max_waiting": 256})


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, postgres_url, redis_url):
    redis.from_url(redis_url).flushall()
    engine = sa.create_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS requests, outcomes, tool_calls, engine_time, api_keys"))
    engine.dispose()
    daemons = [make_daemon(tmp_path_factory, f"replica{i}", postgres_url, redis_url) for i in range(2)]
    for d in daemons:
        d.launch()
    for d in daemons:
        d.wait_serving()
    yield daemons
    for d in daemons:
        d.stop()




def rows(postgres_url, tenant):
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.select(ledger).where(ledger.c.tenant == tenant)).fetchall()
    finally:
        engine.dispose()


def budget_line(redis_url, tenant) -> dict:
    day = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    return redis.from_url(redis_url, decode_responses=True).hgetall(f"frugal:b:tenant:{tenant}:{tenant}:day:{day}")


def test_a_budget_holds_across_two_replicas(replicas, postgres_url):
    key = create_key(replicas[0], "race")  # one key store for both: PostgreSQL
    # One request through each replica first, so both have served from the shared line whatever the race does.
    first = [httpx.post(f"http://127.0.0.1:{d.http_port}/v1/completions", timeout=120,
                        headers={"Authorization": f"Bearer {key}"},
                        json={"prompt": RACE_PROMPT, "max_tokens": RACE_MAX_TOKENS, "temperature": 0,
                              "ignore_eos": True}) for d in replicas]
    assert [r.status_code for r in first] == [200, 200], [r.text for r in first]

    async def both():
        halves = await asyncio.gather(*(_race(f"http://127.0.0.1:{d.http_port}", key, 100) for d in replicas))
        return [r for half in halves for r in half]

    responses = first + asyncio.run(both())
    served = rows(postgres_url, "race")
    check_race(responses, sum(r.prompt_tokens + r.completion_tokens for r in served))
    assert len({r.replica for r in served}) == 2


def test_a_killed_replica_leaves_a_consistent_state(replicas, tmp_path_factory, postgres_url, redis_url):
    victim = replicas[1]
    key = create_key(victim, "crash")
    received: list[str] = []
    stop = threading.Event()

    def client():
        with httpx.Client(base_url=f"http://127.0.0.1:{victim.http_port}", timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as c:
            while not stop.is_set():
                try:
                    resp = c.post("/v1/completions", json={"prompt": "Tell me a story.", "max_tokens": 24,
                                                           "ignore_eos": True, "temperature": 0})
                except httpx.HTTPError:
                    return  # the replica is gone
                if resp.status_code == 200:
                    received.append(resp.json()["id"])

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(received) < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.kill()  # mid-load: some requests were running, some were committing
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert len(received) >= 12
    committed = {r.request_id for r in rows(postgres_url, "crash")}
    assert set(received) <= committed, "a client received an answer that has no ledger row"

    reserved_after_kill = int(budget_line(redis_url, "crash").get("rt", 0))
    assert reserved_after_kill > 0  # the dead replica's requests still hold their reservations
    restarted = make_daemon(tmp_path_factory, "restarted", postgres_url, redis_url).start()
    try:
        # Reservations expire after their TTL; one TTL later the survivors reconcile them with the ledger.
        deadline = time.monotonic() + 10 * RESERVATION_TTL_S + 30
        while True:
            line = budget_line(redis_url, "crash")
            ledger_tokens = sum(r.prompt_tokens + r.completion_tokens for r in rows(postgres_url, "crash"))
            settled = int(line.get("rt", 0)) == 0 and not redis.from_url(redis_url).hlen(
                f"frugal:b:tenant:crash:crash:day:{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}:expired")
            if settled and int(line["st"]) == ledger_tokens:
                break
            assert time.monotonic() < deadline, f"not reconciled: {line}, ledger {ledger_tokens} tokens"
            time.sleep(0.5)
        # The budget serves again from the restarted replica, and its spend keeps matching the ledger.
        resp = httpx.post(f"http://127.0.0.1:{restarted.http_port}/v1/completions", timeout=60,
                          headers={"Authorization": f"Bearer {key}"}, json={"prompt": "hi", "max_tokens": 2})
        assert resp.status_code == 200
        ledger_tokens = sum(r.prompt_tokens + r.completion_tokens for r in rows(postgres_url, "crash"))
        assert int(budget_line(redis_url, "crash")["st"]) == ledger_tokens
    finally:
        restarted.stop()
