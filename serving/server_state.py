"""What the daemon's two front ends (gRPC and the OpenAI-compatible HTTP app) share: one engine, its tokenizer
pool, the control plane, the request limits and the server's status.

The daemon builds one `ServerState`, warms the engine up, sets `ready`, and hands the same object to the gRPC
servicer and to `serving.http.app.create_app(state)`. On SIGTERM it sets `draining`; both front ends then refuse
new requests (gRPC UNAVAILABLE, HTTP 503) while the accepted ones finish.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from serving.limits import RequestLimits

if TYPE_CHECKING:  # AsyncLLM pulls in torch; the state itself must stay cheap to import
    from serving.control.plane import ControlPlane
    from serving.engine.async_engine import AsyncLLM
    from serving.engine.stats import EngineStats
    from serving.engine.tokenizer_pool import TokenizerPool
    from serving.metrics.registry import Metrics


@dataclass(slots=True)
class ServerState:
    async_llm: "AsyncLLM"  # the one engine both front ends serve from
    tokenizers: "TokenizerPool"  # prompt tokenization and chat templating, off the event loop
    control: "ControlPlane"  # keys, limits, budgets, cost and the ledger: every request's admission and settlement
    model_name: str  # served model id (config `served_model_name`, else the model file's stem)
    max_model_len: int  # context length: prompt plus generated tokens
    limits: RequestLimits = field(default_factory=RequestLimits)  # what one request may ask for
    ready: bool = False  # set once the model is loaded and a warm-up generate has run
    draining: bool = False  # set on SIGTERM: refuse new requests, let accepted ones finish
    retry_after_ms: int = 1000  # hint sent with a queue-full refusal (gRPC trailer / HTTP Retry-After)
    created: int = field(default_factory=lambda: int(time.time()))  # unix seconds; OpenAI's `created` field
    metrics: "Metrics | None" = None  # what GET /metrics renders; None: metrics are off
    optimizer: object = None  # serving.control.optimizer.OptimizerConfig: the prompt steps per tenant and route

    def is_ready(self) -> bool:
        """True while new requests are welcome: warmed up, not draining, engine alive."""
        return self.ready and not self.draining and self.async_llm.is_running

    def engine_stats(self) -> "EngineStats":
        return self.async_llm.stats()
