"""Whitespace step: collapse runs of spaces and blank lines and strip trailing spaces, outside fenced code."""
from __future__ import annotations

import re

from serving.control.optimizer.text import fence_ids

_SPACE_RUN = re.compile(r"[ \t]{2,}")


def collapse_whitespace(text: str) -> str:
    """Inside code fences nothing changes; outside, a run of spaces/tabs after the indentation becomes one space,
    trailing spaces go, several blank lines become one, and blank lines at either end go.

    NOTE: leading indentation stays: it carries structure in nested lists, YAML and unfenced (indented) code.
    """
    lines = text.split("\n")
    result: list[str] = []
    result_is_prose: list[bool] = []
    for line, fence_id in zip(lines, fence_ids(lines)):
        if fence_id is None:
            body = line.lstrip(" \t")
            indent = line[:len(line) - len(body)]
            line = (indent + _SPACE_RUN.sub(" ", body)).rstrip(" \t") if body else ""
            if not line and (not result or (result[-1] == "" and result_is_prose[-1])):
                continue  # a blank line at the start, or after another blank prose line
        result.append(line)
        result_is_prose.append(fence_id is None)
    while result and result[-1] == "" and result_is_prose[-1]:
        result.pop()
        result_is_prose.pop()
    return "\n".join(result)
