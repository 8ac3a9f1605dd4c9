"""The `metrics:` section of frugal.yaml."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, kw_only=True)
class MetricsConfig:
    enabled: bool = True  # false: no engine metrics are recorded and /metrics answers 404
    # NOTE: queue depth is what LLM servers scale on; 8 waiting requests is a few seconds of work per replica.
    target_queue_depth: float = 8.0  # waiting requests at which this replica counts as saturated (saturation 1.0)
    kv_cache_usage_target: float = 0.95  # KV usage at which it counts as saturated, whatever the queue
    tenants: list[str] = field(default_factory=list)  # tenant label values besides the config's and the key store's
    workflows: list[str] = field(default_factory=list)  # workflow label values besides the budgets' ids
    max_label_values: int = 1000  # most distinct tenants (and workflows) labelled; the rest go under "other"

    def __post_init__(self) -> None:
        if not self.target_queue_depth > 0:
            raise ValueError(f"target_queue_depth must be > 0, got {self.target_queue_depth}")
        if not 0 < self.kv_cache_usage_target <= 1:
            raise ValueError(f"kv_cache_usage_target must be in (0, 1], got {self.kv_cache_usage_target}")
        if self.max_label_values < 1:
            raise ValueError(f"max_label_values must be >= 1, got {self.max_label_values}")
