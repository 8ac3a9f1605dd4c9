"""The `router:` section of frugal.yaml: routes, tenant tiers, the complexity classifier and the cascade.

Validated by pydantic like `control:`; every model forbids unknown keys, and `router_config` turns the first
error into one message that names the key (`router.routes[1].model: ...`).
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serving.control.config import config_error

SELF_HOSTED_PREFIX = "self-hosted:"
EXTERNAL_PREFIX = "external:"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouteConfig(_Strict):
    """One place a request can be served: a self-hosted model or an external provider's route."""

    id: str = Field(min_length=1)  # the name decisions, fallbacks and the ledger use
    model: str = Field(min_length=1)  # "self-hosted:<model id>" or "external:<route id>"
    # may take private data: the data stays on machines we trust (self-hosted; an external route never is)
    self_hosted: bool
    usd_per_m_input: float | None = Field(default=None, ge=0)  # price estimate; None: the caller derives it
    usd_per_m_output: float | None = Field(default=None, ge=0)  # price estimate; None: the caller derives it
    quality: int = Field(ge=0)  # quality tier, higher = stronger
    # expected worst latency; None: no promise, so a request with a latency target skips it
    max_latency_ms: float | None = Field(default=None, gt=0)
    task_types: list[str] = Field(default_factory=list)  # what it is good for; empty: a general route
    chat: bool = True  # takes chat messages; False: plain completions only (a base model)

    @model_validator(mode="after")
    def _consistent(self):
        # NOTE: a self-hosted model may still be kept from private data (self_hosted: false): a node the
        # operator does not clear for it.
        if self.model.startswith(SELF_HOSTED_PREFIX):
            pass
        elif self.model.startswith(EXTERNAL_PREFIX):
            if self.self_hosted:
                raise ValueError(f"route {self.id!r}: an {EXTERNAL_PREFIX}... model cannot be self_hosted")
        else:
            raise ValueError(f"route {self.id!r}: model must start with {SELF_HOSTED_PREFIX!r} or "
                             f"{EXTERNAL_PREFIX!r}, got {self.model!r}")
        if (self.usd_per_m_input is None) != (self.usd_per_m_output is None):
            raise ValueError(f"route {self.id!r}: give both usd_per_m_input and usd_per_m_output, or neither "
                             "(the caller then derives the price)")
        return self

    @property
    def priced(self) -> bool:
        return self.usd_per_m_input is not None


class QualityConfig(_Strict):
    """Which quality tier each complexity class needs."""

    simple: int = Field(default=0, ge=0)  # a request the classifier calls simple
    complex: int = Field(default=1, ge=0)  # a request it calls complex (and one it could not classify)

    @model_validator(mode="after")
    def _ordered(self):
        if self.complex < self.simple:
            raise ValueError(f"quality.complex ({self.complex}) must be >= quality.simple ({self.simple})")
        return self


class CascadeConfig(_Strict):
    enabled: bool = False  # answer on the chosen route first; escalate to a stronger one when unsure
    min_mean_logprob: float = Field(default=-1.0, le=0)  # an answer whose mean token logprob is below escalates
    # without logprobs: escalate when the classifier's p(simple) is below this; None: keep the answer
    min_classifier_confidence: float | None = Field(default=None, ge=0.5, le=1.0)


class RouterConfig(_Strict):
    routes: list[RouteConfig] = Field(min_length=1)  # in config order (the last tie-break)
    classifier_dir: str | None = None  # a `frugal router train --out` directory; None: complexity unknown
    complex_threshold: float = Field(default=0.5, gt=0, lt=1)  # p(complex) at or above which a request is complex
    quality: QualityConfig = Field(default_factory=QualityConfig)
    tiers: dict[str, list[str]] = Field(default_factory=dict)  # tenant tier -> route ids it may use
    tenants: dict[str, str] = Field(default_factory=dict)  # tenant -> tier; "*" for every other tenant
    cascade: CascadeConfig = Field(default_factory=CascadeConfig)

    @model_validator(mode="after")
    def _references(self):
        ids = [r.id for r in self.routes]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"route ids must be unique; repeated: {', '.join(duplicates)}")
        for tier, route_ids in self.tiers.items():
            unknown = [r for r in route_ids if r not in ids]
            if unknown:
                raise ValueError(f"tier {tier!r} names unknown routes {', '.join(unknown)}; routes: {', '.join(ids)}")
        for tenant, tier in self.tenants.items():
            if tier not in self.tiers:
                raise ValueError(f"tenant {tenant!r} has unknown tier {tier!r}; tiers: "
                                 f"{', '.join(self.tiers) or '(none)'}")
        return self

    def tier_of(self, tenant: str) -> str | None:
        """The tenant's tier; None: no tier applies, every route is allowed."""
        return self.tenants.get(tenant) or self.tenants.get("*")

    def route(self, route_id: str) -> RouteConfig:
        for r in self.routes:
            if r.id == route_id:
                return r
        raise KeyError(f"unknown route {route_id!r}")



def router_config(raw) -> RouterConfig:
    """Validates the `router:` mapping; raises ValueError naming the key (`router.routes[0].model: ...`)."""
    try:
        return RouterConfig.model_validate(raw or {})
    except ValidationError as e:
        raise config_error(e, "router") from None
