"""A circuit breaker per route: closed -> open after N consecutive failed calls -> half-open once open_s has
passed, when exactly one probe call may go through -> closed if it succeeds, open again if it fails.

A call is one `chat_completions` (or stream) with all its retries, so `failure_threshold` counts calls, not
attempts. State changes under a `threading.Lock` that is never held across an await, so one breaker is safe to
share between the event loop and other threads.
"""
from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass
from typing import Callable


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class Admission:
    admitted: bool  # the call may go to the provider
    is_probe: bool  # it is the one half-open probe (hand it back to succeeded / failed / abandoned)
    wait_s: float = 0.0  # refused: seconds until a probe may go through (a lower bound while a probe is out)


class CircuitBreaker:
    def __init__(self, failure_threshold: int, open_s: float, clock: Callable[[], float] = time.monotonic):
        self.failure_threshold = failure_threshold
        self.open_s = open_s
        self.clock = clock
        self._lock = threading.Lock()
        self._num_failures = 0  # consecutive failed calls while closed
        self._opened_at: float | None = None  # None: closed
        self._probe_in_flight = False  # half-open: the one call let through has not reported back

    @property
    def state(self) -> CircuitState:
        with self._lock:
            return self._state()

    def _state(self) -> CircuitState:
        if self._opened_at is None:
            return CircuitState.CLOSED
        if self.clock() - self._opened_at < self.open_s:
            return CircuitState.OPEN
        return CircuitState.HALF_OPEN

    def admit(self) -> Admission:
        """Called before a call. Every admitted call must end in exactly one `succeeded`, `failed` or
        `abandoned`, given its `is_probe`."""
        with self._lock:
            state = self._state()
            if state is CircuitState.CLOSED:
                return Admission(admitted=True, is_probe=False)
            if state is CircuitState.HALF_OPEN and not self._probe_in_flight:
                self._probe_in_flight = True
                return Admission(admitted=True, is_probe=True)
            wait_s = self._opened_at + self.open_s - self.clock() if state is CircuitState.OPEN else 0.0
            return Admission(admitted=False, is_probe=False, wait_s=max(wait_s, 0.0))

    def succeeded(self, is_probe: bool) -> None:
        with self._lock:
            if is_probe:
                self._probe_in_flight = False
            self._num_failures = 0
            self._opened_at = None

    def failed(self, is_probe: bool) -> None:
        with self._lock:
            if is_probe:
                self._probe_in_flight = False
                self._opened_at = self.clock()  # the probe failed: open for another open_s
                return
            if self._opened_at is not None:
                return  # a call admitted before the circuit opened; it is already open
            self._num_failures += 1
            if self._num_failures >= self.failure_threshold:
                self._opened_at = self.clock()

    def abandoned(self, is_probe: bool) -> None:
        """The caller gave up before the call had a verdict (cancelled): no evidence either way."""
        with self._lock:
            if is_probe:
                self._probe_in_flight = False
