"""`VllmEngine`: vLLM's engine behind the native engine's interface, so `AsyncLLM`, the daemon, the control plane,
the metrics and the ledger run on it unchanged.

vLLM's `LLMEngine` runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) and `AsyncLLM`'s engine thread drives
it one `step()` at a time, as it drives the native engine. In process, the scheduler is ours to read: after each
step the tokens that `FrugalScheduler` scheduled per request are split over the step's wall time by
`StepAccounting`, the same method and the same `busy_s` as the native engine, so the ledger's per-request cost means
the same thing on both backends.

The server, never the client, sets the tenant (in `extra_args`, for the policy) and the prefix-cache salt
(`cache_salt`, the tenant unless the caller passes one), so two tenants never share a KV prefix.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field

from scheduler import Priority, QueueFullError
from serving.config import EngineConfig, available_cpus
from serving.engine.accounting import StepAccounting
from serving.engine.iteration_stats import FinishedRequestStats, IterationStats, StatLogger
from serving.engine.llm_engine import check_req_id, check_request_fields, check_token_ids, prompt_ids_of
from serving.engine.outputs import RequestMetrics, RequestOutput
from serving.engine.sampling_params import SamplingParams
from serving.engine.stats import EngineStats
from serving.engine.vllm.scheduler import REQ_ID_ARG, TENANT_ARG
from serving.loaders.convert import hf_dir_for

logger = logging.getLogger(__name__)

SCHEDULER_CLS = "serving.engine.vllm.scheduler.FrugalScheduler"
ASYNC_SCHEDULER_CLS = "serving.engine.vllm.scheduler.FrugalAsyncScheduler"


@dataclass(slots=True)
class VllmModel:
    """What the daemon reads of a loaded model (the native engine's `LoadedModel` has more)."""

    path: str  # what the config named (a GGUF file or an HF directory): the served model's name comes from it
    hf_dir: str  # the HF directory vLLM loaded (a converted copy of a GGUF)


@dataclass(slots=True)
class _Tracked:
    req_id: str  # frugal's request id (vLLM's own adds a suffix)
    prompt: str | None  # prompt text when given as text
    prompt_token_ids: list[int]  # tokenized prompt
    tenant_id: str  # fair-share and accounting key
    metrics: RequestMetrics  # timings and busy_s
    num_logprobs: int | None  # top alternatives the caller asked for per token; None: no logprobs
    busy_s_cap: float | None = None  # finish ("length") once its share of step time passes this
    text: str = ""  # text handed out so far
    token_ids: list[int] = field(default_factory=list)  # tokens handed out so far
    logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per generated token


class VllmEngine:
    def __init__(self, config: EngineConfig, scheduler: str = "frugal", async_scheduling: bool | None = None):
        """`scheduler`: "frugal" (our policy in vLLM) or "vllm" (vLLM's own, the baseline benchmarks compare with;
        it reports no tokens per request, so requests then carry no busy_s). `async_scheduling`: vLLM schedules
        the next step while one runs (`FrugalAsyncScheduler`); None: on GPUs only."""
        if scheduler not in ("frugal", "vllm"):
            raise ValueError(f"scheduler must be frugal or vllm, got {scheduler!r}")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in process: see the module docstring
        on_cpu = config.device == "cpu"
        overlap = not on_cpu if async_scheduling is None else async_scheduling
        if on_cpu:
            num_threads = config.num_threads or available_cpus()
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{num_threads - 1}")
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine as VllmLLMEngine

        hf_dir = hf_dir_for(config.model)
        self.loaded = VllmModel(path=os.path.abspath(os.path.expanduser(config.model)) if config.model else
                                _default_path(), hf_dir=hf_dir)
        args = EngineArgs(
            model=hf_dir, dtype=config.dtype, seed=0, max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            enable_prefix_caching=config.enable_prefix_caching, enable_chunked_prefill=config.enable_chunked_prefill,
            kv_cache_memory_bytes=config.kv_cache_memory_bytes, enforce_eager=on_cpu, disable_log_stats=True,
            # NOTE: on GPU nodes vLLM schedules the next step while one runs; the async subclass keeps that.
            scheduler_cls=None if scheduler == "vllm" else ASYNC_SCHEDULER_CLS if overlap else SCHEDULER_CLS,
            async_scheduling=overlap,
            additional_config={"frugal": {"tenant_weights": dict(config.tenant_weights)}})
        self.llm_engine = VllmLLMEngine.from_engine_args(args)
        self.scheduler = self.llm_engine.engine_core.engine_core.scheduler
        # vLLM picks its own block size (128 tokens on CPU); the metrics' cache_info reads it from here.
        self.config = dataclasses.replace(config, block_size=self.llm_engine.vllm_config.cache_config.block_size)
        self.tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        self.max_model_len = self.llm_engine.model_config.max_model_len
        self.vocab_size = self.llm_engine.model_config.get_vocab_size()
        # NOTE: vLLM keeps one block of its pool as the null block, never handed out: not a block for requests.
        self.num_blocks = self.scheduler.kv_cache_manager.block_pool.num_gpu_blocks - 1
        self.accounting = StepAccounting()
        self.last_step_num_tokens = 0
        self.stat_logger: StatLogger | None = None
        self.faults = None  # fault injection is the native engine's (tests); vLLM's steps are not ours to break
        self._tracked: dict[str, _Tracked] = {}
        self._num_steps = 0
        self._prefix_queries = 0
        self._prefix_hits = 0
        logger.info("engine ready (vllm %s, %s): %s, %d KV blocks, context %d", _vllm_version(),
                    type(self.scheduler).__name__, hf_dir, self.num_blocks, self.max_model_len)

    # -- requests ---------------------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt).input_ids)

    def add_request(self, prompt, params: SamplingParams | None = None, req_id: str | None = None,
                    priority: Priority | int = Priority.STANDARD, tenant_id: str = "default",
                    cache_salt: str | None = None, arrival_time: float | None = None,
                    busy_s_cap: float | None = None) -> str:
        """As `LLMEngine.add_request`: checked whole before vLLM sees it; ValueError or QueueFullError."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        prompt_text, prompt_ids = prompt_ids_of(prompt, self.tokenize)
        check_token_ids(prompt_ids, params, self.max_model_len, self.vocab_size)
        priority = check_request_fields(priority, tenant_id, busy_s_cap, cache_salt)
        req_id = req_id if req_id is not None else f"req-{time.monotonic_ns()}"
        check_req_id(req_id, self._tracked)
        max_waiting = self.config.max_waiting
        if max_waiting is not None and self._num_waiting() >= max_waiting:
            raise QueueFullError(f"waiting queue is full ({max_waiting} requests); retry later")
        now = arrival_time if arrival_time is not None else time.monotonic()
        vllm_params = _vllm_params(params, {TENANT_ARG: tenant_id, REQ_ID_ARG: req_id})
        # NOTE: the salt is always set here, from the tenant the server authenticated: no shared prefix across
        # tenants, whatever the client sent.
        from vllm.inputs.engine import tokens_input

        engine_input = tokens_input(prompt_ids, prompt=prompt_text, cache_salt=cache_salt or tenant_id)
        self.llm_engine.add_request(req_id, engine_input, vllm_params, priority=int(priority))
        self._tracked[req_id] = _Tracked(req_id, prompt_text, prompt_ids, tenant_id, RequestMetrics(arrival_time=now),
                                         params.logprobs, busy_s_cap)
        return req_id

    def abort_request(self, req_id: str) -> RequestOutput | None:
        tracked = self._tracked.get(req_id)
        if tracked is None:
            return None
        return self._finish(tracked, "abort")

    def abort_all(self, error: str | None = None) -> list[RequestOutput]:
        return [self._finish(t, "abort", error=error) for t in list(self._tracked.values())]

    def has_unfinished_requests(self) -> bool:
        return bool(self._tracked)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._tracked)

    def tracked_req_ids(self) -> set[str]:
        return set(self._tracked)

    # -- the loop body ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One vLLM step; never raises (a failed step fails the requests it held, as in the native engine)."""
        self.last_step_num_tokens = 0
        step_start = time.monotonic()
        t0 = time.perf_counter()
        try:
            vllm_outputs = self.llm_engine.step()
        except Exception:
            logger.exception("the vllm step failed; failing its requests")
            self.accounting.failed_step()
            self.accounting.totals.num_failed_requests += len(self._tracked)
            return self.abort_all("the engine step running this request failed")
        step_time = time.perf_counter() - t0
        step_records = getattr(self.scheduler, "step_records", None)
        records = list(step_records or ())
        if step_records:
            step_records.clear()
        num_tokens = sum(sum(r.tokens_per_req.values()) for r in records)
        metrics = {req_id: t.metrics for req_id, t in self._tracked.items()}
        for record in records:
            self._num_steps += 1
            share = step_time * sum(record.tokens_per_req.values()) / num_tokens
            self.accounting.record_tokens(record.tokens_per_req, record.tenant_of_req, metrics, share,
                                          record.schedule_time_s)
            for req_id in record.tokens_per_req:
                tracked = self._tracked.get(req_id)
                if tracked is not None and tracked.metrics.first_scheduled_time is None:
                    tracked.metrics.first_scheduled_time = step_start
        self.last_step_num_tokens = num_tokens
        iteration = IterationStats(num_batched_tokens=num_tokens) if self.stat_logger is not None else None
        now = time.monotonic()
        outputs = []
        for out in vllm_outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue
            outputs.append(self._progress(tracked, out, now, iteration))
        for tracked in list(self._tracked.values()):
            if tracked.busy_s_cap is not None and tracked.metrics.busy_s >= tracked.busy_s_cap:
                # NOTE: its budget reserved no more, as in the native engine.
                outputs.append(self._finish(tracked, "length", iteration=iteration))
        if iteration is not None:
            self._record(iteration)
        return outputs

    def _progress(self, tracked: _Tracked, out, now: float, iteration: IterationStats | None) -> RequestOutput:
        completion = out.outputs[0]
        token_ids = list(completion.token_ids)
        new_ids = token_ids[len(tracked.token_ids):]
        if tracked.metrics.first_token_time is None and new_ids:
            tracked.metrics.num_cached_tokens = out.num_cached_tokens or 0
            self._prefix_queries += len(tracked.prompt_token_ids)
            self._prefix_hits += tracked.metrics.num_cached_tokens
        for _ in new_ids:
            if iteration is not None:
                iteration.count_token(tracked.metrics, len(tracked.prompt_token_ids), now)
            if tracked.metrics.first_token_time is None:
                tracked.metrics.first_token_time = now
            tracked.metrics.last_token_time = now
        if tracked.num_logprobs is not None and completion.logprobs:
            tracked.logprobs = [_logprob_row(token, row, tracked.num_logprobs)
                                for token, row in zip(token_ids, completion.logprobs)]
        delta_text = completion.text[len(tracked.text):]
        tracked.text, tracked.token_ids = completion.text, token_ids
        if not out.finished:
            return self._output(tracked, delta_text, new_ids, finished=False)
        output = self._finish(tracked, completion.finish_reason or "stop", iteration=iteration, release=False,
                              delta=(delta_text, new_ids))
        output.stop_reason = completion.stop_reason
        return output

    def _finish(self, tracked: _Tracked, reason: str, error: str | None = None,
                iteration: IterationStats | None = None, release: bool = True,
                delta: tuple[str, list[int]] = ("", [])) -> RequestOutput:
        """The one place a request leaves: vLLM frees its blocks (unless it already did) and we forget it."""
        self._tracked.pop(tracked.req_id, None)
        if release:
            try:
                self.llm_engine.abort_request([tracked.req_id])
            except Exception:  # a broken engine must not keep the request's client waiting
                logger.exception("vLLM could not abort request %s", tracked.req_id)
        tracked.metrics.finish_time = time.monotonic()
        tracked.metrics.num_preemptions = getattr(self.scheduler, "preemptions_of", {}).pop(tracked.req_id, 0)
        output = self._output(tracked, *delta, finished=True)
        output.finish_reason = reason
        output.error = error
        if self.stat_logger is not None:
            finished = FinishedRequestStats.of(tracked.metrics, "error" if error else reason,
                                               len(tracked.prompt_token_ids), len(tracked.token_ids))
            if iteration is not None:
                iteration.finished.append(finished)
            else:
                self._record(IterationStats(finished=[finished]))
        return output

    def _output(self, tracked: _Tracked, delta_text: str, delta_ids: list[int], finished: bool) -> RequestOutput:
        return RequestOutput(req_id=tracked.req_id, prompt=tracked.prompt, prompt_token_ids=tracked.prompt_token_ids,
                             text=tracked.text, token_ids=list(tracked.token_ids), finished=finished,
                             logprobs=list(tracked.logprobs) if tracked.num_logprobs is not None else None,
                             delta_text=delta_text, delta_token_ids=list(delta_ids), metrics=tracked.metrics)

    def _record(self, iteration: IterationStats) -> None:
        try:
            self.stat_logger.record(iteration)
        except Exception:  # metrics must never fail a step
            logger.exception("recording the step's metrics failed")

    # -- accounting -------------------------------------------------------------------------------------
    @property
    def step_records(self):
        return self.accounting.records

    def _num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.kv_holding_waiting)

    def stats(self) -> EngineStats:
        sched = self.scheduler
        pool = sched.kv_cache_manager.block_pool
        return EngineStats(
            num_total_blocks=self.num_blocks, num_free_blocks=pool.get_num_free_blocks(),
            num_running=len(sched.running), num_waiting=self._num_waiting(), num_unfinished=len(self._tracked),
            max_waiting=self.config.max_waiting, kv_cache_usage=sched.kv_cache_manager.usage,
            prefix_cache_queries=self._prefix_queries, prefix_cache_hits=self._prefix_hits,
            num_preemptions=getattr(sched, "num_frugal_preemptions", 0), num_steps=self._num_steps,
            steps=dataclasses.replace(self.accounting.totals))

    def reset_step_stats(self) -> None:
        self.accounting.reset()

    def close(self) -> None:
        try:
            self.llm_engine.engine_core.shutdown()
        except Exception:
            logger.exception("shutting vLLM down failed")


def _default_path() -> str:
    from serving.loaders import default_model_path

    return default_model_path()


def _vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "?")


def _vllm_params(params: SamplingParams, extra_args: dict):
    from vllm import SamplingParams as VllmSamplingParams

    return VllmSamplingParams(
        n=1, max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
        top_k=params.top_k or 0, seed=params.seed, min_tokens=params.min_tokens, ignore_eos=params.ignore_eos,
        stop=list(params.stop) or None, stop_token_ids=list(params.stop_token_ids) or None,
        include_stop_str_in_output=params.include_stop_str_in_output, logprobs=params.logprobs,
        skip_special_tokens=params.skip_special_tokens, extra_args=extra_args)


def _logprob_row(token: int, row: dict, num_top: int) -> list[tuple[int, float]]:
    """vLLM's {token_id: Logprob} for one position -> the native engine's row: the chosen token first, then the
    `num_top` most likely tokens by rank (the chosen one among them when it is one)."""
    top = sorted((item for item in row.items() if item[1].rank is not None and item[1].rank <= num_top),
                 key=lambda item: item[1].rank)
    return [(token, row[token].logprob)] + [(t, lp.logprob) for t, lp in top]
