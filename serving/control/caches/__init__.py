"""The response caches of the control plane: exact, then semantic, scoped per tenant / route / system prompt.

    caches = ResponseCaches.open(caches_config(raw["caches"]), redis_client=plane.redis)
    request = CacheRequest(tenant=ctx.tenant, route=route, messages=tuple(messages),
                           sampling=Sampling(temperature=0, max_tokens=256), tags=("faq",))
    hit = await caches.lookup(request)        # CacheHit(kind, response, similarity, age_s) or None
    ...                                       # a miss: route, run, settle
    await caches.store(request, CachedResponse(text, finish_reason, prompt_tokens, completion_tokens, cost_usd))
    await caches.invalidate_tag(ctx.tenant, "faq")
"""
from serving.control.caches.config import (CachesConfig, ExactCacheConfig, SemanticCacheConfig, SemanticRouteConfig,
                                           caches_config)
from serving.control.caches.entry import CachedResponse, CacheEntry, CacheHit
from serving.control.caches.exact import ExactCache
from serving.control.caches.guard import refusal, refuse, signature
from serving.control.caches.keys import CacheRequest, CacheScope, Sampling, exact_key, question_of, scope_of
from serving.control.caches.response_caches import ResponseCaches
from serving.control.caches.semantic import SemanticCache
from serving.control.caches.store import CacheStore, LocalStore

__all__ = ["CacheEntry", "CacheHit", "CacheRequest", "CacheScope", "CacheStore", "CachedResponse", "CachesConfig",
           "ExactCache", "ExactCacheConfig", "LocalStore", "ResponseCaches", "Sampling", "SemanticCache",
           "SemanticCacheConfig", "SemanticRouteConfig", "caches_config", "exact_key", "question_of", "refusal",
           "refuse", "scope_of", "signature"]
