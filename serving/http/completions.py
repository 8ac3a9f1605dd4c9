"""POST /v1/completions: raw prompts (text or token ids, one or a batch), n choices per prompt."""
from __future__ import annotations

import logging

from fastapi import Request
from fastapi.responses import Response

from serving.engine.outputs import RequestOutput
from serving.http.errors import bad_request
from serving.http.control import admit_job, authenticate
from serving.http.generation import (Job, ServingContext, check_admission, check_text_param, frugal_info,
                                     make_job, run_for_client, stop_reason, usage)
from serving.http.logprobs import completion_logprobs, delta_rows
from serving.http.protocol import CompletionRequest
from serving.http.responses import Completion, CompletionChoice
from serving.http.streaming import SSEResponse, run_job

logger = logging.getLogger(__name__)

# NOTE: OpenAI's legacy default; a completion without max_tokens is short, unlike a chat answer.
DEFAULT_MAX_TOKENS = 16


async def _prompts(ctx: ServingContext, body: CompletionRequest) -> tuple[list[list[int]], list[str | None]]:
    prompts = body.prompt_list()
    if not prompts:
        raise bad_request("prompt must not be empty", "prompt")
    texts = [p for p in prompts if isinstance(p, str)]
    ctx.state.limits.check_prompt_chars(sum(len(t) for t in texts), "prompt")
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            check_text_param(p, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
    # NOTE: an empty text prompt stays empty (the engine refuses it, naming the prompt) instead of becoming BOS.
    ids = [(await ctx.state.tokenizers.encode(p) if p else []) if isinstance(p, str) else p for p in prompts]
    return ids, [p if isinstance(p, str) else None for p in prompts]


async def create_completion(ctx: ServingContext, body: CompletionRequest, request: Request) -> Response:
    caller = await authenticate(ctx.state, request)
    if ctx.state.routing and body.model not in (None, ctx.state.model_name):
        ctx = _model_view(ctx, body.model)
    state = ctx.state
    check_admission(state, body, caller)
    state.limits.check_logprobs(body.logprobs, "logprobs")
    prompt_ids, prompt_texts = await run_for_client(request, state, body, _prompts(ctx, body))
    job = make_job(state, body, caller, "cmpl", prompt_ids, prompt_texts, logprobs=body.logprobs,
                   default_max_tokens=DEFAULT_MAX_TOKENS)
    logger.debug("%s: %d prompts, user %r", job.request_id, len(prompt_ids), body.user)
    echo = _echo_texts(ctx, job) if body.echo else None
    await admit_job(state, job)
    usage_chunk = Completion(id=job.request_id, created=job.created, model=state.model_name, choices=[])
    result = await run_job(request, state, body, job,
                           lambda: [_chunk(job, state.model_name, i, text) for i, text in enumerate(echo or [])],
                           _chunk_renderer(ctx, job), usage_chunk)
    if isinstance(result, SSEResponse):
        return result
    finals, settlement = result
    want_logprobs = job.params.logprobs is not None
    completion = Completion(
        id=job.request_id, created=job.created, model=state.model_name, usage=usage(job, finals, settlement),
        frugal=frugal_info(job),
        choices=[CompletionChoice(index=i, text=(echo[i] if echo else "") + out.text,
                                  finish_reason=out.finish_reason, stop_reason=stop_reason(out),
                                  logprobs=completion_logprobs(out.logprobs or [], ctx.token_texts, 0)
                                  if want_logprobs else None)
                 for i, out in finals.items()])
    return Response(completion.model_dump_json(), media_type="application/json",
                    headers={"x-request-id": job.request_id})


def _model_view(ctx: ServingContext, model: str) -> ServingContext:
    """Another self-hosted model of `models:` (a base model such as Gemma 3 takes plain completions here)."""
    from serving.http.routed import AUTO, served_view

    state = ctx.state
    if model in state.models:
        return served_view(ctx, model)
    if model in state.upstreams or model == AUTO:
        raise bad_request(f"model `{model}`: POST /v1/completions serves the self-hosted models by name "
                          f"({', '.join(state.models)}); the router and external routes take chat completions",
                          "model")
    return ctx  # check_admission names the unknown model


def _echo_texts(ctx: ServingContext, job: Job) -> list[str]:
    """Each choice's prompt as text (a token id prompt is decoded)."""
    tokenizer = ctx.tokenizer
    texts = [text if text is not None else tokenizer.decode(ids) for text, ids in zip(job.prompt_texts, job.prompts)]
    return [texts[i // job.n] for i in range(job.num_choices)]


def _chunk(job: Job, model: str, index: int, text: str, **choice_fields) -> Completion:
    return Completion(id=job.request_id, created=job.created, model=model,
                      choices=[CompletionChoice(index=index, text=text, **choice_fields)])


def _chunk_renderer(ctx: ServingContext, job: Job):
    model, want_logprobs = ctx.state.model_name, job.params.logprobs is not None
    text_offsets = [0] * job.num_choices  # where the next token starts in each choice's generated text

    def render(index: int, out: RequestOutput) -> Completion | None:
        rows = delta_rows(out) if want_logprobs else []
        if not out.delta_text and not rows and not out.finished:
            return None  # tokens held back (a stop string may be forming): nothing to show yet
        logprobs = None
        if want_logprobs:
            logprobs = completion_logprobs(rows, ctx.token_texts, text_offsets[index])
            text_offsets[index] += sum(len(token) for token in logprobs.tokens)
        return _chunk(job, model, index, out.delta_text, logprobs=logprobs,
                      finish_reason=out.finish_reason if out.finished else None,
                      stop_reason=stop_reason(out))

    return render

