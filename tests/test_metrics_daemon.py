"""/metrics of a real daemon with the control plane on: cost, requests, refusals, budgets remaining and outcomes
equal what the ledger holds; and a real Prometheus server scrapes the daemon under load and reads the saturation
signal, the queue and the cost by tenant back through PromQL with the values the daemon itself shows."""
from __future__ import annotations

import threading
import time
from collections import defaultdict

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.services import prometheus_server
from daemon_process import DaemonProcess
from serving.control.store import requests as ledger
from test_control_daemon import create_key
from serving.metrics import names

pytestmark = pytest.mark.slow

TARGET_QUEUE_DEPTH = 2
ACME_USD = 1.0
TIGHT_TOKENS = 20  # one request of "Say something." and 8 tokens fits, a second does not


@pytest.fixture(scope="module", params=["native", pytest.param("vllm", marks=pytest.mark.vllm)])
def daemon(tmp_path_factory, request):
    control = {"auth": "keys", "key_cache_s": 0.5, "tenants": {"slow": {"rpm": 2}},
               "budgets": [{"scope": "tenant", "id": "acme", "usd": ACME_USD, "period": "day", "mode": "hard"},
                           {"scope": "tenant", "id": "tight", "tokens": TIGHT_TOKENS, "period": "day",
                            "mode": "hard"}]}
    proc = DaemonProcess(tmp_path_factory.mktemp("metrics"), http=True, control=control,
                         metrics={"target_queue_depth": TARGET_QUEUE_DEPTH, "workflows": ["support"]},
                         engine={"kv_cache_memory_bytes": "64MiB", "max_model_len": 512, "max_num_seqs": 1,
                                 "backend": request.param})
    proc.start()
    yield proc
    proc.stop()




def complete(daemon, key, headers=None, max_tokens=4, prompt="Say something."):
    return httpx.post(f"http://127.0.0.1:{daemon.http_port}/v1/completions", timeout=120,
                      headers={"Authorization": f"Bearer {key}", **(headers or {})},
                      json={"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0})


def scrape(daemon) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} of the daemon's /metrics."""
    resp = httpx.get(f"http://127.0.0.1:{daemon.http_port}/metrics", timeout=30)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def sample(samples, name, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{key} not exported; have {sorted(k for k in samples if k[0] == name)}"
    return samples[key]


def ledger_rows(daemon):
    engine = sa.create_engine(f"sqlite:///{daemon.config_path.parent / 'frugal.db'}")
    try:
        with engine.connect() as conn:
            return conn.execute(sa.select(ledger)).fetchall()
    finally:
        engine.dispose()


def test_cost_refusals_budgets_and_outcomes_equal_the_ledger(daemon):
    keys = {tenant: create_key(daemon, tenant) for tenant in ("acme", "slow", "tight", "newco")}
    support = {"x-frugal-workflow-id": "support", "x-frugal-task-id": "ticket-7"}
    for headers in (support, support, {"x-frugal-workflow-id": "invented-by-a-client"}, {}):
        assert complete(daemon, keys["acme"], headers).status_code == 200
    assert complete(daemon, keys["newco"]).status_code == 200
    statuses = [complete(daemon, keys["slow"], max_tokens=2).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert complete(daemon, keys["tight"], max_tokens=8).status_code == 200
    refused = complete(daemon, keys["tight"], max_tokens=8)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "budget_exceeded"
    resp = httpx.post(f"http://127.0.0.1:{daemon.http_port}/v1/outcomes", timeout=30,
                      headers={"Authorization": f"Bearer {keys['acme']}"},
                      json={"task_id": "ticket-7", "workflow_id": "support", "outcome": "resolved"})
    assert resp.status_code == 200, resp.text

    rows = ledger_rows(daemon)
    samples = scrape(daemon)
    model = rows[0].model
    cost = defaultdict(float)
    count = defaultdict(int)
    for r in rows:
        workflow = "none" if r.workflow is None else ("support" if r.workflow == "support" else "other")
        cost[(r.tenant, workflow)] += r.cost_usd
        count[(r.tenant, r.status)] += 1
    for (tenant, workflow), usd in cost.items():
        assert sample(samples, names.COST_USD, tenant=tenant, workflow=workflow, model_name=model) == \
            pytest.approx(usd, rel=1e-9)
    for (tenant, status), n in count.items():
        assert sample(samples, names.REQUESTS, tenant=tenant, model_name=model, status=status) == n
    assert ("newco", "ok") in count  # a tenant from the key store, not the config, keeps its own label
    assert sample(samples, names.REQUESTS, tenant="slow", model_name=model, status="rate_limited") == 1
    assert sample(samples, names.RATE_LIMITED, tenant="slow") == 1
    assert sample(samples, names.REQUESTS, tenant="tight", model_name=model, status="budget_exceeded") == 1
    assert sample(samples, names.BUDGET_REFUSALS, tenant="tight") == 1
    day = time.strftime("%Y-%m-%d", time.gmtime())
    acme_spent = sum(r.cost_usd for r in rows if r.tenant == "acme")
    assert sample(samples, names.BUDGET_REMAINING_USD, scope="tenant", tenant="acme", id="acme", period=day) == \
        pytest.approx(ACME_USD - acme_spent, rel=1e-9)
    tight_tokens = sum(r.prompt_tokens + r.completion_tokens for r in rows if r.tenant == "tight")
    assert sample(samples, names.BUDGET_REMAINING_TOKENS, scope="tenant", tenant="tight", id="tight",
                  period=day) == TIGHT_TOKENS - tight_tokens
    task_cost = sum(r.cost_usd for r in rows if r.task == "ticket-7")
    assert sample(samples, names.TASKS, outcome="resolved") == 1
    assert sample(samples, names.TASK_COST_USD, outcome="resolved") == pytest.approx(task_cost, rel=1e-9)
    # One model: nothing to escalate to, so no (model_name, to_model) series exists.
    assert not [k for k in samples if k[0] == names.ESCALATIONS]
    generated = sum(r.completion_tokens for r in rows)
    assert sample(samples, names.GENERATION_TOKENS, model_name=model) >= generated  # plus the warm-up's
    assert not [k for k in samples if k[0].startswith("frugal:gpu")]  # no GPU here: absent, not an error


def promql(url: str, query: str) -> list[dict]:
    resp = httpx.get(f"{url}/api/v1/query", params={"query": query}, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()["data"]["result"]


def test_prometheus_reads_saturation_queue_and_cost_back(daemon):
    key = create_key(daemon, "acme")
    with prometheus_server([f"127.0.0.1:{daemon.http_port}"], scrape_interval_s=0.5) as prom:
        # One long request holds the only batch slot (max_num_seqs 1); the rest wait behind it.
        def client(max_tokens):
            complete(daemon, key, max_tokens=max_tokens)

        threads = [threading.Thread(target=client, args=(480,))]
        threads[0].start()
        time.sleep(0.5)
        threads += [threading.Thread(target=client, args=(2,)) for _ in range(5)]
        for t in threads[1:]:
            t.start()
        # The queue holds still while the long request decodes: the daemon and Prometheus must agree on it.
        deadline = time.monotonic() + 60
        while True:
            before = scrape(daemon)
            result = promql(prom, names.NUM_REQUESTS_WAITING)
            saturation = promql(prom, names.SATURATION)
            after = scrape(daemon)
            model = result[0]["metric"]["model_name"] if result else None
            waiting = sample(before, names.NUM_REQUESTS_WAITING, model_name=model) if model else None
            if model and waiting == 5 and sample(after, names.NUM_REQUESTS_WAITING, model_name=model) == 5 and \
                    float(result[0]["value"][1]) == 5 and float(saturation[0]["value"][1]) == \
                    sample(after, names.SATURATION, model_name=model):
                break
            assert time.monotonic() < deadline, f"Prometheus never read the queue: {result} {saturation}; daemon: {waiting}"
            time.sleep(0.25)
        assert float(saturation[0]["value"][1]) == pytest.approx(5 / TARGET_QUEUE_DEPTH)  # over target: scale out
        for t in threads:
            t.join(timeout=120)
        # Once the load is over, the cost by tenant Prometheus holds is the daemon's, series for series.
        deadline = time.monotonic() + 30
        while True:
            ours = scrape(daemon)
            by_tenant = defaultdict(float)
            for (name, labels), v in ours.items():
                if name == names.COST_USD:
                    by_tenant[dict(labels)["tenant"]] += v
            theirs = {r["metric"]["tenant"]: float(r["value"][1])
                      for r in promql(prom, f"sum by (tenant) ({names.COST_USD})")}
            if theirs and theirs.keys() == by_tenant.keys() and \
                    all(theirs[t] == pytest.approx(by_tenant[t], rel=1e-9) for t in theirs):
                break
            assert time.monotonic() < deadline, f"cost by tenant: Prometheus {theirs}, daemon {dict(by_tenant)}"
            time.sleep(0.25)
        assert by_tenant["acme"] > 0
        idle = promql(prom, f"{names.SATURATION}")
        assert float(idle[0]["value"][1]) <= 1.0
