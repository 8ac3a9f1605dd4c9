"""The gRPC servicers: generation (unary and streaming), model listing, and engine statistics.

A chat call takes the HTTP chat path's cost steps, through the same control-plane calls: the prompt optimizer
(serving/rpc/optimized.py), then the response caches (serving/rpc/cached.py; a hit answers here, at no cost),
then admission, the engine, settlement, and the answer stored for the next identical call.

Status codes are part of the interface: INVALID_ARGUMENT names the bad field, NOT_FOUND an unknown model,
RESOURCE_EXHAUSTED (with a `retry-after-ms` trailer) a full waiting queue, UNAVAILABLE a daemon that is still
loading or already draining (or a cache store that is down). A cancelled or timed-out call closes its engine stream, which aborts the request and
frees its KV blocks at the next step boundary.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from contextlib import aclosing
from dataclasses import dataclass

import grpc

from scheduler import QueueFullError
from serving.control.admission import Admission, Settlement
from serving.control.caches import CacheHit, CacheRequest
from serving.control.context import RequestContext
from serving.control.errors import ControlError
from serving.control.ledger import LedgerUnavailable
from serving.engine.async_engine import EngineDeadError
from serving.engine.outputs import RequestOutput
from serving.engine.sampling_params import SamplingParams
from serving.rpc import cached, convert
from serving.rpc.gen.frugal.v1 import inference_pb2 as pb
from serving.rpc.gen.frugal.v1 import inference_pb2_grpc as pb_grpc
from serving.rpc.optimized import optimize_chat
from serving.server_state import ServerState

logger = logging.getLogger(__name__)


class StateHolder:
    """The servicers start before the model has loaded; the daemon fills in the state once it is warm."""

    def __init__(self) -> None:
        self.state: ServerState | None = None

    async def serving_state(self, context: grpc.aio.ServicerContext) -> ServerState:
        """The state, or an UNAVAILABLE abort while loading or draining."""
        state = self.state
        if state is None or not state.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        if state.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")
        if not state.async_llm.is_running:
            reason = state.async_llm.health().reason or "the engine has stopped"
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the engine is not running: {reason}")
        return state


@dataclass(slots=True)
class _Call:
    """One Generate / GenerateStream call, checked, optimized and tokenized; then answered by a cache or admitted."""

    req: convert.EngineRequest  # what goes to the engine
    ctx: RequestContext  # who asked
    tokens_saved: int  # prompt tokens the optimizer removed
    cache_req: CacheRequest | None  # how the caches see it; None: no cache takes it (off, not chat, not keyable)
    hit: CacheHit | None = None  # the cache's answer; set: no admission, nothing runs
    admission: Admission | None = None  # its reservations, once admitted; settles the cost

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.req.prompt["prompt_token_ids"])


async def _abort_control(context, e: ControlError) -> None:
    trailers = (("retry-after-ms", str(max(1, math.ceil(1000 * e.retry_after_s)))),) if e.retry_after_s else ()
    await context.abort(e.grpc_status, e.message, trailing_metadata=trailers)


async def _authenticate(state: ServerState, request_context: pb.RequestContext, context) -> RequestContext:
    try:
        return await state.control.authenticate(convert.caller(request_context, context.invocation_metadata()))
    except ValueError as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except ControlError as e:
        await _abort_control(context, e)


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, holder: StateHolder) -> None:
        self.holder = holder

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        state, call = await self._prepare(request, context)
        if call.hit is not None:
            return cached.hit_response(call.req.req_id, state.model_name, call.hit, call.num_prompt_tokens,
                                       call.tokens_saved)
        final = settlement = None
        try:
            async with _StatusMapper(context, call.req, state):
                async with aclosing(self._generate(state, call)) as outputs:
                    async for out in outputs:
                        final = out
                self._check_failed(final)
                settlement = await call.admission.settled()
        finally:
            call.admission.close()
        _log_finished(call, final, settlement)
        _remember(state, call, final, settlement)
        return convert.response(final, state.model_name, state.tokenizers.loop_tokenizer, settlement.cost_usd,
                                _frugal(call))

    async def GenerateStream(self, request: pb.GenerateRequest, context) -> None:
        # NOTE: a coroutine that writes, not an async generator: a cancelled call then raises CancelledError right
        # here, and `aclosing` closes the engine stream at once instead of whenever the generator is collected.
        state, call = await self._prepare(request, context)
        if call.hit is not None:
            await context.write(cached.hit_chunk(call.req.req_id, state.model_name, call.hit,
                                                 call.num_prompt_tokens, call.tokens_saved))
            return
        final = settlement = None
        try:
            async with _StatusMapper(context, call.req, state):
                async with aclosing(self._generate(state, call)) as outputs:
                    async for out in outputs:
                        final = out
                        cost, frugal = 0.0, None
                        if out.finished:
                            self._check_failed(out)
                            settlement = await call.admission.settled()  # the row is committed before the end
                            cost, frugal = settlement.cost_usd, _frugal(call)
                            _remember(state, call, out, settlement)
                        await context.write(convert.chunk(out, state.model_name, state.tokenizers.loop_tokenizer,
                                                          cost, frugal))
        finally:
            call.admission.close()
        _log_finished(call, final, settlement)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        state = await self.holder.serving_state(context)
        path = state.async_llm.engine.loaded.path
        return pb.ListModelsResponse(models=[pb.ModelInfo(id=state.model_name, max_model_len=state.max_model_len,
                                                          path=path)])

    async def ReportOutcome(self, request: pb.ReportOutcomeRequest, context) -> pb.ReportOutcomeResponse:
        state = await self.holder.serving_state(context)
        ctx = await _authenticate(state, request.context, context)
        quality = request.quality if request.HasField("quality") else None
        try:
            await state.control.report_outcome(ctx, request.task_id, request.workflow_id or None, request.outcome,
                                               quality)
        except ControlError as e:
            await _abort_control(context, e)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.ReportOutcomeResponse()

    async def ReportToolCalls(self, request: pb.ReportToolCallsRequest, context) -> pb.TaskStatus:
        state = await self.holder.serving_state(context)
        ctx = await _authenticate(state, request.context, context)
        try:
            task = await state.control.report_tool_calls(ctx, request.task_id, request.count or 1)
        except ControlError as e:
            await _abort_control(context, e)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.TaskStatus(task_id=request.task_id, calls=task.calls, tool_calls=task.tool_calls)

    # -- helpers ----------------------------------------------------------------------------------------
    async def _prepare(self, request: pb.GenerateRequest, context) -> tuple[ServerState, _Call]:
        """Checks, optimizes and tokenizes the call, then asks the caches; a miss is admitted. Every refusal aborts
        the call before anything is reserved."""
        started = time.monotonic()
        state = await self.holder.serving_state(context)
        ctx = await _authenticate(state, request.context, context)
        if request.model and request.model != state.model_name:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"model {request.model!r} is not served here; available: {state.model_name!r}")
        try:
            state.control.check_model(ctx, state.model_name)
            checked = convert.check_request(request, state.limits)
            options = cached.cache_options(context.invocation_metadata())
        except ControlError as e:
            await _abort_control(context, e)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        tokens_saved, messages = 0, checked.messages
        try:
            if messages is not None:
                optimized = await optimize_chat(state, ctx.tenant, messages, checked.context_chunks)
                if optimized is not None:
                    messages, tokens_saved = optimized.messages, optimized.report.tokens_saved
                    _cap_max_tokens(checked, optimized.max_tokens)  # the route's cap
            prompt_ids = await _tokenize(state, checked, messages)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except QueueFullError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e}; retry after {state.retry_after_ms} ms",
                                trailing_metadata=(("retry-after-ms", str(state.retry_after_ms)),))
        req = convert.engine_request(checked, prompt_ids)
        cache_req = None
        if state.control.caches is not None:
            cache_req = cached.cache_request(ctx, req.params, messages, f"self-hosted:{state.model_name}", options)
        call = _Call(req, ctx, tokens_saved, cache_req)
        if cache_req is not None:
            call.hit = await _lookup(state, call, started, context)
            if call.hit is not None:
                return state, call
        try:
            call.admission = await state.control.admit(ctx, req.req_id, state.model_name, len(prompt_ids),
                                                       req.params.max_tokens)
        except ControlError as e:
            await _abort_control(context, e)
        call.admission.tokens_saved = tokens_saved  # the ledger row and frugal:tokens_saved_total
        if call.admission.max_tokens < req.params.max_tokens:  # a soft budget's fallback
            req.params = _capped(req.params, call.admission.max_tokens)
        logger.debug("request %s: tenant=%s key=%s workflow=%s task=%s priority=%s", req.req_id, ctx.tenant,
                     ctx.key_id or "-", ctx.workflow_id or "-", ctx.task_id or "-", req.priority.name.lower())
        return state, call

    @staticmethod
    def _generate(state: ServerState, call: _Call):
        req, admission = call.req, call.admission
        # NOTE: the admission expects the engine request when the stream starts, and hears once how it ended.
        return state.async_llm.generate(req.prompt, req.params, req_id=req.req_id, priority=req.priority,
                                        tenant_id=call.ctx.tenant, busy_s_cap=admission.busy_s_cap,
                                        on_done=admission.expect())

    @staticmethod
    def _check_failed(out: RequestOutput) -> None:
        if out.error is not None:
            raise _EngineFailure(out.error)


async def _tokenize(state: ServerState, checked: convert.CheckedRequest, messages: list[dict] | None) -> list[int]:
    """The prompt's token ids, from the tokenizer pool (never on the event loop); `messages`: the chat input as the
    optimizer left it. Raises ValueError naming the field for what the chat template refuses."""
    request = checked.request
    kind = request.WhichOneof("input")
    if kind == "prompt_token_ids":
        return list(request.prompt_token_ids.ids)
    if kind == "prompt":
        return await state.tokenizers.encode(request.prompt) if request.prompt else []
    try:
        return await state.tokenizers.chat(messages)
    except ValueError as e:
        raise ValueError(f"chat.{e}") from None


def _capped(params: SamplingParams, max_tokens: int) -> SamplingParams:
    return dataclasses.replace(params, max_tokens=max_tokens, min_tokens=min(params.min_tokens, max_tokens))


def _cap_max_tokens(checked: convert.CheckedRequest, cap: int | None) -> None:
    if cap is not None and cap < checked.params.max_tokens:
        checked.params = _capped(checked.params, cap)


async def _lookup(state: ServerState, call: _Call, started: float, context) -> CacheHit | None:
    """The caches' answer, with its ledger row written, or None on a miss."""
    try:
        hit = await state.control.cached_answer(call.ctx, call.cache_req)
        if hit is not None:
            await state.control.record_cache_hit(call.ctx, call.req.req_id, state.model_name, hit,
                                                 call.num_prompt_tokens, 1000 * (time.monotonic() - started))
    except LedgerUnavailable as e:
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
    except Exception as e:  # the shared store (Redis) is down or slow: not the caller's fault, and retryable
        logger.exception("request %s: the response caches failed: %s", call.req.req_id, type(e).__name__)
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"the response caches are unavailable ({type(e).__name__}); "
                                                         f"retry shortly, or send x-frugal-cache: off")
    if hit is not None:
        logger.info("request %s answered from the %s cache: tenant=%s saved $%.6f", call.req.req_id, hit.kind,
                    call.ctx.tenant, hit.saved_usd)
    return hit


def _frugal(call: _Call) -> pb.FrugalInfo:
    return convert.frugal_info(call.admission.route, call.admission.route_reason, call.tokens_saved)


def _remember(state: ServerState, call: _Call, out: RequestOutput, settlement: Settlement) -> None:
    """Stores a miss's answer for the next identical call (the caches decide what they keep)."""
    if call.cache_req is not None and settlement.status == "ok":
        state.control.remember_answer(call.cache_req, out.text, out.finish_reason, len(out.prompt_token_ids),
                                      len(out.token_ids), settlement.cost_usd, state.model_name)


def _log_finished(call: _Call, out: RequestOutput | None, settlement) -> None:
    if out is None:
        return
    latency = time.monotonic() - out.metrics.arrival_time if out.metrics else 0.0
    ctx = call.ctx
    logger.info("request %s done: tenant=%s workflow=%s task=%s prompt=%d cached=%d completion=%d finish=%s %.2fs "
                "$%.6f", call.req.req_id, ctx.tenant, ctx.workflow_id or "-", ctx.task_id or "-",
                len(out.prompt_token_ids), out.num_cached_tokens, len(out.token_ids), out.finish_reason, latency,
                settlement.cost_usd if settlement else 0.0)


class _EngineFailure(Exception):
    """The engine failed the request (a step raised); the client gets INTERNAL."""


class _StatusMapper:
    """Turns engine exceptions into gRPC statuses; cancellation and aborts pass through untouched."""

    def __init__(self, context, req: convert.EngineRequest, state: ServerState) -> None:
        self.context, self.req, self.state = context, req, state

    async def __aenter__(self):
        return self

    async def __aexit__(self, exc_type, exc, tb):
        if isinstance(exc, asyncio.CancelledError):  # the engine stream is already closed: blocks come back
            logger.info("request %s cancelled (client gone or deadline passed)", self.req.req_id)
        if exc is None or not isinstance(exc, Exception) or isinstance(exc, grpc.aio.AbortError):
            return False
        context, req_id = self.context, self.req.req_id
        if isinstance(exc, QueueFullError):
            retry_ms = self.state.retry_after_ms
            logger.info("request %s refused: waiting queue full", req_id)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{exc}; retry after {retry_ms} ms",
                                trailing_metadata=(("retry-after-ms", str(retry_ms)),))
        if isinstance(exc, ValueError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, convert.field_path(str(exc)))
        if isinstance(exc, EngineDeadError):
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the engine has stopped: {exc}")
        if isinstance(exc, LedgerUnavailable):
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if isinstance(exc, _EngineFailure):
            logger.error("request %s failed in the engine: %s", req_id, exc)
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        logger.exception("request %s failed", req_id)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")


class DebugServicer(pb_grpc.DebugServiceServicer):
    def __init__(self, holder: StateHolder) -> None:
        self.holder = holder

    async def GetEngineStats(self, request: pb.GetEngineStatsRequest, context) -> pb.EngineStats:
        state = self.holder.state
        if state is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        s = state.engine_stats()
        health = state.async_llm.health()
        return pb.EngineStats(
            num_total_blocks=s.num_total_blocks, num_free_blocks=s.num_free_blocks, num_running=s.num_running,
            num_waiting=s.num_waiting, num_unfinished=s.num_unfinished, max_waiting=s.max_waiting or 0,
            kv_cache_usage=s.kv_cache_usage, prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits, prefix_cache_hit_rate=s.prefix_cache_hit_rate,
            num_preemptions=s.num_preemptions, num_steps=s.num_steps, ready=state.ready, draining=state.draining,
            num_failed_steps=s.steps.num_failed_steps, num_failed_requests=s.steps.num_failed_requests,
            num_streams=state.async_llm.num_streams, healthy=health.healthy, unhealthy_reason=health.reason or "",
            busy_s=s.steps.step_time_s)
