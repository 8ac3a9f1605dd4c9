"""What the engine hands back per request: cumulative text and tokens, plus the delta since the last output."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float  # time.monotonic() when the engine accepted the request
    first_scheduled_time: float | None = None  # first step that ran any of its tokens
    first_token_time: float | None = None  # first generated token
    last_token_time: float | None = None  # latest generated token
    finish_time: float | None = None  # when it finished
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    num_preemptions: int = 0  # times it was preempted and recomputed
    busy_s: float = 0.0  # its share of engine step time (serving/engine/accounting.py)


@dataclass(slots=True)
class RequestOutput:
    req_id: str  # request id
    prompt: str | None  # prompt text when given as text
    prompt_token_ids: list[int]  # tokenized prompt
    text: str = ""  # generated text so far (stop string cut off)
    token_ids: list[int] = field(default_factory=list)  # generated token ids so far
    finished: bool = False  # no more outputs follow
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that matched, if any
    logprobs: list[list[tuple[int, float]]] | None = None  # per generated token: chosen first, then top-n
    delta_text: str = ""  # text new since the previous output for this request
    delta_token_ids: list[int] = field(default_factory=list)  # tokens new since the previous output
    metrics: RequestMetrics | None = None  # timings
    error: str | None = None  # set when the engine failed this request

    @property
    def num_cached_tokens(self) -> int:
        return self.metrics.num_cached_tokens if self.metrics else 0
