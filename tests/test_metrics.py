"""The engine's metrics against the engine itself: every counter and histogram count equals what the requests
and the block pool say, the saturation signal follows its formula, labels stay bounded, and GPU metrics are
absent (not an error) on a CPU node."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from serving.engine.sampling_params import SamplingParams
from serving.engine.stats import EngineStats, StepTotals
from serving.metrics import names
from serving.metrics.config import MetricsConfig
from serving.metrics.engine import EngineCollector, EngineStatLogger, one_two_five_buckets
from serving.metrics.gpu import GpuCollector
from serving.metrics.labels import OTHER, KnownValues
from serving.metrics.saturation import saturation
from serving.server.config import ConfigError, config_from_dict

MODEL = "m"


def hook(engine, config: MetricsConfig | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    engine.stat_logger = EngineStatLogger(registry, MODEL, engine.max_model_len)
    registry.register(EngineCollector(engine.stats, MODEL, config or MetricsConfig(), {"block_size": "16"}))
    return registry


def value(registry, name, **labels) -> float:
    result = registry.get_sample_value(name, {"model_name": MODEL, **labels})
    assert result is not None, f"{name} {labels} is not exported:\n{generate_latest(registry).decode()[:3000]}"
    return result


def test_engine_counters_and_histograms_equal_what_the_requests_did(make_llm):
    llm = make_llm(max_num_seqs=4, max_num_batched_tokens=64)
    engine = llm.engine
    registry = hook(engine)
    shared = "You are a careful assistant. Answer briefly and precisely. " * 3
    prompts = [shared + f"Question {i}: what is {i} plus {i}?" for i in range(6)] + ["Hi"]
    params = [SamplingParams(max_tokens=3 + i, temperature=0.0, ignore_eos=True) for i in range(len(prompts))]
    outputs = [llm.generate(p, sp)[0] for p, sp in zip(prompts[:2], params[:2])]  # the prefix gets cached
    outputs += llm.generate(prompts[2:], params[2:])
    aborted = engine.add_request("Tell me a long story.", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.abort_request(aborted)

    num_prompt = sum(len(o.prompt_token_ids) for o in outputs)
    num_generated = sum(len(o.token_ids) for o in outputs)
    aborted_tokens = 1  # its prompt was computed and one token sampled before the abort
    assert value(registry, names.GENERATION_TOKENS) == num_generated + aborted_tokens
    assert value(registry, names.PROMPT_TOKENS) == num_prompt + len(engine.tokenize("Tell me a long story."))
    assert value(registry, names.REQUEST_SUCCESS, finished_reason="length") == len(outputs)
    assert value(registry, names.REQUEST_SUCCESS, finished_reason="abort") == 1
    assert value(registry, names.REQUEST_SUCCESS, finished_reason="stop") == 0
    assert value(registry, names.TIME_TO_FIRST_TOKEN + "_count") == len(outputs) + 1
    assert value(registry, names.INTER_TOKEN_LATENCY + "_count") == num_generated - len(outputs)
    assert value(registry, names.E2E_REQUEST_LATENCY + "_count") == len(outputs) + 1
    assert value(registry, names.REQUEST_QUEUE_TIME + "_count") == len(outputs) + 1
    assert value(registry, names.REQUEST_GENERATION_TOKENS + "_sum") == num_generated + aborted_tokens
    e2e = sum(o.metrics.finish_time - o.metrics.arrival_time for o in outputs)
    assert value(registry, names.E2E_REQUEST_LATENCY + "_sum") >= e2e
    stats = engine.stats()
    assert value(registry, names.ITERATION_TOKENS + "_count") == stats.steps.num_executed_steps
    assert value(registry, names.ITERATION_TOKENS + "_sum") == stats.steps.num_batched_tokens
    # Read from the engine's own state at scrape time.
    assert stats.prefix_cache_hits > 0
    assert value(registry, names.PREFIX_CACHE_QUERIES) == stats.prefix_cache_queries
    assert value(registry, names.PREFIX_CACHE_HITS) == stats.prefix_cache_hits
    assert value(registry, names.NUM_PREEMPTIONS) == stats.num_preemptions
    assert value(registry, names.NUM_REQUESTS_RUNNING) == 0 and value(registry, names.NUM_REQUESTS_WAITING) == 0
    assert value(registry, names.KV_CACHE_USAGE_PERC) == 0.0
    assert value(registry, names.ENGINE_BUSY_SECONDS) == pytest.approx(stats.steps.step_time_s)
    assert value(registry, names.CACHE_CONFIG_INFO, block_size="16") == 1.0


def test_a_failed_request_counts_as_error(make_llm):
    from serving.engine.faults import FaultInjector, FaultRule

    llm = make_llm()
    registry = hook(llm.engine)
    llm.engine.faults = FaultInjector([FaultRule("sample", "bad")])
    llm.engine.add_request("Hello", SamplingParams(max_tokens=4), req_id="bad-1")
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert value(registry, names.REQUEST_SUCCESS, finished_reason="error") == 1


def test_queued_requests_raise_saturation(make_llm):
    llm = make_llm(max_num_seqs=2)
    registry = hook(llm.engine, MetricsConfig(target_queue_depth=4))
    for i in range(6):
        llm.engine.add_request(f"Prompt {i}", SamplingParams(max_tokens=2))
    assert value(registry, names.NUM_REQUESTS_WAITING) == 6
    assert value(registry, names.SATURATION) == pytest.approx(6 / 4)
    llm.engine.step()  # two run, four wait; the pool is far from full
    assert value(registry, names.NUM_REQUESTS_RUNNING) == 2
    assert value(registry, names.SATURATION) == pytest.approx(4 / 4)
    assert 0 < value(registry, names.KV_CACHE_USAGE_PERC) < 0.5
    llm.engine.abort_all()


def _stats(num_waiting: int, kv_cache_usage: float) -> EngineStats:
    return EngineStats(num_total_blocks=100, num_free_blocks=int(100 * (1 - kv_cache_usage)), num_running=4,
                       num_waiting=num_waiting, num_unfinished=4 + num_waiting, max_waiting=None,
                       kv_cache_usage=kv_cache_usage, prefix_cache_queries=0, prefix_cache_hits=0,
                       num_preemptions=0, num_steps=0, steps=StepTotals())


@pytest.mark.parametrize("num_waiting,kv,expected", [(0, 0.0, 0.0), (4, 0.3, 0.5), (8, 0.5, 1.0), (16, 0.5, 2.0),
                                                    (0, 0.95, 1.0), (2, 0.5, 0.5 / 0.95)])
def test_saturation_is_queue_depth_first_kv_usage_second(num_waiting, kv, expected):
    assert saturation(num_waiting, kv, 8, 0.95) == pytest.approx(expected)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(lambda: _stats(num_waiting, kv), MODEL, MetricsConfig(), {}))
    assert registry.get_sample_value(names.SATURATION, {"model_name": MODEL}) == pytest.approx(expected)


def test_label_values_are_bounded():
    known = KnownValues(["acme", "*"], max_values=3)
    assert known.label("acme") == "acme" and known.label("invented-by-a-client") == OTHER
    assert known.label(None) == "none" and "*" not in known
    known.add(["b", "c", "d"])
    assert known.label("b") == "b" and known.label("c") == "c" and known.label("d") == OTHER  # capped at 3


def test_token_buckets():
    assert one_two_five_buckets(512) == [1, 2, 5, 10, 20, 50, 100, 200, 500]


def test_gpu_metrics_are_absent_without_a_gpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this node has a GPU: tests/test_metrics.py::test_gpu_metrics_per_device covers it")
    collector = GpuCollector()
    assert not collector.available and list(collector.collect()) == []
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    assert b"frugal:gpu" not in generate_latest(registry)


@pytest.mark.gpu
def test_gpu_metrics_per_device():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GpuCollector())
    total = registry.get_sample_value(names.GPU_MEMORY_TOTAL_BYTES, {"gpu": "0"})
    assert total == torch.cuda.get_device_properties(0).total_memory or total > 0
    assert 0 <= registry.get_sample_value(names.GPU_UTILIZATION_PERC, {"gpu": "0"}) <= 1
    assert registry.get_sample_value(names.GPU_POWER_WATTS, {"gpu": "0"}) > 0


def test_metrics_section_of_the_config():
    config = config_from_dict({"metrics": {"target_queue_depth": 4, "tenants": ["acme"], "enabled": True}})
    assert config.metrics.target_queue_depth == 4.0 and config.metrics.tenants == ["acme"]
    with pytest.raises(ConfigError, match="metrics.kv_cache_usage_target"):
        config_from_dict({"metrics": {"kv_cache_usage_target": 1.5}})
    with pytest.raises(ConfigError, match="metrics.tenants must be a list"):
        config_from_dict({"metrics": {"tenants": "acme"}})
    with pytest.raises(ConfigError, match="unknown key metrics.target"):
        config_from_dict({"metrics": {"target": 4}})
