"""Server-sent events: `data: {chunk}\\n\\n` per chunk, `data: [DONE]\\n\\n` at the end, errors as an error event.

The handler awaits the first output before it answers, so a refusal (bad input, full queue) is still an
HTTP status; after the headers, a failure is a `data: {"error": ...}` event, which OpenAI's client raises.
A client that goes away cancels the body iterator (Starlette listens for the disconnect), and
`SSEResponse` closes it in every case, which closes the output stream and aborts the engine requests.
"""
from __future__ import annotations

import json
import logging
from typing import AsyncIterator, Callable

from pydantic import BaseModel
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from serving.engine.outputs import RequestOutput
from serving.http.errors import APIError
from serving.http.generation import (ChoiceOutput, GenerateRequest, Job, api_error, check_finished, collect,
                                     frugal_info, generate, run_for_client, settle, usage)

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"

RenderChunk = Callable[[int, RequestOutput], BaseModel | None]  # one output -> a chunk, or None to send nothing


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], outputs: AsyncIterator[ChoiceOutput], request_id: str):
        super().__init__(events, headers={"Cache-Control": "no-cache", "x-request-id": request_id})
        self.outputs = outputs  # the engine outputs `events` reads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # NOTE: on a disconnect Starlette cancels the send loop but leaves the iterator open (or never
            # started); close both here so the engine requests are aborted now, not when the GC gets to them.
            await self.body_iterator.aclose()
            await self.outputs.aclose()


def sse(payload: BaseModel | dict) -> str:
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"


async def sse_events(first: ChoiceOutput, outputs: AsyncIterator[ChoiceOutput], job: Job, prelude: list[BaseModel],
                     render: RenderChunk, usage_chunk: BaseModel | None,
                     to_api_error: Callable[[Exception], APIError | None],
                     on_done: Callable[[dict, object], None] | None = None) -> AsyncIterator[str]:
    """The whole event stream of one response. `first` was already taken from `outputs`; `usage_chunk` is the
    empty last chunk that will carry the usage and the `frugal` object (None: no usage chunk, and both ride on
    the last choice's final chunk). The last chunk goes out only once the request's ledger row is committed.
    `on_done(finals, settlement)` hears a stream that ended whole (to store its answer in the caches)."""
    finals: dict[int, RequestOutput] = {}
    settlement = None
    index, out = first
    try:
        for chunk in prelude:
            yield sse(chunk)
        while True:
            if out.finished:
                check_finished(out)
                finals[index] = out
            chunk = render(index, out)
            if out.finished and len(finals) == job.num_choices:
                settlement = await settle(job)
                if usage_chunk is None and chunk is not None:
                    chunk = chunk.model_copy(update={"usage": usage(job, finals, settlement),
                                                     "frugal": frugal_info(job)})
            if chunk is not None:
                yield sse(chunk)
            try:
                index, out = await anext(outputs)
            except StopAsyncIteration:
                break
        if usage_chunk is not None:
            yield sse(usage_chunk.model_copy(update={"usage": usage(job, finals, settlement),
                                                     "frugal": frugal_info(job)}))
        yield DONE
        if on_done is not None and settlement is not None and len(finals) == job.num_choices:
            on_done(finals, settlement)
    except Exception as e:  # after the headers, an error can only travel as an event
        err = to_api_error(e)
        if err is None:
            logger.exception("stream %s failed", job.request_id)
            err = APIError(500, "internal server error", type="server_error", code="internal_error")
        yield sse(err.body())
        yield DONE
    finally:
        await outputs.aclose()
        if job.admission is not None:
            job.admission.close()


async def run_job(request: Request, state, body: GenerateRequest, job: Job, prelude: Callable[[], list[BaseModel]],
                  render: RenderChunk, usage_chunk: BaseModel, on_done: Callable[[dict, object], None] | None = None):
    """Runs an admitted job: the SSE response when the body asks to stream, else (finals, settlement) once every
    choice has finished and the request's ledger row is committed. The admission is closed either way (by the
    event stream, when there is one)."""
    streaming = False
    try:
        outputs = generate(state, job)
        if body.stream:
            first = await run_for_client(request, state, body, anext(outputs))
            events = sse_events(first, outputs, job, prelude(), render, usage_chunk if body.include_usage else None,
                                lambda e: api_error(e, state, body), on_done)
            streaming = True
            return SSEResponse(events, outputs, job.request_id)
        finals = await run_for_client(request, state, body, collect(outputs, job))
        return finals, await run_for_client(request, state, body, settle(job))
    finally:
        if not streaming:
            job.admission.close()
