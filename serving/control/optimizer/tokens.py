"""Counting a chat's prompt tokens with the caller's tokenizer, the way a chat template adds them up.

The optimizer never loads a model: the caller passes `count_tokens(text) -> int` (the engine's tokenizer, without
special tokens). A chat template wraps each message in a few tokens of its own; rendering the template for every
candidate prompt would make trimming quadratic, so the wrapping is a per-message constant instead.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

CountTokens = Callable[[str], int]

# NOTE: ChatML (SmolLM2, Qwen) wraps a message as `<|im_start|>` role `\n` content `<|im_end|>` `\n`: 5 tokens;
# Llama 3 and Gemma 3 add 4-5. The count is approximate by this much per message, never per content token.
MESSAGE_OVERHEAD_TOKENS = 5
# The generation prompt the template appends (`<|im_start|>assistant\n`).
REPLY_PRIMING_TOKENS = 3


def tokenizer_counter(tokenizer) -> CountTokens:
    """`count_tokens` for a transformers tokenizer: content tokens only, the template's own are counted above."""
    return lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)


def memoized(count_tokens: CountTokens) -> CountTokens:
    """The same counter with a cache for one optimisation: its steps count the same messages many times."""
    cache: dict[str, int] = {}

    def count(text: str) -> int:
        if text not in cache:
            cache[text] = int(count_tokens(text))
        return cache[text]

    return count


def message_tokens(message: Mapping[str, str], count_tokens: CountTokens) -> int:
    return count_tokens(message["content"]) + MESSAGE_OVERHEAD_TOKENS


def count_chat_tokens(messages: Iterable[Mapping[str, str]], count_tokens: CountTokens) -> int:
    """Approximate prompt tokens of `messages` rendered through a chat template with its generation prompt."""
    return sum(message_tokens(m, count_tokens) for m in messages) + REPLY_PRIMING_TOKENS
