"""What one engine step did, for the metrics: the engine fills an `IterationStats` per step and hands it to its
stat logger (serving/metrics/engine.py), which turns it into counters and histograms.

The engine thread builds it; the logger records it on that thread too (prometheus-client's metrics are
thread-safe). With no stat logger the engine builds nothing, so metrics off costs nothing on the hot path.
Times are `time.monotonic()` seconds, as in RequestMetrics.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from serving.engine.outputs import RequestMetrics


@dataclass(slots=True)
class FinishedRequestStats:
    finish_reason: str  # stop | length | abort | error (the engine failed it)
    e2e_latency_s: float  # arrival to finish
    queue_time_s: float | None  # arrival to first scheduled; None: never scheduled
    num_prompt_tokens: int  # prompt length, cached tokens included
    num_generation_tokens: int  # tokens it generated

    @classmethod
    def of(cls, m: RequestMetrics, reason: str, num_prompt_tokens: int, num_generation_tokens: int):
        queue_time_s = None if m.first_scheduled_time is None else m.first_scheduled_time - m.arrival_time
        return cls(reason, m.finish_time - m.arrival_time, queue_time_s, num_prompt_tokens, num_generation_tokens)


@dataclass(slots=True)
class IterationStats:
    num_batched_tokens: int = 0  # tokens the step computed (0: the step failed or ran nothing)
    num_prompt_tokens: int = 0  # prompt tokens of requests whose first token came in this step
    num_generation_tokens: int = 0  # tokens generated in this step
    time_to_first_tokens_s: list[float] = field(default_factory=list)  # per request that got its first token
    inter_token_latencies_s: list[float] = field(default_factory=list)  # per later token: time since the previous
    finished: list[FinishedRequestStats] = field(default_factory=list)  # requests that finished

    def count_token(self, m: RequestMetrics, num_prompt_tokens: int, now: float) -> None:
        """One token generated at `now`, before `m.first_token_time` / `m.last_token_time` take it in."""
        self.num_generation_tokens += 1
        if m.first_token_time is None:
            self.num_prompt_tokens += num_prompt_tokens
            self.time_to_first_tokens_s.append(now - m.arrival_time)
        else:
            self.inter_token_latencies_s.append(now - m.last_token_time)


class StatLogger(Protocol):
    def record(self, stats: IterationStats) -> None:
        """Called on the engine thread after every step that ran (and after an abort outside a step)."""
