"""Request limits: what one request may ask for, checked before it costs any tokenization or engine time.

Both front ends call the same checks with their own field names, so a request too large for the HTTP API is too
large for gRPC as well. The body and message size limits are enforced by the servers themselves (an ASGI
middleware for HTTP, grpc's max_receive_message_length for gRPC). `check_text` refuses strings the tokenizer
cannot encode (unpaired surrogates, which JSON can carry) with an error naming the field.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

from serving.engine.sampling_params import MAX_LOGPROBS


class LimitExceeded(ValueError):
    """A request over one of the configured limits; `param` is the request field at fault."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(slots=True, kw_only=True)
class RequestLimits:
    max_body_bytes: int = 4 << 20  # HTTP request body; larger is refused with 413 before it is read whole
    max_grpc_message_bytes: int = 4 << 20  # gRPC request message; larger is RESOURCE_EXHAUSTED
    max_prompt_chars: int = 262_144  # characters of all prompts or message contents of one request
    max_messages: int = 1024  # chat messages in one request
    max_stop_strings: int = 16  # stop strings in one request
    max_stop_string_chars: int = 256  # characters of one stop string
    max_stop_token_ids: int = 64  # stop token ids in one request
    max_choices: int = 16  # engine requests one HTTP request may start (prompts x n)
    max_logprobs: int = MAX_LOGPROBS  # top alternatives per token

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{f.name} must be an integer >= 1, got {value!r}")
        if self.max_logprobs > MAX_LOGPROBS:
            raise ValueError(f"max_logprobs must be at most {MAX_LOGPROBS} (what the sampler returns), "
                             f"got {self.max_logprobs}")

    def check_prompt_chars(self, num_chars: int, param: str) -> None:
        if num_chars > self.max_prompt_chars:
            raise LimitExceeded(param, f"{param}: the request carries {num_chars} characters of prompt text, more "
                                       f"than this server accepts ({self.max_prompt_chars}, limits.max_prompt_chars)")

    def check_messages(self, num_messages: int, param: str) -> None:
        if num_messages > self.max_messages:
            raise LimitExceeded(param, f"{param}: at most {self.max_messages} messages are accepted per request, "
                                       f"got {num_messages} (limits.max_messages)")

    def check_stop(self, stop: Sequence[str], stop_param: str, stop_token_ids: Sequence, ids_param: str) -> None:
        if len(stop) > self.max_stop_strings:
            raise LimitExceeded(stop_param, f"{stop_param}: at most {self.max_stop_strings} stop strings are "
                                            f"accepted, got {len(stop)} (limits.max_stop_strings)")
        for i, s in enumerate(stop):
            if len(s) > self.max_stop_string_chars:
                raise LimitExceeded(stop_param, f"{stop_param}[{i}]: a stop string may have at most "
                                                f"{self.max_stop_string_chars} characters, got {len(s)} "
                                                "(limits.max_stop_string_chars)")
        if len(stop_token_ids) > self.max_stop_token_ids:
            raise LimitExceeded(ids_param, f"{ids_param}: at most {self.max_stop_token_ids} stop token ids are "
                                           f"accepted, got {len(stop_token_ids)} (limits.max_stop_token_ids)")

    def check_choices(self, num_choices: int, param: str, detail: str = "") -> None:
        if num_choices > self.max_choices:
            raise LimitExceeded(param, f"{param}: a request may ask for at most {self.max_choices} choices "
                                       f"(prompts x n), got {detail or num_choices} (limits.max_choices)")

    def check_logprobs(self, num_logprobs: int | None, param: str) -> None:
        if num_logprobs is not None and num_logprobs > self.max_logprobs:
            raise LimitExceeded(param, f"{param}: at most {self.max_logprobs} alternatives per token are "
                                       f"returned, got {num_logprobs} (limits.max_logprobs)")


def check_text(text: str, param: str) -> None:
    """Refuses a string that is not valid Unicode text (an unpaired surrogate), naming the field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{param} is not valid Unicode text: unpaired surrogate at character {e.start}") from None
