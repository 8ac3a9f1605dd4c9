"""Line-level reading of message text: which lines are inside fenced code, and the prose paragraphs between.

Both the whitespace and the dedupe step leave fenced code untouched, so they share this one reading of it.
"""
from __future__ import annotations

import re

# NOTE: any indentation opens a fence (CommonMark allows 0-3 spaces, more inside list items); reading too much as
# code only costs a few unsaved spaces, reading too little would rewrite someone's code.
_OPEN_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})(.*)$")


def fence_ids(lines: list[str]) -> list[int | None]:
    """For each line, the number of the fenced code block it is in (fence lines included), or None for prose.

    An unclosed fence runs to the end of the text.
    """
    ids: list[int | None] = []
    fence = None  # the opening fence's run of ` or ~ while inside a block
    num_fences = 0
    for line in lines:
        if fence is None:
            match = _OPEN_FENCE.match(line)
            # A backtick fence's info string has no backticks: "```x```" on one line is inline code, not a fence.
            if match and not (match.group(1)[0] == "`" and "`" in match.group(2)):
                fence = match.group(1)
                num_fences += 1
            ids.append(num_fences if fence is not None else None)
        else:
            ids.append(num_fences)
            stripped = line.strip()
            if stripped and set(stripped) == {fence[0]} and len(stripped) >= len(fence):
                fence = None
    return ids


def blocks(text: str) -> list[tuple[bool, str]]:
    """The text as (is_code, block) in order: prose paragraphs (runs of non-blank lines) and whole fenced blocks.

    Blank lines between blocks are left out; "\\n\\n".join of the blocks is the text with normalised separators.
    """
    result: list[tuple[bool, str]] = []
    current: list[str] = []
    current_id: int | None = None
    lines = text.split("\n")
    for line, fence_id in zip(lines, fence_ids(lines)):
        blank = fence_id is None and not line.strip()
        if current and (blank or fence_id != current_id):
            result.append((current_id is not None, "\n".join(current)))
            current = []
        if not blank:
            current.append(line)
            current_id = fence_id
    if current:
        result.append((current_id is not None, "\n".join(current)))
    return result
