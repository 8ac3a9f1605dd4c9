"""An external route on the HTTP chat path: the request the provider gets, its answer given back as ours, its
stream passed through, and the admission settled with the provider's reported usage at the route's prices.

A failure before the provider answered (it hung, refused, sent garbage, or its circuit is open) releases the
admission (nothing was spent) and raises `RouteFailed`, so the router can take the next route. Once a stream's
first chunk is out, nothing falls back: a later failure ends the stream with an error event.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import Request
from starlette.responses import StreamingResponse

from serving.control.admission import Admission, Settlement
from serving.control.upstream import UpstreamClient, UpstreamError
from serving.control.upstream.usage import NOT_REPORTED
from serving.http.errors import APIError
from serving.http.generation import until_disconnect
from serving.http.protocol import ChatCompletionRequest
from serving.http.responses import (AssistantMessage, ChatChoice, FrugalInfo, PromptTokensDetails, Usage)
from serving.http.streaming import DONE, sse

_PASSED_ON = ("temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty", "user")


class RouteFailed(Exception):
    """A route could not answer (down, overloaded, garbage): the next route may."""

    def __init__(self, route_id: str, kind: str, message: str):
        super().__init__(f"{route_id}: {kind}: {message}")
        self.route_id = route_id  # the route that failed
        self.kind = kind  # timeout | refused | http_status | garbage | circuit_open | queue_full | engine_dead ...
        self.message = message


@dataclass(slots=True)
class ExternalAnswer:
    choices: list[ChatChoice]  # the provider's choices, in our shape
    usage: Usage  # the provider's counts, with the cost at the route's prices
    settlement: Settlement  # the ledger row is committed
    logprobs: list[float] | None  # the first choice's chosen-token logprobs, when the provider sent them


def upstream_body(body: ChatCompletionRequest, messages: list[dict], max_tokens: int, logprobs: bool) -> dict:
    """The OpenAI request for the provider: the optimized messages and the client's sampling fields."""
    out = {"messages": [{"role": m["role"], "content": m["content"]} for m in messages], "max_tokens": max_tokens}
    for name in _PASSED_ON:
        value = getattr(body, name, None)
        if value is not None:
            out[name] = value
    if logprobs or body.logprobs:
        out["logprobs"] = True
        if body.top_logprobs:
            out["top_logprobs"] = body.top_logprobs
    return out


def _failed(e: UpstreamError) -> Exception:
    if e.kind == "http_status" and not e.route_at_fault:  # NOTE: the provider refused the request itself
        return APIError(502, f"the external route refused the request: {e}", type="upstream_error",
                        code="upstream_refused")
    return RouteFailed(e.route_id, e.kind, e.message)


def _usage(settlement: Settlement) -> Usage:
    return Usage(prompt_tokens=settlement.prompt_tokens, completion_tokens=settlement.completion_tokens,
                 total_tokens=settlement.prompt_tokens + settlement.completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=settlement.cached_tokens),
                 cost_usd=settlement.cost_usd)


def _chosen_logprobs(choice: dict) -> list[float] | None:
    content = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
    if not isinstance(content, list) or not content:
        return None
    values = [row.get("logprob") for row in content if isinstance(row, dict)]
    if not all(isinstance(v, (int, float)) and v <= 0 for v in values):
        return None  # NOTE: garbage logprobs judge nothing; the answer itself passed the shape checks
    return [float(v) for v in values]


async def external_chat(client: UpstreamClient, request: Request, admission: Admission, payload: dict) -> ExternalAnswer:
    started = time.monotonic()
    try:
        result = await until_disconnect(request, client.chat_completions(payload))
    except UpstreamError as e:
        await admission.settle_external(None, "failed", e.kind)
        raise _failed(e) from e
    except BaseException:
        await admission.settle_external(None, "cancelled")
        raise
    settlement = await admission.settle_external(result.usage, "ok", ttft_ms=1000 * (time.monotonic() - started))
    choices = []
    for i, choice in enumerate(result.body["choices"]):
        message = choice.get("message") or {}
        choices.append(ChatChoice(index=choice.get("index", i), finish_reason=choice.get("finish_reason") or "stop",
                                  message=AssistantMessage(content=message.get("content") or "")))
    return ExternalAnswer(choices, _usage(settlement), settlement, _chosen_logprobs(result.body["choices"][0]))


async def external_chat_stream(client: UpstreamClient, admission: Admission, payload: dict, request_id: str,
                               model: str, frugal: FrugalInfo, include_usage: bool) -> StreamingResponse:
    """Opens the provider's stream (raising RouteFailed while fallback is still possible), then passes its chunks
    on under our id and model; the usage and the `frugal` object ride on the last chunk, once the ledger row is
    committed."""
    started = time.monotonic()
    stream = client.stream_chat_completions(payload)
    try:
        await stream.__aenter__()
    except UpstreamError as e:
        await admission.settle_external(None, "failed", e.kind)
        raise _failed(e) from e
    ttft_ms = 1000 * (time.monotonic() - started)

    async def events():
        status, error = "failed", None
        try:
            async for chunk in stream:
                payload = {**chunk.payload, "id": request_id, "model": model}
                if not payload.get("choices") and payload.get("usage") is not None:
                    continue  # the provider's usage chunk: ours, with our cost, goes last
                payload.pop("usage", None)
                yield sse(payload)
            status = "ok"
        except UpstreamError as e:
            error = e
        finally:
            await stream.__aexit__(None, None, None)
        usage = stream.usage if status == "ok" else None
        try:
            # NOTE: a stream cut after its first chunk reported no usage: priced at the worst case reserved
            settlement = await admission.settle_external(usage or NOT_REPORTED, status,
                                                         error.kind if error else None, ttft_ms)
        except Exception as e:  # the ledger row could not be committed: the answer must not look complete
            yield sse(APIError(503, f"the ledger is unavailable: {e}", type="service_unavailable_error",
                               code="ledger_unavailable").body())
            yield DONE
            return
        if error is not None:
            yield sse(APIError(502, f"the external route failed mid-stream: {error}", type="upstream_error",
                               code="upstream_failed").body())
            yield DONE
            return
        last = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                "choices": [], "frugal": frugal.model_dump()}
        if include_usage:
            last["usage"] = _usage(settlement).model_dump()
        yield sse(last)
        yield DONE

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "x-request-id": request_id})

