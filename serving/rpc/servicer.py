"""The gRPC servicers: generation (unary and streaming), model listing, and engine statistics.

Status codes are part of the interface: INVALID_ARGUMENT names the bad field, NOT_FOUND an unknown model,
RESOURCE_EXHAUSTED (with a `retry-after-ms` trailer) a full waiting queue, UNAVAILABLE a daemon that is still
loading or already draining. A cancelled or timed-out call closes its engine stream, which aborts the request and
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
from serving.control.admission import Admission
from serving.control.context import RequestContext
from serving.control.errors import ControlError
from serving.control.ledger import LedgerUnavailable
from serving.engine.async_engine import EngineDeadError
from serving.engine.outputs import RequestOutput
from serving.rpc import convert
from serving.rpc.gen.frugal.v1 import inference_pb2 as pb
from serving.rpc.gen.frugal.v1 import inference_pb2_grpc as pb_grpc
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
    """One admitted Generate / GenerateStream call."""

    req: convert.EngineRequest  # what goes to the engine
    ctx: RequestContext  # who asked
    admission: Admission  # its reservations; settles the cost


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
        return convert.response(final, state.model_name, state.tokenizers.loop_tokenizer, settlement.cost_usd,
                                convert.frugal_info(call.admission.route, call.admission.route_reason))

    async def GenerateStream(self, request: pb.GenerateRequest, context) -> None:
        # NOTE: a coroutine that writes, not an async generator: a cancelled call then raises CancelledError right
        # here, and `aclosing` closes the engine stream at once instead of whenever the generator is collected.
        state, call = await self._prepare(request, context)
        final = settlement = None
        try:
            async with _StatusMapper(context, call.req, state):
                async with aclosing(self._generate(state, call)) as outputs:
                    async for out in outputs:
                        final = out
                        cost = 0.0
                        if out.finished:
                            self._check_failed(out)
                            settlement = await call.admission.settled()  # the row is committed before the end
                            cost = settlement.cost_usd
                        frugal = convert.frugal_info(call.admission.route, call.admission.route_reason) \
                            if out.finished else None
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
        state = await self.holder.serving_state(context)
        ctx = await _authenticate(state, request.context, context)
        if request.model and request.model != state.model_name:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"model {request.model!r} is not served here; available: {state.model_name!r}")
        try:
            state.control.check_model(ctx, state.model_name)
            checked = convert.check_request(request, state.limits)
        except ControlError as e:
            await _abort_control(context, e)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            prompt_ids = await _tokenize(state, checked)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except QueueFullError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e}; retry after {state.retry_after_ms} ms",
                                trailing_metadata=(("retry-after-ms", str(state.retry_after_ms)),))
        req = convert.engine_request(checked, prompt_ids)
        try:
            admission = await state.control.admit(ctx, req.req_id, state.model_name, len(prompt_ids),
                                                  req.params.max_tokens)
        except ControlError as e:
            await _abort_control(context, e)
        if admission.max_tokens < req.params.max_tokens:  # a soft budget's fallback
            req.params = dataclasses.replace(req.params, max_tokens=admission.max_tokens,
                                             min_tokens=min(req.params.min_tokens, admission.max_tokens))
        logger.debug("request %s: tenant=%s key=%s workflow=%s task=%s priority=%s", req.req_id, ctx.tenant,
                     ctx.key_id or "-", ctx.workflow_id or "-", ctx.task_id or "-", req.priority.name.lower())
        return state, _Call(req, ctx, admission)

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


async def _tokenize(state: ServerState, checked: convert.CheckedRequest) -> list[int]:
    """The prompt's token ids, from the tokenizer pool (never on the event loop). Raises ValueError naming the
    field for what the chat template refuses."""
    request = checked.request
    kind = request.WhichOneof("input")
    if kind == "prompt_token_ids":
        return list(request.prompt_token_ids.ids)
    if kind == "prompt":
        return await state.tokenizers.encode(request.prompt) if request.prompt else []
    try:
        return await state.tokenizers.chat(checked.messages)
    except ValueError as e:
        raise ValueError(f"chat.{e}") from None


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
