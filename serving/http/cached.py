"""Response caches on the HTTP path: the cache request of a chat call, and the answer a cache hit sends back.

A hit answers without the model: no admission, no reservation, nothing spent; its ledger row costs 0 and records
what it saved. Headers: `x-frugal-cache: off` skips the caches for this call, `on` lets a sampled (non-greedy)
request be cached and served from the cache; `x-frugal-cache-tags: a,b` tags the stored answer, so invalidating a
tag drops it.
"""
from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from serving.control.caches import CacheHit, CacheRequest
from serving.control.caches.keys import sampling_of
from serving.http.errors import APIError
from serving.http.generation import Job
from serving.http.responses import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                                    ChatCompletionChunk, DeltaMessage, FrugalInfo, PromptTokensDetails, Usage)
from serving.http.streaming import DONE, sse

_MAX_TAGS = 16


def cache_request(request: Request, job: Job, messages: list[dict], route: str) -> CacheRequest | None:
    """None when the caller turned the caches off for this call."""
    mode = (request.headers.get("x-frugal-cache") or "default").lower()
    if mode not in ("default", "on", "off"):
        raise APIError(400, f"x-frugal-cache must be on or off, got {mode!r}", param="x-frugal-cache",
                       code="invalid_header")
    if mode == "off":
        return None
    tags = tuple(t.strip() for t in (request.headers.get("x-frugal-cache-tags") or "").split(",") if t.strip())
    if len(tags) > _MAX_TAGS:
        raise APIError(400, f"x-frugal-cache-tags takes at most {_MAX_TAGS} tags, got {len(tags)}",
                       param="x-frugal-cache-tags", code="invalid_header")
    sampling = sampling_of(job.params, job.n)
    return CacheRequest(tenant=job.ctx.tenant, route=route,
                        messages=tuple({"role": m["role"], "content": m["content"]} for m in messages),
                        sampling=sampling, tags=tags, cache_nondeterministic=mode == "on")


def _info(hit: CacheHit, tokens_saved: int = 0) -> FrugalInfo:
    what = "an identical earlier request" if hit.kind == "exact" else \
        f"an earlier request with the same meaning (similarity {hit.similarity:.3f})"
    return FrugalInfo(route=f"cache:{hit.kind}", reason=f"answered from the {hit.kind} cache: {what}, "
                      f"{hit.age_s:.0f} s ago", cache=hit.kind, similarity=hit.similarity, tokens_saved=tokens_saved)


def cached_chat_response(job: Job, model: str, num_prompt_tokens: int, hit: CacheHit, stream: bool,
                         include_usage: bool) -> Response:
    answer = hit.response
    usage = Usage(prompt_tokens=num_prompt_tokens, completion_tokens=answer.completion_tokens,
                  total_tokens=num_prompt_tokens + answer.completion_tokens,
                  prompt_tokens_details=PromptTokensDetails(cached_tokens=0), cost_usd=0.0)
    headers = {"x-request-id": job.request_id}
    if not stream:
        body = ChatCompletion(id=job.request_id, created=job.created, model=model, usage=usage,
                              frugal=_info(hit, job.tokens_saved),
                              choices=[ChatChoice(index=0, message=AssistantMessage(content=answer.text),
                                                  finish_reason=answer.finish_reason)])
        return Response(body.model_dump_json(), media_type="application/json", headers=headers)

    def chunk(delta: DeltaMessage, finish_reason=None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=job.request_id, created=job.created, model=model, choices=[
            ChatChunkChoice(index=0, delta=delta, finish_reason=finish_reason)])

    async def events():
        yield sse(chunk(DeltaMessage(role="assistant", content="")))
        yield sse(chunk(DeltaMessage(content=answer.text)))
        last = chunk(DeltaMessage(), answer.finish_reason)
        if include_usage:
            yield sse(last)
            last = ChatCompletionChunk(id=job.request_id, created=job.created, model=model, choices=[])
        yield sse(last.model_copy(update={"usage": usage, "frugal": _info(hit, job.tokens_saved)}))
        yield DONE

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})


def elapsed_ms(started: float) -> float:
    return 1000 * (time.monotonic() - started)
