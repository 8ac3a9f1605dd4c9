"""Fault injection for the reliability suite: make one request's sampling or detokenizing raise, fail a whole
step, or hang a step, so tests can prove that the fault stays where it belongs and that the watchdog sees it.

A rule names a point and a request-id prefix; a request whose id starts with the prefix trips it. Rules come from
code (`LLMEngine.faults = FaultInjector([...])`) or, for a daemon under test, from the environment:
    FRUGAL_FAULTS="sample=poison-s-,detokenize=poison-d-,step=poison-x-,hang=hang-"
Nothing is injected unless rules are set; the daemon logs a WARNING when they are.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

POINTS = ("sample", "detokenize", "step", "hang")
ENV_VAR = "FRUGAL_FAULTS"


class InjectedFault(RuntimeError):
    """Raised where a fault rule matched."""


@dataclass(frozen=True, slots=True)
class FaultRule:
    point: str  # one of POINTS
    req_id_prefix: str  # requests whose id starts with this trip the rule

    def __post_init__(self):
        if self.point not in POINTS:
            raise ValueError(f"fault point must be one of {', '.join(POINTS)}, got {self.point!r}")
        if not self.req_id_prefix:
            raise ValueError("a fault rule needs a non-empty request id prefix")


class FaultInjector:
    def __init__(self, rules: list[FaultRule], hang_s: float = 3600.0):
        self.rules = list(rules)
        self.hang_s = hang_s  # how long a hung step sleeps unless released
        self._release = threading.Event()

    @classmethod
    def from_env(cls) -> FaultInjector | None:
        spec = os.environ.get(ENV_VAR, "").strip()
        if not spec:
            return None
        rules = []
        for item in spec.split(","):
            point, sep, prefix = item.strip().partition("=")
            if not sep:
                raise ValueError(f"{ENV_VAR}: expected point=prefix, got {item!r}")
            rules.append(FaultRule(point.strip(), prefix.strip()))
        return cls(rules)

    def matches(self, point: str, req_id: str) -> bool:
        return any(r.point == point and req_id.startswith(r.req_id_prefix) for r in self.rules)

    def on_step(self, req_ids: list[str]) -> None:
        """Called with a step's request ids before the model runs: hangs or raises when a rule says so."""
        if any(self.matches("hang", r) for r in req_ids):
            self._release.wait(self.hang_s)
        culprit = next((r for r in req_ids if self.matches("step", r)), None)
        if culprit is not None:
            raise InjectedFault(f"injected step failure ({culprit})")

    def release(self) -> None:
        """Ends every hang now and for good (shutdown)."""
        self._release.set()
