"""Between the wire and the engine: proto requests to engine arguments, engine outputs to proto responses.

Conversion errors are ValueErrors whose message starts with the proto field path (`sampling.top_p ...`); the
servicer answers them with INVALID_ARGUMENT. `check_request` runs every check that needs no tokenizer (limits
included), so a refused request costs no tokenization; `engine_request` then takes the prompt's token ids, which
the servicer gets from the tokenizer pool, off the event loop.
"""
from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass

from scheduler import Priority
from serving.engine.outputs import RequestOutput
from serving.engine.sampling_params import SamplingParams
from serving.control.context import Caller
from serving.limits import RequestLimits, check_text
from serving.rpc.gen.frugal.v1 import inference_pb2 as pb

# NOTE: the engine's default of 16 tokens cuts most answers short; 256 is a full paragraph or a short function.
DEFAULT_MAX_TOKENS = 256

_PRIORITIES = {
    pb.PRIORITY_UNSPECIFIED: Priority.STANDARD,
    pb.PRIORITY_INTERACTIVE: Priority.INTERACTIVE,
    pb.PRIORITY_STANDARD: Priority.STANDARD,
    pb.PRIORITY_BATCH: Priority.BATCH,
}
_FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}


@dataclass(slots=True)
class EngineRequest:
    """One GenerateRequest, ready for AsyncLLM.generate."""

    req_id: str  # the client's request_id, or one assigned here
    prompt: dict  # {"prompt": text or None, "prompt_token_ids": ids}, as LLMEngine.add_request takes it
    params: SamplingParams  # validated sampling parameters
    priority: Priority  # scheduling class


def caller(request_context: pb.RequestContext, metadata) -> Caller:
    """The caller's credentials and ids: `authorization: Bearer KEY` metadata (else context.api_key), the
    workflow and task ids, and for admin keys the tenant to act for (context.tenant_id or x-frugal-tenant-id)."""
    meta = {k.lower(): v for k, v in (metadata or ())}
    scheme, _, token = meta.get("authorization", "").partition(" ")
    api_key = token.strip() if scheme.lower() == "bearer" else ""
    sensitivity = request_context.sensitivity or meta.get("x-frugal-sensitivity", "")
    if sensitivity not in ("", "standard", "private"):
        raise ValueError(f"context.sensitivity must be standard or private, got {sensitivity!r}")
    for name in ("workflow_id", "task_id", "tenant_id"):
        if len(getattr(request_context, name)) > 128:
            raise ValueError(f"context.{name} may have at most 128 characters")
    return Caller(api_key=api_key or request_context.api_key or None,
                  workflow_id=request_context.workflow_id or meta.get("x-frugal-workflow-id") or None,
                  task_id=request_context.task_id or meta.get("x-frugal-task-id") or None,
                  on_behalf_of=request_context.tenant_id or meta.get("x-frugal-tenant-id") or None,
                  sensitivity=sensitivity or None)


def sampling_params(msg: pb.SamplingParams) -> SamplingParams:
    kwargs = {
        "max_tokens": msg.max_tokens if msg.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
        "min_tokens": msg.min_tokens,
        "ignore_eos": msg.ignore_eos,
        "stop": list(msg.stop),
        "stop_token_ids": list(msg.stop_token_ids),
        "include_stop_str_in_output": msg.include_stop_str_in_output,
    }
    for name in ("temperature", "top_p", "top_k", "seed", "logprobs"):
        if msg.HasField(name):
            kwargs[name] = getattr(msg, name)
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:  # SamplingParams names the field; give its path in the request
        raise ValueError(f"sampling.{e}") from None


@dataclass(slots=True)
class CheckedRequest:
    """A GenerateRequest whose fields passed every check that needs no tokenizer."""

    request: pb.GenerateRequest  # the message itself
    params: SamplingParams  # validated sampling parameters
    priority: Priority  # scheduling class
    messages: list[dict] | None  # chat input, ready for the chat template; None for prompt / token ids
    context_chunks: list[str]  # retrieved context for the last user message (chat input only); empty: none


def check_request(request: pb.GenerateRequest, limits: RequestLimits) -> CheckedRequest:
    """Raises ValueError (or LimitExceeded) naming the bad field; costs no tokenization."""
    kind = request.WhichOneof("input")
    messages = None
    if kind == "prompt":
        limits.check_prompt_chars(len(request.prompt), "prompt")
        check_text(request.prompt, "prompt")
    elif kind == "prompt_token_ids":
        if not request.prompt_token_ids.ids:
            raise ValueError("prompt_token_ids must not be empty")
    elif kind == "chat":
        limits.check_messages(len(request.chat.messages), "chat.messages")
        messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        limits.check_prompt_chars(sum(len(m["role"]) + len(m["content"]) for m in messages), "chat.messages")
        for i, message in enumerate(messages):
            if not message["role"]:
                raise ValueError(f"chat.messages[{i}].role must not be empty")
    else:
        raise ValueError("input: set one of prompt, prompt_token_ids or chat")
    chunks = list(request.context_chunks)
    if chunks:
        # NOTE: refused, not appended: a raw prompt has its own format and token ids have none, so there is no
        # place to put context that would be right for every prompt.
        if messages is None:
            raise ValueError(f"context_chunks need chat input (chat.messages), not {kind}: it has no message to put "
                             f"them in")
        limits.check_messages(len(chunks), "context_chunks")
        limits.check_prompt_chars(sum(len(m["content"]) for m in messages) + sum(map(len, chunks)),
                                  "context_chunks")
        for i, chunk in enumerate(chunks):
            check_text(chunk, f"context_chunks[{i}]")
    if request.priority not in _PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(pb.Priority.keys())}, got {request.priority}")
    sampling = request.sampling
    limits.check_stop(sampling.stop, "sampling.stop", sampling.stop_token_ids, "sampling.stop_token_ids")
    if sampling.HasField("logprobs"):
        limits.check_logprobs(sampling.logprobs, "sampling.logprobs")
    return CheckedRequest(request=request, params=sampling_params(sampling), priority=_PRIORITIES[request.priority],
                          messages=messages, context_chunks=chunks)


def engine_request(checked: CheckedRequest, prompt_ids: list[int]) -> EngineRequest:
    """The engine's view of a checked request, with its prompt tokenized (or its chat rendered) already."""
    request = checked.request
    text = request.prompt if request.WhichOneof("input") == "prompt" else None
    return EngineRequest(req_id=request.request_id or f"grpc-{uuid.uuid4().hex[:16]}",
                         prompt={"prompt": text, "prompt_token_ids": prompt_ids}, params=checked.params,
                         priority=checked.priority)


_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def field_path(engine_message: str) -> str:
    """An engine ValueError's message with the proto path of the field it names (`stop_token_ids ...` ->
    `sampling.stop_token_ids ...`): the engine checks what needs the model (token ids against the vocabulary)."""
    name = engine_message.split(" ", 1)[0]
    return f"sampling.{engine_message}" if name in _SAMPLING_FIELDS else engine_message


def usage(out: RequestOutput, cost_usd: float = 0.0) -> pb.Usage:
    num_prompt, num_completion = len(out.prompt_token_ids), len(out.token_ids)
    return pb.Usage(prompt_tokens=num_prompt, completion_tokens=num_completion, cached_tokens=out.num_cached_tokens,
                    total_tokens=num_prompt + num_completion, cost_usd=cost_usd)


def token_logprobs(entries: list[list[tuple[int, float]]], tokenizer) -> list[pb.TokenLogprob]:
    """Engine logprobs (per token: the chosen one first, then the top alternatives) as proto messages."""
    result = []
    for (token_id, logprob), *top in entries:
        result.append(pb.TokenLogprob(
            token_id=token_id, token=tokenizer.decode([token_id]), logprob=logprob,
            top_logprobs=[pb.TopLogprob(token_id=t, token=tokenizer.decode([t]), logprob=lp) for t, lp in top]))
    return result


def _stop_reason(out: RequestOutput) -> dict:
    # NOTE: the engine also fills stop_reason with the last token of a length-finished request; only a stop counts.
    if out.finish_reason != "stop":
        return {}
    if isinstance(out.stop_reason, str):
        return {"stop_string": out.stop_reason}
    if isinstance(out.stop_reason, int):
        return {"stop_token_id": out.stop_reason}
    return {}


def frugal_info(route: str, reason: str, tokens_saved: int = 0) -> pb.FrugalInfo:
    return pb.FrugalInfo(route=route, reason=reason, tokens_saved=tokens_saved)


def finish_reason(reason: str | None) -> int:
    return _FINISH_REASONS.get(reason, pb.FINISH_REASON_UNSPECIFIED)


def response(out: RequestOutput, model: str, tokenizer, cost_usd: float = 0.0,
             frugal: pb.FrugalInfo | None = None) -> pb.GenerateResponse:
    """The unary answer from a request's final output."""
    return pb.GenerateResponse(frugal=frugal,
        request_id=out.req_id, model=model, text=out.text, token_ids=out.token_ids,
        finish_reason=finish_reason(out.finish_reason), usage=usage(out, cost_usd),
        logprobs=token_logprobs(out.logprobs, tokenizer) if out.logprobs else [], **_stop_reason(out))


def chunk(out: RequestOutput, model: str, tokenizer, cost_usd: float = 0.0,
          frugal: pb.FrugalInfo | None = None) -> pb.GenerateStreamResponse:
    """One stream chunk from an incremental output; the finished output also carries finish reason and usage."""
    delta_logprobs = []
    if out.logprobs and out.delta_token_ids:
        delta_logprobs = token_logprobs(out.logprobs[-len(out.delta_token_ids):], tokenizer)
    msg = pb.GenerateStreamResponse(request_id=out.req_id, model=model, text=out.delta_text,
                                    token_ids=out.delta_token_ids, logprobs=delta_logprobs)
    if out.finished:
        msg.finish_reason = finish_reason(out.finish_reason)
        msg.usage.CopyFrom(usage(out, cost_usd))
        if frugal is not None:
            msg.frugal.CopyFrom(frugal)
        for name, value in _stop_reason(out).items():
            setattr(msg, name, value)
    return msg
