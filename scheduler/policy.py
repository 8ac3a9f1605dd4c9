"""Scheduling policy: who is admitted next, and who gives up its blocks when they run out.

This module knows requests, tenants and steps, never blocks, so the same policy
can run inside another engine's scheduler (vLLM's ``scheduler_cls`` hook) where
that engine owns the KV cache.

Admission order, best first, by the key
``(effective class, tenant usage, arrival_time, arrival order)``:

1. Priority class: INTERACTIVE < STANDARD < BATCH.
2. Aging: a request's effective class improves by one every ``aging_steps``
   scheduler steps since it arrived, down to INTERACTIVE, so no request waits
   forever behind a stream of better ones. Steps, not wall time, keep it
   deterministic and testable.
3. Fair share inside a class: the tenant that has consumed fewer tokens lately
   goes first. Usage is tokens computed for the tenant, divided by its weight,
   decayed with a half-life of ``usage_half_life_steps`` steps so an idle tenant
   does not bank unbounded credit. A tenant that floods the queue pushes its own
   usage up, so another tenant's lone request overtakes the flood.
4. FCFS: arrival_time, then the order the scheduler saw the requests.

Preemption victim: the running request that ranks last by
``(effective class, arrival_time, arrival order)``: the lowest class, then the
latest arrival.
"""
from __future__ import annotations

import heapq
from collections import deque
from typing import Iterable, Iterator

from scheduler.request import Priority, Request


class FairSharePolicy:
    def __init__(
        self,
        aging_steps: int | None = 100,
        usage_half_life_steps: int = 500,
        tenant_weights: dict[str, float] | None = None,
    ) -> None:
        self.aging_steps = aging_steps
        self.tenant_weights = dict(tenant_weights or {})
        self._decay_per_step = 0.5 ** (1.0 / usage_half_life_steps)
        self._usage: dict[str, float] = {}  # tenant_id -> weighted, decayed tokens, as of _usage_step
        self._usage_step: dict[str, int] = {}  # tenant_id -> step _usage was last brought up to date
        self._arrival_step: dict[str, int] = {}  # req_id -> step at which it arrived; drives aging
        self._arrival_seq: dict[str, int] = {}  # req_id -> arrival order; breaks arrival_time ties
        self._next_seq = 0

    def on_arrival(self, request: Request, step: int) -> None:
        """Called once per request, when the scheduler accepts it (not again after preemption)."""
        self._arrival_step[request.req_id] = step
        self._arrival_seq[request.req_id] = self._next_seq
        self._next_seq += 1

    def forget(self, request: Request) -> None:
        """Called when the request finishes or is aborted."""
        self._arrival_step.pop(request.req_id, None)
        self._arrival_seq.pop(request.req_id, None)

    def effective_priority(self, request: Request, step: int) -> int:
        priority = int(request.priority)
        if self.aging_steps is None or priority == 0:
            return priority
        # NOTE: aging counts from arrival, running time included, so a preemption
        # never resets a request's credit and an old request is the last victim.
        waited = step - self._arrival_step.get(request.req_id, step)
        return max(0, priority - waited // self.aging_steps)

    def tenant_usage(self, tenant_id: str, step: int) -> float:
        usage = self._usage.get(tenant_id)
        if usage is None:
            return 0.0
        return usage * self._decay_per_step ** (step - self._usage_step[tenant_id])

    def charge(self, tenant_id: str, num_tokens: int, step: int) -> None:
        """Count tokens computed for a tenant. Called after each step with what it computed."""
        weight = self.tenant_weights.get(tenant_id, 1.0)
        self._usage[tenant_id] = self.tenant_usage(tenant_id, step) + num_tokens / weight
        self._usage_step[tenant_id] = step

    def fcfs_key(self, request: Request) -> tuple[float, int]:
        return request.arrival_time, self._arrival_seq.get(request.req_id, 0)

    def admission_key(self, request: Request, step: int, pending_tokens: dict[str, int] | None = None) -> tuple:
        """Sort key for admission, smallest first.

        ``pending_tokens`` (tenant_id -> tokens) holds what this step already gave a
        tenant, so several admissions in one step already see each other.
        """
        tenant_id = request.tenant_id
        usage = self.tenant_usage(tenant_id, step)
        if pending_tokens:
            usage += pending_tokens.get(tenant_id, 0) / self.tenant_weights.get(tenant_id, 1.0)
        return (self.effective_priority(request, step), usage, *self.fcfs_key(request))

    def victim_key(self, request: Request, step: int) -> tuple:
        """Sort key for preemption, largest preempted first."""
        return (self.effective_priority(request, step), *self.fcfs_key(request))

    def choose_victim(self, running: Iterable[Request], step: int) -> Request:
        """The running request to preempt when blocks run out: lowest class, then latest arrival.

        NOTE: the request asking for blocks is a candidate too: when it ranks last,
        taking blocks from a better request would invert the priorities.
        """
        return max(running, key=lambda request: self.victim_key(request, step))


class WaitingQueue:
    """Waiting (and preempted) requests, one FCFS deque per (tenant, priority class).

    Inside a deque the head is the best request (same tenant and class, earliest
    arrival, longest aged), so only heads compete. A heap of head keys is built at
    a step's first ``peek`` and updated after each ``pop`` for the popped tenant's
    queues only, so an admission costs O(log queues), not O(waiting requests).
    """

    def __init__(self, policy: FairSharePolicy) -> None:
        self.policy = policy
        self._queues: dict[tuple[str, int], deque[Request]] = {}  # (tenant_id, priority) -> FCFS queue
        self._num_requests = 0
        self._heap: list[tuple] | None = None  # (admission key, version, queue key) per head; None: rebuild
        self._heap_for: tuple[int, int] = (-1, 0)  # (step, id(pending_tokens)) the heap's keys hold for
        self._versions: dict[tuple[str, int], int] = {}  # queue key -> version of its live heap entry
        self._stale: set[tuple[str, int]] = set()  # queue keys whose head or tenant usage changed since keyed

    def __len__(self) -> int:
        return self._num_requests

    def __iter__(self) -> Iterator[Request]:
        for queue in self._queues.values():
            yield from queue

    def add(self, request: Request) -> None:
        """Enqueue a new or preempted request at its FCFS place (preempted ones are usually near the front)."""
        key = (request.tenant_id, int(request.priority))
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
        order = self.policy.fcfs_key(request)
        index = len(queue)
        while index > 0 and self.policy.fcfs_key(queue[index - 1]) > order:
            index -= 1
        queue.insert(index, request)
        self._num_requests += 1
        self._heap = None

    def remove(self, request: Request) -> bool:
        """Drop a request (abort while waiting). Returns False if it was not queued."""
        key = (request.tenant_id, int(request.priority))
        queue = self._queues.get(key)
        if queue is None or request not in queue:
            return False
        queue.remove(request)
        self._drop_if_empty(key, queue)
        self._num_requests -= 1
        self._heap = None
        return True

    def peek(self, step: int, pending_tokens: dict[str, int] | None = None) -> Request | None:
        """The request the policy admits next, left in the queue.

        Within one step (same ``step`` and ``pending_tokens`` object), the caller may
        change ``pending_tokens`` only for the tenant of a request it just popped.
        """
        if self._heap is None or self._heap_for != (step, id(pending_tokens)):
            self._rebuild_heap(step, pending_tokens)
        elif self._stale:
            for key in self._stale:
                version = self._versions.get(key, 0) + 1
                self._versions[key] = version
                queue = self._queues.get(key)
                if queue:
                    heapq.heappush(self._heap, (self.policy.admission_key(queue[0], step, pending_tokens), version, key))
            self._stale.clear()
        heap = self._heap
        while heap:
            _, version, key = heap[0]
            if self._versions.get(key) == version and key in self._queues:
                return self._queues[key][0]
            heapq.heappop(heap)  # superseded by a newer entry for the same queue
        return None

    def pop(self, request: Request) -> None:
        """Dequeue the request ``peek`` returned."""
        key = (request.tenant_id, int(request.priority))
        queue = self._queues[key]
        if queue[0] is not request:
            raise ValueError(f"request {request.req_id} is not at the head of its queue")
        queue.popleft()
        self._drop_if_empty(key, queue)
        self._num_requests -= 1
        # The tenant's usage grows with this admission, so all its queues need new keys.
        self._stale.update((request.tenant_id, priority) for priority in _PRIORITIES)

    def _rebuild_heap(self, step: int, pending_tokens: dict[str, int] | None) -> None:
        key_of = self.policy.admission_key
        self._heap = [(key_of(queue[0], step, pending_tokens), 0, key) for key, queue in self._queues.items()]
        heapq.heapify(self._heap)
        self._versions = dict.fromkeys(self._queues, 0)
        self._stale.clear()
        self._heap_for = (step, id(pending_tokens))

    def _drop_if_empty(self, key: tuple[str, int], queue: deque[Request]) -> None:
        if not queue:
            del self._queues[key]


_PRIORITIES = tuple(int(priority) for priority in Priority)
