"""Response-cache invalidation over HTTP: `POST /v1/cache/invalidate` drops cached answers of the caller's tenant,
every one of them (`{"tag": null}` or `{}`) or those stored with one tag (`x-frugal-cache-tags` on the request
that stored them).

The tenant is the authenticated key's (serving/http/control.py `authenticate`), never the body's: the body takes
`tag` and nothing else, and an admin key acts for another tenant only through `x-frugal-tenant-id`, as on every
other route. With `auth: none` every caller is tenant `default`, so any caller may clear it.

NOTE: with no cache configured the answer is a 404 `caches_disabled` (like GET /metrics with metrics off), not a
200 with `removed: 0`: a client that believes it cleared stale answers must learn that nothing was ever cached.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict

from serving.control.caches.keys import check_tag
from serving.http.control import authenticate
from serving.http.errors import APIError, unavailable
from serving.server_state import ServerState

logger = logging.getLogger(__name__)


class CacheInvalidation(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a `tenant` key is refused, not ignored

    tag: str | None = None  # None: every entry of the tenant; else only the entries stored with this tag


def install_cache_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/cache/invalidate")
    async def invalidate_cache(body: CacheInvalidation, request: Request) -> dict:
        ctx = await authenticate(state, request)
        caches = state.control.caches
        if caches is None:
            raise APIError(404, "no response cache is configured (caches.exact.enabled and caches.semantic.enabled "
                           "are false in frugal.yaml), so there is nothing to invalidate", type="not_found_error",
                           code="caches_disabled")
        if body.tag is not None:
            try:
                check_tag(body.tag)
            except ValueError as e:
                raise APIError(400, str(e), param="tag", code="invalid_tag") from None
        kind = "tenant" if body.tag is None else "tag"
        try:
            if body.tag is None:
                num_removed = await caches.invalidate_tenant(ctx.tenant)
            else:
                num_removed = await caches.invalidate_tag(ctx.tenant, body.tag)
        except Exception as e:
            if state.control.redis is None:
                raise  # the in-process store does not fail: this is a bug, and a 500
            logger.error("cache invalidation (%s) of tenant %s failed: %s: %s", kind, ctx.tenant, type(e).__name__, e)
            # NOTE: each invalidation is one Lua script, so it happened whole or not at all; repeating it is safe.
            message = (f"the cache store (control.redis_url) is unavailable ({type(e).__name__}); the invalidation "
                       "may not have happened, and repeating it is safe")
            raise unavailable(message, code="cache_unavailable") from None
        state.control.observer.cache_invalidated(ctx, kind, num_removed)
        logger.info("cache invalidation (%s) of tenant %s by key %s: %d entries removed", kind, ctx.tenant,
                    ctx.key_id, num_removed)
        return {"object": "cache.invalidation", "tenant": ctx.tenant, "tag": body.tag, "removed": num_removed}
