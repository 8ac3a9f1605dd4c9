"""Cache keys: request normalisation, the scope every entry lives in, and the exact-match key.

A scope is (tenant, route, system prompt, earlier turns). Every store keeps entries under a namespace derived from
the scope, so a lookup can only ever search its own scope's entries: a hit across tenants, routes or system
prompts is impossible by construction, not filtered out afterwards.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

_SPACE_RUN = re.compile(r"[ \t]+")
_BLANK_RUN = re.compile(r"\n{3,}")
_ANY_SPACE = re.compile(r"\s+")


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\x00")  # NOTE: a separator, so ("ab", "c") and ("a", "bc") differ
    return h.hexdigest()


def normalise_whitespace(text: str) -> str:
    """Runs of spaces inside a line become one, trailing spaces and blank-line runs go; leading indentation stays
    (it carries meaning in code and nested lists); a one-line text is stripped at both ends."""
    if "\n" not in text.strip():
        return _SPACE_RUN.sub(" ", text.strip())
    lines = []
    for line in text.strip("\n").split("\n"):
        body = line.lstrip(" \t")
        indent = line[:len(line) - len(body)]
        lines.append((indent + _SPACE_RUN.sub(" ", body)).rstrip() if body.strip() else "")
    return _BLANK_RUN.sub("\n\n", "\n".join(lines)).strip("\n")


def normalise_question(text: str) -> str:
    """The text the semantic cache embeds and the guard reads: every whitespace run is one space."""
    return _ANY_SPACE.sub(" ", text).strip()


@dataclass(frozen=True, slots=True)
class Sampling:
    """The sampling parameters that change the output; every one is part of the exact key."""

    temperature: float | None = None  # None: the server's default (not deterministic)
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    n: int = 1  # choices per prompt
    response_format: str | None = None  # JSON text of the client's response_format / grammar, if any
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    @property
    def deterministic(self) -> bool:
        """Greedy decoding or a fixed seed: the same request gets the same answer, so caching it is exact."""
        return self.temperature == 0 or self.top_k == 1 or self.seed is not None


def sampling_of(params, n: int = 1) -> Sampling:
    """The exact key's sampling part of an engine SamplingParams (every field that changes the answer)."""
    return Sampling(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                    max_tokens=params.max_tokens, stop=tuple(params.stop), seed=params.seed,
                    logprobs=params.logprobs is not None, top_logprobs=params.logprobs, n=n,
                    min_tokens=params.min_tokens, skip_special_tokens=params.skip_special_tokens,
                    ignore_eos=params.ignore_eos, stop_token_ids=tuple(params.stop_token_ids),
                    include_stop_str_in_output=params.include_stop_str_in_output)


@dataclass(frozen=True, slots=True)
class CacheRequest:
    """One chat request as the caches see it. Built by the request path after authentication and optimisation."""

    tenant: str  # RequestContext.tenant: from the key, never from the client
    route: str  # the model or route that serves it
    messages: tuple[Mapping[str, str], ...]  # {"role", "content"} with string content
    sampling: Sampling = field(default_factory=Sampling)
    tags: tuple[str, ...] = ()  # the client's tags; invalidating one drops every entry that carries it
    cache_nondeterministic: bool = False  # the client opts in to caching a sampled answer

    def __post_init__(self):
        if not self.tenant:
            raise ValueError("tenant must be a non-empty string")
        if not self.route:
            raise ValueError("route must be a non-empty string")
        for i, m in enumerate(self.messages):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] needs a string role and a string content")
        if any(not isinstance(t, str) or not t for t in self.tags):
            raise ValueError("tags must be non-empty strings")

    @property
    def cacheable(self) -> bool:
        """Whether a stored answer is the answer this request would get.

        NOTE: a CachedResponse holds one choice and no logprobs, so n > 1 and logprobs requests are never cached.
        """
        if self.sampling.n != 1 or self.sampling.logprobs or self.sampling.top_logprobs:
            return False
        return self.sampling.deterministic or self.cache_nondeterministic


def check_tag(tag: str) -> None:
    """Raises ValueError unless `tag` is one tag as `x-frugal-cache-tags` stores it: not empty, no comma, no
    leading or trailing spaces.

    NOTE: refused rather than normalised: invalidating a tag no entry can carry would quietly remove nothing.
    """
    if not isinstance(tag, str) or not tag or tag != tag.strip() or "," in tag:
        raise ValueError(f"tag must be one tag as x-frugal-cache-tags stores it (not empty, no comma, no leading "
                         f"or trailing spaces), got {tag!r}")


def tenant_namespace(tenant: str) -> str:
    """The tenant's part of every store key (a digest, so any tenant string is a safe key)."""
    return _digest("tenant", tenant)[:32]


@dataclass(frozen=True, slots=True)
class CacheScope:
    """The namespace a request's entries live in."""

    tenant: str  # the tenant's name
    route: str  # the model or route
    system_hash: str  # digest of the normalised system messages
    history_hash: str  # digest of the turns before the last user message (they change what it means)

    @property
    def tenant_ns(self) -> str:
        return tenant_namespace(self.tenant)

    @property
    def key(self) -> str:
        """`<tenant namespace>:<scope digest>`: the tenant is the key's prefix, never a filter applied later."""
        return f"{self.tenant_ns}:{_digest('scope', self.tenant, self.route, self.system_hash, self.history_hash)[:32]}"


def _rendered(messages: Sequence[Mapping[str, str]]) -> list[list[str]]:
    return [[m["role"], normalise_whitespace(m["content"])] for m in messages]


def last_user_index(messages: Sequence[Mapping[str, str]]) -> int | None:
    return max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)


def scope_of(request: CacheRequest) -> CacheScope:
    system = [m for m in request.messages if m["role"] in ("system", "developer")]
    last = last_user_index(request.messages)
    history = [m for m in request.messages[:last or 0] if m["role"] not in ("system", "developer")]
    return CacheScope(tenant=request.tenant, route=request.route,
                      system_hash=_digest(json.dumps(_rendered(system))),
                      history_hash=_digest(json.dumps(_rendered(history))))


def question_of(request: CacheRequest) -> str | None:
    """The last user message, normalised; None when the conversation has none (nothing to match on) or when it
    does not end with the user (a continued assistant turn)."""
    last = last_user_index(request.messages)
    if last is None or last != len(request.messages) - 1:
        return None
    question = normalise_question(request.messages[last]["content"])
    return question or None


def exact_key(request: CacheRequest) -> str:
    """`<scope key>:<digest>` of everything that decides the output: scope, messages and sampling."""
    scope = scope_of(request)
    body = json.dumps({"messages": _rendered(request.messages), "sampling": asdict(request.sampling)},
                      sort_keys=True, separators=(",", ":"))
    return f"{scope.key}:{_digest('exact', scope.key, body)[:40]}"
