"""External routes (serving/control/upstream): the client of an upstream OpenAI-compatible API.

Against a small misbehaving server (tests/upstream_faults.py): timeouts, retries with backoff and Retry-After,
the circuit breaker, non-retryable 4xx, garbage answers and cut streams. Against a real second frugal daemon
(slow): unary and streamed pass-through, usage and cost from its own counts, the key as a Bearer token.
"""
import asyncio
import json
import logging
import random
import subprocess
import sys
import threading

import httpx
import pytest

import upstream_faults as faults
from daemon_process import REPO_ROOT, DaemonProcess, free_port
from serving.control.upstream import (CircuitBreaker, CircuitState, UpstreamClient, UpstreamError, UpstreamRoute,
                                      upstream_routes)
from serving.control.upstream.retry import backoff_s

SECRET = "sk-test-4f1c9e0b7a-do-not-log"
PRICES = dict(usd_per_m_input=3.0, usd_per_m_cached_input=0.5, usd_per_m_output=15.0)
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"prompt": "hi", "max_tokens": 4}


@pytest.fixture(scope="module")
def server():
    with faults.FaultServer() as s:
        yield s


def route(base_url, **overrides) -> UpstreamRoute:
    raw = dict(id="r", base_url=base_url, model="provider-model", max_retries=2, backoff_s=0.02, backoff_max_s=0.05,
               timeout_s={"connect": 1.0, "first_byte": 0.3, "total": 5.0},
               circuit={"failure_threshold": 100, "open_s": 0.2}, **PRICES)
    return UpstreamRoute.model_validate({**raw, **overrides})


class RecordingSleep:
    def __init__(self):
        self.delays = []

    async def __call__(self, seconds):
        self.delays.append(seconds)
        await asyncio.sleep(seconds)


def call(r: UpstreamRoute, method="chat_completions", body=CHAT, sleep=None):
    """Runs one call on a fresh client; returns the result, or the UpstreamError."""
    async def go():
        async with UpstreamClient(r, sleep=sleep or asyncio.sleep) as client:
            try:
                return await getattr(client, method)(body)
            except UpstreamError as e:
                return e
    return asyncio.run(go())


def stream(r: UpstreamRoute, method="stream_chat_completions", body=CHAT):
    """(chunks the caller got, the stream, the UpstreamError or None)."""
    async def go():
        got = []
        async with UpstreamClient(r) as client:
            try:
                async with getattr(client, method)(body) as s:
                    async for chunk in s:
                        got.append(chunk)
            except UpstreamError as e:
                return got, locals().get("s"), e
            return got, s, None
    return asyncio.run(go())


def expected_cost(prompt, cached, completion):
    return ((prompt - cached) * PRICES["usd_per_m_input"] + cached * PRICES["usd_per_m_cached_input"]
            + completion * PRICES["usd_per_m_output"]) / 1e6


# --- config ---

def test_config_names_the_bad_field():
    good = route("http://127.0.0.1:1/v1").model_dump()
    assert upstream_routes([good])[0].id == "r"
    with pytest.raises(ValueError, match=r"upstreams\[0\]\.circuit\.open_s"):
        upstream_routes([{**good, "circuit": {"failure_threshold": 3, "open_s": 0}}])
    with pytest.raises(ValueError, match=r"upstreams\[0\]\.retries: Extra inputs"):
        upstream_routes([{**good, "retries": 3}])
    with pytest.raises(ValueError, match=r"upstreams\[1\]\.id: route id 'r' is used twice"):
        upstream_routes([good, good])
    with pytest.raises(ValueError, match=r"backoff_max_s"):
        upstream_routes([{**good, "backoff_s": 2.0, "backoff_max_s": 1.0}])


def test_missing_key_variable_is_named(monkeypatch):
    monkeypatch.delenv("FRUGAL_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="FRUGAL_TEST_NO_SUCH_KEY"):
        UpstreamClient(route("http://127.0.0.1:1/v1", api_key_env="FRUGAL_TEST_NO_SUCH_KEY"))


def test_backoff_doubles_with_jitter_and_is_capped():
    r = route("http://127.0.0.1:1/v1", backoff_s=0.1, backoff_max_s=0.3)
    rng = random.Random(7)
    for i, step in enumerate([0.1, 0.2, 0.3, 0.3]):
        waits = [backoff_s(r, i, rng) for _ in range(200)]
        assert all(step / 2 <= w <= step for w in waits)
        assert len(set(waits)) == 200  # jittered


# --- unary answers, usage, the key ---

@pytest.mark.parametrize("method,body", [("chat_completions", CHAT), ("completions", COMPLETION)])
def test_ok_answer_usage_and_cost(server, method, body):
    result = call(route(server.url(f"ok-{method}", "ok")), method, {**body, "model": "client-model", "stream": True,
                                                                     "stream_options": {"include_usage": True}})
    assert not isinstance(result, UpstreamError), result
    assert result.attempts == 1 and result.body["choices"][0]
    sent = server.bodies[f"ok-{method}"]
    assert sent["model"] == "provider-model" and sent["stream"] is False and "stream_options" not in sent
    u = result.usage
    assert u.reported and (u.prompt_tokens, u.cached_tokens, u.completion_tokens) == (
        faults.PROMPT_TOKENS, faults.CACHED_TOKENS, faults.COMPLETION_TOKENS)
    assert u.cost_usd == pytest.approx(expected_cost(faults.PROMPT_TOKENS, faults.CACHED_TOKENS,
                                                     faults.COMPLETION_TOKENS))


def test_missing_usage_is_flagged_not_invented(server):
    result = call(route(server.url("no-usage", "no-usage")))
    assert result.usage.reported is False and result.usage.cost_usd is None
    _, s, error = stream(route(server.url("no-usage-stream", "no-usage")))
    assert error is None and s.usage.reported is False and s.usage.cost_usd is None


def test_key_sent_as_bearer_and_never_shown(server, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("FRUGAL_TEST_UPSTREAM_KEY", SECRET)
    r = route(server.url("auth", "ok"), api_key_env="FRUGAL_TEST_UPSTREAM_KEY")
    assert not isinstance(call(r), UpstreamError)
    assert server.headers["auth"]["authorization"] == f"Bearer {SECRET}"
    error = call(route(server.url("echo", "echo-auth"), api_key_env="FRUGAL_TEST_UPSTREAM_KEY"))
    assert error.kind == "http_status" and error.status == 401 and "[secure]" in error.message
    client = UpstreamClient(r)
    shown = [repr(r), str(r), repr(client), repr(client._http.headers), str(error), repr(error), caplog.text]
    asyncio.run(client.aclose())
    assert not any(SECRET in text for text in shown)


# --- timeouts, retries, refusals ---

def test_hang_times_out_and_is_retried_with_backoff(server):
    sleep = RecordingSleep()
    error = call(route(server.url("hang", "hang")), sleep=sleep)
    assert error.kind == "timeout" and error.retryable and error.attempts == 3
    assert server.hits["hang"] == 3
    assert len(sleep.delays) == 2
    assert 0.01 <= sleep.delays[0] <= 0.02 and 0.02 <= sleep.delays[1] <= 0.04  # base 0.02, doubled, jittered


def test_total_timeout_bounds_the_call(server):
    error = call(route(server.url("hang-total", "hang"), timeout_s={"connect": 1, "first_byte": 30, "total": 0.3}))
    assert error.kind == "timeout" and "total" in error.message
    assert server.hits["hang-total"] == 1  # no time left for a retry


def test_slow_answer_within_timeouts(server):
    result = call(route(server.url("slow", "slow-100"), timeout_s={"connect": 1, "first_byte": 2, "total": 5}))
    assert not isinstance(result, UpstreamError) and result.attempts == 1


def test_5xx_retried_until_it_succeeds(server):
    result = call(route(server.url("flaky", "fail-2-503")))
    assert not isinstance(result, UpstreamError) and result.attempts == 3 and server.hits["flaky"] == 3


def test_5xx_retries_run_out(server):
    error = call(route(server.url("down", "status-502"), max_retries=1))
    assert (error.kind, error.status, error.retryable, error.attempts) == ("http_status", 502, True, 2)
    assert "fault 502" in error.message and server.hits["down"] == 2


def test_retry_after_is_honoured(server):
    sleep = RecordingSleep()
    error = call(route(server.url("busy", "retry-after-0.15"), max_retries=1), sleep=sleep)
    assert error.status == 429 and error.retry_after_s == pytest.approx(0.15) and error.attempts == 2
    assert sleep.delays == [pytest.approx(0.15)]  # the provider's wait, over the 0.05 s backoff cap
    error = call(route(server.url("busy-long", "retry-after-60")))
    assert error.status == 429 and error.retry_after_s == 60 and server.hits["busy-long"] == 1  # past the deadline


@pytest.mark.parametrize("status,retryable", [(400, False), (404, False), (422, False), (401, True)])
def test_other_4xx_are_not_retried(server, status, retryable):
    tag = f"refused-{status}"
    error = call(route(server.url(tag, f"status-{status}")))
    assert (error.kind, error.status, error.retryable) == ("http_status", status, retryable)
    assert server.hits[tag] == 1


def test_refused_connections(server):
    error = call(route(f"http://127.0.0.1:{free_port()}/v1", max_retries=1))  # nobody listening
    assert error.kind == "refused" and error.retryable and error.attempts == 2
    error = call(route(server.url("close", "close")))
    assert error.kind == "refused" and server.hits["close"] == 3


@pytest.mark.parametrize("behaviour,message", [("non-json", "not JSON: '<html>oops</html>'"),
                                               ("no-choices", "no choices list"),
                                               ("wrong-types", "message.content is int")])
def test_garbage_is_a_clear_failure_not_retried(server, behaviour, message):
    error = call(route(server.url(f"garbage-{behaviour}", behaviour)))
    assert error.kind == "garbage" and message in error.message
    assert server.hits[f"garbage-{behaviour}"] == 1


def test_chat_off_route_refuses_chat():
    client = UpstreamClient(route("http://127.0.0.1:1/v1", chat=False))
    with pytest.raises(ValueError, match="completions only"):
        client.stream_chat_completions(CHAT)
    asyncio.run(client.aclose())


# --- streams ---

@pytest.mark.parametrize("method,body,chat", [("stream_chat_completions", CHAT, True),
                                              ("stream_completions", COMPLETION, False)])
def test_stream_passes_chunks_through_with_usage(server, method, body, chat):
    tag = f"stream-{method}"
    got, s, error = stream(route(server.url(tag, "ok")), method, body)
    assert error is None
    assert [c.data for c in got] == [json.dumps(e) for e in faults.chunks(chat, usage=True)]
    assert got[0].sse == f"data: {got[0].data}\n\n"
    sent = server.bodies[tag]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert s.usage.reported and s.usage.cost_usd == pytest.approx(
        expected_cost(faults.PROMPT_TOKENS, faults.CACHED_TOKENS, faults.COMPLETION_TOKENS))
    assert s.attempts == 1 and s.num_chunks == len(got)


def test_stream_cut_after_first_chunk_fails_and_is_not_retried(server):
    got, s, error = stream(route(server.url("cut", "cut")))
    assert len(got) == 1 and got[0].payload["choices"][0]["delta"]["content"] == "hel"
    assert error.kind == "garbage" and not error.retryable and "cut" in error.message
    assert s.usage is None and server.hits["cut"] == 1


def test_stream_retried_before_its_first_chunk(server):
    got, s, error = stream(route(server.url("stream-flaky", "fail-1-503")))
    assert error is None and s.attempts == 2 and len(got) == 4
    _, _, error = stream(route(server.url("stall", "stall")))  # headers, then no first chunk: nothing reached us
    assert error.kind == "timeout" and error.retryable and server.hits["stall"] == 3


@pytest.mark.parametrize("behaviour,message", [("no-done", "without [DONE] after 4 chunk"),
                                               ("non-json", "expected an event stream, got text/html")])
def test_stream_garbage(server, behaviour, message):
    got, _, error = stream(route(server.url(f"stream-{behaviour}", behaviour)))
    assert error.kind == "garbage" and message in error.message and server.hits[f"stream-{behaviour}"] == 1


# --- circuit breaker ---

def test_circuit_opens_half_opens_and_closes(server):
    r = route(server.url("circuit", "fail-3-503"), max_retries=0,
              circuit={"failure_threshold": 2, "open_s": 0.2})

    async def go():
        async with UpstreamClient(r) as client:
            async def one():
                try:
                    return await client.chat_completions(CHAT)
                except UpstreamError as e:
                    return e
            assert (await one()).status == 503 and client.circuit.state is CircuitState.CLOSED
            assert (await one()).status == 503 and client.circuit.state is CircuitState.OPEN
            refused = await one()
            assert refused.kind == "circuit_open" and refused.retryable and refused.attempts == 0
            assert 0 < refused.retry_after_s <= 0.2 and server.hits["circuit"] == 2  # not sent
            await asyncio.sleep(0.25)
            assert client.circuit.state is CircuitState.HALF_OPEN
            assert (await one()).status == 503 and client.circuit.state is CircuitState.OPEN  # the probe failed
            assert (await one()).kind == "circuit_open" and server.hits["circuit"] == 3
            await asyncio.sleep(0.25)
            assert not isinstance(await one(), UpstreamError)  # the probe succeeds
            assert client.circuit.state is CircuitState.CLOSED
            assert not isinstance(await one(), UpstreamError) and server.hits["circuit"] == 5
    asyncio.run(go())


def test_request_refusals_do_not_open_the_circuit(server):
    r = route(server.url("circuit-400", "status-400"), circuit={"failure_threshold": 1, "open_s": 10})

    async def go():
        async with UpstreamClient(r) as client:
            for _ in range(3):
                with pytest.raises(UpstreamError, match="HTTP 400"):
                    await client.chat_completions(CHAT)
            return client.circuit.state
    assert asyncio.run(go()) is CircuitState.CLOSED and server.hits["circuit-400"] == 3


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_half_open_lets_exactly_one_probe_through():
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, open_s=10, clock=clock)
    breaker.failed(breaker.admit().is_probe)
    assert breaker.state is CircuitState.CLOSED
    breaker.failed(breaker.admit().is_probe)
    refused = breaker.admit()
    assert not refused.admitted and refused.wait_s == 10
    clock.now = 10
    admissions = []
    threads = [threading.Thread(target=lambda: admissions.append(breaker.admit())) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a.is_probe for a in admissions if a.admitted] == [True]
    breaker.abandoned(True)  # the probe's caller went away: the next call probes instead
    probe = breaker.admit()
    assert probe.admitted and probe.is_probe
    breaker.succeeded(True)
    assert breaker.state is CircuitState.CLOSED and breaker.admit().admitted


def test_calls_admitted_before_opening_do_not_extend_it():
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, open_s=10, clock=clock)
    first, second = breaker.admit(), breaker.admit()
    breaker.failed(first.is_probe)
    clock.now = 5
    breaker.failed(second.is_probe)  # in flight when it opened
    clock.now = 10
    assert breaker.state is CircuitState.HALF_OPEN


# --- a real frugal daemon as the upstream ---

@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    proc = DaemonProcess(tmp_path_factory.mktemp("upstream"), http=True, control={"auth": "keys"},
                         engine={"kv_cache_memory_bytes": "64MiB", "max_model_len": 512})
    proc.start()
    result = subprocess.run([sys.executable, "-m", "serving.cli", "keys", "create", "--tenant", "upstream", "--json",
                             "--config", str(proc.config_path)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    proc.key = json.loads(result.stdout.strip().splitlines()[-1])["key"]
    base_url = f"http://127.0.0.1:{proc.http_port}/v1"
    models = httpx.get(f"{base_url}/models", headers={"Authorization": f"Bearer {proc.key}"}, timeout=30)
    proc.model = models.json()["data"][0]["id"]
    proc.base_url = base_url
    yield proc
    proc.stop()


@pytest.fixture
def daemon_route(daemon, monkeypatch):
    monkeypatch.setenv("FRUGAL_TEST_DAEMON_KEY", daemon.key)
    return route(daemon.base_url, model=daemon.model, api_key_env="FRUGAL_TEST_DAEMON_KEY",
                 timeout_s={"connect": 5, "first_byte": 60, "total": 120})


def direct(daemon, path, body):
    resp = httpx.post(f"{daemon.base_url}/{path}", json={**body, "model": daemon.model},
                      headers={"Authorization": f"Bearer {daemon.key}"}, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.mark.slow
def test_daemon_unary_passes_through_with_cost(daemon, daemon_route):
    body = {**CHAT, "max_tokens": 8, "temperature": 0}
    result = call(daemon_route, body=body)
    assert not isinstance(result, UpstreamError), result
    ref = direct(daemon, "chat/completions", body)
    assert result.body["choices"][0]["message"]["content"] == ref["choices"][0]["message"]["content"]
    u = result.usage
    assert (u.prompt_tokens, u.completion_tokens) == (ref["usage"]["prompt_tokens"], ref["usage"]["completion_tokens"])
    assert u.reported and u.cost_usd == pytest.approx(expected_cost(u.prompt_tokens, u.cached_tokens,
                                                                    u.completion_tokens))
    completion = call(daemon_route, "completions", {"prompt": "1, 2, 3,", "max_tokens": 6, "temperature": 0})
    assert completion.body["choices"][0]["text"] == direct(daemon, "completions", {
        "prompt": "1, 2, 3,", "max_tokens": 6, "temperature": 0})["choices"][0]["text"]


@pytest.mark.slow
def test_daemon_stream_equals_unary(daemon, daemon_route):
    body = {**CHAT, "max_tokens": 10, "temperature": 0}
    got, s, error = stream(daemon_route, body=body)
    assert error is None, error
    full = call(daemon_route, body=body)
    text = "".join(c.payload["choices"][0]["delta"].get("content") or "" for c in got if c.payload["choices"])
    assert text == full.body["choices"][0]["message"]["content"]
    assert got[-1].payload["choices"] == [] and got[-1].payload["usage"]  # asked for with include_usage
    assert (s.usage.prompt_tokens, s.usage.completion_tokens) == (full.usage.prompt_tokens,
                                                                  full.usage.completion_tokens)
    assert s.usage.cost_usd == pytest.approx(full.usage.cost_usd)


@pytest.mark.slow
def test_daemon_cached_tokens_priced_lower(daemon, daemon_route):
    body = {"prompt": "A long shared preamble about rivers, mountains and the sea. " * 6, "max_tokens": 2,
            "temperature": 0}
    cold, warm = call(daemon_route, "completions", body), call(daemon_route, "completions", body)
    assert cold.usage.prompt_tokens == warm.usage.prompt_tokens and warm.usage.cached_tokens > 0
    assert warm.usage.cost_usd == pytest.approx(expected_cost(warm.usage.prompt_tokens, warm.usage.cached_tokens,
                                                              warm.usage.completion_tokens))
    assert warm.usage.cost_usd < expected_cost(warm.usage.prompt_tokens, 0, warm.usage.completion_tokens)


@pytest.mark.slow
def test_daemon_wrong_key_is_401_not_retried_and_not_shown(daemon, daemon_route, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("FRUGAL_TEST_DAEMON_KEY", SECRET)
    error = call(daemon_route)
    assert (error.kind, error.status, error.attempts) == ("http_status", 401, 1)
    client = UpstreamClient(daemon_route)
    shown = [str(error), repr(error), repr(client), repr(daemon_route), caplog.text]
    asyncio.run(client.aclose())
    assert not any(SECRET in text or daemon.key in text for text in shown)
