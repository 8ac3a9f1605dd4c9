"""The `caches:` section of frugal.yaml: the exact and the semantic response cache.

    caches:
      exact: {enabled: true, ttl_s: 3600}
      semantic:
        enabled: true
        threshold: 0.85
        ttl_s: 3600
        routes:
          small-model: {threshold: 0.9}

Validated by pydantic like `control:`; `caches_config` turns the first error into one message that names the key
(`caches.semantic.threshold: ...`).
"""
from __future__ import annotations

from pydantic import Field, ValidationError

from serving.control.config import _Strict, config_error

# NOTE: chosen on the tuning part of tests/data/cache_pairs.jsonl (caches/evaluation.py, printed by
# benchmarks/semantic_cache.py): with the guard, 0.85 keeps false hits under 2.5% and hits ~70% of paraphrases;
# plain cosine lets 45% of the hard negatives through at 0.85 ("turn on" / "turn off" sit closer than paraphrases).
DEFAULT_SEMANTIC_THRESHOLD = 0.85


class ExactCacheConfig(_Strict):
    enabled: bool = False  # look up the normalised request before routing
    ttl_s: float = Field(default=3600.0, gt=0)  # how long an answer stays valid
    max_entries: int = Field(default=10_000, ge=1)  # in-process store: least recently used entries go first


class SemanticRouteConfig(_Strict):
    threshold: float = Field(ge=-1.0, le=1.0)  # cosine similarity a hit needs on this route


class SemanticCacheConfig(_Strict):
    enabled: bool = False  # look up the question by meaning after an exact miss
    threshold: float = Field(default=DEFAULT_SEMANTIC_THRESHOLD, ge=-1.0, le=1.0)  # cosine similarity a hit needs
    ttl_s: float = Field(default=3600.0, gt=0)  # how long an answer stays valid
    routes: dict[str, SemanticRouteConfig] = Field(default_factory=dict)  # per-route thresholds
    max_entries_per_scope: int = Field(default=512, ge=1)  # per tenant/route/system prompt; oldest go first
    max_scopes: int = Field(default=4096, ge=1)  # in-process store: least recently used scopes go first
    num_candidates: int = Field(default=4, ge=1)  # how many nearest entries the guard may look at

    def threshold_for(self, route: str) -> float:
        override = self.routes.get(route)
        return override.threshold if override is not None else self.threshold


class CachesConfig(_Strict):
    exact: ExactCacheConfig = Field(default_factory=ExactCacheConfig)
    semantic: SemanticCacheConfig = Field(default_factory=SemanticCacheConfig)


def caches_config(raw) -> CachesConfig:
    """Validates the `caches:` mapping; raises ValueError naming the key (`caches.semantic.threshold: ...`)."""
    try:
        return CachesConfig.model_validate(raw or {})
    except ValidationError as e:
        raise config_error(e, "caches") from None
