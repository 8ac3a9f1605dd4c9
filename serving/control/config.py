"""The `control:` section of frugal.yaml: keys, storage, prices, budgets and agent limits, validated by pydantic.

Every model forbids unknown keys, so a typo fails the start; `control_config` turns pydantic's errors into one
message that names the key (`control.budgets[0].period: ...`).
"""
from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_DATA_DIR = os.path.join("~", ".local", "share", "frugal")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelPrice(_Strict):
    """A model's price: by accelerator time (self-hosted), or by tokens (a priced API, or a fixed internal rate)."""

    usd_per_hour: float | None = Field(default=None, ge=0)  # the accelerator's price while this model runs
    usd_per_m_input: float | None = Field(default=None, ge=0)  # per million prompt tokens not served from cache
    usd_per_m_cached_input: float | None = Field(default=None, ge=0)  # per million cached prompt tokens
    usd_per_m_output: float | None = Field(default=None, ge=0)  # per million generated tokens

    @model_validator(mode="after")
    def _one_method(self):
        by_tokens = self.usd_per_m_input is not None or self.usd_per_m_output is not None
        if by_tokens and self.usd_per_hour is not None:
            raise ValueError("give usd_per_hour or the usd_per_m_* token prices, not both")
        if not by_tokens and self.usd_per_hour is None:
            raise ValueError("give usd_per_hour, or usd_per_m_input and usd_per_m_output")
        if by_tokens and (self.usd_per_m_input is None or self.usd_per_m_output is None):
            raise ValueError("token pricing needs both usd_per_m_input and usd_per_m_output")
        return self

    @property
    def by_tokens(self) -> bool:
        return self.usd_per_hour is None


class PricingConfig(_Strict):
    self_hosted_usd_per_hour: float = Field(default=2.50, ge=0)  # the accelerator's price, unless a model has its own
    models: dict[str, ModelPrice] = Field(default_factory=dict)  # per served model id


class FallbackConfig(_Strict):
    max_tokens: int = Field(ge=1)  # a soft budget past its limit caps the request's max_tokens at this


class BudgetConfig(_Strict):
    scope: Literal["tenant", "workflow", "task"]  # what the id names
    id: str = Field(min_length=1)  # the tenant / workflow / task id; "*" gives every id a budget of its own
    usd: float | None = Field(default=None, gt=0)  # money limit over the period
    tokens: int | None = Field(default=None, gt=0)  # prompt + completion tokens (cached included) over the period
    period: Literal["day", "month", "total"] = "day"  # UTC calendar day or month, or forever
    mode: Literal["hard", "soft"] = "hard"  # hard refuses; soft logs, counts and applies the fallback
    fallback: FallbackConfig | None = None  # soft only: what to do past the limit

    @model_validator(mode="after")
    def _limits(self):
        if self.usd is None and self.tokens is None:
            raise ValueError("a budget needs usd, tokens or both")
        if self.fallback is not None and self.mode != "soft":
            raise ValueError("fallback applies to soft budgets only")
        return self

    @property
    def name(self) -> str:
        return f"{self.scope} {self.id}"


class TaskLimits(_Strict):
    """Agent budgets: what one task id (an agent run) may use in all."""

    max_calls: int | None = Field(default=None, ge=1)  # model calls
    max_tool_calls: int | None = Field(default=None, ge=1)  # tool calls the client reports
    max_tokens: int | None = Field(default=None, ge=1)  # prompt + completion tokens over all its calls
    max_wall_s: float | None = Field(default=None, gt=0)  # seconds since the task's first call


class TenantLimits(_Strict):
    rpm: int | None = Field(default=None, ge=1)  # requests per minute over all the tenant's keys
    tpm: int | None = Field(default=None, ge=1)  # tokens per minute (prompt + max_tokens, settled to the real count)


class ControlConfig(_Strict):
    auth: Literal["none", "keys"] = "none"  # none: every caller is tenant "default"; keys: Bearer API keys
    database_url: str | None = None  # None: SQLite (WAL) at data_dir/frugal.db; or postgresql+psycopg://...
    redis_url: str | None = None  # counters shared by several replicas; None: in this process
    data_dir: str = DEFAULT_DATA_DIR  # where the SQLite ledger lives
    pricing: PricingConfig = Field(default_factory=PricingConfig)
    budgets: list[BudgetConfig] = Field(default_factory=list)
    tasks: TaskLimits = Field(default_factory=TaskLimits)
    tenants: dict[str, TenantLimits] = Field(default_factory=dict)  # rate limits per tenant; "*" for every tenant
    reservation_ttl_s: float = Field(default=900.0, gt=0)  # a reservation a crashed replica left expires after this
    key_cache_s: float = Field(default=2.0, ge=0)  # how long an authenticated key is trusted before a re-check

    @model_validator(mode="after")
    def _unique_budgets(self):
        seen = set()
        for b in self.budgets:
            key = (b.scope, b.id, b.period)
            if key in seen:
                raise ValueError(f"two budgets for {b.scope} {b.id!r} over the same period ({b.period})")
            seen.add(key)
        return self

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return "sqlite:///" + os.path.join(os.path.abspath(os.path.expanduser(self.data_dir)), "frugal.db")

    def price_of(self, model: str) -> ModelPrice:
        return self.pricing.models.get(model) or ModelPrice(usd_per_hour=self.pricing.self_hosted_usd_per_hour)


def config_error(e: ValidationError, prefix: str, loc=None) -> ValueError:
    """pydantic's first error as one line naming the key (`control.budgets[0].period: ...`), for every section
    of frugal.yaml validated with pydantic. `loc`: the error's location, when the caller filtered it."""
    first = e.errors()[0]
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in (first["loc"] if loc is None else loc))
    message = first["msg"].removeprefix("Value error, ")
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return ValueError(f"{prefix}{path}: {message}{more}")


def control_config(raw) -> ControlConfig:
    """Validates the `control:` mapping; raises ValueError naming the key (`control.budgets[0].period: ...`)."""
    try:
        return ControlConfig.model_validate(raw or {})
    except ValidationError as e:
        raise config_error(e, "control") from None
