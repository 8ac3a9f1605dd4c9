"""Trim-history step: drop the oldest turns whole until the prompt fits its budget.

A turn starts at a user message and runs to the next one (the assistant's reply and any tool messages belong to
it); non-system messages before the first user message form a turn of their own. System messages are never
dropped and keep their place; the last turn (the one holding the last user message) is always kept.
Nothing is summarised and no message is cut: a message is either sent as it was or not at all.
"""
from __future__ import annotations

from dataclasses import dataclass

from serving.control.optimizer.config import TrimHistoryConfig
from serving.control.optimizer.tokens import REPLY_PRIMING_TOKENS, CountTokens, message_tokens


@dataclass(frozen=True, slots=True)
class TrimResult:
    messages: list[dict[str, str]]  # the kept messages, in their order; the input's messages when unchanged
    num_turns: int  # turns in the input
    num_turns_dropped: int  # oldest turns dropped
    note: str  # why it changed what it did, or why it changed nothing


def turns(messages: list[dict[str, str]]) -> list[list[int]]:
    """The non-system messages' indices grouped into turns, oldest first."""
    groups: list[list[int]] = []
    for i, message in enumerate(messages):
        if message["role"] in ("system", "developer"):
            continue
        if not groups or message["role"] == "user":
            groups.append([])
        groups[-1].append(i)
    return groups


def trim_history(messages: list[dict[str, str]], config: TrimHistoryConfig, count_tokens: CountTokens) -> TrimResult:
    groups = turns(messages)
    if len(groups) <= 1:
        return TrimResult(messages, len(groups), 0, "one turn: nothing to trim")
    cost = [message_tokens(m, count_tokens) for m in messages]
    system_tokens = sum(c for m, c in zip(messages, cost) if m["role"] in ("system", "developer"))
    turn_tokens = [sum(cost[i] for i in group) for group in groups]
    num_kept = len(groups) if config.keep_last_turns is None else min(len(groups), config.keep_last_turns)
    budget = config.max_prompt_tokens
    if budget is not None:
        needed = REPLY_PRIMING_TOKENS + system_tokens + turn_tokens[-1]
        if needed > budget:
            return TrimResult(messages, len(groups), 0,
                              f"not trimmed: system messages and the last turn need {needed} tokens, "
                              f"over max_prompt_tokens={budget}")
        total = needed
        num_fit = 1
        # Newest to oldest, stopping at the first turn that does not fit: the kept history has no holes.
        while num_fit < num_kept and total + turn_tokens[-1 - num_fit] <= budget:
            total += turn_tokens[-1 - num_fit]
            num_fit += 1
        num_kept = num_fit
    num_dropped = len(groups) - num_kept
    if num_dropped == 0:
        return TrimResult(messages, len(groups), 0, "within budget: nothing trimmed")
    dropped = {i for group in groups[:num_dropped] for i in group}
    kept = [dict(m) for i, m in enumerate(messages) if i not in dropped]
    return TrimResult(kept, len(groups), num_dropped,
                      f"dropped the {num_dropped} oldest of {len(groups)} turns ({len(dropped)} messages)")
