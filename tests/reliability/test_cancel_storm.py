"""Cancel storms: many clients at once that cancel mid-stream, run out of deadline or hang up, over gRPC and
HTTP. Afterwards the engine holds no request and no KV block, and the canary answers as before."""
import asyncio
import random

import grpc
import httpx
import pytest

from serving.rpc.gen.frugal.v1 import inference_pb2 as pb
from serving.rpc.gen.frugal.v1 import inference_pb2_grpc as pb_grpc
from support import add_count, assert_clean

pytestmark = pytest.mark.slow

NUM_CLIENTS = 24  # per protocol and round
LONG = pb.SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)


async def _grpc_client(stub, rng: random.Random, i: int) -> str:
    req = pb.GenerateRequest(prompt=f"Count to one hundred, client {i}:", sampling=LONG)
    how = rng.choice(["cancel", "deadline", "unary-deadline", "finish"])
    try:
        if how == "unary-deadline":
            await stub.Generate(req, timeout=rng.uniform(0.05, 1.0))
            return "finished"
        call = stub.GenerateStream(req, timeout=rng.uniform(0.05, 1.5) if how == "deadline" else 120)
        stop_after = rng.randint(0, 8)
        n = 0
        async for _ in call:
            n += 1
            if how == "cancel" and n >= stop_after:
                call.cancel()
                return "cancelled"
        return "finished"
    except grpc.aio.AioRpcError as e:
        assert e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED), e
        return e.code().name


async def _http_client(client: httpx.AsyncClient, rng: random.Random, i: int) -> str:
    body = {"prompt": f"Count to one hundred, client {i}:", "max_tokens": 100, "temperature": 0,
            "ignore_eos": True, "stream": rng.random() < 0.7}
    try:
        if body["stream"]:
            async with client.stream("POST", "/v1/completions", json=body, timeout=120) as resp:
                stop_after = rng.randint(0, 8)
                n = 0
                async for _ in resp.aiter_lines():
                    n += 1
                    if n >= stop_after:
                        return "disconnected"  # leaving the block closes the connection mid-stream
            return "finished"
        await client.post("/v1/completions", json=body, timeout=rng.uniform(0.05, 1.0))
        return "finished"
    except httpx.TimeoutException:
        return "timed out"


async def _storm(daemon, seed: int) -> list[str]:
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(daemon.proc.target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        # NOTE: a connection per request, as separate clients would have: a hang-up then ends only its own.
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=daemon.http_url, limits=limits) as client:
            tasks = [_grpc_client(stub, rng, i) for i in range(NUM_CLIENTS)]
            tasks += [_http_client(client, rng, i) for i in range(NUM_CLIENTS)]
            rng.shuffle(tasks)
            return await asyncio.gather(*tasks)


def test_cancel_storms_leave_nothing_behind(daemon):
    for seed in range(3):
        outcomes = asyncio.run(_storm(daemon, seed))
        add_count("requests cancelled, timed out or disconnected", sum(o != "finished" for o in outcomes))
        assert any(o != "finished" for o in outcomes)
        assert_clean(daemon)
    assert daemon.canary() == daemon.reference
    assert daemon.http_canary() == daemon.http_reference
