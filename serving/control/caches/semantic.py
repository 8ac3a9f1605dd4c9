"""The semantic cache: a question close in meaning to one already answered in the same scope gets its answer,
unless the guard (guard.py) finds a known difference between the two.

The question is the last user message; the scope (keys.py) already carries the tenant, route, system prompt and
earlier turns, so only entries written under exactly those are ever compared.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from typing import Callable

import numpy as np

from serving.control.caches.config import SemanticCacheConfig
from serving.control.caches.entry import CachedResponse, CacheEntry, CacheHit
from serving.control.caches.guard import refusal, signature
from serving.control.caches.keys import CacheRequest, question_of, scope_of
from serving.control.caches.store import CacheStore
from serving.control.caches.template import differing_parts

logger = logging.getLogger(__name__)

NUM_RECENT_VECTORS = 256  # questions embedded at a miss, kept for the put that follows it


def entry_id_of(question: str) -> str:
    """One entry per question in a scope: storing the same question again replaces it."""
    return hashlib.sha256(question.encode()).hexdigest()[:32]


def _fits(response: CachedResponse, max_tokens: int | None) -> bool:
    """Whether a stored answer is one a request allowed `max_tokens` could have got: a complete answer no longer
    than that, or an answer cut at exactly that length."""
    if response.finish_reason == "length":
        return max_tokens is not None and response.completion_tokens == max_tokens
    return max_tokens is None or response.completion_tokens <= max_tokens


class SemanticCache:
    def __init__(self, config: SemanticCacheConfig, store: CacheStore, embedder=None,
                 clock: Callable[[], float] = time.time):
        self.config = config
        self.store = store
        self._embedder = embedder  # an Embedder; None: Embedder.shared(), loaded at the first use
        self.clock = clock  # UNIX seconds
        self._recent: OrderedDict[str, np.ndarray] = OrderedDict()  # question -> its vector
        self.num_refused = 0  # near neighbours the guard turned down since start

    @property
    def embedder(self):
        if self._embedder is None:
            from serving.control.embeddings import Embedder

            self._embedder = Embedder.shared()
        return self._embedder

    @staticmethod
    def eligible(request: CacheRequest) -> bool:
        # NOTE: a structured-output request needs the format it asked for; a paraphrase's answer may not have it.
        return request.cacheable and request.sampling.response_format is None

    async def _vector(self, question: str) -> np.ndarray:
        vector = self._recent.get(question)
        if vector is None:
            vector = await asyncio.to_thread(self.embedder.encode_one, question)  # CPU work, off the event loop
            self._recent[question] = vector
            while len(self._recent) > NUM_RECENT_VECTORS:
                self._recent.popitem(last=False)
        else:
            self._recent.move_to_end(question)
        return vector

    async def get(self, request: CacheRequest) -> CacheHit | None:
        """Called after an exact miss: the answer to the nearest guarded question above the route's threshold."""
        if not self.config.enabled or not self.eligible(request):
            return None
        question = question_of(request)
        if question is None:
            return None
        scope = scope_of(request)
        now = self.clock()
        entry_ids, vectors = await self.store.scan(scope.key, now)
        if not entry_ids:
            return None  # nothing to compare with: no embedding needed
        similarities = vectors @ await self._vector(question)
        threshold = self.config.threshold_for(request.route)
        nearest = np.argsort(-similarities)[:self.config.num_candidates]
        candidates = [int(i) for i in nearest if similarities[i] >= threshold]
        if not candidates:
            return None
        entries = await self.store.get_many(scope.key, [entry_ids[i] for i in candidates], now)
        asked = signature(question)
        max_tokens = request.sampling.max_tokens
        for i, entry in zip(candidates, entries):
            if entry is None or entry.scope_key != scope.key:
                continue
            if not _fits(entry.response, max_tokens):
                continue
            reason = refusal(asked, signature(entry.question)) or await self._template_refusal(
                question, entry.question, similarity_threshold=threshold)
            if reason is not None:
                self.num_refused += 1
                logger.debug("semantic cache: refused %r for %r (%s)", entry.question, question, reason)
                continue
            return CacheHit(kind="semantic", response=entry.response, similarity=float(similarities[i]),
                            age_s=now - entry.created_at, matched_question=entry.question)
        return None

    async def _template_refusal(self, question: str, cached: str, similarity_threshold: float) -> str | None:
        """Two questions from one template must also agree where they differ: the payload's meaning, not the
        shared instruction's, decides."""
        parts = differing_parts(question, cached)
        if parts is None or parts[0] == parts[1]:
            return None
        if not parts[0] or not parts[1]:
            return f"one template, and only one of them adds {parts[0] or parts[1]!r}"
        a, b = await asyncio.gather(self._vector(parts[0]), self._vector(parts[1]))
        similarity = float(a @ b)
        if similarity < similarity_threshold:
            return f"one template, different payloads ({parts[0]!r} vs {parts[1]!r}: similarity {similarity:.3f})"
        return refusal(signature(parts[0]), signature(parts[1]))

    async def put(self, request: CacheRequest, response: CachedResponse) -> bool:
        """Called once the request is done; returns whether the answer was stored.

        NOTE: a complete answer ("stop"), or one cut at max_tokens ("length"); a cut one is only served to a request
        with the same max_tokens (`_fits`), which would have been cut at the same length. Nothing else (an abort,
        an error) is an answer.
        """
        if not self.config.enabled or not self.eligible(request) or response.finish_reason not in ("stop", "length"):
            return False
        question = question_of(request)
        if question is None:
            return False
        vector = await self._vector(question)
        now = self.clock()
        scope = scope_of(request)
        entry = CacheEntry(scope_key=scope.key, response=response, tags=tuple(sorted(set(request.tags))),
                           created_at=now, expires_at=now + self.config.ttl_s, question=question)
        await self.store.add(scope.key, entry_id_of(question), entry, vector, now)
        return True
