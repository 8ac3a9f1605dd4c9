"""frugal's scheduling policy for another engine's scheduler (vLLM's, through its ``scheduler_cls`` hook).

The other engine keeps its own requests, KV cache and step loop; what it asks of a policy is the order of its
waiting queue and a preemption victim. ``ForeignPolicy`` answers both with the same ``FairSharePolicy`` and
``WaitingQueue`` the native scheduler runs, on a shadow ``Request`` per foreign request (its id, tenant, class
and arrival), so the two engines cannot drift apart: one implementation, two adapters.

Nothing here imports the other engine; its requests are duck-typed (``request_id``, ``num_tokens``,
``num_computed_tokens``). The adapter for vLLM lives in ``serving/engine/vllm/``.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Protocol

from scheduler.policy import FairSharePolicy, WaitingQueue
from scheduler.request import Priority, Request


class ForeignRequest(Protocol):
    request_id: str
    num_computed_tokens: int

    @property
    def num_tokens(self) -> int: ...


class ForeignPolicy:
    """The policy's clock and the shadow requests, shared by the foreign scheduler's queues.

    The foreign scheduler calls, in order: ``admit`` when a request arrives; ``begin_step`` before it schedules;
    ``end_step`` with the tokens it scheduled per request; ``forget`` when a request leaves.
    """

    def __init__(self, policy: FairSharePolicy) -> None:
        self.policy = policy
        self.step = 0  # steps scheduled so far: the policy's clock (aging, usage decay)
        self.pending_tokens: dict[str, int] = {}  # tenant_id -> tokens admitted in the step being scheduled
        self.shadows: dict[str, Request] = {}  # foreign request id -> the policy's view of it

    def admit(self, req_id: str, tenant_id: str, priority: int, arrival_time: float, num_prompt_tokens: int,
              max_tokens: int) -> Request:
        if req_id in self.shadows:
            raise ValueError(f"request id {req_id!r} is already in use")
        # NOTE: the shadow holds no token ids; the policy orders by class, tenant usage and arrival only.
        shadow = Request(req_id=req_id, prompt_token_ids=[], max_tokens=max_tokens, priority=_priority(priority),
                         tenant_id=tenant_id, arrival_time=arrival_time)
        self.shadows[req_id] = shadow
        self.policy.on_arrival(shadow, self.step)
        return shadow

    def begin_step(self) -> None:
        # A new dict, so the queues' heaps see that their keys were computed for another step.
        self.pending_tokens = {}

    def end_step(self, tokens_per_req: dict[str, int]) -> None:
        """Charges each tenant for the tokens its requests were scheduled, then advances the clock."""
        for req_id, num_tokens in tokens_per_req.items():
            shadow = self.shadows.get(req_id)
            if shadow is not None and num_tokens > 0:
                self.policy.charge(shadow.tenant_id, num_tokens, self.step)
        self.step += 1

    def forget(self, req_id: str) -> None:
        shadow = self.shadows.pop(req_id, None)
        if shadow is not None:
            self.policy.forget(shadow)

    def effective_priority(self, req_id: str) -> int | None:
        """The request's class after aging (None for an unknown id): what a victim choice must compare."""
        shadow = self.shadows.get(req_id)
        return None if shadow is None else self.policy.effective_priority(shadow, self.step)

    def choose_victim(self, requests: Iterable[ForeignRequest]) -> ForeignRequest:
        """The request to preempt: lowest class after aging, then the latest arrival (``FairSharePolicy``)."""
        by_id = {r.request_id: r for r in requests}
        shadows = [self.shadows[req_id] for req_id in by_id]
        return by_id[self.policy.choose_victim(shadows, self.step).req_id]

    def tenant_of(self, req_id: str) -> str | None:
        shadow = self.shadows.get(req_id)
        return None if shadow is None else shadow.tenant_id


class PolicyQueue:
    """A waiting queue in the foreign scheduler's protocol (vLLM's ``RequestQueue``), ordered by the policy.

    ``peek_request`` / ``pop_request`` give the request the native scheduler would admit next: best class (with
    aging), then the tenant that used fewest tokens lately, then FCFS. "Prepending" a preempted or skipped
    request puts it back at its FCFS place, where it ranks by the same key as before.
    """

    def __init__(self, state: ForeignPolicy) -> None:
        self.state = state
        self._queue = WaitingQueue(state.policy)
        self._foreign: dict[str, ForeignRequest] = {}  # request id -> queued foreign request

    def add_request(self, request: ForeignRequest) -> None:
        req_id = request.request_id
        shadow = self.state.shadows.get(req_id)
        if shadow is None:
            raise KeyError(f"request {req_id!r} was never admitted to the policy")
        if req_id in self._foreign:
            return
        self._foreign[req_id] = request
        self._queue.add(shadow)

    def peek_request(self) -> ForeignRequest:
        shadow = self._queue.peek(self.state.step, self.state.pending_tokens)
        if shadow is None:
            raise IndexError("peek from an empty queue")
        return self._foreign[shadow.req_id]

    def pop_request(self) -> ForeignRequest:
        request = self.peek_request()
        shadow = self.state.shadows[request.request_id]
        self._queue.pop(shadow)
        del self._foreign[request.request_id]
        # NOTE: the foreign scheduler may give it only a chunk; its whole remainder is what the next admission
        # in this step should see the tenant ask for, as the native scheduler counts a chunked prompt.
        pending = self.state.pending_tokens
        pending[shadow.tenant_id] = pending.get(shadow.tenant_id, 0) + max(
            0, request.num_tokens - request.num_computed_tokens)
        return request

    def prepend_request(self, request: ForeignRequest) -> None:
        self.add_request(request)

    def prepend_requests(self, requests: Iterable[ForeignRequest]) -> None:
        for request in requests:
            self.add_request(request)

    def remove_request(self, request: ForeignRequest) -> None:
        if self._foreign.pop(request.request_id, None) is None:
            raise ValueError(f"request {request.request_id!r} is not queued")
        self._queue.remove(self.state.shadows[request.request_id])

    def remove_requests(self, requests: Iterable[ForeignRequest]) -> None:
        for request in list(requests):
            if request.request_id in self._foreign:
                self.remove_request(request)

    def __bool__(self) -> bool:
        return bool(self._foreign)

    def __len__(self) -> int:
        return len(self._foreign)

    def __contains__(self, request: object) -> bool:
        return getattr(request, "request_id", None) in self._foreign

    def __iter__(self) -> Iterator[ForeignRequest]:
        return iter(list(self._foreign.values()))


def _priority(value: int) -> Priority:
    # NOTE: vLLM's priorities are any integers; ours are three classes, so the rest are clamped to the nearest.
    return Priority(min(max(int(value), min(Priority)), max(Priority)))
