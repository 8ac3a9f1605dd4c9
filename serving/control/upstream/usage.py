"""What an upstream answer used and cost, from the provider's own `usage`, and the shape checks that tell a real
answer from garbage.

The counts are the provider's: nothing is re-tokenized here. An answer without `usage` says so
(`reported=False`, cost None) rather than passing for a free request.
"""
from __future__ import annotations

from dataclasses import dataclass

from serving.control.cost import CostModel
from serving.control.upstream.config import UpstreamRoute


@dataclass(frozen=True, slots=True)
class UpstreamUsage:
    reported: bool  # the provider sent usage; False: the counts are 0 and cost_usd is None, not measured
    prompt_tokens: int  # prompt tokens, cached included
    cached_tokens: int  # of those, served from the provider's prompt cache (prompt_tokens_details.cached_tokens)
    completion_tokens: int  # generated tokens
    cost_usd: float | None  # at the route's prices; None when not reported


NOT_REPORTED = UpstreamUsage(reported=False, prompt_tokens=0, cached_tokens=0, completion_tokens=0, cost_usd=None)


def _count(value, name: str) -> int:
    if type(value) is not int or value < 0:  # NOTE: bool is an int subclass; true is not a token count
        raise ValueError(f"usage.{name} is {value!r}, not a count")
    return value


def usage_of(route: UpstreamRoute, raw) -> UpstreamUsage:
    """`raw`: the provider's `usage` object, or None. Raises ValueError (garbage) on wrong types."""
    if raw is None:
        return NOT_REPORTED
    if not isinstance(raw, dict):
        raise ValueError(f"usage is {type(raw).__name__}, not an object")
    prompt = _count(raw.get("prompt_tokens"), "prompt_tokens")
    completion = _count(raw.get("completion_tokens"), "completion_tokens")
    details = raw.get("prompt_tokens_details")
    if details is not None and not isinstance(details, dict):
        raise ValueError(f"usage.prompt_tokens_details is {type(details).__name__}, not an object")
    cached = (details or {}).get("cached_tokens")
    cached = 0 if cached is None else _count(cached, "prompt_tokens_details.cached_tokens")
    if cached > prompt:
        raise ValueError(f"usage says {cached} cached of {prompt} prompt tokens")
    cost = CostModel(route.price).actual(0.0, prompt, cached, completion)
    return UpstreamUsage(reported=True, prompt_tokens=prompt, cached_tokens=cached, completion_tokens=completion,
                         cost_usd=cost)


def _choices(payload, allow_empty: bool) -> list[dict]:
    if not isinstance(payload, dict):
        raise ValueError(f"the answer is {type(payload).__name__}, not an object")
    choices = payload.get("choices")
    if choices is None and "error" in payload:
        raise ValueError(f"the provider sent an error instead of an answer: {str(payload['error'])[:200]}")
    if not isinstance(choices, list):
        raise ValueError("the answer has no choices list" if choices is None else
                         f"choices is {type(choices).__name__}, not a list")
    if not choices and not allow_empty:
        raise ValueError("the answer has an empty choices list")
    for i, choice in enumerate(choices):
        if not isinstance(choice, dict):
            raise ValueError(f"choices[{i}] is {type(choice).__name__}, not an object")
    return choices


def check_answer(payload, chat: bool) -> None:
    """A whole (non-streamed) answer. Raises ValueError naming what is wrong."""
    for i, choice in enumerate(_choices(payload, allow_empty=False)):
        if chat:
            message = choice.get("message")
            if not isinstance(message, dict):
                raise ValueError(f"choices[{i}].message is missing or not an object")
            content = message.get("content")
            if content is None and not message.get("tool_calls") and not message.get("refusal"):
                raise ValueError(f"choices[{i}].message has no content")
            if content is not None and not isinstance(content, str):
                raise ValueError(f"choices[{i}].message.content is {type(content).__name__}, not a string")
        elif not isinstance(choice.get("text"), str):
            raise ValueError(f"choices[{i}].text is missing or not a string")


def check_chunk(payload, chat: bool) -> None:
    """One streamed chunk (the last may carry only usage, with an empty choices list)."""
    for i, choice in enumerate(_choices(payload, allow_empty=True)):
        if chat:
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                raise ValueError(f"choices[{i}].delta is missing or not an object")
            content = delta.get("content")
            if content is not None and not isinstance(content, str):
                raise ValueError(f"choices[{i}].delta.content is {type(content).__name__}, not a string")
        elif not isinstance(choice.get("text"), str):
            raise ValueError(f"choices[{i}].text is missing or not a string")
