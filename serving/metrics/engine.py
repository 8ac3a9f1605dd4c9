"""The engine's metrics, with vLLM v1's names (under `frugal:`), types, units and buckets.

Two halves: `EngineStatLogger` is the engine's stat logger and records what each step did (tokens, TTFT,
inter-token latency, finished requests) into counters and histograms on the engine thread; `EngineCollector`
reads the state that is already kept (queue, running batch, KV usage, prefix-cache counters, preemptions, busy
time) at scrape time, so none of it costs anything per step.
"""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from serving.engine.iteration_stats import IterationStats
from serving.engine.stats import EngineStats
from serving.metrics import names
from serving.metrics.config import MetricsConfig
from serving.metrics.saturation import saturation

# The buckets vLLM uses, so histogram_quantile over either engine reads the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def one_two_five_buckets(maximum: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to `maximum` (vLLM's token-count buckets)."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10 ** exponent
            if value > maximum:
                return buckets
            buckets.append(value)
        exponent += 1


class EngineStatLogger:
    """The engine's StatLogger: counters and histograms fed once per step."""

    def __init__(self, registry: CollectorRegistry, model_name: str, max_model_len: int):
        labels = ["model_name"]
        self.prompt_tokens = Counter(names.PROMPT_TOKENS.removesuffix("_total"), "Prefill tokens processed.",
                                     labels, registry=registry).labels(model_name)
        self.generation_tokens = Counter(names.GENERATION_TOKENS.removesuffix("_total"),
                                         "Generation tokens processed.", labels, registry=registry).labels(model_name)
        success = Counter(names.REQUEST_SUCCESS.removesuffix("_total"), "Finished requests, by finish reason.",
                          labels + ["finished_reason"], registry=registry)
        self.success = {reason: success.labels(model_name, reason) for reason in ("stop", "length", "abort", "error")}
        self.ttft = Histogram(names.TIME_TO_FIRST_TOKEN, "Time to first token in seconds.", labels,
                              buckets=TTFT_BUCKETS, registry=registry).labels(model_name)
        self.itl = Histogram(names.INTER_TOKEN_LATENCY, "Inter-token latency in seconds.", labels,
                             buckets=ITL_BUCKETS, registry=registry).labels(model_name)
        self.e2e = Histogram(names.E2E_REQUEST_LATENCY, "End-to-end request latency in seconds.", labels,
                             buckets=REQUEST_LATENCY_BUCKETS, registry=registry).labels(model_name)
        self.queue_time = Histogram(names.REQUEST_QUEUE_TIME, "Time requests spent waiting before first scheduled, "
                                    "in seconds.", labels, buckets=REQUEST_LATENCY_BUCKETS,
                                    registry=registry).labels(model_name)
        token_buckets = one_two_five_buckets(max_model_len)
        self.request_prompt_tokens = Histogram(names.REQUEST_PROMPT_TOKENS, "Prompt tokens per finished request.",
                                               labels, buckets=token_buckets, registry=registry).labels(model_name)
        self.request_generation_tokens = Histogram(names.REQUEST_GENERATION_TOKENS,
                                                   "Generated tokens per finished request.", labels,
                                                   buckets=token_buckets, registry=registry).labels(model_name)
        self.iteration_tokens = Histogram(names.ITERATION_TOKENS, "Tokens computed per engine step.", labels,
                                          buckets=ITERATION_TOKEN_BUCKETS, registry=registry).labels(model_name)

    def record(self, stats: IterationStats) -> None:
        if stats.num_prompt_tokens:
            self.prompt_tokens.inc(stats.num_prompt_tokens)
        if stats.num_generation_tokens:
            self.generation_tokens.inc(stats.num_generation_tokens)
        if stats.num_batched_tokens:
            self.iteration_tokens.observe(stats.num_batched_tokens)
        for ttft in stats.time_to_first_tokens_s:
            self.ttft.observe(ttft)
        for itl in stats.inter_token_latencies_s:
            self.itl.observe(itl)
        for finished in stats.finished:
            self.success[finished.finish_reason].inc()
            self.e2e.observe(finished.e2e_latency_s)
            if finished.queue_time_s is not None:
                self.queue_time.observe(finished.queue_time_s)
            self.request_prompt_tokens.observe(finished.num_prompt_tokens)
            self.request_generation_tokens.observe(finished.num_generation_tokens)


class EngineCollector:
    """Gauges and monotonic counters read from the engine's own state when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str, config: MetricsConfig,
                 cache_info: dict[str, str], started: float | None = None):
        self.stats = stats
        self.model_name = model_name
        self.config = config
        self.cache_info = cache_info  # labels of frugal:cache_config_info
        self.started = time.monotonic() if started is None else started  # engine time counts from here

    def describe(self):
        return []  # collected lazily: the registry must not call the engine when the collector is registered

    def collect(self):
        stats = self.stats()
        model = [self.model_name]

        def gauge(name, doc, value):
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(model, value)
            return family

        def counter(name, doc, value):
            family = CounterMetricFamily(name.removesuffix("_total"), doc, labels=["model_name"])
            family.add_metric(model, value)
            return family

        yield gauge(names.NUM_REQUESTS_RUNNING, "Number of requests in model execution batches.", stats.num_running)
        yield gauge(names.NUM_REQUESTS_WAITING, "Number of requests waiting to be processed.", stats.num_waiting)
        yield gauge(names.KV_CACHE_USAGE_PERC, "KV-cache usage. 1 means 100 percent usage.", stats.kv_cache_usage)
        info = GaugeMetricFamily(names.CACHE_CONFIG_INFO, "Information of the KV cache configuration.",
                                 labels=["model_name", *self.cache_info])
        info.add_metric([self.model_name, *self.cache_info.values()], 1.0)
        yield info
        yield counter(names.PREFIX_CACHE_QUERIES, "Prefix cache queries, in terms of number of queried tokens.",
                      stats.prefix_cache_queries)
        yield counter(names.PREFIX_CACHE_HITS, "Prefix cache hits, in terms of number of cached tokens.",
                      stats.prefix_cache_hits)
        yield counter(names.NUM_PREEMPTIONS, "Cumulative number of preemptions from the engine.",
                      stats.num_preemptions)
        busy = stats.steps.step_time_s
        yield counter(names.ENGINE_BUSY_SECONDS, "Accelerator seconds spent running engine steps.", busy)
        yield counter(names.ENGINE_IDLE_SECONDS, "Accelerator seconds with no engine step running.",
                      max(0.0, time.monotonic() - self.started - busy))
        yield gauge(names.SATURATION, "Load of this replica against its target: 1 = at target; scale out above. "
                    "max(waiting / target_queue_depth, kv_cache_usage / kv_cache_usage_target).",
                    saturation(stats.num_waiting, stats.kv_cache_usage, self.config.target_queue_depth,
                               self.config.kv_cache_usage_target))
