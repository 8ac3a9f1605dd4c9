"""Retries within one route: exponential backoff with jitter, Retry-After honoured, all inside the call's deadline."""
from __future__ import annotations

import asyncio
import logging
import random
from typing import Awaitable, Callable, TypeVar

from serving.control.upstream.config import UpstreamRoute
from serving.control.upstream.errors import UpstreamError, retried_in_route

logger = logging.getLogger(__name__)

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


def backoff_s(route: UpstreamRoute, retry_index: int, rng: random.Random) -> float:
    """The wait before retry `retry_index` (0 for the first): base x 2^i, capped, then "equal jitter" (half fixed,
    half random), so many clients that failed together do not come back together, yet each one still backs off."""
    step = min(route.backoff_max_s, route.backoff_s * 2 ** retry_index)
    return step / 2 + rng.uniform(0, step / 2)


async def with_retries(route: UpstreamRoute, attempt: Callable[[int], Awaitable[T]], deadline: float,
                       sleep: Sleep, rng: random.Random) -> T:
    """Runs `attempt(1)`, `attempt(2)`, ... until one returns, one raises an error the client does not retry, the
    route's max_retries are spent, or the next wait would pass `deadline` (loop time). Raises the last error."""
    loop = asyncio.get_running_loop()
    num_attempts = 0
    while True:
        num_attempts += 1
        try:
            return await attempt(num_attempts)
        except UpstreamError as e:
            if not retried_in_route(e) or num_attempts > route.max_retries:
                raise
            # NOTE: a Retry-After is the provider telling us when it will serve again; it wins over our backoff,
            # even past backoff_max_s, and when it falls past the deadline the error goes to the router at once.
            wait_s = e.retry_after_s if e.retry_after_s is not None else backoff_s(route, num_attempts - 1, rng)
            if loop.time() + wait_s >= deadline:
                raise
            logger.warning("upstream %s: attempt %d failed (%s: %s); retrying in %.2f s", route.id, num_attempts,
                           e.kind, e.message, wait_s)
            await sleep(wait_s)
