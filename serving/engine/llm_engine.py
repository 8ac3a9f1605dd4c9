"""The synchronous engine: requests in, one scheduled step at a time, incremental outputs out.

`step()` is the whole loop body: schedule, run the model, update the scheduler, detokenize, check stop
conditions, finish requests. The offline `LLM` calls it until everything finishes; `AsyncLLM` calls it from its
own thread.

Two rules keep one request from hurting another:
- Atomic admission: `add_request` checks a request whole (prompt, every sampling field, token ids inside the
  vocabulary) and builds all of its state before it touches the scheduler, so a refusal leaves nothing behind.
  The engine's table of requests and the scheduler's change together, in `add_request` and `_drop`, so the
  engine never tracks a request the scheduler does not hold, nor the other way round.
- Fault isolation: `step()` never raises. What fails in one request's own work (sampling, stop matching,
  detokenizing, logprobs) fails that request alone, with its own error. A failure nobody can be blamed for (the
  model forward, the scheduler) fails the requests of that step, with a message that names no other request's
  data, and counts as a failed step for the watchdog.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from itertools import count

import torch

from scheduler import Priority, Request, RequestStatus, Scheduler, SchedulerConfig
from scheduler.config import num_blocks_from_memory
from serving.config import EngineConfig, available_cpus
from serving.engine.accounting import StepAccounting
from serving.engine.detokenizer import IncrementalDetokenizer
from serving.engine.faults import FaultInjector, InjectedFault
from serving.engine.iteration_stats import FinishedRequestStats, IterationStats, StatLogger
from serving.engine.kv_events import KVEventPublisher
from serving.engine.model_runner import ModelRunner, kv_bytes_per_block
from serving.engine.outputs import RequestMetrics, RequestOutput
from serving.engine.sampler import SamplingState, make_sampling_state
from serving.engine.sampling_params import SamplingParams
from serving.engine.stats import EngineStats
from serving.loaders import LoadedModel, load_model

logger = logging.getLogger(__name__)

_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(slots=True)
class _Tracked:
    """Engine-side state of one request, beside the scheduler's Request."""

    request: Request  # the scheduler's view
    prompt: str | None  # original prompt text, if given as text
    params: SamplingParams  # sampling parameters
    sampling: SamplingState  # sampler state (generator, counters)
    detok: IncrementalDetokenizer  # incremental text and stop strings
    metrics: RequestMetrics  # timings
    logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per generated token
    num_emitted_tokens: int = 0  # tokens already handed out in outputs
    fail_detokenize: bool = False  # tests: detokenizing this request raises (serving/engine/faults.py)
    busy_s_cap: float | None = None  # stop the request (finish "length") once its share of step time passes this


def prompt_ids_of(prompt, tokenize) -> tuple[str | None, list[int]]:
    """(text or None, token ids) of a prompt given as text, token ids, or a dict of either."""
    if isinstance(prompt, str):
        return prompt, tokenize(prompt) if prompt else []
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            text = prompt.get("prompt")
            if text is not None and not isinstance(text, str):
                raise ValueError(f"prompt must be a string, got {type(text).__name__}")
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)):
                raise ValueError(f"prompt_token_ids must be a list of integers, got {type(ids).__name__}")
            return text, list(ids)
        if "prompt" in prompt:
            return prompt_ids_of(prompt["prompt"], tokenize)
        raise ValueError("prompt dict needs 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, (list, tuple)):
        return None, list(prompt)
    raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")


def check_request_fields(priority, tenant_id, busy_s_cap, cache_salt) -> Priority:
    """The per-request field checks every engine backend makes before it accepts a request; returns the class."""
    try:
        priority = Priority(priority)
    except ValueError:
        raise ValueError(f"priority must be one of {[p.name.lower() for p in Priority]}, got {priority!r}")
    if not isinstance(tenant_id, str) or not tenant_id:
        raise ValueError(f"tenant_id must be a non-empty string, got {tenant_id!r}")
    if busy_s_cap is not None and not busy_s_cap > 0:
        raise ValueError(f"busy_s_cap must be > 0 seconds, got {busy_s_cap!r}")
    if cache_salt is not None and not isinstance(cache_salt, str):
        raise ValueError(f"cache_salt must be a string, got {type(cache_salt).__name__}")
    return priority


def check_req_id(req_id, in_use) -> None:
    if not isinstance(req_id, str) or not req_id:
        raise ValueError(f"request id must be a non-empty string, got {req_id!r}")
    if req_id in in_use:
        raise ValueError(f"request id {req_id!r} is already in use")


def check_token_ids(prompt_ids: list[int], params: SamplingParams, max_model_len: int, vocab: int) -> None:
    """The token-level checks every engine backend makes before it accepts a request."""
    if not prompt_ids:
        raise ValueError("prompt must not be empty")
    if len(prompt_ids) >= max_model_len:
        raise ValueError(f"prompt has {len(prompt_ids)} tokens but the context length is {max_model_len} "
                         "(prompt plus at least one generated token)")
    if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in prompt_ids):
        raise ValueError(f"prompt_token_ids must be integers in [0, {vocab})")
    bad_stop = [t for t in params.stop_token_ids if t >= vocab]
    if bad_stop:
        raise ValueError(f"stop_token_ids must be token ids in [0, {vocab}), got {bad_stop[0]}")


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.config = config
        torch.set_num_threads(config.num_threads or available_cpus())
        self.device = torch.device(config.device)
        dtype = getattr(torch, config.dtype)
        self.loaded = loaded or load_model(config.model, dtype=dtype, device=config.device,
                                           quantization=config.quantization, quant_cpu_path=config.quant_cpu_path)
        self.tokenizer = self.loaded.tokenizer
        self.args = self.loaded.args
        self.max_model_len = min(config.max_model_len or min(self.args.max_position_embeddings, 8192),
                                 self.args.max_position_embeddings)
        self.eos_token_ids = list(self.args.eos_token_ids)
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in self.eos_token_ids:
            self.eos_token_ids.append(self.tokenizer.eos_token_id)
        bytes_per_block = kv_bytes_per_block(self.args, config.block_size, dtype)
        num_blocks = num_blocks_from_memory(config.kv_cache_memory_bytes, bytes_per_block)
        pool_tokens = num_blocks * config.block_size
        if pool_tokens < self.max_model_len:
            if config.max_model_len is not None:
                raise ValueError(f"kv_cache_memory_bytes ({config.kv_cache_memory_bytes}) holds {pool_tokens} "
                                 f"tokens, fewer than max_model_len ({config.max_model_len}); raise the budget "
                                 "or lower max_model_len")
            # NOTE: with the model's default context, shrink the context to what one request can hold.
            logger.warning("KV budget holds %d tokens; context length lowered from %d", pool_tokens,
                           self.max_model_len)
            self.max_model_len = pool_tokens
        self.scheduler = Scheduler(SchedulerConfig(
            num_blocks=num_blocks,
            max_model_len=self.max_model_len,
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            enable_prefix_caching=config.enable_prefix_caching,
            enable_chunked_prefill=config.enable_chunked_prefill,
            max_waiting=config.max_waiting,
            tenant_weights=dict(config.tenant_weights),
        ))
        self.runner = ModelRunner(self.loaded.model, num_blocks, config.block_size, self.device, dtype)
        self.num_blocks = num_blocks
        self.kv_event_publisher: KVEventPublisher | None = None  # prefix-cache events for routers; None: off
        if config.kv_events.enabled:
            self.scheduler.kv_cache_manager.enable_kv_events()
            self.kv_event_publisher = KVEventPublisher(config.kv_events, self.loaded.path)
        self.faults: FaultInjector | None = None  # tests only: see serving/engine/faults.py
        self._tracked: dict[str, _Tracked] = {}
        self._ids = count()
        self.accounting = StepAccounting()
        self.last_step_num_tokens = 0  # tokens the latest step computed; 0 when it scheduled nothing or failed
        self.stat_logger: StatLogger | None = None  # the metrics (serving/metrics/engine.py); None: nothing recorded
        self._iteration: IterationStats | None = None  # what the running step did, while a stat logger is set
        logger.info("engine ready: %s, %d KV blocks of %d tokens (%.0f MiB), context %d", self.loaded.path,
                    num_blocks, config.block_size, num_blocks * bytes_per_block / 2**20, self.max_model_len)

    # -- requests ---------------------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        # The tokenizer's default call, special tokens included, so ids match transformers.
        return list(self.tokenizer(prompt).input_ids)

    def add_request(self, prompt: str | list[int] | dict, params: SamplingParams | None = None,
                    req_id: str | None = None, priority: Priority | int = Priority.STANDARD,
                    tenant_id: str = "default", cache_salt: str | None = None,
                    arrival_time: float | None = None, busy_s_cap: float | None = None) -> str:
        """Validates and queues one request. Raises ValueError naming the bad field, or QueueFullError; either
        way nothing of the request is left in the engine or the scheduler. `busy_s_cap` bounds the request's
        share of step time (what a hard budget reserved for it): past it the request finishes with "length"."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        prompt_text, prompt_ids = self._prompt_ids(prompt)
        self._check_token_ids(prompt_ids, params)
        priority = check_request_fields(priority, tenant_id, busy_s_cap, cache_salt)
        req_id = req_id if req_id is not None else f"req-{next(self._ids)}"
        check_req_id(req_id, self._tracked)
        now = arrival_time if arrival_time is not None else time.monotonic()
        request = Request(req_id=req_id, prompt_token_ids=prompt_ids, max_tokens=params.max_tokens,
                          priority=priority, tenant_id=tenant_id, cache_salt=cache_salt, arrival_time=now)
        # Everything the request needs is built before the scheduler sees it: a failure here leaves no trace.
        sampling = make_sampling_state(params, self.eos_token_ids, self.device)
        tracked = _Tracked(
            request=request, prompt=prompt_text, params=params, sampling=sampling,
            detok=IncrementalDetokenizer(self.tokenizer, params.stop, params.include_stop_str_in_output,
                                         params.skip_special_tokens),
            metrics=RequestMetrics(arrival_time=now), busy_s_cap=busy_s_cap)
        if self.faults is not None:
            sampling.inject_fault = self.faults.matches("sample", req_id)
            tracked.fail_detokenize = self.faults.matches("detokenize", req_id)
        self.scheduler.add_request(request)  # may raise (QueueFullError): nothing tracked yet
        self._tracked[req_id] = tracked
        return req_id

    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        return prompt_ids_of(prompt, self.tokenize)

    def _check_token_ids(self, prompt_ids: list[int], params: SamplingParams) -> None:
        check_token_ids(prompt_ids, params, self.max_model_len, self.args.vocab_size)

    def abort_request(self, req_id: str) -> RequestOutput | None:
        """Frees the request's blocks at once. Returns its final output, or None for an unknown id."""
        tracked = self._tracked.get(req_id)
        if tracked is None:
            return None
        return self._finish(tracked, RequestStatus.FINISHED_ABORTED)

    def abort_all(self, error: str | None = None) -> list[RequestOutput]:
        """Finishes every request (engine shutdown or death); `error` is what their clients are told."""
        return [self._finish(t, RequestStatus.FINISHED_ABORTED, error=error) for t in list(self._tracked.values())]

    def has_unfinished_requests(self) -> bool:
        return bool(self._tracked)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._tracked)

    def tracked_req_ids(self) -> set[str]:
        """The engine's requests; always the same set as the scheduler's (`scheduler.requests`)."""
        return set(self._tracked)

    # -- the loop body ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one scheduled step; returns an output for every request that made progress or finished.
        Never raises: failures become failed requests (see the module docstring)."""
        t0 = time.perf_counter()
        step_start = time.monotonic()
        self.last_step_num_tokens = 0
        try:
            sched_out = self.scheduler.schedule()
        except Exception:
            # Nothing was handed out, so no request can be failed; the watchdog counts the failed steps.
            logger.exception("the scheduler failed; no request ran in this step")
            self.accounting.failed_step()
            return []
        if sched_out.is_empty:
            return []
        if self.stat_logger is not None:
            self._iteration = IterationStats()
        req_ids = [s.req_id for s in sched_out.seqs]
        try:
            if self.faults is not None:
                self.faults.on_step(req_ids)
            states = {s.req_id: self._tracked[s.req_id].sampling for s in sched_out.seqs if s.sample}
            tenants = {s.req_id: self._tracked[s.req_id].request.tenant_id for s in sched_out.seqs}
            metrics = {s.req_id: self._tracked[s.req_id].metrics for s in sched_out.seqs}
            runner_out = self.runner.execute(sched_out, states)
            self.scheduler.update_from_output(sched_out, runner_out)
        except Exception:
            outputs = self._fail_step(req_ids)
            self._record_iteration()
            return outputs
        if self.kv_event_publisher is not None:
            self.kv_event_publisher.publish(self.scheduler.kv_cache_manager.take_events())
        self.last_step_num_tokens = sched_out.num_batched_tokens
        now = time.monotonic()
        iteration = self._iteration
        outputs = []
        for seq in sched_out.seqs:
            tracked = self._tracked.get(seq.req_id)
            if tracked is None:
                continue
            if tracked.metrics.first_scheduled_time is None:
                tracked.metrics.first_scheduled_time = step_start
                tracked.metrics.num_cached_tokens = max(tracked.request.num_cached_tokens, 0)
            error = runner_out.errors.get(seq.req_id)
            if error is not None:
                outputs.append(self._fail_request(tracked, "sampling", error))
                continue
            token = runner_out.sampled_token_ids.get(seq.req_id)
            if token is None:
                continue
            if iteration is not None:
                iteration.count_token(tracked.metrics, len(tracked.request.prompt_token_ids), now)
            if tracked.metrics.first_token_time is None:
                tracked.metrics.first_token_time = now
            tracked.metrics.last_token_time = now
            if seq.req_id in runner_out.logprobs:
                tracked.logprobs.append(runner_out.logprobs[seq.req_id])
            try:
                outputs.append(self._process_token(tracked, token))
            except Exception as e:
                outputs.append(self._fail_request(tracked, "detokenizing", f"{type(e).__name__}: {e}"))
        self.accounting.record(sched_out, tenants, metrics, time.perf_counter() - t0)
        for seq in sched_out.seqs:
            tracked = self._tracked.get(seq.req_id)
            if tracked is not None and tracked.busy_s_cap is not None and tracked.metrics.busy_s >= tracked.busy_s_cap:
                # NOTE: its budget reserved no more: stopping here is what keeps a hard budget from being overspent.
                outputs.append(self._finish(tracked, RequestStatus.FINISHED_LENGTH))
        if iteration is not None:
            iteration.num_batched_tokens = sched_out.num_batched_tokens
            self._record_iteration()
        return outputs

    def _record_iteration(self) -> None:
        iteration, self._iteration = self._iteration, None
        if iteration is not None and self.stat_logger is not None:
            try:
                self.stat_logger.record(iteration)
            except Exception:  # metrics must never fail a step
                logger.exception("recording the step's metrics failed")

    def _process_token(self, tracked: _Tracked, token: int) -> RequestOutput:
        request, params = tracked.request, tracked.params
        tracked.sampling.num_output_tokens = len(request.output_token_ids)
        if tracked.fail_detokenize:
            raise InjectedFault("injected detokenizer failure")
        stop_hit = tracked.detok.push(token)
        num_out = len(request.output_token_ids)
        status = None
        if stop_hit:
            status = RequestStatus.FINISHED_STOPPED
        elif token in tracked.sampling.stop_ids and num_out >= params.min_tokens:
            status = RequestStatus.FINISHED_STOPPED
        elif num_out >= params.max_tokens or request.num_tokens >= self.max_model_len:
            status = RequestStatus.FINISHED_LENGTH
        if status is None:
            return self._make_output(tracked, finished=False)
        by_token = status == RequestStatus.FINISHED_STOPPED and not stop_hit
        return self._finish(tracked, status, stop_token=token if by_token else None)

    def _finish(self, tracked: _Tracked, status: RequestStatus, stop_token: int | None = None,
                error: str | None = None) -> RequestOutput:
        self._drop(tracked.request.req_id, status)
        tracked.request.status = status
        tracked.metrics.finish_time = time.monotonic()
        tracked.metrics.num_preemptions = tracked.request.num_preemptions
        if tracked.detok.stop_reason is None and error is None:
            try:
                tracked.detok.flush()
            except Exception:  # the text stays as it was; the request still finishes and frees its blocks
                logger.exception("request %s: detokenizing the last tokens failed", tracked.request.req_id)
        out = self._make_output(tracked, finished=True)
        out.finish_reason = _FINISH_REASONS[status]
        out.stop_reason = tracked.detok.stop_reason if tracked.detok.stop_reason is not None else (
            stop_token if stop_token is not None and stop_token not in self.eos_token_ids else None)
        out.error = error
        if self.stat_logger is not None:
            self._count_finished(tracked, "error" if error is not None else out.finish_reason)
        return out

    def _count_finished(self, tracked: _Tracked, reason: str) -> None:
        finished = FinishedRequestStats.of(tracked.metrics, reason, len(tracked.request.prompt_token_ids),
                                           len(tracked.request.output_token_ids))
        if self._iteration is not None:
            self._iteration.finished.append(finished)
        else:  # an abort between steps
            self._iteration = IterationStats(finished=[finished])
            self._record_iteration()

    def _drop(self, req_id: str, status: RequestStatus) -> None:
        """The one place a request leaves: the scheduler frees its blocks and the engine forgets it, together."""
        self.scheduler.finish_requests([req_id], status)
        self._tracked.pop(req_id, None)

    def _fail_request(self, tracked: _Tracked, stage: str, detail: str) -> RequestOutput:
        """Fails one request for a fault in its own work; its client is told what failed, nobody else is."""
        req_id = tracked.request.req_id
        logger.error("request %s failed while %s: %s", req_id, stage, detail)
        self.accounting.totals.num_failed_requests += 1
        kind = detail.split(":", 1)[0]
        return self._finish(tracked, RequestStatus.FINISHED_ABORTED, error=f"{stage} failed for this request ({kind})")

    def _make_output(self, tracked: _Tracked, finished: bool) -> RequestOutput:
        request = tracked.request
        token_ids = list(request.output_token_ids)
        delta_ids = token_ids[tracked.num_emitted_tokens:]
        tracked.num_emitted_tokens = len(token_ids)
        return RequestOutput(
            req_id=request.req_id, prompt=tracked.prompt, prompt_token_ids=request.prompt_token_ids,
            text=tracked.detok.text if finished else tracked.detok.text[:tracked.detok.num_emitted_chars],
            token_ids=token_ids, finished=finished,
            logprobs=list(tracked.logprobs) if tracked.params.logprobs is not None else None,
            delta_text=tracked.detok.take_delta(finished), delta_token_ids=delta_ids, metrics=tracked.metrics)

    def _fail_step(self, req_ids: list[str]) -> list[RequestOutput]:
        # NOTE: the exception text may quote any request of the batch, so it goes to the log under an id and the
        # clients get only that id.
        error_id = uuid.uuid4().hex[:12]
        logger.exception("step failed (error id %s); failing the %d requests in it", error_id, len(req_ids))
        self.accounting.failed_step()
        failed = [self._tracked[r] for r in req_ids if r in self._tracked]
        self.accounting.totals.num_failed_requests += len(failed)
        message = f"the engine step running this request failed (error id {error_id})"
        return [self._finish(t, RequestStatus.FINISHED_ABORTED, error=message) for t in failed]

    # -- accounting -------------------------------------------------------------------------------------
    @property
    def step_records(self):
        return self.accounting.records

    def stats(self) -> EngineStats:
        sched = self.scheduler
        pool = sched.kv_cache_manager.block_pool
        return EngineStats(
            num_total_blocks=self.num_blocks,
            num_free_blocks=pool.num_free_blocks,
            num_running=sched.num_running,
            num_waiting=sched.num_waiting,
            num_unfinished=len(self._tracked),
            max_waiting=self.config.max_waiting,
            kv_cache_usage=pool.usage,
            prefix_cache_queries=pool.prefix_cache_queries,
            prefix_cache_hits=pool.prefix_cache_hits,
            num_preemptions=sched.num_preemptions,
            num_steps=sched.num_steps,
            steps=dataclasses.replace(self.accounting.totals),
        )

    def reset_step_stats(self) -> None:
        self.accounting.reset()

    def close(self) -> None:
        """Releases what outlives a step (the KV event sockets). Called once, after the last step."""
        if self.kv_event_publisher is not None:
            self.kv_event_publisher.close()
