"""Engine statistics: one snapshot type for health checks, the debug RPC, benchmarks and the dashboard.

`LLMEngine.stats()` builds it from the scheduler, the block pool and the engine's own step counters; the values
may be a step old when read from another thread.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class StepTotals:
    """Counters the engine keeps over the steps it ran; `LLMEngine.reset_step_stats()` zeroes them."""

    num_executed_steps: int = 0  # steps that ran the model (a step with nothing scheduled is not counted)
    step_time_s: float = 0.0  # wall time of those steps
    schedule_time_s: float = 0.0  # of which, time spent in the scheduler
    num_batched_tokens: int = 0  # tokens computed by those steps
    num_failed_steps: int = 0  # steps that raised and failed the requests in them
    num_consecutive_failed_steps: int = 0  # failed steps since the last one that succeeded (the watchdog reads it)
    num_failed_requests: int = 0  # requests failed by the engine (their own fault, or their step's)


@dataclass(slots=True)
class EngineStats:
    num_total_blocks: int  # KV blocks in the pool
    num_free_blocks: int  # blocks in the free queue, cached prefixes included (a block held by no request)
    num_running: int  # requests in the scheduler's running set
    num_waiting: int  # requests in the scheduler's waiting queue, preempted ones included
    num_unfinished: int  # requests the engine tracks; equals num_running + num_waiting
    max_waiting: int | None  # bound of the waiting queue; None: unbounded
    kv_cache_usage: float  # fraction of KV blocks held by requests
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache, re-admissions included
    prefix_cache_hits: int  # of those, tokens served from the cache
    num_preemptions: int  # preemptions since start
    num_steps: int  # scheduler steps since start
    steps: StepTotals  # what the executed steps cost and how many failed

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @property
    def scheduler_fraction(self) -> float:
        """Share of step time spent scheduling."""
        return self.steps.schedule_time_s / self.steps.step_time_s if self.steps.step_time_s else 0.0
