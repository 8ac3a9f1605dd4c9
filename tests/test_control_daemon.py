"""The control plane in the real daemon, over HTTP and gRPC: keys and the errors for bad ones, model allowlists,
rate limits, tenant isolation of the prefix cache, the cost on every response and its ledger row, a hard budget
under 200 concurrent requests, agent task budgets, outcomes in `frugal report`, and cost attribution (the
request costs add up to price x engine busy time). Each runs on the native engine, and on the vLLM backend where
vLLM is installed (`make test-vllm`)."""
import asyncio
import json
import subprocess
import sys
import time

import grpc
import httpx
import pytest
import sqlalchemy as sa

from daemon_process import REPO_ROOT, DaemonProcess
from serving.control.store import requests as ledger
from serving.rpc.gen.frugal.v1 import inference_pb2 as pb
from serving.rpc.gen.frugal.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

PRICE_PER_HOUR = 2.50
RACE_PROMPT = list(range(1000, 1024))  # 24 prompt token ids
RACE_MAX_TOKENS = 8
RACE_ALLOWED = 50  # the budget holds exactly this many requests of that size
LONG_PROMPT = "The history of the city, told street by street. " * 20


@pytest.fixture(scope="module", params=["native", pytest.param("vllm", marks=pytest.mark.vllm)])
def daemon(tmp_path_factory, request):
    control = {"auth": "keys", "key_cache_s": 0.5,
               "budgets": [{"scope": "tenant", "id": "race", "period": "day", "mode": "hard",
                            "tokens": RACE_ALLOWED * (len(RACE_PROMPT) + RACE_MAX_TOKENS)}],
               "tasks": {"max_calls": 3, "max_tool_calls": 2}}
    proc = DaemonProcess(tmp_path_factory.mktemp("control"), http=True, control=control,
                         engine={"kv_cache_memory_bytes": "64MiB", "max_model_len": 512, "max_waiting": 256,
                                 "backend": request.param})
    proc.start()
    yield proc
    proc.stop()


def cli(daemon, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.cli", *args, "--config", str(daemon.config_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def create_key(daemon, tenant, *flags) -> str:
    result = cli(daemon, "keys", "create", "--tenant", tenant, "--json", *flags)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])["key"]


def http(daemon, path, key=None, headers=None, **body):
    hdrs = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    return httpx.post(f"http://127.0.0.1:{daemon.http_port}{path}", json=body, headers=hdrs, timeout=120)


def grpc_call(daemon, key, request, method="Generate", timeout=120):
    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        call = getattr(stub, method)
        metadata = (("authorization", f"Bearer {key}"),) if key else ()
        result = call(request, metadata=metadata, timeout=timeout)
        return list(result) if method == "GenerateStream" else result


def stats(daemon) -> pb.EngineStats:
    with grpc.insecure_channel(daemon.target) as channel:
        return pb_grpc.DebugServiceStub(channel).GetEngineStats(pb.GetEngineStatsRequest(), timeout=10)


def ledger_rows(daemon, **where):
    engine = sa.create_engine(f"sqlite:///{daemon.config_path.parent / 'frugal.db'}")
    try:
        with engine.connect() as conn:
            query = sa.select(ledger)
            for column, value in where.items():
                query = query.where(getattr(ledger.c, column) == value)
            return conn.execute(query).fetchall()
    finally:
        engine.dispose()


def test_missing_wrong_and_revoked_keys_are_refused(daemon):
    for key in (None, "frg_nope_nope"):
        resp = http(daemon, "/v1/completions", key, prompt="hi", max_tokens=2)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key", resp.text
        with pytest.raises(grpc.RpcError) as err:
            grpc_call(daemon, key, pb.GenerateRequest(prompt="hi"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    key = create_key(daemon, "acme")
    assert http(daemon, "/v1/completions", key, prompt="hi", max_tokens=2).status_code == 200
    key_id = key.split("_")[1]
    assert cli(daemon, "keys", "revoke", key_id).returncode == 0
    time.sleep(0.6)  # control.key_cache_s
    resp = http(daemon, "/v1/completions", key, prompt="hi", max_tokens=2)
    assert resp.status_code == 401 and "revoked" in resp.json()["error"]["message"]
    listed = json.loads(cli(daemon, "keys", "list", "--json").stdout)
    assert any(k["key_id"] == key_id and k["revoked_at"] for k in listed)
    assert key not in daemon.log_tail(200_000)  # keys are never logged


def test_model_allowlist_and_rate_limits(daemon):
    key = create_key(daemon, "acme", "--models", "some-other-model")
    resp = http(daemon, "/v1/completions", key, prompt="hi", max_tokens=2)
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "model_not_allowed"
    with pytest.raises(grpc.RpcError) as err:
        grpc_call(daemon, key, pb.GenerateRequest(prompt="hi"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    limited = create_key(daemon, "acme", "--rpm", "2")
    for _ in range(2):
        assert http(daemon, "/v1/completions", limited, prompt="hi", max_tokens=1).status_code == 200
    resp = http(daemon, "/v1/completions", limited, prompt="hi", max_tokens=1)
    assert resp.status_code == 429 and resp.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(resp.headers["retry-after"]) >= 1
    with pytest.raises(grpc.RpcError) as err:
        grpc_call(daemon, limited, pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=1)))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(dict(err.value.trailing_metadata())["retry-after-ms"]) > 0


def test_tenants_never_share_a_prefix(daemon):
    first, second = create_key(daemon, "tenant-a"), create_key(daemon, "tenant-b")
    body = {"prompt": LONG_PROMPT, "max_tokens": 2, "temperature": 0}

    def cached(key):
        return http(daemon, "/v1/completions", key, **body).json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached(first) == 0
    assert cached(first) > 0  # the same tenant reuses its own prefix
    hits = stats(daemon).prefix_cache_hits
    assert cached(second) == 0
    # A tenant id the client claims is ignored: the key decides.
    reply = grpc_call(daemon, second, pb.GenerateRequest(prompt=LONG_PROMPT, context=pb.RequestContext(
        tenant_id="tenant-a"), sampling=pb.SamplingParams(max_tokens=2, temperature=0)))
    assert reply.usage.cached_tokens > 0  # tenant-b's own prefix, from its request just before
    assert stats(daemon).prefix_cache_hits - hits == reply.usage.cached_tokens


def test_every_response_carries_its_cost_and_has_its_ledger_row(daemon):
    key = create_key(daemon, "costs")
    plain = http(daemon, "/v1/completions", key, prompt="Count: 1, 2,", max_tokens=6, temperature=0).json()
    streamed = httpx.post(f"http://127.0.0.1:{daemon.http_port}/v1/chat/completions", timeout=120,
                          headers={"Authorization": f"Bearer {key}"},
                          json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "stream": True})
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert chunks[-1]["usage"]["cost_usd"] > 0 and all(c.get("usage") is None for c in chunks[:-1])
    unary = grpc_call(daemon, key, pb.GenerateRequest(prompt="Count: 1, 2,", sampling=pb.SamplingParams(
        max_tokens=6, temperature=0)))
    stream = grpc_call(daemon, key, pb.GenerateRequest(prompt="Count: 1, 2,", sampling=pb.SamplingParams(
        max_tokens=6, temperature=0)), method="GenerateStream")
    assert unary.usage.cost_usd > 0 and stream[-1].usage.cost_usd > 0
    assert not any(c.usage.cost_usd for c in stream[:-1])
    # Every answer says how it was served: the route, why, and what a cache or the optimizer saved.
    route = f"self-hosted:{plain['model']}"
    assert plain["frugal"] == {"route": route, "reason": "the only route: one self-hosted model", "cache": None,
                               "similarity": None, "tokens_saved": 0}
    assert chunks[-1]["frugal"]["route"] == route and all(c.get("frugal") is None for c in chunks[:-1])
    assert unary.frugal.route == route and unary.frugal.reason and not unary.frugal.cache
    assert stream[-1].frugal.route == route and not any(c.HasField("frugal") for c in stream[:-1])
    rows = {r.request_id: r for r in ledger_rows(daemon, tenant="costs")}
    for request_id, cost in [(plain["id"], plain["usage"]["cost_usd"]), (chunks[-1]["id"], chunks[-1]["usage"]["cost_usd"]),
                             (unary.request_id, unary.usage.cost_usd), (stream[-1].request_id, stream[-1].usage.cost_usd)]:
        assert rows[request_id].cost_usd == pytest.approx(cost) and rows[request_id].status == "ok"
        assert rows[request_id].key_id == key.split("_")[1]


async def _race(base_url: str, key: str, num_requests: int) -> list[httpx.Response]:
    body = {"prompt": RACE_PROMPT, "max_tokens": RACE_MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(num_requests)))


def check_race(responses, spent_tokens: int) -> None:
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(ok) == RACE_ALLOWED, [r.text for r in refused[:3]]
    assert all(r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded" for r in refused)
    message = refused[0].json()["error"]["message"]
    assert message.startswith("budget_exceeded: tenant 'race': hard limit") and "per day" in message
    assert spent_tokens == RACE_ALLOWED * (len(RACE_PROMPT) + RACE_MAX_TOKENS)


def test_a_hard_budget_holds_under_200_concurrent_requests(daemon):
    key = create_key(daemon, "race")
    responses = asyncio.run(_race(f"http://127.0.0.1:{daemon.http_port}", key, 200))
    rows = ledger_rows(daemon, tenant="race")
    check_race(responses, sum(r.prompt_tokens + r.completion_tokens for r in rows))
    with pytest.raises(grpc.RpcError) as err:  # the budget is spent for gRPC callers too
        grpc_call(daemon, key, pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=RACE_PROMPT),
                                                  sampling=pb.SamplingParams(max_tokens=RACE_MAX_TOKENS)))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.details().startswith("budget_exceeded: tenant 'race'")


def test_agent_task_budgets_outcomes_and_the_report(daemon):
    key = create_key(daemon, "agents")
    task = {"x-frugal-task-id": "ticket-42", "x-frugal-workflow-id": "support"}
    resp = http(daemon, "/v1/tasks/ticket-42/tool_calls", key, count=1)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "task_not_found"
    for _ in range(3):
        assert http(daemon, "/v1/completions", key, task, prompt="Step:", max_tokens=2).status_code == 200
    resp = http(daemon, "/v1/completions", key, task, prompt="Step:", max_tokens=2)
    assert resp.status_code == 429 and "max_calls 3" in resp.json()["error"]["message"]
    assert http(daemon, "/v1/tasks/ticket-42/tool_calls", key, count=2).json()["tool_calls"] == 2
    resp = http(daemon, "/v1/tasks/ticket-42/tool_calls", key, count=1)
    assert resp.status_code == 429 and resp.json()["error"]["code"] == "budget_exceeded"
    assert http(daemon, "/v1/outcomes", key, task_id="ticket-42", workflow_id="support", outcome="resolved",
                quality=0.9).status_code == 200
    resp = http(daemon, "/v1/outcomes", key, task_id="ticket-42", outcome="solved")
    assert resp.status_code == 400
    grpc_call(daemon, key, pb.ReportOutcomeRequest(task_id="ticket-42", outcome="resolved"), method="ReportOutcome")
    with pytest.raises(grpc.RpcError) as err:
        grpc_call(daemon, key, pb.ReportToolCallsRequest(task_id="nope"), method="ReportToolCalls")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    report = cli(daemon, "report", "--by", "outcome", "--since", "1h", "--json")
    assert report.returncode == 0, report.stderr
    (resolved,) = [row for row in json.loads(report.stdout)["rows"] if row["group"] == "resolved"]
    assert (resolved["requests"], resolved["tasks"], resolved["resolved"]) == (3, 1, 1)
    assert resolved["cost_usd"] > 0 and resolved["cost_per_resolved_usd"] == pytest.approx(resolved["cost_usd"])
    by_workflow = json.loads(cli(daemon, "report", "--by", "workflow", "--json").stdout)["rows"]
    assert any(row["group"] == "support" and row["requests"] == 3 for row in by_workflow)
    table = cli(daemon, "report", "--by", "tenant")
    assert table.returncode == 0 and "agents" in table.stdout and "idle cost" in table.stdout


def test_request_costs_add_up_to_price_times_busy_time(daemon):
    key = create_key(daemon, "attribution")
    busy_before = stats(daemon).busy_s

    async def load():
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.http_port}", timeout=300,
                                     headers={"Authorization": f"Bearer {key}"}) as client:
            prompts = [LONG_PROMPT[: 40 + 17 * i] for i in range(16)]
            return await asyncio.gather(*(client.post("/v1/completions", json={
                "prompt": p, "max_tokens": 12 + i, "temperature": 0, "ignore_eos": True})
                for i, p in enumerate(prompts)))

    responses = asyncio.run(load())
    assert all(r.status_code == 200 for r in responses)
    busy = stats(daemon).busy_s - busy_before
    total = sum(r.cost_usd for r in ledger_rows(daemon, tenant="attribution"))
    assert total == pytest.approx(busy * PRICE_PER_HOUR / 3600, rel=0.01)
    assert sum(r.json()["usage"]["cost_usd"] for r in responses) == pytest.approx(total)
