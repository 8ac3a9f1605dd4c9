"""The one error an upstream route raises, typed so the router can decide: retry later, fall back, or give up.

The message names the route and what went wrong (the status and a short excerpt of the provider's error, the
timeout that fired, the garbage that came back), never the API key.
"""
from __future__ import annotations

import email.utils
import time
from typing import Literal

import httpx

Kind = Literal["timeout", "refused", "http_status", "garbage", "circuit_open"]
KINDS = ("timeout", "refused", "http_status", "garbage", "circuit_open")


class UpstreamError(Exception):
    def __init__(self, route_id: str, kind: Kind, message: str, *, retryable: bool, status: int | None = None,
                 retry_after_s: float | None = None, attempts: int = 0):
        assert kind in KINDS, kind
        super().__init__(f"upstream {route_id}: {kind}: {message}")
        self.route_id = route_id  # the route that failed
        self.kind = kind  # timeout | refused | http_status | garbage | circuit_open
        self.message = message  # what went wrong, for logs and the client
        self.retryable = retryable  # the same request may succeed later (on this route, or another one now)
        self.status = status  # the provider's HTTP status, for http_status
        self.retry_after_s = retry_after_s  # the provider's Retry-After, or when an open circuit lets a probe in
        self.attempts = attempts  # requests sent to the provider for this call (0: none, as with circuit_open)

    @property
    def route_at_fault(self) -> bool:
        """Counts against the route's circuit: everything but the provider refusing the request itself."""
        return not (self.kind == "http_status" and request_refused(self.status))

    def __repr__(self) -> str:
        return (f"UpstreamError(route_id={self.route_id!r}, kind={self.kind!r}, status={self.status!r}, "
                f"retryable={self.retryable!r}, attempts={self.attempts!r}, message={self.message!r})")


def request_refused(status: int | None) -> bool:
    """A 4xx other than 401/403/408/429: the provider refused this request (bad body, unknown model, too long);
    the same body on another route would most likely be refused too. The route itself is working."""
    return status is not None and 400 <= status < 500 and status not in (401, 403, 408, 429)


def retried_in_route(e: UpstreamError) -> bool:
    """What the client retries itself, before the first streamed byte: connect errors, timeouts, 429 and 5xx."""
    if e.kind in ("timeout", "refused"):
        return e.retryable
    return e.kind == "http_status" and e.retryable and (e.status == 429 or e.status >= 500)


def retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds (an integer, or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def status_error(route_id: str, status: int, headers: httpx.Headers, excerpt: str, attempt: int) -> UpstreamError:
    # NOTE: 401/403 are the route's fault (its key), so another route may well succeed: retryable for the router,
    # though the client never repeats a 4xx itself.
    return UpstreamError(route_id, "http_status", f"HTTP {status}: {excerpt}" if excerpt else f"HTTP {status}",
                         retryable=not request_refused(status), status=status,
                         retry_after_s=retry_after_s(headers.get("retry-after")), attempts=attempt)


def transport_error(route_id: str, exc: httpx.HTTPError, attempt: int, timeouts, after_first_byte: bool = False
                    ) -> UpstreamError:
    """httpx's exception for one attempt as an UpstreamError. After the first streamed byte nothing is retryable:
    the caller has already passed part of the answer on."""
    retryable = not after_first_byte
    if isinstance(exc, httpx.ConnectTimeout):
        return UpstreamError(route_id, "timeout", f"no connection within {timeouts.connect} s",
                             retryable=retryable, attempts=attempt)
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamError(route_id, "timeout", f"no byte within {timeouts.first_byte} s ({type(exc).__name__})",
                             retryable=retryable, attempts=attempt)
    if after_first_byte and isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
        return UpstreamError(route_id, "garbage", f"the stream was cut: {type(exc).__name__}: {exc}",
                             retryable=False, attempts=attempt)
    if isinstance(exc, (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        # NOTE: a connection dropped after the request was sent may have been served (and billed) upstream;
        # retrying it is what every OpenAI client does, and the alternative is failing a request that can succeed.
        return UpstreamError(route_id, "refused", f"{type(exc).__name__}: {exc}", retryable=retryable,
                             attempts=attempt)
    return UpstreamError(route_id, "garbage", f"{type(exc).__name__}: {exc}", retryable=retryable, attempts=attempt)
