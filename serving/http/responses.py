"""Response schemas of the OpenAI-compatible API: the shapes OpenAI's own client parses.

`stop_reason` on a choice is a vLLM extension: the stop string or stop token id that ended it, if any.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


def _none(value) -> bool:
    return value is None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int  # prompt tokens, counted once per prompt (not once per choice)
    completion_tokens: int  # generated tokens over all choices
    total_tokens: int  # the sum of the two
    prompt_tokens_details: PromptTokensDetails  # the cached part of the prompt
    cost_usd: float | None = None  # what the request cost (frugal extension; serving/control/cost.py)


class FrugalInfo(BaseModel):
    """How frugal served the request (an extension object; OpenAI clients ignore unknown fields)."""

    route: str  # e.g. "self-hosted:<model>"
    reason: str  # why this route
    cache: Literal["exact", "semantic"] | None = None  # which response cache answered; None: none did
    similarity: float | None = None  # of a semantic-cache hit
    tokens_saved: int = 0  # prompt tokens the optimizer removed


class TopLogprob(BaseModel):
    token: str  # the token's text
    logprob: float  # log-probability under the model (before temperature and top-p/top-k)
    bytes: list[int] | None  # UTF-8 bytes of `token`


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]  # the most likely alternatives at this position, best first


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None  # one entry per generated token


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str  # the generated text


class ChatChoice(BaseModel):
    index: int  # choice number (n)
    message: AssistantMessage  # the answer
    logprobs: ChatLogprobs | None = None  # set when requested
    finish_reason: str | None  # "stop" or "length"
    stop_reason: str | int | None = None  # what matched, for a "stop" that was not EOS


class ChatCompletion(BaseModel):
    id: str  # "chatcmpl-..."
    object: Literal["chat.completion"] = "chat.completion"
    created: int  # unix seconds
    model: str  # the served model
    choices: list[ChatChoice]  # ordered by index
    usage: Usage
    frugal: FrugalInfo | None = None  # route, cache and savings


class DeltaMessage(BaseModel):
    # NOTE: absent, not null, when unset: some clients append a null content to the text.
    role: Literal["assistant"] | None = Field(default=None, exclude_if=_none)
    content: str | None = Field(default=None, exclude_if=_none)


class ChatChunkChoice(BaseModel):
    index: int  # choice number (n)
    delta: DeltaMessage  # what is new
    logprobs: ChatLogprobs | None = None  # of the tokens new in this chunk
    finish_reason: str | None = None  # set on the last chunk of the choice
    stop_reason: str | int | None = None  # set with finish_reason "stop" when a stop string or id matched


class ChatCompletionChunk(BaseModel):
    id: str  # the same for every chunk of a response
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int  # unix seconds
    model: str  # the served model
    choices: list[ChatChunkChoice]  # empty in the usage chunk
    usage: Usage | None = None  # only in the last chunk, when stream_options.include_usage
    frugal: FrugalInfo | None = None  # in that last chunk too


class CompletionLogprobs(BaseModel):
    tokens: list[str]  # generated token texts
    token_logprobs: list[float]  # their logprobs
    top_logprobs: list[dict[str, float]] | None  # per token: alternative text -> logprob
    text_offset: list[int]  # where each token starts in the choice's text


class CompletionChoice(BaseModel):
    index: int  # prompt index * n + choice number
    text: str  # generated text (prompt first when echo)
    logprobs: CompletionLogprobs | None = None  # set when requested
    finish_reason: str | None = None  # "stop" or "length"; None on a stream chunk that is not the last
    stop_reason: str | int | None = None  # what matched, for a "stop" that was not EOS


class Completion(BaseModel):
    id: str  # "cmpl-..."; the same for every chunk of a stream
    object: Literal["text_completion"] = "text_completion"
    created: int  # unix seconds
    model: str  # the served model
    choices: list[CompletionChoice]  # ordered by index; empty in the usage chunk of a stream
    usage: Usage | None = None  # on a full response, and on the last chunk when include_usage
    frugal: FrugalInfo | None = None  # route, cache and savings, with the usage


class ModelCard(BaseModel):
    id: str  # the name clients send as `model`
    object: Literal["model"] = "model"
    created: int  # unix seconds the server started
    owned_by: str = "frugal"
    max_model_len: int | None = None  # context length: prompt plus generated tokens (vLLM extension); None: external


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
