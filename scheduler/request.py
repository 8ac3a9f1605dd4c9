"""A request as the scheduler sees it: token ids, progress counters and status.

The scheduler works on token counts, not on separate prefill and decode paths:
each step a request computes some of the tokens between ``num_computed_tokens``
and ``num_tokens``. A prompt prefill, a chunk of one, a decode and a recompute
after preemption are all the same thing seen through those two numbers.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Everything after PREEMPTED means finished.
    FINISHED_STOPPED = 3  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = 4  # max_tokens or the model's context length
    FINISHED_ABORTED = 5  # client abort, deadline or engine-side error

    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED


class Priority(enum.IntEnum):
    """Priority classes; a lower value is served first."""

    INTERACTIVE = 0
    STANDARD = 1
    BATCH = 2


@dataclass(slots=True, eq=False)
class Request:
    req_id: str  # unique per engine
    prompt_token_ids: list[int]  # the prompt, tokenized
    max_tokens: int  # most tokens to generate; the engine stops the request at this count
    priority: Priority = Priority.STANDARD  # priority class
    tenant_id: str = "default"  # fair-share accounting key
    cache_salt: str | None = None  # extra key mixed into block hashes; None -> tenant_id
    arrival_time: float = field(default_factory=time.monotonic)  # seconds, monotonic clock
    output_token_ids: list[int] = field(default_factory=list)  # generated so far
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = -1  # prompt tokens served by the prefix cache at first schedule; -1: not yet scheduled
    num_preemptions: int = 0  # times this request was preempted
    status: RequestStatus = RequestStatus.WAITING

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def hash_salt(self) -> str:
        return self.tenant_id if self.cache_salt is None else self.cache_salt

    def is_finished(self) -> bool:
        return self.status.is_finished()
