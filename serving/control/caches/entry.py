"""What the caches store and return: typed records that cross the boundary to the request path."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """The answer a request got, as the caller hands it to `put` once the engine or upstream is done."""

    text: str  # the completion's text
    finish_reason: str  # "stop", "length", ...
    prompt_tokens: int  # what the original request's prompt counted
    completion_tokens: int  # what it generated
    cost_usd: float  # what the original request paid: what a hit saves
    model: str = ""  # the model (or route) that produced it, for the response and the ledger


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A stored answer with the scope it belongs to; the scope is checked again on every read."""

    scope_key: str  # CacheScope.key of the request that wrote it
    response: CachedResponse  # the answer
    tags: tuple[str, ...]  # the client's tags, for invalidation
    created_at: float  # UNIX seconds (the cache's clock)
    expires_at: float  # UNIX seconds; a read at or after this is a miss
    question: str = ""  # semantic entries: the normalised question the guard compares with

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> CacheEntry:
        data = json.loads(raw)
        return cls(scope_key=data["scope_key"], response=CachedResponse(**data["response"]),
                   tags=tuple(data["tags"]), created_at=data["created_at"], expires_at=data["expires_at"],
                   question=data["question"])


@dataclass(frozen=True, slots=True)
class CacheHit:
    """A lookup that found an answer."""

    kind: Literal["exact", "semantic"]  # which cache answered
    response: CachedResponse  # the stored answer
    similarity: float  # cosine similarity of the two questions; 1.0 for an exact hit
    age_s: float  # how long ago the answer was stored
    matched_question: str = ""  # semantic hits: the cached question that matched

    @property
    def saved_usd(self) -> float:
        return self.response.cost_usd
