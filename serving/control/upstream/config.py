"""One external route: an upstream OpenAI-compatible API (a hosted provider, or another frugal daemon).

Validated like the `control:` section (`serving/control/config.py`): unknown keys fail the start, and
`upstream_routes` names the field at fault (`upstreams[1].circuit.open_s: ...`). The API key is not part of the
config: only the name of the environment variable that holds it, read once when the client starts.
"""
from __future__ import annotations

from pydantic import Field, ValidationError, model_validator

from serving.control.config import ModelPrice, _Strict, config_error


class TimeoutConfig(_Strict):
    connect: float = Field(default=5.0, gt=0)  # TCP (and TLS) connect, per attempt
    first_byte: float = Field(default=30.0, gt=0)  # per attempt: request sent -> first byte; also any gap between bytes
    total: float = Field(default=120.0, gt=0)  # the whole call: every attempt, backoff and, for a stream, its end


class CircuitConfig(_Strict):
    failure_threshold: int = Field(default=5, ge=1)  # consecutive failed calls that open the circuit
    open_s: float = Field(default=30.0, gt=0)  # how long it stays open before one probe may go through


class UpstreamRoute(_Strict):
    id: str = Field(min_length=1)  # the route's name in the router, metrics and errors
    base_url: str = Field(pattern=r"^https?://")  # up to and including /v1, e.g. https://api.openai.com/v1
    api_key_env: str | None = None  # the environment variable holding the key; None: no Authorization header
    model: str = Field(min_length=1)  # the provider's model name, written into every request body
    chat: bool = True  # serves /chat/completions; False: only /completions
    timeout_s: TimeoutConfig = Field(default_factory=TimeoutConfig)
    max_retries: int = Field(default=2, ge=0)  # extra attempts after the first, for retryable failures only
    backoff_s: float = Field(default=0.5, gt=0)  # the first retry's backoff; doubles per retry, with jitter
    backoff_max_s: float = Field(default=8.0, gt=0)  # the most one backoff (not a Retry-After) waits
    circuit: CircuitConfig = Field(default_factory=CircuitConfig)
    usd_per_m_input: float = Field(ge=0)  # per million prompt tokens not served from the provider's cache
    usd_per_m_cached_input: float | None = Field(default=None, ge=0)  # per million cached prompt tokens; None: input
    usd_per_m_output: float = Field(ge=0)  # per million generated tokens

    @model_validator(mode="after")
    def _backoff(self):
        if self.backoff_max_s < self.backoff_s:
            raise ValueError(f"backoff_max_s ({self.backoff_max_s}) must be at least backoff_s ({self.backoff_s})")
        return self

    @property
    def price(self) -> ModelPrice:
        return ModelPrice(usd_per_m_input=self.usd_per_m_input, usd_per_m_cached_input=self.usd_per_m_cached_input,
                          usd_per_m_output=self.usd_per_m_output)


def upstream_routes(raw) -> list[UpstreamRoute]:
    """Validates a list of route mappings; raises ValueError naming the key (`upstreams[0].timeout_s.total: ...`)."""
    routes = []
    for i, item in enumerate(raw or []):
        try:
            routes.append(UpstreamRoute.model_validate(item))
        except ValidationError as e:
            raise config_error(e, f"upstreams[{i}]") from None
    ids = [r.id for r in routes]
    for i, route_id in enumerate(ids):
        if route_id in ids[:i]:
            raise ValueError(f"upstreams[{i}].id: route id {route_id!r} is used twice")
    return routes
