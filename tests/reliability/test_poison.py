"""Poison requests interleaved with honest ones on the same daemon, at the same time: every bad input found so far
(a 2^70 seed, a stop id outside the vocabulary with min_tokens, a lone surrogate, oversized prompts and bodies)
and faults injected into one request's sampling or detokenizing. Each poison request gets its own clear error;
every honest request's answer equals its solo run token for token; nothing is left behind."""
import json
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import grpc
import httpx
import pytest

from serving.rpc.gen.frugal.v1 import inference_pb2 as pb
from support import POISON_DETOKENIZE, POISON_SAMPLE, add_count, assert_clean, report

pytestmark = pytest.mark.slow

ROUNDS = 3


@dataclass
class Call:
    name: str
    run: Callable[[], object]  # returns what must equal the solo run (honest) or what went wrong (poison)


def _grpc_honest(daemon, name: str, **sampling) -> Call:
    def run():
        req = pb.GenerateRequest(prompt=f"Tell me something about {name}.",
                                 sampling=pb.SamplingParams(max_tokens=24, **sampling))
        resp = daemon.stub.Generate(req, timeout=120)
        return resp.text, list(resp.token_ids)
    return Call(f"grpc {name}", run)


def _grpc_stream_honest(daemon) -> Call:
    def run():
        req = pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Name a colour.")]),
                                 sampling=pb.SamplingParams(max_tokens=24, temperature=0.0, logprobs=2))
        chunks = list(daemon.stub.GenerateStream(req, timeout=120))
        # NOTE: logprob values may differ in the last digits between batch sizes, so only their shape is compared.
        logprobs = [lp for c in chunks for lp in c.logprobs]
        assert [lp.token_id for lp in logprobs] == [t for c in chunks for t in c.token_ids]
        assert all(len(lp.top_logprobs) == 2 for lp in logprobs)
        return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids]
    return Call("grpc stream", run)


def _http_honest(daemon, path: str, body: dict) -> Call:
    def run():
        resp = httpx.post(f"{daemon.http_url}{path}", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        choice = resp.json()["choices"][0]
        return choice.get("text", choice.get("message", {}).get("content"))
    return Call(f"http {path}", run)


def honest_calls(daemon) -> list[Call]:
    return [
        _grpc_honest(daemon, "the moon", temperature=0.0),
        _grpc_honest(daemon, "rivers", temperature=0.8, top_p=0.9, seed=7),
        _grpc_stream_honest(daemon),
        _http_honest(daemon, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Write a haiku."}],
                                                     "max_tokens": 24, "temperature": 0}),
        _http_honest(daemon, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 1.0,
                                                "seed": 3}),
    ]


def _http_error(daemon, path: str, body: bytes | dict, status: int, param: str | None) -> Callable:
    def run():
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        resp = httpx.post(f"{daemon.http_url}{path}", content=content, timeout=120,
                          headers={"content-type": "application/json"})
        error = resp.json()["error"]
        assert (resp.status_code, error["param"]) == (status, param), (resp.status_code, error)
        return error["message"]
    return run


def _grpc_error(daemon, req: pb.GenerateRequest, code: grpc.StatusCode, needle: str) -> Callable:
    def run():
        with pytest.raises(grpc.RpcError) as err:
            daemon.stub.Generate(req, timeout=120)
        assert err.value.code() == code and needle in err.value.details(), (err.value.code(), err.value.details())
        return err.value.details()
    return run


def poison_calls(daemon, round_no: int) -> list[Call]:
    chat = "/v1/chat/completions"
    user = [{"role": "user", "content": "hi"}]
    greedy = pb.SamplingParams(max_tokens=24, temperature=0.0)
    calls = {
        "seed 2**70": _http_error(daemon, chat, {"messages": user, "seed": 2**70}, 400, "seed"),
        "stop id outside the vocabulary": _http_error(
            daemon, "/v1/completions", {"prompt": "hi", "stop_token_ids": [10**9], "min_tokens": 4},
            400, "stop_token_ids"),
        "lone surrogate": _http_error(daemon, chat, b'{"messages": [{"role": "user", "content": "\\ud800 hi"}]}',
                                      400, "messages[0].content"),
        "6 MB body": _http_error(daemon, "/v1/completions", {"prompt": "word " * 1_200_000}, 413, None),
        "300k-character prompt": _http_error(daemon, "/v1/completions", {"prompt": "x" * 300_000}, 400, "prompt"),
        "too many stop strings": _http_error(daemon, chat, {"messages": user, "stop": ["a"] * 50}, 400, "stop"),
        "grpc prompt id outside the vocabulary": _grpc_error(
            daemon, pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[1, 10**9])),
            grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids must be"),
        "grpc stop id outside the vocabulary": _grpc_error(
            daemon, pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(stop_token_ids=[10**9], min_tokens=4)),
            grpc.StatusCode.INVALID_ARGUMENT, "sampling.stop_token_ids"),
        "grpc 5 MB message": _grpc_error(daemon, pb.GenerateRequest(prompt="y" * (5 << 20)),
                                         grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
        "sampling fault": _grpc_error(daemon, pb.GenerateRequest(
            request_id=f"{POISON_SAMPLE}{round_no}", prompt="Tell me something about the moon.", sampling=greedy),
            grpc.StatusCode.INTERNAL, "sampling failed for this request"),
        "detokenizer fault": _grpc_error(daemon, pb.GenerateRequest(
            request_id=f"{POISON_DETOKENIZE}{round_no}", prompt="Tell me something about rivers.", sampling=greedy),
            grpc.StatusCode.INTERNAL, "detokenizing failed for this request"),
    }
    return [Call(name, run) for name, run in calls.items()]


def test_poison_never_harms_honest_requests(daemon):
    honest = honest_calls(daemon)
    solo = {call.name: call.run() for call in honest}
    rng = random.Random(0)
    num_harmed = num_poison = 0
    for round_no in range(ROUNDS):
        poison = poison_calls(daemon, round_no)
        calls = honest + poison
        rng.shuffle(calls)
        with ThreadPoolExecutor(len(calls)) as pool:
            futures = {call.name: pool.submit(call.run) for call in calls}
        num_poison += len(poison)
        for call in poison:
            message = futures[call.name].result()  # raises if it did not get its own clear error
            assert "Tell me something" not in message and "haiku" not in message, (call.name, message)
        for call in honest:
            if futures[call.name].result() != solo[call.name]:
                num_harmed += 1
        assert_clean(daemon)
    add_count("poison requests sent", num_poison)
    report("honest requests harmed", num_harmed)
    assert num_harmed == 0
    assert daemon.canary() == daemon.reference
