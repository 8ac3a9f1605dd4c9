"""What each engine step cost and whom it served: the basis of per-request cost on self-hosted models.

A step's wall time is split among the requests in it by the tokens each computed, so a request's `busy_s` is its
share of accelerator time and the shares of all requests add up to the engine's busy time. Prefix-cache hits
cost nothing (no token is computed for them). `solo_s_per_token` follows what a token costs in a step of one or
two tokens, the dearest a token gets (a lone decode); the control plane reserves budgets from it.
`bulk_s_per_token` follows what a token costs in a big step (a prefill chunk, a wide batch): the router prices
a self-hosted route's prompt tokens from it.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from serving.engine.outputs import RequestMetrics
from serving.engine.stats import StepTotals

_SOLO_MAX_TOKENS = 2  # a step this small is a lone decode (or two): its per-token cost is the worst case
_SOLO_EWMA = 0.1  # weight of the newest solo step
BULK_MIN_TOKENS = 64  # a step this big is a prefill chunk or a wide batch: its per-token cost is the cheap end


@dataclass(slots=True)
class StepRecord:
    """One engine step, kept so accelerator time can be attributed to the requests that shared it."""

    step_time_s: float  # wall time of the whole step
    schedule_time_s: float  # part of it spent in the scheduler
    num_tokens: int  # tokens computed in the step
    tokens_per_req: dict[str, int]  # req_id -> tokens it computed in this step
    tenant_of_req: dict[str, str]  # req_id -> tenant_id


class StepAccounting:
    def __init__(self, num_records: int = 10_000):
        self.records: deque[StepRecord] = deque(maxlen=num_records)  # the latest steps
        self.totals = StepTotals()
        self.solo_s_per_token: float | None = None  # None until a small step ran
        self.bulk_s_per_token: float | None = None  # None until a step of BULK_MIN_TOKENS or more ran

    def record(self, sched_out, tenants: dict[str, str], metrics: dict[str, RequestMetrics], step_time: float) -> None:
        """Called once per executed step, with every scheduled request's metrics (finished ones included)."""
        self.record_tokens({s.req_id: s.num_tokens for s in sched_out.seqs}, tenants, metrics, step_time,
                           sched_out.schedule_time_s)

    def record_tokens(self, tokens: dict[str, int], tenants: dict[str, str], metrics: dict[str, RequestMetrics],
                      step_time: float, schedule_time_s: float) -> None:
        """`record` for a step given as tokens per request (what another engine's scheduler reports)."""
        num_tokens = sum(tokens.values())
        if num_tokens <= 0:
            return
        for req_id, n in tokens.items():
            if req_id in metrics:
                metrics[req_id].busy_s += step_time * n / num_tokens
        per_token = step_time / num_tokens
        if num_tokens <= _SOLO_MAX_TOKENS:
            self.solo_s_per_token = per_token if self.solo_s_per_token is None else \
                (1 - _SOLO_EWMA) * self.solo_s_per_token + _SOLO_EWMA * per_token
        elif num_tokens >= BULK_MIN_TOKENS:
            self.bulk_s_per_token = per_token if self.bulk_s_per_token is None else \
                (1 - _SOLO_EWMA) * self.bulk_s_per_token + _SOLO_EWMA * per_token
        self.records.append(StepRecord(step_time, schedule_time_s, num_tokens, tokens, tenants))
        totals = self.totals
        totals.num_executed_steps += 1
        totals.step_time_s += step_time
        totals.schedule_time_s += schedule_time_s
        totals.num_batched_tokens += num_tokens
        totals.num_consecutive_failed_steps = 0

    def failed_step(self) -> None:
        self.totals.num_failed_steps += 1
        self.totals.num_consecutive_failed_steps += 1

    def reset(self) -> None:
        self.records.clear()
        self.totals = StepTotals()
