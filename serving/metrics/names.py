"""Every metric the daemon exports on `/metrics`, by name.

The engine's metrics keep vLLM v1's meaning, type and units under the `frugal:` prefix (`vllm:X` -> `frugal:X`),
so dashboards, KEDA triggers and the inference gateway's scorers written for vLLM read them unchanged; all carry
a `model_name` label. Counters are listed as exposed (with their `_total` suffix); histograms by their base name.
deploy/, the dashboard and the Grafana JSON name only metrics from this module (a test checks it).
"""
from __future__ import annotations

PREFIX = "frugal:"

# -- engine, vLLM v1 semantics ---------------------------------------------------------------------------------
NUM_REQUESTS_RUNNING = "frugal:num_requests_running"  # gauge: requests in the running batch
NUM_REQUESTS_WAITING = "frugal:num_requests_waiting"  # gauge: requests queued, preempted ones included
KV_CACHE_USAGE_PERC = "frugal:kv_cache_usage_perc"  # gauge: fraction of KV blocks held by requests, 0-1
CACHE_CONFIG_INFO = "frugal:cache_config_info"  # gauge 1 with block_size, num_gpu_blocks, ... labels
PREFIX_CACHE_QUERIES = "frugal:prefix_cache_queries_total"  # counter: prompt tokens looked up
PREFIX_CACHE_HITS = "frugal:prefix_cache_hits_total"  # counter: of those, tokens found cached
NUM_PREEMPTIONS = "frugal:num_preemptions_total"  # counter
PROMPT_TOKENS = "frugal:prompt_tokens_total"  # counter: prompt tokens of requests that started generating
GENERATION_TOKENS = "frugal:generation_tokens_total"  # counter: tokens generated
REQUEST_SUCCESS = "frugal:request_success_total"  # counter by finished_reason: stop | length | abort | error
TIME_TO_FIRST_TOKEN = "frugal:time_to_first_token_seconds"  # histogram
INTER_TOKEN_LATENCY = "frugal:inter_token_latency_seconds"  # histogram
E2E_REQUEST_LATENCY = "frugal:e2e_request_latency_seconds"  # histogram
REQUEST_QUEUE_TIME = "frugal:request_queue_time_seconds"  # histogram
REQUEST_PROMPT_TOKENS = "frugal:request_prompt_tokens"  # histogram
REQUEST_GENERATION_TOKENS = "frugal:request_generation_tokens"  # histogram
ITERATION_TOKENS = "frugal:iteration_tokens_total"  # histogram: tokens computed per engine step

# -- autoscaling -------------------------------------------------------------------------------------------------
SATURATION = "frugal:saturation"  # gauge: 1.0 = this replica is at its target load (serving/metrics/saturation.py)

# -- cost and control plane ------------------------------------------------------------------------------------
REQUESTS = "frugal:requests_total"  # counter by tenant, model_name, status (ok | cancelled | failed | refused)
COST_USD = "frugal:cost_usd_total"  # counter by tenant, workflow, model_name
ENGINE_BUSY_SECONDS = "frugal:engine_busy_seconds_total"  # counter: accelerator time spent in engine steps
ENGINE_IDLE_SECONDS = "frugal:engine_idle_seconds_total"  # counter: accelerator time with nothing to run
BUDGET_REMAINING_USD = "frugal:budget_remaining_usd"  # gauge by scope, id
BUDGET_REMAINING_TOKENS = "frugal:budget_remaining_tokens"  # gauge by scope, id
RATE_LIMITED = "frugal:rate_limited_total"  # counter by tenant: requests refused by a rate limit
BUDGET_REFUSALS = "frugal:budget_refusals_total"  # counter by tenant: requests refused by a budget
TASKS = "frugal:tasks_total"  # counter by outcome (resolved | escalated | failed)
TASK_COST_USD = "frugal:task_cost_usd_total"  # counter by outcome: what the tasks with that outcome cost
EXACT_CACHE_QUERIES = "frugal:exact_cache_queries_total"  # counter: exact response-cache lookups
EXACT_CACHE_HITS = "frugal:exact_cache_hits_total"  # counter: of those, answered from the cache
SEMANTIC_CACHE_QUERIES = "frugal:semantic_cache_queries_total"  # counter: semantic lookups (after an exact miss)
SEMANTIC_CACHE_HITS = "frugal:semantic_cache_hits_total"  # counter: of those, answered from the cache
CACHE_SAVED_USD = "frugal:cache_saved_usd_total"  # counter by tenant: what cache hits saved (the answers' cost)
CACHE_INVALIDATIONS = "frugal:cache_invalidations_total"  # counter by kind: tenant (all) | tag, over HTTP
TOKENS_SAVED = "frugal:tokens_saved_total"  # counter by tenant: prompt tokens the optimizer removed
ESCALATIONS = "frugal:escalations_total"  # counter by model_name (the unsure one) and to_model: cascade escalations
ROUTE_FALLBACKS = "frugal:route_fallbacks_total"  # counter by model_name and kind: a route failed, the next took it

# -- GPU (nvidia-ml-py; absent without one) -----------------------------------------------------------------------
GPU_UTILIZATION_PERC = "frugal:gpu_utilization_perc"  # gauge by gpu: 0-1
GPU_MEMORY_USED_BYTES = "frugal:gpu_memory_used_bytes"  # gauge by gpu
GPU_MEMORY_TOTAL_BYTES = "frugal:gpu_memory_total_bytes"  # gauge by gpu
GPU_POWER_WATTS = "frugal:gpu_power_watts"  # gauge by gpu
