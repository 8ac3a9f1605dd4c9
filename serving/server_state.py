"""What the daemon's two front ends (gRPC and the OpenAI-compatible HTTP app) share: one engine and its status.

The daemon builds one `ServerState`, warms the engine up, sets `ready`, and hands the same object to the gRPC
servicer and to `serving.http.app.create_app(state)`. On SIGTERM it sets `draining`; both front ends then refuse
new requests (gRPC UNAVAILABLE, HTTP 503) while the accepted ones finish.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # AsyncLLM pulls in torch; the state itself must stay cheap to import
    from serving.engine.async_engine import AsyncLLM


@dataclass(slots=True)
class EngineStats:
    """A snapshot of the engine for health checks, the debug RPC and the dashboard (values may be a step old)."""

    num_total_blocks: int  # KV blocks in the pool
    num_free_blocks: int  # blocks in the free queue, cached prefixes included (a block held by no request)
    num_running: int  # requests in the running set
    num_waiting: int  # requests in the waiting queue, preempted ones included
    num_unfinished: int  # requests the engine tracks (running + waiting)
    max_waiting: int | None  # bound of the waiting queue; None: unbounded
    kv_cache_usage: float  # fraction of KV blocks held by requests
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens served from the cache
    prefix_cache_hit_rate: float  # hits / queries; 0.0 before any query
    num_preemptions: int  # preemptions since start
    num_steps: int  # scheduler steps since start


@dataclass(slots=True)
class ServerState:
    async_llm: "AsyncLLM"  # the one engine both front ends serve from
    model_name: str  # served model id (config `served_model_name`, else the model file's stem)
    max_model_len: int  # context length: prompt plus generated tokens
    ready: bool = False  # set once the model is loaded and a warm-up generate has run
    draining: bool = False  # set on SIGTERM: refuse new requests, let accepted ones finish
    retry_after_ms: int = 1000  # hint sent with a queue-full refusal (gRPC trailer / HTTP Retry-After)
    created: int = field(default_factory=lambda: int(time.time()))  # unix seconds; OpenAI's `created` field

    def is_ready(self) -> bool:
        """True while new requests are welcome: warmed up, not draining, engine thread alive."""
        return self.ready and not self.draining and self.async_llm.is_running

    def engine_stats(self) -> EngineStats:
        engine = self.async_llm.engine
        sched = engine.scheduler.stats
        return EngineStats(
            num_total_blocks=engine.num_blocks,
            num_free_blocks=sched.num_free_blocks,
            num_running=sched.num_running,
            num_waiting=sched.num_waiting,
            num_unfinished=engine.num_unfinished_requests,
            max_waiting=engine.config.max_waiting,
            kv_cache_usage=sched.kv_cache_usage,
            prefix_cache_queries=sched.prefix_cache_queries,
            prefix_cache_hits=sched.prefix_cache_hits,
            prefix_cache_hit_rate=sched.prefix_cache_hit_rate,
            num_preemptions=sched.num_preemptions,
            num_steps=sched.num_steps,
        )
