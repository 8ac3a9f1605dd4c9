"""POST /v1/chat/completions when the daemon serves several models (`models:` in frugal.yaml).

    authenticate -> optimise -> cache (scoped by the model the client asked for) -> route -> admit on the
    route's model -> self-hosted engine or external API -> [cascade: escalate an unsure answer] -> settle

The client names a model (`model: "<id>"`: that model only, no fallback) or lets the router choose (`"auto"`, or
no model). The router's choice comes with ordered fallbacks: an engine at capacity, a dead engine, an external
route that hangs, refuses, sends garbage or has its circuit open makes the request go to the next route; a
refusal by the control plane (budget, rate limit) does not. Private data (a private key, or the header
`x-frugal-sensitivity: private`) only ever reaches models cleared for it. Headers the router reads:
`x-frugal-task-type` and `x-frugal-latency-target-ms`.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response

from serving.control.context import RequestContext
from serving.control.errors import ControlError
from serving.control.router import RouteConfig, RouteDecision, RouteRequest, should_escalate
from serving.http.cached import cache_request, cached_chat_response, elapsed_ms
from serving.http.chat import (chat_completion, chat_ids, chat_job, check_logprob_params, optimized,
                               run_chat_job, template_messages)
from serving.http.control import admit_job
from serving.http.errors import APIError, control_api_error
from serving.http.external import RouteFailed, external_chat, external_chat_stream, upstream_body
from serving.http.generation import ServingContext, check_admission, run_for_client
from serving.http.logprobs import TokenTexts
from serving.http.protocol import ChatCompletionRequest
from serving.http.responses import ChatCompletion, FrugalInfo
from serving.http.streaming import SSEResponse

logger = logging.getLogger(__name__)

AUTO = "auto"  # the model name that lets the router choose
_FALLBACK_STATUSES = {429: ("queue_full",), 503: ("engine_dead", "aborted", "draining", "loading")}


@dataclass(slots=True)
class Plan:
    routes: list[RouteConfig]  # in the order they are tried
    reason: str  # why the first one
    decision: RouteDecision | None  # the router's; None: the client named the model
    downgraded: bool = False  # re-planned past a soft budget
    notes: list[str] = field(default_factory=list)  # fallbacks and escalations, for the response's reason


@dataclass(slots=True)
class Answer:
    """One route's finished (non-streamed) answer."""

    route: RouteConfig
    completion: ChatCompletion  # the response body, without the `frugal` object yet
    text: str  # the first choice's text (what a cache stores)
    finish_reason: str
    logprobs: list[float] | None  # the first choice's chosen-token logprobs: the cascade's confidence
    cost_usd: float


class _Downgrade(Exception):
    """Admission found a soft budget past its limit: re-plan on the cheapest route."""


def served_view(ctx: ServingContext, model_id: str) -> ServingContext:
    """A ServingContext on one self-hosted model's engine and tokenizer (logprob texts are per tokenizer)."""
    if model_id not in ctx.views:
        state = ctx.state.view(model_id)
        tokenizer = state.tokenizers.loop_tokenizer
        ctx.views[model_id] = ServingContext(state=state, tokenizer=tokenizer, token_texts=TokenTexts(tokenizer))
    return ctx.views[model_id]


def _resolve(ctx: ServingContext, body: ChatCompletionRequest, caller: RequestContext) -> str | None:
    """The model the client named (checked: served, allowed for the key, a chat model, private-safe), or None
    for the router to choose."""
    state = ctx.state
    if body.model in (None, AUTO):
        return None
    ids = state.model_ids()
    if body.model not in ids:
        raise APIError(404, f"The model `{body.model}` does not exist; this server serves "
                       f"{', '.join(f'`{m}`' for m in ids)} (or `{AUTO}` to let the router choose)",
                       param="model", code="model_not_found")
    try:
        state.control.check_model(caller, body.model)
    except ControlError as e:
        raise control_api_error(e) from None
    route = _route_of(state, body.model)
    if not route.chat:
        raise APIError(400, f"model `{body.model}` takes plain completions only (POST /v1/completions)",
                       param="model", code="model_not_chat")
    if caller.private and not route.self_hosted:
        raise APIError(403, f"model `{body.model}` is not cleared for private data, and this request is private",
                       type="permission_error", param="model", code="private_data")
    return body.model


def _route_of(state, model_id: str) -> RouteConfig:
    router = state.router
    if router is not None:
        for route in router.config.routes:
            if route.model.split(":", 1)[1] == model_id:
                return route
    served = state.models.get(model_id)
    prefix = "self-hosted" if served is not None else "external"
    return RouteConfig(id=model_id, model=f"{prefix}:{model_id}", self_hosted=served is not None,
                       usd_per_m_input=0.0, usd_per_m_output=0.0, quality=0, chat=served is None or served.chat)


def _latency_target(request: Request) -> float | None:
    raw = request.headers.get("x-frugal-latency-target-ms")
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise APIError(400, f"x-frugal-latency-target-ms must be a number of milliseconds > 0, got {raw!r}",
                       param="x-frugal-latency-target-ms", code="invalid_header")
    return value


async def _plan(ctx: ServingContext, request: Request, caller: RequestContext, pinned: str | None,
                question: str | None, num_prompt_tokens: int, max_tokens: int, over_soft_budget: bool) -> Plan:
    state = ctx.state
    if pinned is not None:
        return Plan([_route_of(state, pinned)], f"{pinned}: the model the client asked for", None)
    router = state.router
    if router is None:
        raise APIError(400, f"this server has no router: name one of {', '.join(state.model_ids())} as the model",
                       param="model", code="model_required")
    task_type = request.headers.get("x-frugal-task-type") or None
    route_request = RouteRequest(tenant=caller.tenant, private=caller.private, prompt=question, task_type=task_type,
                                 latency_target_ms=_latency_target(request), over_soft_budget=over_soft_budget,
                                 prompt_tokens=num_prompt_tokens, max_tokens=max_tokens, chat=True)
    try:
        # NOTE: the classifier embeds the prompt: CPU work, off the event loop
        decision = await asyncio.to_thread(router.decide, route_request)
    except ControlError as e:
        raise control_api_error(e) from None
    allowed = [r for r in (decision.route, *decision.fallbacks) if _key_allows(state, caller, r)]
    if not allowed:
        raise APIError(403, f"the key may use none of the eligible routes ({decision.route.id}, "
                       f"{', '.join(r.id for r in decision.fallbacks)})", type="permission_error", param="model",
                       code="model_not_allowed")
    return Plan(allowed, decision.reason, decision, downgraded=over_soft_budget)


def _key_allows(state, caller: RequestContext, route: RouteConfig) -> bool:
    try:
        state.control.check_model(caller, route.model.split(":", 1)[1])
    except ControlError:
        return False
    return True


async def routed_chat_completion(ctx: ServingContext, body: ChatCompletionRequest, request: Request,
                                 caller: RequestContext) -> Response:
    state = ctx.state
    check_admission(state, body, caller, routed=True)
    check_logprob_params(state, body)
    started = time.monotonic()
    pinned = _resolve(ctx, body, caller)
    asked = pinned or AUTO
    chat_models = [m for m in state.models.values() if m.chat]
    if not chat_models:
        raise APIError(400, "no self-hosted model here takes chat messages", param="model", code="model_not_chat")
    # NOTE: the first self-hosted chat model counts the prompt for the router, the reservation of an external
    # route and the cache key; each self-hosted route tokenizes again with its own tokenizer.
    counter = served_view(ctx, pinned if pinned in state.models else chat_models[0].id)
    messages = template_messages(ctx, body)
    # NOTE: the router reads the question as the client asked it, before the optimizer packs context chunks into
    # it: retrieved text says nothing about how hard the question is
    question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
    result = await run_for_client(request, state, body, optimized(ctx, body, caller.tenant, messages, f"route:{asked}"))
    if result is not None:
        messages = result.messages
    ids = await run_for_client(request, state, body, chat_ids(counter.state, messages))
    job = chat_job(counter.state, body, caller, ids, result)
    request_id = job.request_id
    cache_req = None
    if state.control.caches is not None:
        cache_req = cache_request(request, job, messages, f"route:{asked}")
        hit = await state.control.cached_answer(job.ctx, cache_req) if cache_req is not None else None
        if hit is not None:
            await state.control.record_cache_hit(job.ctx, request_id, hit.response.model or asked, hit, len(ids),
                                                 elapsed_ms(started))
            return cached_chat_response(job, hit.response.model or asked, len(ids), hit, body.stream,
                                        body.include_usage)
    plan = await _plan(ctx, request, caller, pinned, question, len(ids), job.params.max_tokens, False)
    while True:
        try:
            return await _serve(ctx, body, request, caller, plan, messages, result, request_id, cache_req, len(ids))
        except _Downgrade:
            plan = await _plan(ctx, request, caller, pinned, question, len(ids), job.params.max_tokens, True)
            plan.notes.append("past a soft budget: re-routed to the cheapest eligible route")


async def _serve(ctx, body, request, caller, plan: Plan, messages, result, request_id: str, cache_req,
                 num_prompt_tokens: int) -> Response:
    control = ctx.state.control
    cascade = plan.decision.cascade if plan.decision is not None and not body.stream and body.n in (None, 1) \
        else None
    failures: list[RouteFailed] = []
    for i, route in enumerate(plan.routes):
        reason = "; ".join([plan.reason, *plan.notes])
        try:
            answer = await _attempt(ctx, body, request, caller, plan, route, messages, result, request_id, reason,
                                    want_logprobs=cascade is not None and i == 0, num_prompt_tokens=num_prompt_tokens,
                                    cache_req=cache_req)
        except RouteFailed as e:
            failures.append(e)
            nxt = plan.routes[i + 1].id if i + 1 < len(plan.routes) else None
            control.observer.fallback(caller, route.id, nxt, e.kind)
            logger.warning("%s: route %s failed (%s: %s)%s", request_id, route.id, e.kind, e.message,
                           f"; falling back to {nxt}" if nxt else "")
            plan.notes.append(f"{route.id} failed ({e.kind}): fell back to {nxt}" if nxt else
                              f"{route.id} failed ({e.kind})")
            continue
        if isinstance(answer, Response):  # a stream: it carries its own `frugal` object
            return answer
        if i == 0 and cascade is not None:
            verdict = should_escalate(cascade, answer.logprobs, plan.decision.p_complex)
            stronger = next((r for r in plan.routes if r.id == cascade.escalate_to), None)
            if verdict.escalate and stronger is not None:
                control.observer.escalated(caller, route.id, stronger.id)
                plan.notes.append(f"cascade: {verdict.reason}")
                try:
                    unsure = answer
                    answer = await _attempt(ctx, body, request, caller, plan, stronger, messages, result, request_id,
                                            "; ".join([plan.reason, *plan.notes]), escalated_from=route.id,
                                            num_prompt_tokens=num_prompt_tokens)
                    # NOTE: the request cost both answers: the response (and what a cache hit later saves) says so
                    answer.cost_usd += unsure.cost_usd
                    spent = answer.completion.usage.model_copy(update={"cost_usd": answer.cost_usd})
                    answer.completion = answer.completion.model_copy(update={"usage": spent})
                except RouteFailed as e:  # NOTE: the first answer stands: unsure beats none
                    control.observer.fallback(caller, stronger.id, route.id, e.kind)
                    plan.notes.append(f"escalation to {stronger.id} failed ({e.kind}): kept {route.id}'s answer")
            elif verdict.mean_logprob is not None or verdict.escalate:
                plan.notes.append(f"cascade: {verdict.reason}")
        return _respond(ctx, body, plan, answer, request_id, cache_req, result, num_prompt_tokens)
    raise APIError(503, "every route failed: " + "; ".join(str(f) for f in failures), type="service_unavailable_error",
                   code="no_route_available", headers={"Retry-After": "1"})


def _respond(ctx, body, plan: Plan, answer: Answer, request_id: str, cache_req, result, num_prompt_tokens: int):
    route = answer.route
    frugal = FrugalInfo(route=route.model, reason="; ".join([plan.reason, *plan.notes]),
                        tokens_saved=result.report.tokens_saved if result is not None else 0)
    completion = answer.completion.model_copy(update={"frugal": frugal})
    if cache_req is not None and len(completion.choices) == 1:
        ctx.state.control.remember_answer(cache_req, answer.text, answer.finish_reason, num_prompt_tokens,
                                          completion.usage.completion_tokens, answer.cost_usd, route.id)
    return Response(completion.model_dump_json(), media_type="application/json", headers={"x-request-id": request_id})


async def _attempt(ctx, body, request, caller, plan: Plan, route: RouteConfig, messages, result, request_id: str,
                   reason: str, want_logprobs: bool = False, escalated_from: str | None = None,
                   num_prompt_tokens: int = 0, cache_req=None):
    model_id = route.model.split(":", 1)[1]
    state = ctx.state
    if model_id in state.models:
        return await _local(ctx, body, request, caller, plan, route, model_id, messages, result, request_id, reason,
                            want_logprobs, escalated_from, cache_req if body.stream else None)
    client = state.upstreams[model_id]
    max_tokens = body.requested_max_tokens or (result.max_tokens if result is not None else None) or 1024
    if result is not None and result.max_tokens is not None:
        max_tokens = min(max_tokens, result.max_tokens)
    try:
        admission = await state.control.admit(caller, request_id, model_id, num_prompt_tokens, max_tokens,
                                              num_choices_per_prompt=body.num_choices_per_prompt)
    except ControlError as e:
        raise control_api_error(e) from None
    admission.route, admission.route_reason, admission.escalated_from = route.model, reason, escalated_from
    admission.tokens_saved = result.report.tokens_saved if result is not None else 0
    if admission.soft_over and plan.decision is not None and not plan.downgraded:
        await admission.settle_external(None, "refused")
        raise _Downgrade()
    payload = upstream_body(body, messages, admission.max_tokens, want_logprobs)
    if body.stream:
        frugal = FrugalInfo(route=route.model, reason=reason, tokens_saved=admission.tokens_saved)
        return await external_chat_stream(client, admission, payload, request_id, model_id, frugal, body.include_usage)
    out = await external_chat(client, request, admission, payload)
    completion = ChatCompletion(id=request_id, created=int(time.time()), model=model_id, usage=out.usage,
                                choices=out.choices)
    first = out.choices[0]
    return Answer(route, completion, first.message.content, first.finish_reason, out.logprobs,
                  out.settlement.cost_usd)


async def _local(ctx, body, request, caller, plan: Plan, route: RouteConfig, model_id: str, messages, result,
                 request_id: str, reason: str, want_logprobs: bool, escalated_from: str | None, stream_cache_req=None):
    view = served_view(ctx, model_id)
    ids = await run_for_client(request, view.state, body, chat_ids(view.state, messages))
    logprobs = body.engine_logprobs if body.engine_logprobs is not None else (0 if want_logprobs else None)
    job = chat_job(view.state, body, caller, ids, result, logprobs=logprobs)
    job.request_id = request_id
    await admit_job(view.state, job)
    admission = job.admission
    admission.route_reason, admission.escalated_from = reason, escalated_from
    if admission.soft_over and plan.decision is not None and not plan.downgraded:
        admission.close()  # no engine request started: the admission releases everything
        raise _Downgrade()
    try:
        out = await run_chat_job(view, body, request, job, stream_cache_req, len(ids))
    except APIError as e:
        if e.code in _FALLBACK_STATUSES.get(e.status_code, ()):
            raise RouteFailed(route.id, e.code, e.message) from e
        raise
    if isinstance(out, SSEResponse):
        return out
    finals, settlement = out
    completion = chat_completion(view, body, job, finals, settlement, model_id, None)
    first = finals[0]
    chosen = [row[0][1] for row in first.logprobs or [] if row] if logprobs is not None else None
    if not body.logprobs:  # asked for the cascade only: the client did not ask for them
        completion = completion.model_copy(update={"choices": [c.model_copy(update={"logprobs": None})
                                                               for c in completion.choices]})
    return Answer(route, completion, first.text, first.finish_reason, chosen, settlement.cost_usd)

