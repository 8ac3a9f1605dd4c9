"""Between the wire and the engine: proto requests to engine arguments, engine outputs to proto responses.

Conversion errors are ValueErrors whose message starts with the proto field path (`sampling.top_p ...`); the
servicer answers them with INVALID_ARGUMENT.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from scheduler import Priority
from serving.engine.chat import chat_prompt_ids
from serving.engine.outputs import RequestOutput
from serving.engine.sampling_params import SamplingParams
from serving.rpc.gen.frugal.v1 import inference_pb2 as pb

# NOTE: the engine's default of 16 tokens cuts most answers short; 256 is a full paragraph or a short function.
DEFAULT_MAX_TOKENS = 256
DEFAULT_TENANT = "default"

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
    prompt: str | list[int]  # text (tokenized by the engine) or token ids (chat is rendered here)
    params: SamplingParams  # validated sampling parameters
    priority: Priority  # scheduling class
    tenant_id: str  # fair-share and prefix-cache key
    workflow_id: str  # control-plane metadata, logged for now
    task_id: str  # control-plane metadata, logged for now
    has_api_key: bool  # whether an API key came with the request (the key itself is never kept)


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


def engine_request(request: pb.GenerateRequest, tokenizer) -> EngineRequest:
    """Raises ValueError naming the bad field."""
    kind = request.WhichOneof("input")
    if kind == "prompt":
        prompt = request.prompt
    elif kind == "prompt_token_ids":
        prompt = list(request.prompt_token_ids.ids)
        if not prompt:
            raise ValueError("prompt_token_ids must not be empty")
    elif kind == "chat":
        messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        for i, message in enumerate(messages):
            if not message["role"]:
                raise ValueError(f"chat.messages[{i}].role must not be empty")
        try:
            prompt = chat_prompt_ids(tokenizer, messages)
        except ValueError as e:
            raise ValueError(f"chat.{e}") from None
    else:
        raise ValueError("input: set one of prompt, prompt_token_ids or chat")
    if request.priority not in _PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(pb.Priority.keys())}, got {request.priority}")
    ctx = request.context
    return EngineRequest(
        req_id=request.request_id or f"grpc-{uuid.uuid4().hex[:16]}",
        prompt=prompt,
        params=sampling_params(request.sampling),
        priority=_PRIORITIES[request.priority],
        tenant_id=ctx.tenant_id or DEFAULT_TENANT,
        workflow_id=ctx.workflow_id,
        task_id=ctx.task_id,
        has_api_key=bool(ctx.api_key),
    )


def usage(out: RequestOutput) -> pb.Usage:
    num_prompt, num_completion = len(out.prompt_token_ids), len(out.token_ids)
    return pb.Usage(prompt_tokens=num_prompt, completion_tokens=num_completion, cached_tokens=out.num_cached_tokens,
                    total_tokens=num_prompt + num_completion)


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


def response(out: RequestOutput, model: str, tokenizer) -> pb.GenerateResponse:
    """The unary answer from a request's final output."""
    return pb.GenerateResponse(
        request_id=out.req_id, model=model, text=out.text, token_ids=out.token_ids,
        finish_reason=_FINISH_REASONS.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED), usage=usage(out),
        logprobs=token_logprobs(out.logprobs, tokenizer) if out.logprobs else [], **_stop_reason(out))


def chunk(out: RequestOutput, model: str, tokenizer) -> pb.GenerateStreamResponse:
    """One stream chunk from an incremental output; the finished output also carries finish reason and usage."""
    delta_logprobs = []
    if out.logprobs and out.delta_token_ids:
        delta_logprobs = token_logprobs(out.logprobs[-len(out.delta_token_ids):], tokenizer)
    msg = pb.GenerateStreamResponse(request_id=out.req_id, model=model, text=out.delta_text,
                                    token_ids=out.delta_token_ids, logprobs=delta_logprobs)
    if out.finished:
        msg.finish_reason = _FINISH_REASONS.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
        msg.usage.CopyFrom(usage(out))
        for name, value in _stop_reason(out).items():
            setattr(msg, name, value)
    return msg
