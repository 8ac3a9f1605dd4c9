"""Response caches on the gRPC path: the per-call cache options from the metadata, the cache request of a chat
call, and the messages a cache hit answers with.

The gRPC twin of serving/http/cached.py, with the same metadata names as its headers: `x-frugal-cache: off`
skips the caches for this call, `on` lets a sampled (non-greedy) request be cached and served from the cache;
`x-frugal-cache-tags: a,b` tags the stored answer. A hit answers without the model: no admission, no
reservation, nothing spent; its ledger row costs 0 and records what it saved.
"""
from __future__ import annotations

from dataclasses import dataclass

from serving.control.caches import CacheHit, CacheRequest
from serving.control.caches.keys import sampling_of
from serving.control.context import RequestContext
from serving.engine.sampling_params import SamplingParams
from serving.rpc import convert
from serving.rpc.gen.frugal.v1 import inference_pb2 as pb

MAX_TAGS = 16  # as on HTTP: x-frugal-cache-tags


@dataclass(frozen=True, slots=True)
class CacheOptions:
    """What the caller asked of the caches for one call, from its metadata."""

    enabled: bool  # False: `x-frugal-cache: off`, this call neither reads nor writes the caches
    cache_nondeterministic: bool  # `x-frugal-cache: on`: a sampled answer may be stored and served
    tags: tuple[str, ...]  # `x-frugal-cache-tags`: the stored answer's tags


def cache_options(metadata) -> CacheOptions:
    """Raises ValueError naming the metadata key for a value it does not take.

    NOTE: checked on every call, caches on or off, chat or prompt: a bad value is the caller's mistake either way,
    and a call must not start to fail the day an operator turns the caches on.
    """
    meta = {k.lower(): v for k, v in (metadata or ()) if isinstance(v, str)}
    mode = (meta.get("x-frugal-cache") or "default").strip().lower()
    if mode not in ("default", "on", "off"):
        raise ValueError(f"x-frugal-cache must be on or off, got {mode!r}")
    tags = tuple(t.strip() for t in meta.get("x-frugal-cache-tags", "").split(",") if t.strip())
    if len(tags) > MAX_TAGS:
        raise ValueError(f"x-frugal-cache-tags takes at most {MAX_TAGS} tags, got {len(tags)}")
    return CacheOptions(enabled=mode != "off", cache_nondeterministic=mode == "on", tags=tags)


def cache_request(ctx: RequestContext, params: SamplingParams, messages: list[dict] | None, route: str,
                  options: CacheOptions) -> CacheRequest | None:
    """How the caches see a checked (and optimized) chat call; None when no cache may take it: caches off for
    this call, or a prompt rather than chat messages."""
    if not options.enabled or messages is None:
        return None
    sampling = sampling_of(params)
    return CacheRequest(tenant=ctx.tenant, route=route,
                        messages=tuple({"role": m["role"], "content": m["content"]} for m in messages),
                        sampling=sampling, tags=options.tags,
                        cache_nondeterministic=options.cache_nondeterministic)


def hit_info(hit: CacheHit, tokens_saved: int) -> pb.FrugalInfo:
    what = "an identical earlier request" if hit.kind == "exact" else \
        f"an earlier request with the same meaning (similarity {hit.similarity:.3f})"
    return pb.FrugalInfo(route=f"cache:{hit.kind}", cache=hit.kind, similarity=hit.similarity,
                         reason=f"answered from the {hit.kind} cache: {what}, {hit.age_s:.0f} s ago",
                         tokens_saved=tokens_saved)


def _usage(hit: CacheHit, num_prompt_tokens: int) -> pb.Usage:
    num_completion = hit.response.completion_tokens
    return pb.Usage(prompt_tokens=num_prompt_tokens, completion_tokens=num_completion, cached_tokens=0,
                    total_tokens=num_prompt_tokens + num_completion, cost_usd=0.0)


def hit_response(req_id: str, model: str, hit: CacheHit, num_prompt_tokens: int,
                 tokens_saved: int) -> pb.GenerateResponse:
    """The unary answer of a hit: the stored text (no token ids, which the caches do not keep), cost 0."""
    return pb.GenerateResponse(request_id=req_id, model=model, text=hit.response.text,
                               finish_reason=convert.finish_reason(hit.response.finish_reason),
                               usage=_usage(hit, num_prompt_tokens), frugal=hit_info(hit, tokens_saved))


def hit_chunk(req_id: str, model: str, hit: CacheHit, num_prompt_tokens: int,
              tokens_saved: int) -> pb.GenerateStreamResponse:
    """A hit as a stream: one chunk, the first and the last, with the whole text, finish reason and usage."""
    return pb.GenerateStreamResponse(request_id=req_id, model=model, text=hit.response.text,
                                     finish_reason=convert.finish_reason(hit.response.finish_reason),
                                     usage=_usage(hit, num_prompt_tokens), frugal=hit_info(hit, tokens_saved))
