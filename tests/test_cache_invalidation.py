"""Cache invalidation, in a real daemon with the exact cache on, in process and in Redis: a tenant's invalidation
drops its own cached answers (the next identical request runs the model) and never another tenant's; a tag drops
only the entries stored with it; the body cannot name a tenant, only an admin key's x-frugal-tenant-id can; the
metrics count invalidations; `frugal cache invalidate` drops entries in Redis and says why it cannot in process.
Without caches, the route answers 404 caches_disabled."""
from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from daemon_process import DaemonProcess
from serving.control.config import control_config
from serving.control.keys import KeyStore
from serving.control.plane import ControlPlane
from serving.control.store import open_database
from serving.http.cache_admin import install_cache_routes
from serving.http.errors import install_error_handlers
from serving.metrics import names
from test_caches_daemon import chat, metric, until_cached
from test_control_daemon import cli

SHORT = {"max_tokens": 12}  # every miss runs the model: keep its answers short


def _daemon(tmp_path_factory, name: str, **control) -> DaemonProcess:
    engine = {"kv_cache_memory_bytes": "64MiB", "max_model_len": 512}
    return DaemonProcess(tmp_path_factory.mktemp(name), http=True, caches={"exact": {"enabled": True}},
                         control={"auth": "keys", **control}, engine=engine).start()


# NOTE: each daemon starts when a test first needs it, so `-k local_daemon` loads one model only.
@pytest.fixture(scope="module")
def local_daemon(tmp_path_factory):
    proc = _daemon(tmp_path_factory, "invalidate-local")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def redis_daemon(tmp_path_factory, redis_url):
    proc = _daemon(tmp_path_factory, "invalidate-redis", redis_url=redis_url)
    yield proc
    proc.stop()


@pytest.fixture(scope="module", params=["local_daemon", "redis_daemon"])
def daemon(request):
    """Each behaviour on both stores: the tests' tenants are the same, the stores are not."""
    return request.getfixturevalue(request.param)


def create_key(daemon, tenant, role="user") -> str:
    """A key in the daemon's key store, as `frugal keys create` makes it, without a process per key."""
    engine = open_database(f"sqlite:///{daemon.config_path.parent / 'frugal.db'}")
    try:
        return KeyStore(engine).create(tenant, role)[0]
    finally:
        engine.dispose()


def invalidate(daemon, key, headers=None, **body) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{daemon.http_port}/v1/cache/invalidate", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {key}", **(headers or {})})


def cache_of(daemon, key, question, headers=None) -> str | None:
    return chat(daemon, key, question, headers, **SHORT).json()["frugal"]["cache"]


@pytest.mark.slow
def test_a_tenants_invalidation_drops_its_answers_and_no_one_elses(daemon):
    keys = {tenant: create_key(daemon, tenant) for tenant in ("alpha", "beta")}
    for key in keys.values():
        until_cached(daemon, key, "How do I reset my password?", **SHORT)
    before = metric(daemon, names.CACHE_INVALIDATIONS, kind="tenant")
    resp = invalidate(daemon, keys["alpha"])
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"object": "cache.invalidation", "tenant": "alpha", "tag": None, "removed": 1}
    assert cache_of(daemon, keys["alpha"], "How do I reset my password?") is None
    assert cache_of(daemon, keys["beta"], "How do I reset my password?") == "exact"
    assert metric(daemon, names.CACHE_INVALIDATIONS, kind="tenant") == before + 1


@pytest.mark.slow
def test_a_tag_drops_only_the_entries_that_carry_it(daemon):
    key = create_key(daemon, "tagged")
    questions = {"Where is my invoice?": "faq,billing", "What are your opening hours?": "hours", "Who are you?": ""}
    for question, tags in questions.items():
        until_cached(daemon, key, question, headers={"x-frugal-cache-tags": tags}, **SHORT)
    before = metric(daemon, names.CACHE_INVALIDATIONS, kind="tag")
    resp = invalidate(daemon, key, tag="faq")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"object": "cache.invalidation", "tenant": "tagged", "tag": "faq", "removed": 1}
    assert cache_of(daemon, key, "Where is my invoice?") is None
    assert cache_of(daemon, key, "What are your opening hours?") == "exact"
    assert cache_of(daemon, key, "Who are you?") == "exact"
    assert invalidate(daemon, key, tag="faq").json()["removed"] == 0  # nothing carries it any more
    assert metric(daemon, names.CACHE_INVALIDATIONS, kind="tag") == before + 2

    bad = invalidate(daemon, key, tag="faq,billing")  # two tags: no entry carries that one
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tag", bad.text
    assert bad.json()["error"]["code"] == "invalid_tag"


@pytest.mark.slow
def test_only_an_admin_key_reaches_another_tenant_and_only_by_its_header(daemon):
    victim, intruder = create_key(daemon, "victim"), create_key(daemon, "intruder")
    until_cached(daemon, victim, "Where is my parcel?", **SHORT)
    for body in ({"tenant": "victim"}, {"tag": None, "tenant_id": "victim"}):
        resp = invalidate(daemon, intruder, **body)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] in ("tenant", "tenant_id") and "extra inputs" in error["message"].lower(), error
    # A user key's x-frugal-tenant-id is ignored: the call acts for the key's own tenant.
    resp = invalidate(daemon, intruder, headers={"x-frugal-tenant-id": "victim"})
    assert resp.status_code == 200 and resp.json()["tenant"] == "intruder" and resp.json()["removed"] == 0
    assert invalidate(daemon, "not-a-key").status_code == 401
    assert cache_of(daemon, victim, "Where is my parcel?") == "exact"

    admin = create_key(daemon, "ops", role="admin")
    resp = invalidate(daemon, admin, headers={"x-frugal-tenant-id": "victim"})
    assert resp.status_code == 200 and resp.json()["tenant"] == "victim" and resp.json()["removed"] == 1
    assert cache_of(daemon, victim, "Where is my parcel?") is None


@pytest.mark.slow
def test_the_cli_invalidates_the_redis_store_and_explains_the_in_process_one(local_daemon, redis_daemon):
    key = create_key(redis_daemon, "cli")
    until_cached(redis_daemon, key, "Can I change my plan?", headers={"x-frugal-cache-tags": "plans"}, **SHORT)
    until_cached(redis_daemon, key, "Can I cancel my plan?", **SHORT)
    result = cli(redis_daemon, "cache", "invalidate", "--tenant", "cli", "--tag", "plans", "--json")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == \
        '{"object": "cache.invalidation", "tenant": "cli", "tag": "plans", "removed": 1}'
    assert cache_of(redis_daemon, key, "Can I change my plan?") is None
    assert cache_of(redis_daemon, key, "Can I cancel my plan?") == "exact"

    result = cli(local_daemon, "cache", "invalidate", "--tenant", "cli")
    assert result.returncode == 2 and "control.redis_url is not set" in result.stderr, result.stderr


def test_without_caches_the_route_says_so(tmp_path):
    plane = ControlPlane.open(control_config({"data_dir": str(tmp_path)}), "m")
    app = FastAPI()
    install_error_handlers(app)
    install_cache_routes(app, SimpleNamespace(control=plane))
    try:
        with TestClient(app) as client:
            resp = client.post("/v1/cache/invalidate", json={})
            assert resp.status_code == 404, resp.text
            error = resp.json()["error"]
            assert error["code"] == "caches_disabled" and error["type"] == "not_found_error"
            assert "caches.exact.enabled" in error["message"]
            assert client.post("/v1/cache/invalidate", json={"tenant": "x"}).status_code == 400
    finally:
        plane.ledger.close()
        plane.db.dispose()
