"""Semantic cache benchmark: hit and false-hit rates on the labelled pairs, and the lookup latency.

    python -m benchmarks.semantic_cache [--skip-redis] [--num-lookups 300]

Rates (tests/data/cache_pairs.jsonl: paraphrases and hard negatives; a pair is stored as `a`, looked up as `b`):
the guarded cache at the configured threshold, run through the real SemanticCache (one scope per pair), beside
plain cosine at 0.90 and 0.95, on the whole set, the tuning part and the held-out part; and the threshold the
tuning part chooses (caches/evaluation.py).
Latency: `ResponseCaches.lookup` (embedding included) against a scope holding every stored question of the set,
in this process and in Redis (a real redis-server on loopback), beside nothing cached (an empty scope: the
lookup returns before embedding) and beside the embedding alone.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from contextlib import ExitStack

import numpy as np

from benchmarks.metrics import percentile
from serving.control.caches import (CachedResponse, CacheRequest, CachesConfig, ResponseCaches, Sampling,
                                    SemanticCache, SemanticCacheConfig, ExactCacheConfig, LocalStore)
from serving.control.caches.evaluation import (Pair, choose_threshold, guard_passes, load_pairs, rates,
                                               similarities)
from serving.control.embeddings import Embedder

SYSTEM = "You are the support assistant of Acme. Answer briefly."


def request(tenant: str, question: str, route: str = "support") -> CacheRequest:
    return CacheRequest(tenant=tenant, route=route,
                        messages=({"role": "system", "content": SYSTEM}, {"role": "user", "content": question}),
                        sampling=Sampling(temperature=0, max_tokens=256))


def answer(text: str) -> CachedResponse:
    return CachedResponse(text=text, finish_reason="stop", prompt_tokens=40, completion_tokens=30, cost_usd=0.0004)


async def guarded_hits(pairs: list[Pair], embedder, threshold: float) -> np.ndarray:
    """Each pair in a scope of its own (its own tenant): store a, look up b."""
    cache = SemanticCache(SemanticCacheConfig(enabled=True, threshold=threshold), LocalStore(), embedder)
    hits = []
    for i, pair in enumerate(pairs):
        await cache.put(request(f"pair-{i}", pair.a), answer(pair.a))
        hits.append(await cache.get(request(f"pair-{i}", pair.b)) is not None)
    return np.array(hits)


def print_rates(title: str, pairs: list[Pair], hits: np.ndarray) -> None:
    held = np.array([p.held_out for p in pairs])
    whole = rates(pairs, hits)
    tune = rates([p for p in pairs if not p.held_out], hits[~held])
    held_out = rates([p for p in pairs if p.held_out], hits[held])
    print(f"  {title:<26} whole: {whole.line()}")
    print(f"  {'':<26} tune:  {tune.line()}")
    print(f"  {'':<26} held:  {held_out.line()}")


def print_kinds(pairs: list[Pair], columns: dict[str, np.ndarray]) -> None:
    kinds = sorted({p.kind for p in pairs if not p.paraphrase})
    print("  false hits by kind:   " + "".join(f"{name:>14}" for name in columns))
    for kind in kinds:
        mask = np.array([p.kind == kind for p in pairs])
        cells = "".join(f"{int(hits[mask].sum()):>8d} / {int(mask.sum()):<3d}" for hits in columns.values())
        print(f"    {kind:<20}{cells}")


async def latency(caches: ResponseCaches, questions: list[str], lookups: list[str], tenant: str) -> list[float]:
    for question in questions:
        await caches.store(request(tenant, question), answer(question))
    timings = []
    for question in lookups:
        start = time.perf_counter()
        await caches.lookup(request(tenant, question))
        timings.append((time.perf_counter() - start) * 1000)
    return timings


def latency_line(name: str, timings: list[float]) -> str:
    return f"  {name:<46} p50 {percentile(timings, 50):7.2f} ms   p95 {percentile(timings, 95):7.2f} ms"


async def main_async(args) -> int:
    embedder = Embedder.shared()
    pairs = load_pairs()
    sims = similarities(pairs, embedder)
    passes = guard_passes(pairs)
    tune = [p for p in pairs if not p.held_out]
    held = np.array([p.held_out for p in pairs])
    chosen = choose_threshold(tune, sims[~held], passes[~held])
    configured = SemanticCacheConfig().threshold
    print(f"labelled pairs: {len(pairs)} ({sum(p.paraphrase for p in pairs)} paraphrases, "
          f"{sum(not p.paraphrase for p in pairs)} hard negatives; {int(held.sum())} held out)")
    print(f"threshold chosen on the tuning part: {chosen:.2f}; configured default: {configured:.2f}")
    guarded = await guarded_hits(pairs, embedder, configured)
    print_rates(f"guarded cache @ {configured:.2f}", pairs, guarded)
    print_rates(f"plain cosine @ {configured:.2f}", pairs, sims >= configured)
    print_rates("plain cosine @ 0.90", pairs, sims >= 0.90)
    print_rates("plain cosine @ 0.95", pairs, sims >= 0.95)
    print_kinds(pairs, {f"guarded@{configured:.2f}": guarded, "cosine@0.90": sims >= 0.90,
                        "cosine@0.95": sims >= 0.95})

    stored = sorted({p.a for p in pairs})
    lookups = [pairs[i % len(pairs)].b for i in range(args.num_lookups)]
    config = CachesConfig(exact=ExactCacheConfig(enabled=True),
                          semantic=SemanticCacheConfig(enabled=True, max_entries_per_scope=len(stored)))
    print(f"\nlookup latency: exact, then semantic over a scope of {len(stored)} questions; "
          f"{len(lookups)} lookups (CPU embedding included)")
    embed_timings = []
    for question in lookups[:100]:
        start = time.perf_counter()
        embedder.encode_one(question + " ")  # a new text each time
        embed_timings.append((time.perf_counter() - start) * 1000)
    nothing = await latency(ResponseCaches.open(config, embedder=embedder), [], lookups, "empty")
    print(latency_line("nothing cached (empty scope, no embedding)", nothing))
    print(latency_line("embedding one question alone", embed_timings))
    local = await latency(ResponseCaches.open(config, embedder=embedder), stored, lookups, "full")
    print(latency_line("in process", local))
    if not args.skip_redis:
        import redis.asyncio as aioredis

        from benchmarks.services import redis_server

        with ExitStack() as stack:
            url = stack.enter_context(redis_server())
            client = aioredis.from_url(url, decode_responses=True)
            empty = await latency(ResponseCaches.open(config, client, embedder), [], lookups, "empty")
            print(latency_line("Redis, nothing cached (empty scope)", empty))
            shared = await latency(ResponseCaches.open(config, client, embedder), stored, lookups, "full")
            print(latency_line("Redis", shared))
            await client.aclose()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-redis", action="store_true", help="no Redis store (no redis-server installed)")
    parser.add_argument("--num-lookups", type=int, default=300)
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
