"""frugal's scheduling policy inside vLLM, through `SchedulerConfig.scheduler_cls`.

vLLM keeps its KV cache, its chunked prefill and its step loop; the policy decisions are frugal's, from the same
`FairSharePolicy` the native scheduler runs (`scheduler/foreign.py` adapts it):
- the waiting queues (`waiting`, `kv_holding_waiting`) are `PolicyQueue`s: admission by class with aging, then
  the tenant with the least recent token usage (weighted), then FCFS;
- the preemption victim: vLLM's priority mode takes the running request with the largest (priority, arrival);
  before each step every running request's `priority` is set to its class after aging, so that choice is the
  policy's (`FairSharePolicy.choose_victim`: lowest class, then latest arrival);
- each step charges the tenants for the tokens vLLM scheduled for them.

The tenant and frugal's request id travel in `SamplingParams.extra_args` (`frugal_tenant`, `frugal_req_id`), set
by the server from the authenticated key. Tokens scheduled per step are kept in `step_records` for the engine's
cost accounting. The policy's knobs come from `additional_config["frugal"]` (`aging_steps`,
`usage_half_life_steps`, `tenant_weights`).

`FrugalScheduler` subclasses vLLM's `Scheduler`; `FrugalAsyncScheduler` its `AsyncScheduler`, which GPU nodes
want so vLLM keeps scheduling the next step while the current one runs.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import RequestQueue, SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler

from scheduler.foreign import ForeignPolicy, PolicyQueue
from scheduler.policy import FairSharePolicy

TENANT_ARG = "frugal_tenant"  # SamplingParams.extra_args key: the authenticated tenant
REQ_ID_ARG = "frugal_req_id"  # SamplingParams.extra_args key: frugal's request id (vLLM adds a suffix to its own)
DEFAULT_TENANT = "default"


@dataclass(slots=True)
class ScheduledStep:
    """What one vLLM schedule() gave each request, for the engine's cost accounting."""

    tokens_per_req: dict[str, int]  # frugal req_id -> tokens scheduled
    tenant_of_req: dict[str, str]  # frugal req_id -> tenant_id
    schedule_time_s: float  # wall time spent in schedule()


class _FrugalQueue(PolicyQueue, RequestQueue):
    """`PolicyQueue` registered as vLLM's queue type."""


class FrugalPolicyMixin:
    """The policy hooks; mixed in front of vLLM's Scheduler or AsyncScheduler."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        options = dict((self.vllm_config.additional_config or {}).get("frugal", {}))
        self.frugal = ForeignPolicy(FairSharePolicy(
            aging_steps=options.get("aging_steps", 100),
            usage_half_life_steps=options.get("usage_half_life_steps", 500),
            tenant_weights=options.get("tenant_weights")))
        # NOTE: priority mode is what makes vLLM pick its victim by (priority, arrival) rather than the newest.
        self.policy = SchedulingPolicy.PRIORITY
        self.waiting = _FrugalQueue(self.frugal)
        self.kv_holding_waiting = _FrugalQueue(self.frugal)
        self.step_records: deque[ScheduledStep] = deque(maxlen=1024)  # drained by the engine after each step
        self._frugal_ids: dict[str, str] = {}  # vLLM request id -> frugal req_id
        self.num_frugal_preemptions = 0  # requests preempted since start
        self.preemptions_of: dict[str, int] = {}  # frugal req_id -> times preempted, while it is unfinished

    def add_request(self, request) -> None:
        if request.request_id not in self.requests:
            extra = request.sampling_params.extra_args or {} if request.sampling_params is not None else {}
            tenant = extra.get(TENANT_ARG) or DEFAULT_TENANT
            self._frugal_ids[request.request_id] = extra.get(REQ_ID_ARG) or request.request_id
            self.frugal.admit(request.request_id, str(tenant), request.priority, request.arrival_time,
                              request.num_prompt_tokens, request.max_tokens)
        super().add_request(request)

    def schedule(self, *args, **kwargs):
        started = time.perf_counter()
        self.frugal.begin_step()
        for request in self.running:
            effective = self.frugal.effective_priority(request.request_id)
            if effective is not None:
                request.priority = effective
        output = super().schedule(*args, **kwargs)
        tokens = dict(output.num_scheduled_tokens)
        self.frugal.end_step(tokens)
        if tokens:
            ids = self._frugal_ids
            self.step_records.append(ScheduledStep(
                tokens_per_req={ids.get(r, r): n for r, n in tokens.items()},
                tenant_of_req={ids.get(r, r): self.frugal.tenant_of(r) or DEFAULT_TENANT for r in tokens},
                schedule_time_s=time.perf_counter() - started))
        return output

    def _preempt_request(self, request, *args, **kwargs):
        self.num_frugal_preemptions += 1
        req_id = self._frugal_ids.get(request.request_id, request.request_id)
        self.preemptions_of[req_id] = self.preemptions_of.get(req_id, 0) + 1
        return super()._preempt_request(request, *args, **kwargs)

    def _free_request(self, request, *args, **kwargs):
        result = super()._free_request(request, *args, **kwargs)
        self.frugal.forget(request.request_id)
        self._frugal_ids.pop(request.request_id, None)
        return result


class FrugalScheduler(FrugalPolicyMixin, Scheduler):
    pass


class FrugalAsyncScheduler(FrugalPolicyMixin, AsyncScheduler):
    pass
