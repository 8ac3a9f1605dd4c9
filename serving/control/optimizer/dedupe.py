"""Dedupe step: drop instruction paragraphs that a system or user message repeats from an earlier one.

Agent frameworks and RAG templates often resend the same instructions with every turn; only later copies go, the
first stays where it was. A paragraph is a run of non-blank lines outside fenced code.
"""
from __future__ import annotations

import re

from serving.control.optimizer.text import blocks

INSTRUCTION_ROLES = ("system", "developer", "user")
# NOTE: short paragraphs ("Thanks!", "Yes, go on.") repeat in real conversations for their own reasons.
MIN_PARAGRAPH_WORDS = 6
_NOT_WORD = re.compile(r"[^\w\s]+")


def paragraph_key(paragraph: str) -> str | None:
    """What "the same paragraph" means: equal after case, whitespace and punctuation/markup are ignored.

    NOTE: near-verbatim stops there, never a similarity ratio: "Always answer in English" and "Never answer in
    English" are 90% alike and opposite. None for a paragraph too short to count as an instruction.
    """
    words = _NOT_WORD.sub(" ", paragraph.casefold()).split()
    return " ".join(words) if len(words) >= MIN_PARAGRAPH_WORDS else None


def dedupe_messages(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], int]:
    """(messages with repeated instruction paragraphs dropped, number of paragraphs dropped).

    Fenced code is never dropped (a near-copy of code is different code), assistant and tool messages are neither
    changed nor used as originals, and a message is never emptied: one made only of repeats keeps them.
    A changed message has its blocks joined by one blank line; an unchanged one stays byte for byte.
    """
    seen: set[str] = set()
    result = []
    num_dropped = 0
    for message in messages:
        if message["role"] not in INSTRUCTION_ROLES:
            result.append(dict(message))
            continue
        parts = blocks(message["content"])
        keys = [None if is_code else paragraph_key(text) for is_code, text in parts]
        kept = [text for (_, text), key in zip(parts, keys) if key is None or key not in seen]
        if len(kept) < len(parts) and kept:
            num_dropped += len(parts) - len(kept)
            result.append({**message, "content": "\n\n".join(kept)})
        else:
            result.append(dict(message))
        seen.update(key for key in keys if key is not None)  # after the message: copies inside it are its own
    return result, num_dropped
