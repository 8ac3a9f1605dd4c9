"""What both generate endpoints share: admission, prompt and length checks, running the choices, disconnects, usage.

A request becomes a `Job`: its prompts as token ids, one SamplingParams, n choices per prompt, the caller's
authenticated context and, once admitted, the control plane's Admission. Each choice is one engine request;
`generate` merges their outputs into one stream of (choice index, output). Whoever consumes that stream owns it:
closing it (or cancelling the task awaiting it) aborts every engine request in it, which frees their KV blocks
at the next step boundary, and the Admission settles whatever they cost.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, TypeVar

from fastapi import Request

from scheduler import Priority
from serving.control.admission import Admission, Settlement
from serving.control.context import RequestContext
from serving.engine.outputs import RequestOutput
from serving.engine.sampling_params import SamplingParams
from serving.control.errors import ControlError
from serving.http.errors import APIError, bad_request, control_api_error, from_engine_error, unavailable
from serving.http.logprobs import TokenTexts
from serving.http.protocol import ChatCompletionRequest, CompletionRequest
from serving.http.responses import FrugalInfo, PromptTokensDetails, Usage
from serving.limits import check_text
from serving.server_state import ServerState

logger = logging.getLogger(__name__)

T = TypeVar("T")
GenerateRequest = ChatCompletionRequest | CompletionRequest
ChoiceOutput = tuple[int, RequestOutput]  # (choice index, output)

@dataclass(slots=True)
class ServingContext:
    """What the handlers share for the app's lifetime."""

    state: ServerState  # the engine and the server's status
    tokenizer: object  # the event loop's own tokenizer copy, for decoding only
    token_texts: TokenTexts  # token id -> text, for logprobs
    views: dict = dataclasses.field(default_factory=dict)  # model id -> ServingContext of another served model


@dataclass(slots=True)
class Job:
    request_id: str  # the response id; the engine request ids derive from it
    prompts: list[list[int]]  # prompt token ids, one list per input prompt
    prompt_texts: list[str | None]  # the prompts as text when they came as text
    params: SamplingParams  # every choice's parameters (choice i of n draws with seed + i)
    n: int  # choices per prompt
    priority: Priority  # scheduling class
    created: int  # unix seconds, the `created` of every response object
    ctx: RequestContext  # who asked (the tenant is the fair-share key and the prefix-cache salt)
    admission: Admission | None = None  # set by serving.http.control.admit; settles the cost
    tokens_saved: int = 0  # prompt tokens the optimizer removed

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n


def prompt_param(body: GenerateRequest) -> str:
    return "messages" if isinstance(body, ChatCompletionRequest) else "prompt"


def api_error(exc: Exception, state: ServerState, body: GenerateRequest) -> APIError | None:
    """The response for an exception out of the engine or the parameter checks; None for a bug here."""
    return from_engine_error(exc, state.retry_after_ms, set(type(body).model_fields), body.engine_field_aliases(),
                             prompt_param(body))


_NOT_READY = {
    "draining": "the server is shutting down and takes no new requests",
    "engine_dead": "the engine is not running",
    "loading": "the model is still loading",
}


def readiness(state: ServerState) -> str:
    """Whether the server takes new requests: "ready", or why not ("draining", "engine_dead", "loading")."""
    if state.draining:
        return "draining"
    if not state.async_llm.is_running:
        return "engine_dead"
    return "ready" if state.is_ready() else "loading"


def check_model(state: ServerState, model: str) -> None:
    if model != state.model_name:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{state.model_name}`",
                       param="model", code="model_not_found")


def check_admission(state: ServerState, body: GenerateRequest, ctx: RequestContext, routed: bool = False) -> None:
    """Refuses what no engine work can fix: another model (or one the key may not use), a server that is not
    taking requests, an option this server does not implement. `routed`: the model was already resolved and
    checked against the key by the routed path (serving/http/routed.py)."""
    if not routed:
        if body.model is not None:
            check_model(state, body.model)
        try:
            state.control.check_model(ctx, state.model_name)
        except ControlError as e:
            raise control_api_error(e) from None
    status = readiness(state)
    if status != "ready":
        reason = state.async_llm.health().reason if status == "engine_dead" else None
        raise unavailable(f"{_NOT_READY[status]}: {reason}" if reason else _NOT_READY[status], code=status)
    unsupported = body.unsupported_param()
    if unsupported is not None:
        raise bad_request(unsupported[1], unsupported[0], code="unsupported_parameter")
    if body.num_choices_per_prompt < 1:
        raise bad_request(f"n must be >= 1, got {body.n}", "n")
    n, num_prompts = body.num_choices_per_prompt, body.num_prompts
    state.limits.check_choices(num_prompts * n, "n" if n > 1 else prompt_param(body), f"{num_prompts} x {n}")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    state.limits.check_stop(stop, "stop", body.stop_token_ids or [], "stop_token_ids")
    for i, s in enumerate(stop):
        check_text_param(s, f"stop[{i}]")


def check_text_param(text: str, param: str) -> None:
    """A 400 naming `param` for a string the tokenizer cannot take (an unpaired surrogate)."""
    try:
        check_text(text, param)
    except ValueError as e:
        raise bad_request(str(e), param, code="invalid_text") from None


def make_job(state: ServerState, body: GenerateRequest, ctx: RequestContext, id_prefix: str,
             prompts: list[list[int]], prompt_texts: list[str | None], logprobs: int | None,
             default_max_tokens: int | None) -> Job:
    """Checks lengths and builds the sampling parameters. `default_max_tokens` None: fill the context."""
    n = body.num_choices_per_prompt
    max_model_len = state.max_model_len
    longest = max((len(ids) for ids in prompts), default=0)
    if longest >= max_model_len:
        raise bad_request(f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
                          f"{longest} tokens (at least one token must remain for the completion)",
                          prompt_param(body), code="context_length_exceeded")
    max_tokens = body.requested_max_tokens
    if max_tokens is None:
        max_tokens = max_model_len - longest if default_max_tokens is None else min(
            default_max_tokens, max_model_len - longest)
    elif max_tokens >= 1 and longest + max_tokens > max_model_len:  # below 1: SamplingParams says so
        raise bad_request(f"This model's maximum context length is {max_model_len} tokens; the prompt has "
                          f"{longest} and {body.max_tokens_param} asks for {max_tokens} more",
                          body.max_tokens_param, code="context_length_exceeded")
    try:
        params = body.sampling_params(max_tokens, logprobs)
    except ValueError as e:
        raise api_error(e, state, body) from e
    return Job(request_id=f"{id_prefix}-{uuid.uuid4().hex}", prompts=prompts, prompt_texts=prompt_texts,
               params=params, n=n, priority=body.engine_priority, created=int(time.time()), ctx=ctx)


def generate(state: ServerState, job: Job) -> AsyncIterator[ChoiceOutput]:
    """All choices' outputs as (index, output), index = prompt index * n + choice number. Nothing runs until the
    first `__anext__`, which raises the engine's refusal (ValueError, QueueFullError, EngineDeadError)."""
    streams = []
    admission = job.admission
    for index in range(job.num_choices):
        choice = index % job.n
        params = job.params
        if choice and params.seed is not None:
            params = dataclasses.replace(params, seed=params.seed + choice)
        req_id = job.request_id if job.num_choices == 1 else f"{job.request_id}-{index}"
        prompt = {"prompt": job.prompt_texts[index // job.n], "prompt_token_ids": job.prompts[index // job.n]}

        # NOTE: a factory, called right before the stream is iterated: the admission then expects exactly the
        # engine requests that really started, and hears once how each of them ended.
        def start(prompt=prompt, params=params, req_id=req_id, index=index):
            return state.async_llm.generate(
                prompt, params, req_id=req_id, priority=job.priority, tenant_id=job.ctx.tenant,
                busy_s_cap=admission.busy_s_cap if admission else None,
                on_done=admission.expect(index) if admission else None)
        streams.append(start)
    if len(streams) == 1:
        return _single(streams[0])
    return _merge(streams)


async def _single(start) -> AsyncIterator[ChoiceOutput]:
    stream = start()
    try:
        async for out in stream:
            yield 0, out
    finally:
        await stream.aclose()


async def _merge(starts: list) -> AsyncIterator[ChoiceOutput]:
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, start) -> None:
        stream = start()
        try:
            async for out in stream:
                queue.put_nowait((index, out))
        except Exception as e:  # the engine refused or failed this choice: the whole request fails
            queue.put_nowait((index, e))
        finally:
            await stream.aclose()
            queue.put_nowait((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(starts)]
    try:
        num_open = len(tasks)
        while num_open:
            index, item = await queue.get()
            if item is done:
                num_open -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        # Cancelling a pump cancels its engine stream, which aborts that engine request.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Awaits `awaitable` unless the client goes away first; then cancels it (aborting its engine requests)
    and raises a 499 that nobody will read. Starlette does not cancel a handler whose client left."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        logger.info("client left before the response; its request was aborted")
        raise APIError(499, "client closed the request", code="client_closed_request")
    return work.result()


async def run_for_client(request: Request, state: ServerState, body: GenerateRequest, awaitable: Awaitable[T]) -> T:
    """`until_disconnect`, with the engine's refusals and failures turned into API errors."""
    try:
        return await until_disconnect(request, awaitable)
    except Exception as e:
        err = api_error(e, state, body)
        if err is None or err is e:
            raise
        raise err from e


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def check_finished(out: RequestOutput) -> None:
    """A finished output that carries no answer: the engine failed it, or something aborted it."""
    if out.error is not None:
        raise APIError(500, f"the engine failed this request: {out.error}", type="server_error",
                       code="engine_error")
    if out.finish_reason == "abort":
        raise unavailable("the request was aborted before it finished", code="aborted")


async def collect(outputs: AsyncIterator[ChoiceOutput], job: Job) -> dict[int, RequestOutput]:
    """The final output of every choice, by index, in index order."""
    finals: dict[int, RequestOutput] = {}
    try:
        async for index, out in outputs:
            if out.finished:
                check_finished(out)
                finals[index] = out
    finally:
        await outputs.aclose()
    return {i: finals[i] for i in range(job.num_choices)}


async def settle(job: Job) -> Settlement | None:
    """Waits for the request's settlement: its cost, with its ledger row committed (raises LedgerUnavailable
    when the row could not be; the response must then fail)."""
    if job.admission is None:
        return None
    return await job.admission.settled()


def stop_reason(out: RequestOutput) -> str | int | None:
    """The stop string or id that ended a choice; None unless it finished with "stop" (the engine also names
    the last token of a "length" finish)."""
    return out.stop_reason if out.finish_reason == "stop" else None


def frugal_info(job: Job) -> FrugalInfo | None:
    admission = job.admission
    if admission is None:
        return None
    return FrugalInfo(route=admission.route, reason=admission.route_reason, tokens_saved=job.tokens_saved)


def usage(job: Job, finals: dict[int, RequestOutput], settlement: Settlement | None = None) -> Usage:
    """Prompt tokens count once per prompt, as OpenAI counts them with n > 1; `cost_usd` from the settlement."""
    num_prompt = sum(len(ids) for ids in job.prompts)
    num_completion = sum(len(out.token_ids) for out in finals.values())
    num_cached = sum(finals[p * job.n].num_cached_tokens for p in range(len(job.prompts)) if p * job.n in finals)
    return Usage(prompt_tokens=num_prompt, completion_tokens=num_completion, total_tokens=num_prompt + num_completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=num_cached),
                 cost_usd=settlement.cost_usd if settlement is not None else None)
