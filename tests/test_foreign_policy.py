"""The policy adapter for another engine's scheduler (scheduler/foreign.py): its queue admits in the native
scheduler's order and its victim is the native policy's. (The adapter on the real vLLM: tests/test_vllm_backend.py.)"""
from dataclasses import dataclass

import pytest

from scheduler import Priority
from scheduler.foreign import ForeignPolicy, PolicyQueue
from scheduler.policy import FairSharePolicy


@dataclass(eq=False)
class Foreign:
    """Another engine's request: only the fields the adapter reads."""

    request_id: str
    num_tokens: int = 10
    num_computed_tokens: int = 0


def admit(state, queue, req_id, tenant="t", priority=Priority.STANDARD, arrival=0.0, num_tokens=10):
    request = Foreign(req_id, num_tokens)
    state.admit(req_id, tenant, int(priority), arrival, num_tokens, 8)
    queue.add_request(request)
    return request


def drain(state, queue):
    order = []
    state.begin_step()
    while queue:
        order.append(queue.pop_request().request_id)
    return order


def test_classes_then_fcfs():
    state = ForeignPolicy(FairSharePolicy())
    queue = PolicyQueue(state)
    admit(state, queue, "batch", priority=Priority.BATCH, arrival=1.0)
    admit(state, queue, "late", arrival=3.0)
    admit(state, queue, "early", arrival=2.0)
    admit(state, queue, "interactive", priority=Priority.INTERACTIVE, arrival=4.0)
    assert drain(state, queue) == ["interactive", "early", "late", "batch"]


def test_a_quiet_tenant_overtakes_a_flood_inside_one_step():
    state = ForeignPolicy(FairSharePolicy())
    queue = PolicyQueue(state)
    for i in range(4):
        admit(state, queue, f"a{i}", tenant="A", arrival=float(i))
    admit(state, queue, "b0", tenant="B", arrival=10.0)
    state.begin_step()
    first = queue.pop_request()
    # A's admission counts toward A at once: the next pick in the same step is B's.
    assert (first.request_id, queue.peek_request().request_id) == ("a0", "b0")
    assert state.pending_tokens == {"A": 10}


def test_usage_charged_at_the_end_of_a_step_orders_the_next():
    state = ForeignPolicy(FairSharePolicy())
    queue = PolicyQueue(state)
    admit(state, queue, "a", tenant="A", arrival=1.0)
    admit(state, queue, "b", tenant="B", arrival=2.0)
    state.end_step({"a": 0, "x-unknown": 5})
    assert drain(state, queue)[0] == "a"
    admit(state, queue, "a2", tenant="A", arrival=3.0)
    admit(state, queue, "b2", tenant="B", arrival=4.0)
    state.end_step({"a": 100})
    assert drain(state, queue) == ["b2", "a2"]


def test_prepend_returns_a_request_to_its_place_and_remove_forgets_it():
    state = ForeignPolicy(FairSharePolicy())
    queue = PolicyQueue(state)
    a = admit(state, queue, "a", arrival=1.0)
    b = admit(state, queue, "b", arrival=2.0)
    state.begin_step()
    assert queue.pop_request() is a
    queue.prepend_request(a)  # skipped this step: it goes back in front of b
    assert queue.peek_request() is a and len(queue) == 2 and a in queue
    queue.remove_requests([a, Foreign("never-queued")])
    assert list(queue) == [b]
    with pytest.raises(ValueError, match="not queued"):
        queue.remove_request(a)
    queue.pop_request()
    with pytest.raises(IndexError):
        queue.peek_request()
    with pytest.raises(KeyError, match="never admitted"):
        queue.add_request(Foreign("stranger"))


def test_victim_is_the_lowest_class_then_the_latest_arrival_with_aging():
    state = ForeignPolicy(FairSharePolicy(aging_steps=2))
    requests = [Foreign(r) for r in ("i", "b-old", "b-new")]
    state.admit("i", "t", 0, 5.0, 10, 8)
    state.admit("b-old", "t", 2, 1.0, 10, 8)
    state.admit("b-new", "t", 2, 2.0, 10, 8)
    assert state.choose_victim(requests).request_id == "b-new"
    for _ in range(4):  # four steps: both batch requests age to INTERACTIVE; the latest arrival yields
        state.end_step({})
    assert state.effective_priority("b-old") == 0
    assert state.choose_victim(requests).request_id == "i"


def test_priorities_outside_the_classes_are_clamped_and_ids_are_unique():
    state = ForeignPolicy(FairSharePolicy())
    assert state.admit("x", "t", 9, 0.0, 1, 1).priority == Priority.BATCH
    assert state.admit("y", "t", -3, 0.0, 1, 1).priority == Priority.INTERACTIVE
    with pytest.raises(ValueError, match="already in use"):
        state.admit("x", "t", 1, 0.0, 1, 1)
    state.forget("x")
    assert state.tenant_of("x") is None and state.effective_priority("x") is None
