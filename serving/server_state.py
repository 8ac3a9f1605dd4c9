"""What the daemon's two front ends (gRPC and the OpenAI-compatible HTTP app) share: one engine, its tokenizer
pool, the control plane, the request limits and the server's status.

The daemon builds one `ServerState`, warms the engine up, sets `ready`, and hands the same object to the gRPC
servicer and to `serving.http.app.create_app(state)`. On SIGTERM it sets `draining`; both front ends then refuse
new requests (gRPC UNAVAILABLE, HTTP 503) while the accepted ones finish.
"""
from __future__ import annotations

import dataclasses
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


@dataclass(frozen=True, slots=True)
class ServedModel:
    """One self-hosted model of `models:`: its own engine thread and tokenizers."""

    id: str  # the served model id (and its route id)
    async_llm: "AsyncLLM"  # its engine
    tokenizers: "TokenizerPool"  # its tokenizer's pool
    max_model_len: int  # its context length
    chat: bool  # takes chat messages (it has a chat template)


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
    models: dict[str, ServedModel] = field(default_factory=dict)  # every self-hosted model, the primary first
    upstreams: dict = field(default_factory=dict)  # external model id -> serving.control.upstream.UpstreamClient
    router: object = None  # serving.control.router.Router over `models:`; None: one model, nothing to route

    @property
    def routing(self) -> bool:
        """Several models are served: requests name one, or `auto` lets the router choose."""
        return len(self.models) + len(self.upstreams) > 1

    def model_ids(self) -> list[str]:
        return list(self.models or [self.model_name]) + list(self.upstreams)

    def view(self, model_id: str) -> "ServerState":
        """This state as seen by a request served by self-hosted model `model_id`: its engine, tokenizers and
        context length in place of the primary's; everything else (the control plane, the limits) shared.
        NOTE: `ready` and `draining` are copied: the request was accepted under them."""
        served = self.models[model_id]
        if served.async_llm is self.async_llm:
            return self
        return dataclasses.replace(self, async_llm=served.async_llm, tokenizers=served.tokenizers,
                                   model_name=served.id, max_model_len=served.max_model_len)

    def engines(self) -> list["AsyncLLM"]:
        return [m.async_llm for m in self.models.values()] or [self.async_llm]

    def is_ready(self) -> bool:
        """True while new requests are welcome: warmed up, not draining, engine alive."""
        return self.ready and not self.draining and self.async_llm.is_running

    def engine_stats(self) -> "EngineStats":
        return self.async_llm.stats()
