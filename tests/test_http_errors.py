"""Errors are part of the interface: OpenAI-shaped bodies naming the param, 404/429/503, and client disconnects
that abort the engine request and free its KV blocks."""
import asyncio
import socket
import time

import httpx
import openai
import pytest

from http_support import MODEL_NAME, serve
from serving.limits import RequestLimits

MESSAGES = [{"role": "user", "content": "Hello"}]
LONG = {"max_tokens": 400, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def served(loaded_model):
    with serve(loaded_model) as s:
        yield s


@pytest.fixture(scope="module")
def client(served):
    return served.client()


def _error(served, path, body=None, **kwargs):
    """POSTs raw JSON; returns (status, the `error` object)."""
    resp = httpx.post(f"{served.base_url}{path}", json=body, timeout=60, **kwargs)
    return resp.status_code, resp.json()["error"]


def test_bad_max_tokens_names_the_param(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=0)
    assert e.value.param == "max_tokens" and "max_tokens" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=-3)
    assert e.value.param == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4, top_p=0)
    assert e.value.param == "top_p"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_context_length_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "word " * 1100}],
                                       max_tokens=4)
    assert e.value.param == "messages" and e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=5000)
    assert e.value.param == "max_tokens" and e.value.code == "context_length_exceeded"


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "Hi", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "Hi", "stop": 7}, "stop"),
    ("/v1/completions", {"prompt": "Hi", "priority": "urgent"}, "priority"),
    ("/v1/completions", {"prompt": "Hi", "presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "Hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "", "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": [10**9], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "Hi", "n": 17}, "n"),
    ("/v1/completions", {"prompt": "Hi", "min_tokens": 9, "max_tokens": 2}, "min_tokens"),
    ("/v1/chat/completions", {"model": MODEL_NAME}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools"),
])
def test_bad_input_is_400_in_openai_shape(served, path, body, param):
    status, error = _error(served, path, body)
    assert status == 400 and error["type"] == "invalid_request_error" and error["param"] == param, error
    assert error["message"]


def test_malformed_requests_and_unknown_routes(served):
    resp = httpx.post(f"{served.base_url}/v1/completions", content=b'{"prompt": ',
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"
    resp = httpx.get(f"{served.base_url}/v1/nothing-here")
    assert resp.status_code == 404 and set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{served.base_url}/v1/chat/completions").status_code == 405
    assert served.wait_idle()


def test_stream_disconnect_aborts_and_frees_blocks(served):
    body = {"model": MODEL_NAME, "messages": MESSAGES, "stream": True, **LONG}
    with httpx.stream("POST", f"{served.base_url}/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = resp.iter_lines()
        first_events = [next(lines) for _ in range(4)]  # two events, each a data line and a blank line
        assert first_events[0].startswith("data: {") and first_events[2].startswith("data: {")
        assert served.engine.has_unfinished_requests()
    # Closing the response closed the connection mid-stream.
    assert served.wait_idle(), "engine still holds the request after the client left"


def test_abort_mid_stream_arrives_as_error_event(served, client):
    stream = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, stream=True, max_tokens=400,
                                            extra_body={"ignore_eos": True})
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.role == "assistant"
    asyncio.run(served.state.async_llm.abort(stream.response.headers["x-request-id"]))
    with pytest.raises(openai.APIError) as e:
        list(chunks)
    assert e.value.code == "aborted"
    assert served.wait_idle()


def test_non_stream_disconnect_aborts(served):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.base_url}/v1/completions", json={"prompt": "Tell a story.", **LONG}, timeout=1.0)
    assert served.wait_idle(), "engine still holds the request after the client left"


def _raw_request(base_url: str, body: bytes) -> socket.socket:
    """Sends a request on a bare socket and never reads the answer."""
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def test_full_queue_is_429_with_retry_after(loaded_model):
    with serve(loaded_model, max_num_seqs=1, max_waiting=1) as small:
        stats = lambda: small.engine.stats()  # noqa: E731
        body = {"model": MODEL_NAME, "prompt": "Count:", "stream": True, **LONG}
        with httpx.stream("POST", f"{small.base_url}/v1/completions", json=body, timeout=60) as running:
            events = running.iter_lines()  # keep it: a dropped line iterator closes the connection
            assert next(events).startswith("data: {")  # the first request holds the only running slot
            waiting = _raw_request(small.base_url, b'{"prompt": "Wait", "max_tokens": 2}')
            deadline = time.monotonic() + 20
            while stats().num_waiting < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert stats().num_waiting == 1
            with pytest.raises(openai.RateLimitError) as e:
                small.client().completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2)
            assert e.value.response.headers["retry-after"] == "1" and e.value.code == "queue_full"
            assert stats().num_running == 1 and next(events) == ""  # the accepted ones are unharmed
            waiting.close()
        assert small.wait_idle()
        # Backpressure is not an outage: with room again, the next request is served.
        assert small.client().completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2).choices[0].text


def test_draining_and_dead_engine_are_503(loaded_model):
    with serve(loaded_model) as small:
        client = small.client()
        small.state.draining = True
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2)
        assert e.value.status_code == 503 and e.value.code == "draining"
        ready = httpx.get(f"{small.base_url}/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        assert httpx.get(f"{small.base_url}/healthz").status_code == 200
        assert client.models.list().data  # metadata stays readable while draining
        small.state.draining = False
        assert httpx.get(f"{small.base_url}/readyz").status_code == 200
        small.state.async_llm.shutdown()
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2)
        assert e.value.status_code == 503 and e.value.code == "engine_dead"
        assert httpx.get(f"{small.base_url}/readyz").json()["status"] == "engine_dead"
        assert httpx.get(f"{small.base_url}/healthz").status_code == 200  # shut down on purpose: not a failure


def test_dead_engine_fails_liveness(loaded_model):
    with serve(loaded_model) as small:
        small.state.async_llm.declare_dead("the engine is stuck: test")
        live = httpx.get(f"{small.base_url}/healthz")
        assert live.status_code == 503 and live.json() == {"status": "unhealthy",
                                                          "reason": "the engine is stuck: test"}
        assert httpx.get(f"{small.base_url}/readyz").json()["status"] == "engine_dead"
        resp = httpx.post(f"{small.base_url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert resp.status_code == 503 and "stuck" in resp.json()["error"]["message"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x" * 2001}, "prompt"),
    ("/v1/completions", {"prompt": ["x" * 1000, "y" * 1001]}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 2001}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}] * 5}, "messages"),
    ("/v1/completions", {"prompt": "Hi", "stop": ["a", "b", "c"]}, "stop"),
    ("/v1/completions", {"prompt": "Hi", "stop": "x" * 9}, "stop"),
    ("/v1/completions", {"prompt": "Hi", "stop_token_ids": [1, 2, 3]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "Hi", "n": 3}, "n"),
    ("/v1/completions", {"prompt": ["a", "b", "c"]}, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 4}, "logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 4}, "top_logprobs"),
])
def test_limits_refuse_before_any_work(loaded_model, path, body, param):
    limits = RequestLimits(max_prompt_chars=2000, max_messages=4, max_stop_strings=2, max_stop_string_chars=8,
                           max_stop_token_ids=2, max_choices=2, max_logprobs=3)
    with serve(loaded_model, limits=limits) as small:
        small.state.tokenizers.encode = small.state.tokenizers.chat = None  # a refused request never tokenizes
        status, error = _error(small, path, body)
        assert (status, error["param"], error["code"]) == (400, param, "limit_exceeded"), error
        assert "limits." in error["message"]
        assert small.engine.stats().num_steps == 0


def test_body_limit_is_413(loaded_model):
    with serve(loaded_model, limits=RequestLimits(max_body_bytes=1000)) as small:
        status, error = _error(small, "/v1/completions", {"prompt": "x" * 2000})
        assert (status, error["code"]) == (413, "request_too_large")

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(20):
                yield b"x" * 100

        resp = httpx.post(f"{small.base_url}/v1/completions", content=chunks(),
                          headers={"content-type": "application/json"})
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"
        assert _error(small, "/v1/completions", {"prompt": "Hi", "temperature": "hot"})[0] == 400  # under it


@pytest.mark.parametrize("body, param", [
    (b'{"messages": [{"role": "user", "content": "\\ud800 hi"}]}', "messages[0].content"),
    (b'{"messages": [{"role": "\\udfff", "content": "hi"}]}', "messages[0].role"),
    (b'{"prompt": "a\\udc00b"}', "prompt"),
    (b'{"prompt": "ok", "stop": ["\\ud83d"]}', "stop[0]"),
])
def test_lone_surrogates_are_400_naming_the_field(served, body, param):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    resp = httpx.post(f"{served.base_url}{path}", content=body, headers={"content-type": "application/json"})
    error = resp.json()["error"]
    assert (resp.status_code, error["param"], error["code"]) == (400, param, "invalid_text"), error
    assert "unpaired surrogate" in error["message"]


def test_huge_seed_is_400_naming_seed(served):
    status, error = _error(served, "/v1/chat/completions", {"messages": MESSAGES, "seed": 2**70})
    assert (status, error["param"]) == (400, "seed") and "2**64" in error["message"]
    assert served.wait_idle()
    status, error = _error(served, "/v1/completions", {"prompt": "Hi", "stop_token_ids": [10**9], "min_tokens": 4})
    assert (status, error["param"]) == (400, "stop_token_ids")
    assert served.wait_idle()
