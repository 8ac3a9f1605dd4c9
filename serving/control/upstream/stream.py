"""A streamed upstream answer: the provider's SSE chunks, passed through, with its usage read from the last one.

Entering the stream (`async with`) sends the request, with retries, until the first chunk is in hand; only then
does the caller see anything, so until `__aenter__` returns the router can still fall back to another route.
After that nothing is retried: a cut, a timeout or a garbage chunk ends the stream with a non-retryable
`UpstreamError`. The circuit hears the verdict when the stream ends.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator

import httpx

from serving.control.upstream.errors import UpstreamError, transport_error
from serving.control.upstream.sse import DONE, sse_data
from serving.control.upstream.usage import NOT_REPORTED, UpstreamUsage, check_chunk, usage_of

if TYPE_CHECKING:
    from serving.control.upstream.client import UpstreamClient


@dataclass(frozen=True, slots=True)
class StreamChunk:
    data: str  # the event's data exactly as the provider sent it
    payload: dict  # the same, parsed (and checked: a chunk object with a choices list)

    @property
    def sse(self) -> str:
        """The chunk as an SSE event, to pass on to the client as it came."""
        return f"data: {self.data}\n\n"


class UpstreamStream:
    def __init__(self, client: "UpstreamClient", path: str, body: dict, chat: bool):
        self.route_id = client.route.id  # the route streaming
        self.attempts = 0  # requests sent (1 + retries before the first chunk)
        self.num_chunks = 0  # chunks handed to the caller
        self.usage: UpstreamUsage | None = None  # set when the stream ends with [DONE]; .reported False if none came
        self._client = client
        self._path, self._body, self._chat = path, body, chat
        self._response: httpx.Response | None = None
        self._events: AsyncIterator[str] | None = None
        self._first: StreamChunk | None = None
        self._last_usage: UpstreamUsage | None = None
        self._error: UpstreamError | None = None
        self._admission = None
        self._deadline = 0.0

    async def __aenter__(self) -> "UpstreamStream":
        client = self._client
        self._admission = client.admit()
        self._deadline = client.deadline()
        try:
            await client.retried(self._open, self._deadline)
        except BaseException as e:
            client.settle(self._admission, e)
            self._admission = None
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        try:
            if self._events is not None:
                await self._events.aclose()
            if self._response is not None:
                await self._response.aclose()
        finally:
            if self._admission is not None:
                admission, self._admission = self._admission, None
                if self.usage is not None:
                    self._client.settle(admission, None)
                elif self._error is not None:
                    self._client.settle(admission, self._error)
                else:  # the caller left before the end: no verdict on the route
                    self._client.circuit.abandoned(admission.is_probe)

    async def __aiter__(self) -> AsyncIterator[StreamChunk]:
        if self._first is None:
            raise RuntimeError("iterate an UpstreamStream once, inside `async with`")
        chunk, self._first = self._first, None
        try:
            while chunk is not None:
                self.num_chunks += 1
                yield chunk
                chunk = await self._next_chunk(after_first_byte=True)
        except UpstreamError as e:
            self._error = e
            raise
        self.usage = self._last_usage or NOT_REPORTED

    async def _open(self, attempt: int) -> None:
        client = self._client
        self.attempts = attempt
        try:
            response = await asyncio.wait_for(client.send(self._path, self._body, stream=True),
                                              client.remaining_s(self._deadline, attempt))
        except asyncio.TimeoutError:
            raise client.total_timeout(attempt) from None
        except httpx.HTTPError as e:
            raise transport_error(self.route_id, e, attempt, client.route.timeout_s) from None
        try:
            content_type = response.headers.get("content-type", "")
            if not 200 <= response.status_code < 300 or "text/event-stream" not in content_type:
                text = await self._read_rest(response, attempt)
                client.check_status(response, text, attempt)
                raise client.garbage(f"expected an event stream, got {content_type or 'no content type'}: "
                                     f"{text!r}", attempt)
            self._response, self._events = response, sse_data(response.aiter_lines())
            self._first = await self._next_chunk(after_first_byte=False)
            if self._first is None:
                raise client.garbage("the stream ended ([DONE]) before its first chunk", attempt)
        except BaseException:
            self._response = self._events = None
            await response.aclose()
            raise

    async def _read_rest(self, response: httpx.Response, attempt: int) -> str:
        try:
            await asyncio.wait_for(response.aread(), self._client.remaining_s(self._deadline, attempt))
        except (asyncio.TimeoutError, httpx.HTTPError):
            return ""  # the status says enough
        return response.text

    async def _next_chunk(self, after_first_byte: bool) -> StreamChunk | None:
        """The next chunk, or None at [DONE]. Raises UpstreamError: retryable only before the first byte."""
        client, attempt = self._client, self.attempts
        retryable = not after_first_byte
        try:
            data = await asyncio.wait_for(anext(self._events), client.remaining_s(self._deadline, attempt))
        except StopAsyncIteration:
            raise client.garbage(f"the stream ended without [DONE] after {self.num_chunks} chunk(s)", attempt,
                                 retryable) from None
        except asyncio.TimeoutError:
            raise client.total_timeout(attempt, after_first_byte) from None
        except UpstreamError as e:  # remaining_s: the deadline passed
            e.retryable = retryable
            raise
        except httpx.HTTPError as e:
            raise transport_error(self.route_id, e, attempt, client.route.timeout_s, after_first_byte) from None
        if data == DONE:
            return None
        try:
            payload = json.loads(data)
        except ValueError:
            raise client.garbage(f"chunk {self.num_chunks} is not JSON: {data!r}", attempt, retryable) from None
        try:
            check_chunk(payload, self._chat)
            if payload.get("usage") is not None:
                self._last_usage = usage_of(client.route, payload["usage"])
        except ValueError as e:
            raise client.garbage(f"chunk {self.num_chunks}: {e}", attempt, retryable) from None
        return StreamChunk(data=data, payload=payload)
