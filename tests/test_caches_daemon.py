"""The response caches in a real daemon: a repeated chat request is answered by the exact cache, a paraphrase by
the semantic cache (with its similarity), a changed order number is not; hits cost nothing, their ledger rows
record what they saved, the metrics count them, streams are served too, and a tenant never gets another
tenant's answer. And the prompt optimizer on the same path: a tenant with its steps on sends fewer tokens, the
relevant context chunks only, and is told (and billed) for what it saved."""
from __future__ import annotations

import json
import time

import httpx
import pytest
import sqlalchemy as sa

from daemon_process import DaemonProcess
from serving.control.store import requests as ledger
from test_control_daemon import create_key
from serving.metrics import names

pytestmark = pytest.mark.slow


def cost_path_daemon(workdir) -> DaemonProcess:
    """A daemon with both caches on and the optimizer's steps for tenant "lean" (also the gRPC tests')."""
    return DaemonProcess(workdir, http=True, control={"auth": "keys"},
                         caches={"exact": {"enabled": True}, "semantic": {"enabled": True}},
                         optimizer={"tenants": {"lean": {"whitespace": True, "dedupe": True, "max_tokens_cap": 8,
                                                         "context": {"max_tokens": 120, "min_similarity": 0.3}}}},
                         engine={"kv_cache_memory_bytes": "64MiB", "max_model_len": 512})


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    proc = cost_path_daemon(tmp_path_factory.mktemp("caches"))
    proc.start()
    yield proc
    proc.stop()




def chat(daemon, key, question, headers=None, **extra):
    body = {"messages": [{"role": "system", "content": "You are the support desk of Acme."},
                         {"role": "user", "content": question}], "max_tokens": 96, "stop": ["\n"], "temperature": 0, **extra}
    resp = httpx.post(f"http://127.0.0.1:{daemon.http_port}/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {key}", **(headers or {})})
    assert resp.status_code == 200, resp.text
    return resp


def until_cached(daemon, key, question, kind="exact", headers=None, **extra):
    """Answers are stored in the background, after the response: ask until the cache answers."""
    deadline = time.monotonic() + 30
    while True:
        resp = chat(daemon, key, question, headers, **extra).json()
        if resp["frugal"]["cache"] == kind:
            return resp
        assert time.monotonic() < deadline, f"never served from the {kind} cache: {resp['frugal']}"
        time.sleep(0.2)


def ledger_rows(daemon):
    engine = sa.create_engine(f"sqlite:///{daemon.config_path.parent / 'frugal.db'}")
    try:
        with engine.connect() as conn:
            return {r.request_id: r for r in conn.execute(sa.select(ledger)).fetchall()}
    finally:
        engine.dispose()


def metric(daemon, name, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{daemon.http_port}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"{name} {labels} not exported")


def test_exact_and_semantic_hits_cost_nothing_and_record_their_savings(daemon):
    key = create_key(daemon, "acme")
    first = chat(daemon, key, "How do I reset my password?").json()
    assert first["frugal"]["cache"] is None and first["usage"]["cost_usd"] > 0
    # NOTE: the semantic cache keeps complete answers only, so the answers here must end by themselves.
    assert first["choices"][0]["finish_reason"] == "stop"
    hit = until_cached(daemon, key, "How do I reset my password?")
    assert hit["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    assert hit["usage"]["cost_usd"] == 0 and hit["frugal"]["route"] == "cache:exact"
    assert hit["frugal"]["similarity"] == 1.0
    rows = ledger_rows(daemon)
    assert rows[hit["id"]].cost_usd == 0 and rows[hit["id"]].cache == "exact"
    assert rows[hit["id"]].saved_usd == pytest.approx(first["usage"]["cost_usd"])

    paraphrase = chat(daemon, key, "How can I reset my password?").json()
    assert paraphrase["frugal"]["cache"] == "semantic", paraphrase["frugal"]
    assert 0.85 <= paraphrase["frugal"]["similarity"] < 1.0
    assert paraphrase["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]

    # A changed order number is another question: the guard refuses the near neighbour, the model answers.
    chat(daemon, key, "Please refund order 1234.")
    time.sleep(1.0)  # its answer is stored in the background
    other = chat(daemon, key, "Please refund order 5678.").json()
    assert other["frugal"]["cache"] is None and other["usage"]["cost_usd"] > 0

    assert chat(daemon, key, "How do I reset my password?", {"x-frugal-cache": "off"}).json()["frugal"]["cache"] \
        is None
    assert metric(daemon, names.EXACT_CACHE_HITS) >= 1 and metric(daemon, names.SEMANTIC_CACHE_HITS) >= 1
    assert metric(daemon, names.CACHE_SAVED_USD, tenant="acme") >= rows[hit["id"]].saved_usd


def test_a_stream_is_served_from_the_cache(daemon):
    key = create_key(daemon, "streamer")
    first = chat(daemon, key, "What are your opening hours?").json()
    until_cached(daemon, key, "What are your opening hours?")
    resp = chat(daemon, key, "What are your opening hours?", stream=True, stream_options={"include_usage": True})
    chunks = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")]
    assert resp.text.rstrip().endswith("data: [DONE]")
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == first["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["cost_usd"] == 0
    assert chunks[-1]["frugal"]["cache"] == "exact"


def test_a_streamed_answer_is_stored_too(daemon):
    key = create_key(daemon, "streamed-first")
    question = "Do you ship to Canada?"
    resp = chat(daemon, key, question, stream=True)
    chunks = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    hit = until_cached(daemon, key, question)  # nobody asked unary first: the stream's answer was stored
    assert hit["choices"][0]["message"]["content"] == streamed and hit["usage"]["cost_usd"] == 0


def test_a_tenant_never_gets_another_tenants_answer(daemon):
    owner = create_key(daemon, "owner")
    chat(daemon, owner, "Where is my invoice for March?")
    until_cached(daemon, owner, "Where is my invoice for March?")
    assert chat(daemon, owner, "Where can I find my invoice for March?").json()["frugal"]["cache"] == "semantic"
    # Each stranger asks once (its own answer is stored after it), so any hit could only be the owner's.
    for i, question in enumerate(("Where is my invoice for March?", "Where can I find my invoice for March?")):
        stranger = create_key(daemon, f"stranger-{i}")
        assert chat(daemon, stranger, question).json()["frugal"]["cache"] is None


REFUND_CHUNKS = [
    "Shipping: orders leave our warehouse within two business days.",
    "Refunds: a refund goes back to the original payment method within 5 to 10 business days.",
    "Passwords: reset yours from the sign-in page with the Forgot password link.",
    "Invoices: every invoice is in Billing, under Documents, as a PDF.",
    "Refunds: to ask for a refund, open the order and choose Request a refund within 30 days.",
    "API keys: create and revoke keys in Settings, under Developers.",
]


def test_the_optimizer_sends_fewer_tokens_and_reports_them(daemon):
    keys = {tenant: create_key(daemon, tenant) for tenant in ("lean", "plain")}
    instruction = "Always answer politely and in one sentence, and never promise a date you cannot keep."
    body = {"messages": [{"role": "system", "content": f"You are Acme's support desk.\n\n{instruction}"},
                         {"role": "user", "content": f"{instruction}\n\nHow   do I    get my money back?"}],
            "context_chunks": REFUND_CHUNKS, "max_tokens": 32, "temperature": 0}
    answers = {}
    for tenant, key in keys.items():
        resp = httpx.post(f"http://127.0.0.1:{daemon.http_port}/v1/chat/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {key}", "x-frugal-cache": "off"})
        assert resp.status_code == 200, resp.text
        answers[tenant] = resp.json()
    lean, plain = answers["lean"], answers["plain"]
    assert plain["frugal"]["tokens_saved"] == 0  # no step for this tenant: every chunk goes in, nothing removed
    saved = lean["frugal"]["tokens_saved"]
    assert saved > 0 and lean["usage"]["prompt_tokens"] < plain["usage"]["prompt_tokens"]
    assert lean["usage"]["completion_tokens"] <= 8  # the cap
    rows = ledger_rows(daemon)
    assert rows[lean["id"]].tokens_saved == saved
    assert metric(daemon, names.TOKENS_SAVED, tenant="lean") >= saved
    bad = httpx.post(f"http://127.0.0.1:{daemon.http_port}/v1/chat/completions", timeout=60,
                     headers={"Authorization": f"Bearer {keys['lean']}"},
                     json={**body, "messages": [{"role": "system", "content": "Only a system prompt."}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "context_chunks"
