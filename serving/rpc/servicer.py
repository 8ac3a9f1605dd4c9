"""The gRPC servicers: generation (unary and streaming), model listing, and engine statistics.

Status codes are part of the interface: INVALID_ARGUMENT names the bad field, NOT_FOUND an unknown model,
RESOURCE_EXHAUSTED (with a `retry-after-ms` trailer) a full waiting queue, UNAVAILABLE a daemon that is still
loading or already draining. A cancelled or timed-out call closes its engine stream, which aborts the request and
frees its KV blocks at the next step boundary.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing

import grpc

from scheduler import QueueFullError
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


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, holder: StateHolder) -> None:
        self.holder = holder

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        state, req = await self._prepare(request, context)
        final = None
        async with _StatusMapper(context, req, state):
            async with aclosing(self._generate(state, req)) as outputs:
                async for out in outputs:
                    final = out
            self._check_failed(final)
        _log_finished(req, final)
        return convert.response(final, state.model_name, state.tokenizers.loop_tokenizer)

    async def GenerateStream(self, request: pb.GenerateRequest, context) -> None:
        # NOTE: a coroutine that writes, not an async generator: a cancelled call then raises CancelledError right
        # here, and `aclosing` closes the engine stream at once instead of whenever the generator is collected.
        state, req = await self._prepare(request, context)
        final = None
        async with _StatusMapper(context, req, state):
            async with aclosing(self._generate(state, req)) as outputs:
                async for out in outputs:
                    final = out
                    if out.finished:
                        self._check_failed(out)
                    await context.write(convert.chunk(out, state.model_name, state.tokenizers.loop_tokenizer))
        _log_finished(req, final)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        state = await self.holder.serving_state(context)
        path = state.async_llm.engine.loaded.path
        return pb.ListModelsResponse(models=[pb.ModelInfo(id=state.model_name, max_model_len=state.max_model_len,
                                                          path=path)])

    # -- helpers ----------------------------------------------------------------------------------------
    async def _prepare(self, request: pb.GenerateRequest, context):
        state = await self.holder.serving_state(context)
        if request.model and request.model != state.model_name:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"model {request.model!r} is not served here; available: {state.model_name!r}")
        try:
            checked = convert.check_request(request, state.limits)
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
        logger.debug("request %s: tenant=%s workflow=%s task=%s priority=%s api_key=%s", req.req_id, req.tenant_id,
                     req.workflow_id or "-", req.task_id or "-", req.priority.name.lower(),
                     "set" if req.has_api_key else "none")
        return state, req

    @staticmethod
    def _generate(state: ServerState, req: convert.EngineRequest):
        return state.async_llm.generate(req.prompt, req.params, req_id=req.req_id, priority=req.priority,
                                        tenant_id=req.tenant_id)

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


def _log_finished(req: convert.EngineRequest, out: RequestOutput | None) -> None:
    if out is None:
        return
    latency = time.monotonic() - out.metrics.arrival_time if out.metrics else 0.0
    logger.info("request %s done: tenant=%s workflow=%s task=%s prompt=%d cached=%d completion=%d finish=%s %.2fs",
                req.req_id, req.tenant_id, req.workflow_id or "-", req.task_id or "-", len(out.prompt_token_ids),
                out.num_cached_tokens, len(out.token_ids), out.finish_reason, latency)


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
            num_streams=state.async_llm.num_streams, healthy=health.healthy, unhealthy_reason=health.reason or "")
