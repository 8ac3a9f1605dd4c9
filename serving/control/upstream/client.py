"""The client of one external route: an OpenAI-compatible API behind httpx, with timeouts, retries, a circuit
breaker, shape checks and the provider's usage priced at the route's rates.

One `UpstreamClient` per route, made when the router starts and closed when it stops; its `httpx.AsyncClient`
pools connections. Every failure is an `UpstreamError` (see errors.py for the kinds); nothing else escapes
except cancellation.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

import httpx

from serving.control.upstream.circuit import Admission, CircuitBreaker
from serving.control.upstream.config import UpstreamRoute
from serving.control.upstream.errors import UpstreamError, status_error, transport_error
from serving.control.upstream.retry import Sleep, with_retries
from serving.control.upstream.stream import UpstreamStream
from serving.control.upstream.usage import UpstreamUsage, check_answer, usage_of

logger = logging.getLogger(__name__)

T = TypeVar("T")
EXCERPT_CHARS = 300  # of a provider's error body or garbage, in an error message
MAX_CONNECTIONS = 100  # per route


@dataclass(frozen=True, slots=True)
class UpstreamResult:
    route_id: str  # the route that answered
    body: dict  # the provider's answer, as it sent it (checked: choices of the right shape)
    usage: UpstreamUsage  # the provider's token counts and their cost; usage.reported False when it sent none
    attempts: int  # requests sent for this call (1 + retries)


class UpstreamClient:
    def __init__(self, route: UpstreamRoute, *, transport: httpx.AsyncBaseTransport | None = None,
                 sleep: Sleep = asyncio.sleep, rng: random.Random | None = None):
        """Reads the API key from `route.api_key_env` now; raises ValueError naming the variable (never its
        value) when it is unset. `sleep` and `rng` are the backoff's, replaceable in tests."""
        headers = {}
        self._secret = None  # the key, kept only to scrub it from error excerpts
        if route.api_key_env is not None:
            key = os.environ.get(route.api_key_env)
            if not key:
                raise ValueError(f"upstream {route.id}: environment variable {route.api_key_env} "
                                 f"(api_key_env) is not set")
            headers["Authorization"] = f"Bearer {key}"  # httpx shows it as [secure] in a repr
            self._secret = key
        self.route = route
        self.circuit = CircuitBreaker(route.circuit.failure_threshold, route.circuit.open_s)
        t = route.timeout_s
        self._http = httpx.AsyncClient(
            base_url=route.base_url.rstrip("/") + "/", headers=headers, transport=transport,
            timeout=httpx.Timeout(connect=t.connect, read=t.first_byte, write=t.first_byte, pool=t.connect),
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS // 5))
        self._sleep = sleep
        self._rng = rng or random.Random()

    def __repr__(self) -> str:
        return (f"UpstreamClient(id={self.route.id!r}, base_url={self.route.base_url!r}, model={self.route.model!r}, "
                f"circuit={self.circuit.state.value})")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "UpstreamClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # --- the four calls ---

    async def chat_completions(self, body: dict) -> UpstreamResult:
        """POST /chat/completions with `body` (an OpenAI request; `model` is replaced by the route's)."""
        return await self._unary("chat/completions", body, chat=True)

    async def completions(self, body: dict) -> UpstreamResult:
        return await self._unary("completions", body, chat=False)

    def stream_chat_completions(self, body: dict) -> UpstreamStream:
        """`async with client.stream_chat_completions(body) as stream: async for chunk in stream: ...`; entering
        retries until the first chunk is in hand (so the router can still fall back), after which nothing is
        retried; `stream.usage` is set once the stream has ended."""
        return UpstreamStream(self, "chat/completions", self._body(body, chat=True, stream=True), chat=True)

    def stream_completions(self, body: dict) -> UpstreamStream:
        return UpstreamStream(self, "completions", self._body(body, chat=False, stream=True), chat=False)

    # --- shared by the unary calls and UpstreamStream ---

    def _body(self, body: dict, chat: bool, stream: bool) -> dict:
        if chat and not self.route.chat:
            raise ValueError(f"upstream {self.route.id} serves /completions only (chat: false)")
        out = {**body, "model": self.route.model, "stream": stream}
        if stream:
            # NOTE: the cost comes from the provider's counts, which a stream only sends when asked.
            out["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        else:
            out.pop("stream_options", None)
        return out

    def excerpt(self, text: str) -> str:
        text = text.strip()
        if self._secret:
            text = text.replace(self._secret, "[secure]")
        return text[:EXCERPT_CHARS] + ("..." if len(text) > EXCERPT_CHARS else "")

    def deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.route.timeout_s.total

    def remaining_s(self, deadline: float, attempt: int) -> float:
        """Seconds left before `deadline`; raises the timeout error when none are."""
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise self.total_timeout(attempt)
        return left

    def total_timeout(self, attempt: int, after_first_byte: bool = False) -> UpstreamError:
        return UpstreamError(self.route.id, "timeout", f"not done within {self.route.timeout_s.total} s (total)",
                             retryable=not after_first_byte, attempts=attempt)

    def admit(self) -> Admission:
        """Asks the circuit; raises circuit_open (retryable: the router should take the next route)."""
        admission = self.circuit.admit()
        if not admission.admitted:
            raise UpstreamError(self.route.id, "circuit_open",
                                f"circuit open after repeated failures; next probe in {admission.wait_s:.1f} s",
                                retryable=True, retry_after_s=admission.wait_s)
        return admission

    def settle(self, admission: Admission, error: BaseException | None) -> None:
        """Reports an admitted call's outcome to the circuit."""
        if error is None or (isinstance(error, UpstreamError) and not error.route_at_fault):
            self.circuit.succeeded(admission.is_probe)
        elif isinstance(error, UpstreamError):
            self.circuit.failed(admission.is_probe)
            logger.warning("upstream %s: call failed after %d attempt(s): %s: %s (circuit %s)", self.route.id,
                           error.attempts, error.kind, error.message, self.circuit.state.value)
        else:
            self.circuit.abandoned(admission.is_probe)

    async def retried(self, attempt: Callable[[int], Awaitable[T]], deadline: float) -> T:
        return await with_retries(self.route, attempt, deadline, self._sleep, self._rng)

    async def send(self, path: str, body: dict, stream: bool) -> httpx.Response:
        request = self._http.build_request("POST", path, json=body)
        return await self._http.send(request, stream=stream)

    def check_status(self, response: httpx.Response, text: str, attempt: int) -> None:
        if not 200 <= response.status_code < 300:
            raise status_error(self.route.id, response.status_code, response.headers, self.excerpt(text), attempt)

    def garbage(self, what: str, attempt: int, retryable: bool = True) -> UpstreamError:
        return UpstreamError(self.route.id, "garbage", self.excerpt(what), retryable=retryable, attempts=attempt)

    # --- unary ---

    async def _unary(self, path: str, body: dict, chat: bool) -> UpstreamResult:
        body = self._body(body, chat=chat, stream=False)
        admission = self.admit()
        deadline = self.deadline()
        try:
            result = await self.retried(lambda attempt: self._attempt(path, body, chat, attempt, deadline), deadline)
        except BaseException as e:
            self.settle(admission, e)
            raise
        self.settle(admission, None)
        return result

    async def _attempt(self, path: str, body: dict, chat: bool, attempt: int, deadline: float) -> UpstreamResult:
        try:
            response = await asyncio.wait_for(self.send(path, body, stream=False), self.remaining_s(deadline, attempt))
        except asyncio.TimeoutError:
            raise self.total_timeout(attempt) from None
        except httpx.HTTPError as e:
            raise transport_error(self.route.id, e, attempt, self.route.timeout_s) from None
        self.check_status(response, response.text, attempt)
        try:
            payload = response.json()
        except ValueError:
            raise self.garbage(f"the answer is not JSON: {response.text!r}", attempt) from None
        try:
            check_answer(payload, chat)
            usage = usage_of(self.route, payload.get("usage"))
        except ValueError as e:
            raise self.garbage(str(e), attempt) from None
        return UpstreamResult(route_id=self.route.id, body=payload, usage=usage, attempts=attempt)
