"""The `optimizer:` section of frugal.yaml: which prompt optimisation steps run for a tenant or a route.

    optimizer:
      default: {whitespace: true}
      tenants:
        acme: {dedupe: true, trim_history: {max_prompt_tokens: 3000, keep_last_turns: 8}}
      routes:
        small-model: {max_tokens_cap: 256, context: {max_tokens: 800, min_similarity: 0.25}, trim_history: false}

Precedence, per step: route over tenant over default. The most specific scope that names a step decides the
whole step (its settings are not merged field by field with a wider scope's); `false` turns a step off in a
narrower scope; a step no scope names is off. So above, a request of acme on small-model gets whitespace (default),
dedupe (tenant), no trim_history (the route's false beats the tenant's), the cap and context selection (route).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, StrictInt, ValidationError, field_validator, model_validator

from serving.control.config import _Strict, config_error

STEP_NAMES = ("whitespace", "dedupe", "context", "trim_history", "max_tokens_cap")  # also the order they run in


class TrimHistoryConfig(_Strict):
    """Drops the oldest turns whole; system messages and the last turn always stay."""

    max_prompt_tokens: int | None = Field(default=None, ge=1)  # the whole prompt's budget (chat tokens)
    keep_last_turns: int | None = Field(default=None, ge=1)  # keep at most this many of the latest turns

    @model_validator(mode="after")
    def _some_limit(self):
        if self.max_prompt_tokens is None and self.keep_last_turns is None:
            raise ValueError("trim_history needs max_prompt_tokens, keep_last_turns or both")
        return self


class ContextConfig(_Strict):
    """Selects the client's `context_chunks` by similarity to the last user message."""

    max_tokens: int = Field(ge=1)  # budget for the selected chunks, each counted as rendered ("[n] text")
    # NOTE: all-MiniLM-L6-v2 scores unrelated text around 0.0-0.2; 0.0 keeps everything the budget allows.
    min_similarity: float = Field(default=0.0, ge=-1.0, le=1.0)  # cosine similarity a chunk needs to be kept


class OptimizerSteps(_Strict):
    """The steps one scope (default, a tenant, a route) sets. None: not set here, a wider scope decides."""

    whitespace: bool | None = None  # collapse space runs and blank lines, strip trailing spaces (not in code)
    dedupe: bool | None = None  # drop system/user paragraphs repeated from an earlier system/user message
    context: ContextConfig | Literal[False] | None = None  # rank, filter and pack context_chunks
    trim_history: TrimHistoryConfig | Literal[False] | None = None  # drop the oldest turns
    max_tokens_cap: StrictInt | Literal[False] | None = None  # max_tokens is at most this

    @field_validator("context", "trim_history", "max_tokens_cap", mode="before")
    @classmethod
    def _false_or_setting(cls, value):
        if value is True:
            raise ValueError("true is not a setting: give the step's settings, or false to turn it off")
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ValueError("must be at least 1 (or false to turn the step off)")
        return value


@dataclass(frozen=True, slots=True)
class OptimizerPlan:
    """The steps one request gets, after precedence. None / False: the step does not run."""

    whitespace: bool  # collapse whitespace outside code fences
    dedupe: bool  # drop duplicated instructions
    context: ContextConfig | None  # context selection settings
    trim_history: TrimHistoryConfig | None  # history trimming settings
    max_tokens_cap: int | None  # the cap on max_tokens

    @property
    def enabled_steps(self) -> tuple[str, ...]:
        return tuple(name for name in STEP_NAMES if getattr(self, name))


class OptimizerConfig(_Strict):
    default: OptimizerSteps = Field(default_factory=OptimizerSteps)  # every request
    tenants: dict[str, OptimizerSteps] = Field(default_factory=dict)  # per tenant id; over default
    routes: dict[str, OptimizerSteps] = Field(default_factory=dict)  # per route name; over tenant and default

    def plan_for(self, tenant: str | None, route: str | None) -> OptimizerPlan:
        """The steps for a request of `tenant` on `route` (either may be None: that scope is skipped)."""
        scopes = [self.default, self.tenants.get(tenant or ""), self.routes.get(route or "")]
        resolved = {}
        for name in STEP_NAMES:
            value = None
            for scope in scopes:  # widest first, so the last scope that sets the step wins
                if scope is not None and getattr(scope, name) is not None:
                    value = getattr(scope, name)
            resolved[name] = value
        return OptimizerPlan(whitespace=bool(resolved["whitespace"]), dedupe=bool(resolved["dedupe"]),
                             context=resolved["context"] or None, trim_history=resolved["trim_history"] or None,
                             max_tokens_cap=resolved["max_tokens_cap"] or None)


def optimizer_config(raw) -> OptimizerConfig:
    """Validates the `optimizer:` mapping; raises ValueError naming the key (`optimizer.routes.x.context: ...`)."""
    try:
        return OptimizerConfig.model_validate(raw or {})
    except ValidationError as e:
        first = e.errors()[0]
        # pydantic names the union member it tried ("TrimHistoryConfig", "literal[False]"): not a key of ours.
        loc = [p for p in first["loc"] if isinstance(p, int) or not (p[:1].isupper() or "[" in p)]
        raise config_error(e, "optimizer", loc) from None
