"""The continuous-batching scheduler: decides what the next engine step computes.

The engine loop is ``schedule()`` -> model runner -> ``update_from_output()`` ->
the engine checks stop conditions and calls ``finish_requests()``. The scheduler
never decides that a request is done; it only moves tokens through the cache.

One step, under a budget of ``max_num_batched_tokens`` tokens and
``max_num_seqs`` running requests:

1. Running requests first: decodes (one token each), then requests still
   catching up on their prompt (chunked prefill), in the order they were admitted.
   When a running request needs a block and none is free, the policy's victim
   (lowest class, latest arrival; see ``scheduler.policy``) is preempted by
   recompute: its blocks are freed (they keep their hashes, so the recompute will
   likely hit the prefix cache), ``num_computed_tokens`` drops to 0 and it goes
   back to the waiting queue. A victim already scheduled in this step is taken
   out of the step again.
2. Then waiting requests, in policy order (class with aging, tenant fair share,
   FCFS), while seats, budget and blocks last. A prefix-cache hit starts the
   request at the cached token count. A prompt larger than the remaining budget
   gets a chunk of it; later steps finish it in step 1.
   NOTE: no admissions in a step that preempted: the blocks just freed would be
   handed straight back and the step would thrash.
   NOTE: admission stops at the first request that does not fit rather than
   skipping to smaller ones, so a large request cannot be starved by small ones.

With ``enable_chunked_prefill`` off, a waiting prompt runs only when it fits the
remaining budget whole; a prompt larger than the whole budget could never do so,
so it alone is still admitted with a chunk and finished over several steps.
"""
from __future__ import annotations

import time
from itertools import chain
from typing import Iterable

from scheduler.config import SchedulerConfig
from scheduler.kv_cache_manager import KVCacheManager, token_slice
from scheduler.output import ModelRunnerOutput, ScheduledSeq, SchedulerOutput
from scheduler.policy import FairSharePolicy, WaitingQueue
from scheduler.request import Request, RequestStatus


class QueueFullError(Exception):
    """The waiting queue holds ``max_waiting`` requests; the caller should push back (retry later)."""


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.max_waiting = config.max_waiting
        self.enable_chunked_prefill = config.enable_chunked_prefill
        self.kv_cache_manager = KVCacheManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.policy = FairSharePolicy(config.aging_steps, config.usage_half_life_steps, config.tenant_weights)
        self.requests: dict[str, Request] = {}  # req_id -> every unfinished request
        self.waiting = WaitingQueue(self.policy)  # waiting and preempted requests
        self.running: dict[str, Request] = {}  # req_id -> running request, in admission order
        self.num_steps = 0  # schedule() calls; the clock of aging and usage decay
        self.num_preemptions = 0  # preemptions since start

    # -- requests in and out ------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Accept a new request into the waiting queue.

        Raises ValueError for a request that could never run, and QueueFullError
        when ``max_waiting`` requests already wait (backpressure; nothing is lost).
        """
        req_id = request.req_id
        if req_id in self.requests:
            raise ValueError(f"request {req_id!r}: req_id is already in use")
        num_prompt_tokens = request.num_prompt_tokens
        if num_prompt_tokens == 0:
            raise ValueError(f"request {req_id!r}: prompt is empty; it needs at least one token")
        if num_prompt_tokens > self.max_model_len:
            raise ValueError(
                f"request {req_id!r}: prompt has {num_prompt_tokens} tokens, "
                f"more than max_model_len ({self.max_model_len})"
            )
        if request.max_tokens < 1:
            raise ValueError(f"request {req_id!r}: max_tokens must be >= 1, got {request.max_tokens}")
        if request.is_finished():
            raise ValueError(f"request {req_id!r}: already finished ({request.status.name})")
        if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"waiting queue is full ({self.max_waiting} requests); retry later")
        request.status = RequestStatus.WAITING
        self.requests[req_id] = request
        self.policy.on_arrival(request, self.num_steps)
        self.waiting.add(request)

    def finish_requests(self, req_ids: str | Iterable[str], status: RequestStatus) -> None:
        """Mark requests finished and free their blocks at once.

        Called by the engine when a stop condition hits, and for aborts (a waiting
        request simply leaves the queue). Unknown or already finished ids are ignored,
        so an abort racing a normal finish is harmless.
        """
        if not status.is_finished():
            raise ValueError(f"status must be a finished status (FINISHED_*), got {status.name}")
        if isinstance(req_ids, str):
            req_ids = (req_ids,)
        for req_id in req_ids:
            request = self.requests.pop(req_id, None)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                del self.running[req_id]
            else:
                self.waiting.remove(request)
            request.status = status
            self.kv_cache_manager.free(request)
            self.kv_cache_manager.free_block_hashes(request)
            self.policy.forget(request)

    def abort_request(self, req_id: str) -> None:
        self.finish_requests(req_id, RequestStatus.FINISHED_ABORTED)

    # -- one step -------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Choose the next step's work. Called once per engine step, before the model runs."""
        start_time = time.perf_counter()
        self.num_steps += 1
        step = self.num_steps
        kv = self.kv_cache_manager
        token_budget = self.max_num_batched_tokens
        scheduled: dict[str, ScheduledSeq] = {}  # req_id -> its share; insertion order is batch order
        scheduled_tokens: dict[str, int] = {}  # tenant_id -> tokens scheduled in this step
        preempted_req_ids: list[str] = []

        # 1. Running requests: decodes, then prompts still being chunked in.
        decodes, prefills = [], []  # (request, tokens it has left to compute)
        for request in self.running.values():
            num_remaining = request.num_tokens - request.num_computed_tokens
            if num_remaining == 1:
                decodes.append((request, 1))
            elif num_remaining > 1:
                prefills.append((request, num_remaining))
            # 0: the runner sampled nothing for it last step, so there is nothing to compute.
        for request, num_remaining in chain(decodes, prefills):
            if token_budget == 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            num_new_tokens = min(num_remaining, token_budget)
            while (block_ids := kv.allocate_slots(request, num_new_tokens)) is None:
                victim = self.policy.choose_victim(self.running.values(), step)
                self._preempt(victim)
                preempted_req_ids.append(victim.req_id)
                undone = scheduled.pop(victim.req_id, None)
                if undone is not None:
                    token_budget += undone.num_tokens
                    scheduled_tokens[victim.tenant_id] -= undone.num_tokens
                if victim is request:
                    break
            if block_ids is None:
                continue
            scheduled[request.req_id] = self._scheduled_seq(request, num_new_tokens, block_ids)
            token_budget -= num_new_tokens
            scheduled_tokens[request.tenant_id] = scheduled_tokens.get(request.tenant_id, 0) + num_new_tokens

        # 2. Waiting requests, in policy order.
        while not preempted_req_ids and token_budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting.peek(step, scheduled_tokens)
            if request is None:
                break
            computed_blocks, num_cached_tokens = kv.get_computed_blocks(request)
            num_new_tokens = request.num_tokens - num_cached_tokens
            if num_new_tokens > token_budget:
                if not self.enable_chunked_prefill and num_new_tokens <= self.max_num_batched_tokens:
                    break
                num_new_tokens = token_budget
            block_ids = kv.allocate_slots(request, num_new_tokens, computed_blocks)
            if block_ids is None:
                break
            self.waiting.pop(request)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_cached_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached_tokens
            self.running[request.req_id] = request
            scheduled[request.req_id] = self._scheduled_seq(request, num_new_tokens, block_ids)
            token_budget -= num_new_tokens
            scheduled_tokens[request.tenant_id] = scheduled_tokens.get(request.tenant_id, 0) + num_new_tokens

        return SchedulerOutput(
            seqs=list(scheduled.values()),
            num_batched_tokens=self.max_num_batched_tokens - token_budget,
            preempted_req_ids=preempted_req_ids,
            schedule_time_s=time.perf_counter() - start_time,
        )

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> list[Request]:
        """Record a step's results. Called once per step, after the model ran.

        Advances each request by the tokens it computed, appends sampled tokens,
        caches blocks that became full and charges tenants for fair share.
        Returns the requests that got a new token, for the engine's stop checks.
        """
        step = self.num_steps
        kv = self.kv_cache_manager
        sampled_token_ids = model_runner_output.sampled_token_ids
        computed_tokens: dict[str, int] = {}  # tenant_id -> tokens computed in this step
        updated = []
        for seq in scheduler_output.seqs:
            request = self.running.get(seq.req_id)
            if request is None:
                continue  # finished or aborted after schedule()
            if request.num_computed_tokens != seq.start_pos:
                raise ValueError(
                    f"request {seq.req_id!r}: output starts at {seq.start_pos} but the request has "
                    f"{request.num_computed_tokens} computed tokens; was this output applied twice?"
                )
            request.num_computed_tokens += seq.num_tokens
            computed_tokens[request.tenant_id] = computed_tokens.get(request.tenant_id, 0) + seq.num_tokens
            if seq.sample:
                token_id = sampled_token_ids.get(seq.req_id)
                if token_id is not None:
                    request.output_token_ids.append(token_id)
                    updated.append(request)
            kv.cache_blocks(request, request.num_computed_tokens)
        for tenant_id, num_tokens in computed_tokens.items():
            self.policy.charge(tenant_id, num_tokens, step)
        return updated

    # -- queries ----------------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def get_request(self, req_id: str) -> Request | None:
        return self.requests.get(req_id)

    def get_block_ids(self, req_id: str) -> list[int]:
        return self.kv_cache_manager.get_block_ids(req_id)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix; False (nothing done) while a request holds blocks."""
        return self.kv_cache_manager.reset_prefix_cache()

    # -- internals --------------------------------------------------------------------------

    def _preempt(self, request: Request) -> None:
        """Preempt by recompute: free the blocks, forget the progress, wait again."""
        del self.running[request.req_id]
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add(request)

    @staticmethod
    def _scheduled_seq(request: Request, num_new_tokens: int, block_ids: list[int]) -> ScheduledSeq:
        start_pos = request.num_computed_tokens
        end_pos = start_pos + num_new_tokens
        # Positional: this runs for every request every step, and keywords cost twice as much.
        return ScheduledSeq(
            request.req_id,  # req_id
            token_slice(request, start_pos, end_pos),  # token_ids
            start_pos,  # start_pos
            list(block_ids),  # block_ids: a copy, since the table grows in later steps
            end_pos == request.num_tokens,  # sample
        )
