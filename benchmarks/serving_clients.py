"""Load-generator clients for the serving benchmark: a Poisson arrival schedule and one async client per protocol.

Each client sends ShareGPT prompts as token ids with max_tokens fixed and ignore_eos, so every request does a
known amount of work, and times each request from the moment it is sent: TTFT at the first chunk that carries
tokens, end-to-end at the last chunk.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from benchmarks.sharegpt import SampledRequest

DONE = object()  # what `sse_payload` returns for the `data: [DONE]` line that ends an OpenAI stream
_HTTP_TIMEOUT_S = 600.0  # one request at saturation waits behind all the others; never cut one short


@dataclass(slots=True)
class RequestResult:
    """One request as the client saw it."""

    prompt_len: int  # prompt tokens sent
    expected_output_len: int  # max_tokens sent; with ignore_eos, exactly what should come back
    num_output_tokens: int = 0  # output tokens received (gRPC: token ids in the chunks; HTTP: the usage chunk)
    ttft_s: float = math.nan  # from send to the first chunk with tokens
    e2e_s: float = math.nan  # from send to the end of the stream
    error: str | None = None  # why the request failed; None when it completed

    @property
    def ok(self) -> bool:
        return self.error is None and self.num_output_tokens == self.expected_output_len

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None with fewer than two tokens."""
        if self.error is not None or self.num_output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)


def arrival_offsets(num_requests: int, rate: float, seed: int) -> list[float]:
    """Send times in seconds from the start of a run: a Poisson process of `rate` requests a second.

    The first request goes at 0 and each gap after it is exponential with mean 1 / rate, drawn from its own
    `random.Random(seed)` so the schedule does not depend on anything else the run draws. rate=inf sends all
    at once (saturation).
    """
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests a second (inf: all at once), got {rate}")
    if math.isinf(rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(num_requests):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


async def run_schedule(send: Callable[[SampledRequest], Awaitable[RequestResult]], requests: list[SampledRequest],
                       offsets: list[float]) -> tuple[list[RequestResult], float]:
    """Sends request i at offsets[i] seconds; returns the results in request order and the wall time from the
    first send to the last completion."""
    t0 = time.monotonic()
    tasks = []
    for request, offset in zip(requests, offsets):
        delay = t0 + offset - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(request)))
    results = await asyncio.gather(*tasks)
    return list(results), time.monotonic() - t0


# ---------------------------------------------------------------------------------------------- gRPC


class GrpcClient:
    """GenerateStream over one grpc.aio channel; create it inside the event loop that uses it."""

    def __init__(self, target: str) -> None:
        import grpc

        from serving.rpc.gen.frugal.v1 import inference_pb2 as pb
        from serving.rpc.gen.frugal.v1 import inference_pb2_grpc as pb_grpc

        self._grpc, self._pb = grpc, pb
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.InferenceServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def send(self, request: SampledRequest) -> RequestResult:
        pb = self._pb
        result = RequestResult(request.prompt_len, request.output_len)
        message = pb.GenerateRequest(
            prompt_token_ids=pb.TokenIds(ids=request.prompt_token_ids),
            sampling=pb.SamplingParams(max_tokens=request.output_len, temperature=0.0, ignore_eos=True),
        )
        started = time.monotonic()
        try:
            async for chunk in self.stub.GenerateStream(message):
                if chunk.token_ids and math.isnan(result.ttft_s):
                    result.ttft_s = time.monotonic() - started
                result.num_output_tokens += len(chunk.token_ids)
                if chunk.HasField("usage") and chunk.usage.completion_tokens != result.num_output_tokens:
                    result.error = (f"usage says {chunk.usage.completion_tokens} completion tokens, "
                                    f"the chunks carried {result.num_output_tokens}")
        except self._grpc.RpcError as e:
            result.error = f"{e.code().name}: {e.details()}"
        result.e2e_s = time.monotonic() - started
        return result


# ---------------------------------------------------------------------------------------------- HTTP


def sse_payload(line: str):
    """One line of a server-sent event stream: the decoded JSON of a `data:` line, `DONE` for `data: [DONE]`,
    None for anything else (the blank line between events, comments, other fields)."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):].strip()
    if data == "[DONE]":
        return DONE
    return json.loads(data)


def _ignore_eos(request: SampledRequest) -> dict:
    return {"ignore_eos": True}


class HttpClient:
    """Streaming POST /v1/completions over one httpx.AsyncClient; create it inside the event loop that uses it.

    `fields(request)` gives the body's fields that make the server do exactly max_tokens of work (frugal's and
    vLLM's `ignore_eos`; other servers word it otherwise); `text_prompts` sends the prompt's text instead of its
    token ids, for servers that take only text; `ends_with_done`: the server closes its stream with
    `data: [DONE]` (OpenAI's and frugal's do; transformers serve ends after the usage chunk).
    """

    def __init__(self, target: str, fields: Callable[[SampledRequest], dict] = _ignore_eos,
                 text_prompts: bool = False, ends_with_done: bool = True) -> None:
        import httpx

        self._httpx = httpx
        self.fields, self.text_prompts, self.ends_with_done = fields, text_prompts, ends_with_done
        # NOTE: no connection cap: at saturation every request must be in flight at once, as with gRPC's streams.
        self.client = httpx.AsyncClient(base_url=f"http://{target}", timeout=_HTTP_TIMEOUT_S,
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))

    async def close(self) -> None:
        await self.client.aclose()

    async def send(self, request: SampledRequest) -> RequestResult:
        result = RequestResult(request.prompt_len, request.output_len)
        # NOTE: no "model": the daemon then takes its default model, so the client need not ask for its id.
        body = {"prompt": request.prompt if self.text_prompts else request.prompt_token_ids,
                "max_tokens": request.output_len, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}, **self.fields(request)}
        started = time.monotonic()
        try:
            async with self.client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                else:
                    await self._read_stream(response, result, started)
        except self._httpx.HTTPError as e:
            result.error = f"{type(e).__name__}: {e}"
        result.e2e_s = time.monotonic() - started
        return result

    async def _read_stream(self, response, result: RequestResult, started: float) -> None:
        # NOTE: completion chunks carry text, not token ids; the first token whose text is held back (a partial
        # UTF-8 character) shows up with the next one, so TTFT is the first chunk with text.
        async for line in response.aiter_lines():
            payload = sse_payload(line)
            if payload is None:
                continue
            if payload is DONE:
                return
            if "error" in payload:
                result.error = f"stream error: {payload['error'].get('message')}"
                return
            if math.isnan(result.ttft_s) and any(choice.get("text") for choice in payload.get("choices", [])):
                result.ttft_s = time.monotonic() - started
            if payload.get("usage"):
                result.num_output_tokens = payload["usage"]["completion_tokens"]
                if not self.ends_with_done:
                    return
        result.error = "the stream ended without data: [DONE]" if self.ends_with_done else \
            "the stream ended without a usage chunk"


async def run_protocol(protocol: str, target: str, requests: list[SampledRequest],
                       offsets: list[float]) -> tuple[list[RequestResult], float]:
    """Runs the schedule against a running daemon with a fresh client of `protocol` ("grpc" or "http")."""
    client = GrpcClient(target) if protocol == "grpc" else HttpClient(target)
    try:
        return await run_schedule(client.send, requests, offsets)
    finally:
        await client.close()
