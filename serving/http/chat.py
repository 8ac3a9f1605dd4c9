"""POST /v1/chat/completions: messages through the model's chat template, one answer per choice."""
from __future__ import annotations

import dataclasses
import logging
import time

from fastapi import Request
from fastapi.responses import Response

from serving.engine.outputs import RequestOutput
from serving.http.cached import cache_request, cached_chat_response, elapsed_ms
from serving.http.errors import bad_request
from serving.http.control import admit_job, authenticate
from serving.http.generation import (Job, ServingContext, check_admission, check_text_param, frugal_info,
                                     make_job, run_for_client, stop_reason, usage)
from serving.http.logprobs import chat_logprobs, delta_rows
from serving.http.protocol import ChatCompletionRequest
from serving.http.responses import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                                    ChatCompletionChunk, DeltaMessage)
from serving.http.streaming import SSEResponse, run_job

logger = logging.getLogger(__name__)


def template_messages(ctx: ServingContext, body: ChatCompletionRequest) -> list[dict]:
    """The messages as the chat template takes them, checked against the limits before any templating."""
    limits = ctx.state.limits
    limits.check_messages(len(body.messages), "messages")
    messages = []
    for i, message in enumerate(body.messages):
        try:
            messages.append(message.template_dict(i))
        except ValueError as e:
            raise bad_request(str(e), f"messages[{i}].content")
    limits.check_prompt_chars(sum(len(m["content"]) + len(m["role"]) for m in messages), "messages")
    for i, m in enumerate(messages):
        check_text_param(m["role"], f"messages[{i}].role")
        check_text_param(m["content"], f"messages[{i}].content")
    return messages


async def optimized(ctx: ServingContext, body: ChatCompletionRequest, tenant: str, messages: list[dict],
                    route: str | None = None):
    """The prompt optimizer's result (serving/control/optimizer/), or None when it has nothing to do: no step
    applies to this tenant and route (default: the served model's), and no context chunks came."""
    from serving.control.optimizer import OptimizerPlan, optimize, tokenizer_counter

    state, chunks = ctx.state, body.context_chunks or []
    config = state.optimizer
    route = route or f"self-hosted:{state.model_name}"
    plan = config.plan_for(tenant, route) if config is not None else None
    if not chunks and (plan is None or not plan.enabled_steps):
        return None
    if chunks:
        state.limits.check_messages(len(chunks), "context_chunks")
        state.limits.check_prompt_chars(sum(len(m["content"]) for m in messages) + sum(map(len, chunks)),
                                        "context_chunks")
        for i, chunk in enumerate(chunks):
            check_text_param(chunk, f"context_chunks[{i}]")
    plan = plan or OptimizerPlan(whitespace=False, dedupe=False, context=None, trim_history=None,
                                 max_tokens_cap=None)
    try:
        return await state.tokenizers.run(
            lambda tok: optimize(messages, plan, tokenizer_counter(tok), context_chunks=chunks or None))
    except ValueError as e:
        raise bad_request(str(e), "context_chunks" if chunks else "messages")


async def _prompt_ids(ctx: ServingContext, body: ChatCompletionRequest, tenant: str):
    """(messages as sent, their token ids, the optimizer's result or None)."""
    messages = template_messages(ctx, body)
    result = await optimized(ctx, body, tenant, messages)
    if result is not None:
        messages = result.messages
    return messages, await chat_ids(ctx.state, messages), result


async def chat_ids(state, messages: list[dict]) -> list[int]:
    try:
        return await state.tokenizers.chat(messages)
    except ValueError as e:
        raise bad_request(str(e), "messages")


def check_logprob_params(state, body: ChatCompletionRequest) -> None:
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
    state.limits.check_logprobs(body.top_logprobs, "top_logprobs")


def chat_job(state, body: ChatCompletionRequest, caller, ids: list[int], result, logprobs: int | None = None) -> Job:
    """The Job of one chat request on `state`'s model, with the optimizer's savings and its route cap applied."""
    job = make_job(state, body, caller, "chatcmpl", [ids], [None],
                   logprobs=body.engine_logprobs if logprobs is None else logprobs, default_max_tokens=None)
    if result is not None:
        job.tokens_saved = result.report.tokens_saved
        cap = result.max_tokens  # the route's cap (the client's own max_tokens is applied by make_job)
        if cap is not None and cap < job.params.max_tokens:
            job.params = dataclasses.replace(job.params, max_tokens=cap, min_tokens=min(job.params.min_tokens, cap))
    return job


async def create_chat_completion(ctx: ServingContext, body: ChatCompletionRequest, request: Request) -> Response:
    state = ctx.state
    caller = await authenticate(state, request)
    if state.routing:
        from serving.http.routed import routed_chat_completion

        return await routed_chat_completion(ctx, body, request, caller)
    check_admission(state, body, caller)
    check_logprob_params(state, body)
    started = time.monotonic()
    messages, ids, result = await run_for_client(request, state, body, _prompt_ids(ctx, body, caller.tenant))
    job = chat_job(state, body, caller, ids, result)
    logger.debug("%s: %d prompt tokens, user %r", job.request_id, len(ids), body.user)
    cache_req = None
    if state.control.caches is not None:
        cache_req = cache_request(request, job, messages, f"self-hosted:{state.model_name}")
        hit = await state.control.cached_answer(job.ctx, cache_req) if cache_req is not None else None
        if hit is not None:
            await state.control.record_cache_hit(job.ctx, job.request_id, state.model_name, hit, len(ids),
                                                 elapsed_ms(started))
            return cached_chat_response(job, state.model_name, len(ids), hit, body.stream, body.include_usage)
    await admit_job(state, job)
    result = await run_chat_job(ctx, body, request, job, cache_req, len(ids))
    if isinstance(result, SSEResponse):
        return result
    finals, settlement = result
    completion = chat_completion(ctx, body, job, finals, settlement, state.model_name, frugal_info(job))
    remember(state, cache_req, finals, settlement, len(ids))
    return Response(completion.model_dump_json(), media_type="application/json",
                    headers={"x-request-id": job.request_id})


async def run_chat_job(ctx: ServingContext, body: ChatCompletionRequest, request: Request, job: Job,
                       cache_req=None, num_prompt_tokens: int = 0):
    """Runs an admitted chat job on `ctx.state`'s engine: the SSE response, or (finals, settlement). A stream
    that ends whole stores its answer under `cache_req` (a finished answer is stored by the caller)."""
    state = ctx.state
    usage_chunk = ChatCompletionChunk(id=job.request_id, created=job.created, model=state.model_name, choices=[])
    on_done = None
    if cache_req is not None and job.num_choices == 1:
        def on_done(finals, settlement):
            remember(state, cache_req, finals, settlement, num_prompt_tokens)
    return await run_job(request, state, body, job, lambda: _prelude(job, state.model_name),
                         _chunk_renderer(ctx, job), usage_chunk, on_done)


def remember(state, cache_req, finals: dict, settlement, num_prompt_tokens: int) -> None:
    """A successful single answer goes into the response caches (in the background)."""
    if cache_req is None or settlement.status != "ok" or len(finals) != 1:
        return
    out = finals[0]
    state.control.remember_answer(cache_req, out.text, out.finish_reason, num_prompt_tokens, len(out.token_ids),
                                  settlement.cost_usd, state.model_name)


def chat_completion(ctx: ServingContext, body: ChatCompletionRequest, job: Job, finals: dict, settlement, model: str,
                    frugal) -> ChatCompletion:
    want_logprobs = body.logprobs
    return ChatCompletion(
        id=job.request_id, created=job.created, model=model, usage=usage(job, finals, settlement), frugal=frugal,
        choices=[ChatChoice(index=i, message=AssistantMessage(content=out.text), finish_reason=out.finish_reason,
                            stop_reason=stop_reason(out),
                            logprobs=chat_logprobs(out.logprobs or [], ctx.token_texts) if want_logprobs else None)
                 for i, out in finals.items()])


def _prelude(job: Job, model: str) -> list[ChatCompletionChunk]:
    """OpenAI opens every choice with a chunk that carries the role and empty content."""
    return [ChatCompletionChunk(id=job.request_id, created=job.created, model=model, choices=[
        ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))]) for i in range(job.num_choices)]


def _chunk_renderer(ctx: ServingContext, job: Job):
    model, want_logprobs = ctx.state.model_name, job.params.logprobs is not None

    def render(index: int, out: RequestOutput) -> ChatCompletionChunk | None:
        rows = delta_rows(out) if want_logprobs else []
        if not out.delta_text and not rows and not out.finished:
            return None  # tokens held back (a stop string may be forming): nothing to show yet
        choice = ChatChunkChoice(
            index=index, delta=DeltaMessage(content=out.delta_text) if out.delta_text else DeltaMessage(),
            logprobs=chat_logprobs(rows, ctx.token_texts) if want_logprobs else None,
            finish_reason=out.finish_reason if out.finished else None,
            stop_reason=stop_reason(out))
        return ChatCompletionChunk(id=job.request_id, created=job.created, model=model, choices=[choice])

    return render

