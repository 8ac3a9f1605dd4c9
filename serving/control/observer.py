"""What the control plane reports as it admits, refuses and settles requests: the hooks the metrics implement
(serving/metrics/control.py). The base class ignores everything, so the plane runs the same without metrics.
Called on the event loop; implementations must not block."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.control.admission import Admission, Settlement
    from serving.control.context import RequestContext
    from serving.control.errors import ControlError


class ControlObserver:
    def admitted(self, admission: "Admission") -> None:
        """A request passed its limits and budgets; its budget lines are reserved."""

    def refused(self, ctx: "RequestContext", model: str, error: "ControlError") -> None:
        """A request was refused at admission (rate limit, budget, agent task, unavailable store)."""

    def settled(self, admission: "Admission", settlement: "Settlement") -> None:
        """A request ended and its real cost is known (its ledger row is queued or committed)."""

    def cache_lookup(self, ctx: "RequestContext", kind: str, hit: bool, saved_usd: float) -> None:
        """A response cache (`kind`: exact or semantic) was asked; `saved_usd` is what a hit saved."""

    def cache_invalidated(self, ctx: "RequestContext", kind: str, num_removed: int) -> None:
        """A client dropped its tenant's cached answers (`kind`: tenant, all of them; tag, those with a tag)."""

    def fallback(self, ctx: "RequestContext", route: str, next_route: str | None, kind: str) -> None:
        """A route failed a request (`kind`: timeout, refused, garbage, circuit_open, queue_full, engine_dead...);
        `next_route` takes it, None: no route was left."""

    def escalated(self, ctx: "RequestContext", route: str, to_route: str) -> None:
        """The cascade found `route`'s answer unsure and sent the request on to `to_route`."""

    def outcome(self, ctx: "RequestContext", outcome: str, task_cost_usd: float) -> None:
        """A task's outcome was reported; `task_cost_usd` is what the task's calls cost in all."""
