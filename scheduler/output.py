"""The typed boundary between the scheduler and the model runner."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class ScheduledSeq:
    """One request's share of a step."""

    req_id: str  # request id
    token_ids: list[int]  # tokens to compute this step: all_token_ids[start_pos:start_pos + len]
    start_pos: int  # position of token_ids[0]; equals num_computed_tokens before the step
    block_ids: list[int]  # the request's whole block table, covering start_pos + len(token_ids) tokens
    sample: bool  # True when this chunk reaches the last known token, so the runner samples the next one

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True)
class SchedulerOutput:
    """What runs in one engine step. Decodes come first, then prefill chunks."""

    seqs: list[ScheduledSeq]  # scheduled requests, in batch order
    num_batched_tokens: int  # sum of len(token_ids); never above max_num_batched_tokens
    preempted_req_ids: list[str] = field(default_factory=list)  # preempted (by recompute) in this step
    schedule_time_s: float = 0.0  # wall time spent in schedule()

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass(slots=True)
class ModelRunnerOutput:
    """What the model runner returns for one step."""

    sampled_token_ids: dict[str, int]  # req_id -> next token, for every seq with sample=True
    logprobs: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # req_id -> [(token_id, logprob)]; chosen token first
    errors: dict[str, str] = field(default_factory=dict)  # req_id -> why its own sampling failed; it got no token
