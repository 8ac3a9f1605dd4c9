"""Server-sent events from an upstream: the `data` of each event, as the provider sent it.

Enough of the SSE format for OpenAI-compatible streams: `data:` lines (several join with a newline), a blank
line ends the event, comments (`:`) and other fields (`event:`, `id:`, `retry:`) are skipped. An event the
stream ends in the middle of is dropped, as the format says; the caller sees a stream without `[DONE]`.
"""
from __future__ import annotations

from typing import AsyncIterator

DONE = "[DONE]"


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
