"""`frugal cache invalidate`: drops a tenant's cached answers, all of them or those with a tag, in the Redis store
the daemons' response caches share (control.redis_url), the same operation as POST /v1/cache/invalidate.

Without control.redis_url the caches live inside the daemon's process, where only its HTTP API reaches them.
"""
from __future__ import annotations

import asyncio
import json
import sys


def add_cache(sub) -> None:
    p = sub.add_parser("cache", help="the response caches shared in Redis (control.redis_url)")
    cache = p.add_subparsers(dest="cache_command", required=True)
    invalidate = cache.add_parser("invalidate", help="drop a tenant's cached answers (all, or those with --tag)")
    invalidate.add_argument("--tenant", required=True, help="whose answers (the tenant its keys were created for)")
    invalidate.add_argument("--tag", default=None, help="only the answers stored with this tag (x-frugal-cache-tags)")
    invalidate.add_argument("--json", action="store_true", help="print what POST /v1/cache/invalidate answers")
    invalidate.add_argument("--config", default=None, help="frugal.yaml whose caches: and control.redis_url to use")


async def _invalidate(config, tenant: str, tag: str | None) -> int:
    import redis.asyncio as aioredis

    from serving.control.caches import ResponseCaches

    client = aioredis.from_url(config.control.redis_url, decode_responses=True)  # as the daemon's client
    try:
        caches = ResponseCaches.open(config.caches, redis_client=client)
        return await (caches.invalidate_tenant(tenant) if tag is None else caches.invalidate_tag(tenant, tag))
    finally:
        await client.aclose()


def cmd_cache(args) -> int:
    from redis.exceptions import RedisError

    from serving.control.caches.keys import check_tag
    from serving.server.config import ConfigError, load_config

    try:
        config = load_config(args.config)
        if args.tag is not None:
            check_tag(args.tag)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not (config.caches.exact.enabled or config.caches.semantic.enabled):
        print("error: no response cache is configured (caches.exact.enabled and caches.semantic.enabled are false), "
              "so there is nothing to invalidate", file=sys.stderr)
        return 2
    if config.control.redis_url is None:
        print("error: control.redis_url is not set, so the response caches live inside the daemon's process, out of "
              "this command's reach: use POST /v1/cache/invalidate on the daemon instead", file=sys.stderr)
        return 2
    try:
        num_removed = asyncio.run(_invalidate(config, args.tenant, args.tag))
    except (RedisError, OSError) as e:
        print(f"error: cannot reach control.redis_url: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"object": "cache.invalidation", "tenant": args.tenant, "tag": args.tag,
                          "removed": num_removed}))
    else:
        which = "cached answers" if args.tag is None else f"cached answers tagged {args.tag!r}"
        print(f"removed {num_removed} {which} of tenant {args.tenant}")
    return 0
