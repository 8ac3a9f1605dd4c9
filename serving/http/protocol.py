"""Request schemas of the OpenAI-compatible API, and their translation into engine SamplingParams.

Pydantic checks types only; value ranges are checked once, by SamplingParams, so the HTTP API and the gRPC API
refuse the same values with the same messages. Fields this server does not implement are refused when they are
set to anything but their neutral value (a silent no-op would change what the client asked for); fields that
cannot change the output (metadata, store, service_tier, ...) are ignored.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from scheduler import Priority
from serving.engine.sampling_params import SamplingParams

_PRIORITIES = {"interactive": Priority.INTERACTIVE, "standard": Priority.STANDARD, "batch": Priority.BATCH}


def _not_supported(name: str, value) -> str:
    return f"{name}={value!r} is not supported by this server"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False  # send a last chunk with the usage of the whole request


class _GenerateRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # must name the served model; None: the served model
    max_tokens: int | None = None  # most tokens to generate
    temperature: float | None = None  # None: 1.0, as OpenAI
    top_p: float | None = None  # None: 1.0
    n: int | None = None  # choices per prompt; None: 1
    stop: str | list[str] | None = None  # stop strings, cut from the text
    seed: int | None = None  # same seed, same tokens; choice i of n uses seed + i
    stream: bool | None = False  # server-sent events instead of one JSON body
    stream_options: StreamOptions | None = None  # only with stream
    user: str | None = None  # end-user id, kept for the logs
    presence_penalty: float | None = None  # not implemented: refused unless 0
    frequency_penalty: float | None = None  # not implemented: refused unless 0
    logit_bias: dict[str, float] | None = None  # not implemented: refused unless empty
    # Vendor extensions (vLLM names).
    top_k: int | None = None  # keep the k most likely tokens; 0 or -1 keeps all
    min_tokens: int | None = None  # EOS and stop tokens are blocked until this many tokens exist
    ignore_eos: bool | None = False  # keep generating past EOS (benchmarks)
    stop_token_ids: list[int] | None = None  # extra token ids that end generation
    priority: Literal["interactive", "standard", "batch"] | None = None  # scheduling class; None: standard

    @property
    def num_choices_per_prompt(self) -> int:
        return 1 if self.n is None else self.n

    @property
    def engine_priority(self) -> Priority:
        return _PRIORITIES[self.priority or "standard"]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported_param(self) -> tuple[str, str] | None:
        """(field, why) for the first field set to a value this server cannot honour, or None."""
        for name in ("presence_penalty", "frequency_penalty", "logit_bias"):
            if getattr(self, name):
                return name, _not_supported(name, getattr(self, name))
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed with stream=true"
        return None

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """Raises ValueError naming the engine field (see `engine_field_aliases` for the API name)."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            min_tokens=self.min_tokens or 0,
            ignore_eos=bool(self.ignore_eos),
            stop=[] if self.stop is None else self.stop,
            stop_token_ids=list(self.stop_token_ids or []),
            logprobs=logprobs,
        )


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str  # only "text" is served
    text: str | None = None  # the text of a "text" part


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str  # system, developer, user, assistant, tool
    content: str | list[ContentPart] | None = None  # text, or text parts
    name: str | None = None  # accepted and not rendered: the template has no slot for it

    def template_dict(self, index: int) -> dict:
        """The message as the chat template wants it. Raises ValueError naming messages[index]."""
        if isinstance(self.content, list):
            if any(part.type != "text" or part.text is None for part in self.content):
                raise ValueError(f"messages[{index}].content: only text parts are supported by this model")
            content = "".join(part.text for part in self.content)
        else:
            content = self.content or ""
        # NOTE: OpenAI's "developer" role is the newer name of "system"; model templates only know the latter.
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content}


class ChatCompletionRequest(_GenerateRequest):
    messages: list[ChatMessage]  # the conversation, rendered through the model's chat template
    max_completion_tokens: int | None = None  # the newer name of max_tokens; wins when both are set
    logprobs: bool | None = False  # return the chosen tokens' logprobs
    top_logprobs: int | None = None  # and this many alternatives per token (needs logprobs)
    tools: list[dict] | None = None  # not implemented: refused unless empty
    functions: list[dict] | None = None  # not implemented: refused unless empty
    response_format: dict | None = None  # only {"type": "text"}
    context_chunks: list[str] | None = None  # retrieved context sent apart from the question (frugal extension)

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def num_prompts(self) -> int:
        return 1

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported_param(self) -> tuple[str, str] | None:
        for name in ("tools", "functions"):
            if getattr(self, name):
                return name, f"{name} (function calling) is not supported by this server"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", _not_supported("response_format", self.response_format)
        return super().unsupported_param()

    def engine_field_aliases(self) -> dict[str, str]:
        """Engine field names in error messages -> the request field that carried them."""
        return {"max_tokens": self.max_tokens_param, "prompt": "messages", "logprobs": "top_logprobs"}


class CompletionRequest(_GenerateRequest):
    # A text, a batch of texts, a token id list, or a batch of token id lists.
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # return the chosen tokens' logprobs and this many alternatives
    echo: bool | None = False  # prefix each choice with its prompt
    suffix: str | None = None  # not implemented: refused unless empty
    best_of: int | None = None  # not implemented beyond best_of == n

    @property
    def max_tokens_param(self) -> str:
        return "max_tokens"

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_list())

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def unsupported_param(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", _not_supported("suffix", self.suffix)
        if self.best_of is not None and self.best_of != self.num_choices_per_prompt:
            return "best_of", "best_of must equal n (or be left out): ranking extra samples is not supported"
        if self.echo and self.logprobs is not None:
            return "echo", "echo together with logprobs is not supported (the engine does not score prompts)"
        return super().unsupported_param()

    def engine_field_aliases(self) -> dict[str, str]:
        return {}

    def prompt_list(self) -> list[str | list[int]]:
        """The prompts as a list: each one a text or a token id list."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)
