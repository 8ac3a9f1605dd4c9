"""One registry per daemon: the engine's, the control plane's and the GPU's metrics, rendered for GET /metrics.

`Metrics.install` hooks the stat logger into the engine and the observer into the control plane; `render`
refreshes what must be read asynchronously (budget lines in Redis) and returns the text exposition format.
"""
from __future__ import annotations

import logging

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, disable_created_metrics, generate_latest

from serving.control.context import DEFAULT_TENANT
from serving.metrics.config import MetricsConfig
from serving.metrics.control import ControlMetrics
from serving.metrics.engine import EngineCollector, EngineStatLogger
from serving.metrics.gpu import GpuCollector
from serving.metrics.labels import KnownValues

logger = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, config: MetricsConfig, registry: CollectorRegistry, control: ControlMetrics, plane,
                 tenants: KnownValues):
        self.config = config
        self.registry = registry
        self.control = control
        self.plane = plane
        self.tenants = tenants

    @classmethod
    def install(cls, config: MetricsConfig, engine, plane, model_name: str, stats=None,
                route_names: list[str] | None = None) -> Metrics:
        """Hooks metrics into `engine` (an LLMEngine) and `plane` (the ControlPlane). `stats` reads the engine's
        EngineStats from any thread (default: `engine.stats`)."""
        # NOTE: the *_created series double the exposition and no dashboard reads them (vLLM turns them off too).
        disable_created_metrics()
        registry = CollectorRegistry(auto_describe=False)
        control_config = plane.config
        tenants = KnownValues([DEFAULT_TENANT, *config.tenants, *control_config.tenants,
                               *engine.config.tenant_weights,
                               *(b.id for b in control_config.budgets if b.scope == "tenant")],
                              config.max_label_values)
        workflows = KnownValues([*config.workflows, *(b.id for b in control_config.budgets if b.scope == "workflow")],
                                config.max_label_values)
        engine.stat_logger = EngineStatLogger(registry, model_name, engine.max_model_len)
        cache_info = {"block_size": str(engine.config.block_size), "num_gpu_blocks": str(engine.num_blocks),
                      "enable_prefix_caching": str(engine.config.enable_prefix_caching),
                      "cache_dtype": engine.config.dtype}
        registry.register(EngineCollector(stats or engine.stats, model_name, config, cache_info))
        control = ControlMetrics(registry, plane, tenants, workflows, route_names or [model_name])
        plane.observer = control
        registry.register(control)
        registry.register(GpuCollector())
        return cls(config, registry, control, plane, tenants)

    async def render(self) -> bytes:
        await self.control.refresh()
        return generate_latest(self.registry)
