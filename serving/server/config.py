"""The daemon's configuration: a YAML file, validated at start, with command-line flags on top.

Every key is checked by name and type before anything loads, and an error names the bad key (`engine.max_waiting
must be ...`), so a typo fails the start instead of silently taking a default.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import yaml

from serving.config import EngineConfig, KVEventsConfig, WatchdogConfig
from serving.control.caches.config import CachesConfig, caches_config
from serving.control.config import ControlConfig, control_config
from serving.control.optimizer import OptimizerConfig, optimizer_config
from serving.control.router.config import RouterConfig, router_config
from serving.engine.kv_events import topic_for
from serving.limits import RequestLimits
from serving.metrics.config import MetricsConfig
from serving.server.models import ModelEntry, derived_routes, models_config

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_BYTE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
# NOTE: an unbounded queue hides overload until latency explodes; 256 waiting requests is minutes of work here.
DEFAULT_MAX_WAITING = 256


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


@dataclass(slots=True, kw_only=True)
class ServeConfig:
    model: str | None = None  # GGUF file or HF directory; None: the bundled SmolLM2-135M-Instruct
    served_model_name: str | None = None  # the id clients send as `model`; None: the model file's stem
    host: str = "127.0.0.1"  # address both servers bind
    grpc_port: int = 50051  # gRPC port; 0 picks a free one
    http_port: int | None = 8000  # OpenAI-compatible HTTP port; None: no HTTP server
    drain_grace_s: float = 30.0  # on SIGTERM, how long accepted requests may still run before they are cancelled
    retry_after_ms: int = 1000  # retry hint sent with a queue-full refusal
    log_level: str = "INFO"  # one of DEBUG, INFO, WARNING, ERROR, CRITICAL
    tokenizer_workers: int = 2  # threads that tokenize and template prompts off the event loop
    engine: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields (validated), without `model`
    limits: RequestLimits = field(default_factory=RequestLimits)  # what one request may ask for
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)  # when the engine is declared dead
    control: ControlConfig = field(default_factory=ControlConfig)  # keys, budgets, prices, the ledger
    kv_events: KVEventsConfig = field(default_factory=KVEventsConfig)  # prefix-cache events for routers
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # /metrics and the saturation signal
    caches: CachesConfig = field(default_factory=CachesConfig)  # exact and semantic response caches
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  # prompt and context steps per tenant/route
    models: list[ModelEntry] = field(default_factory=list)  # every served model; empty: the one of `model`
    router: RouterConfig | None = None  # routes over `models`; None: one model, nothing to route

    def model_engine_config(self, entry: ModelEntry, path: str) -> EngineConfig:
        """The engine of one self-hosted entry of `models:`: the `engine:` section with the entry's own keys on top."""
        _check_keys(entry.engine, {k: c for k, c in _ENGINE.items() if k in _ENGINE_FIELDS}, f"models[{entry.id}].engine.")
        own = {key: _ENGINE[key](f"models[{entry.id}].engine.{key}", value) for key, value in entry.engine.items()}
        kwargs = {"max_waiting": DEFAULT_MAX_WAITING, **self.engine, **own}
        kv_events = self.kv_events
        if kv_events.enabled and entry is not self.models[0]:
            kv_events = dataclasses.replace(kv_events, enabled=False)  # NOTE: one PUB socket: the primary's
        elif kv_events.topic is None:
            kv_events = dataclasses.replace(kv_events, topic=topic_for(entry.id))
        try:
            return EngineConfig(model=path, kv_events=kv_events, **kwargs)
        except ValueError as e:
            raise ConfigError(f"models[{entry.id}].engine.{e}") from e

    def engine_config(self) -> EngineConfig:
        kwargs = {"max_waiting": DEFAULT_MAX_WAITING, **self.engine}
        kv_events = self.kv_events
        if kv_events.topic is None and self.served_model_name is not None:  # routers key the cache by this name
            kv_events = dataclasses.replace(kv_events, topic=topic_for(self.served_model_name))
        try:
            return EngineConfig(model=self.model, kv_events=kv_events, **kwargs)
        except ValueError as e:  # EngineConfig's messages start with the field name
            raise ConfigError(f"engine.{e}") from e


# -- checks: each takes (key, value) and returns the normalised value or raises ConfigError naming the key --
def _int(minimum: int, none_ok: bool = False, maximum: int | None = None) -> Callable:
    def check(key, value):
        if value is None and none_ok:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum or \
                (maximum is not None and value > maximum):
            bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
            raise ConfigError(f"{key} must be an integer {bound}{' or null' if none_ok else ''}, got {value!r}")
        return value
    return check


def _number(minimum: float) -> Callable:
    def check(key, value):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < minimum:
            raise ConfigError(f"{key} must be a number >= {minimum}, got {value!r}")
        return float(value)
    return check


def _str(none_ok: bool = False, choices: tuple[str, ...] | None = None) -> Callable:
    def check(key, value):
        if value is None and none_ok:
            return None
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key} must be a non-empty string{' or null' if none_ok else ''}, got {value!r}")
        if choices is not None:
            if value.upper() not in choices:
                raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
            return value.upper()
        return value
    return check


def _bool(key, value):
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _bytes(key, value):
    """An integer, or a string with a unit: '96MiB', '2GiB', '512MB'."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", value)
        if match and match.group(2).upper() in _BYTE_UNITS:
            value = int(match.group(1)) * _BYTE_UNITS[match.group(2).upper()]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key} must be a positive number of bytes (e.g. 268435456 or '256MiB'), got {value!r}")
    return value


def _names(key, value):
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key} must be a list of non-empty strings, got {value!r}")
    return list(value)


def _weights(key, value):
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0
            for k, w in value.items()):
        raise ConfigError(f"{key} must map tenant ids to positive numbers, got {value!r}")
    return {k: float(w) for k, w in value.items()}


_PORT = _int(0, maximum=65535)
_TOP_LEVEL: dict[str, Callable] = {
    "model": _str(none_ok=True),
    "served_model_name": _str(none_ok=True),
    "host": _str(),
    "grpc_port": _PORT,
    "http_port": _int(0, none_ok=True, maximum=65535),
    "drain_grace_s": _number(0.0),
    "retry_after_ms": _int(0),
    "log_level": _str(choices=_LOG_LEVELS),
    "tokenizer_workers": _int(1, maximum=64),
}
_LIMITS: dict[str, Callable] = {
    "max_body_bytes": _bytes,
    "max_grpc_message_bytes": _bytes,
    "max_prompt_chars": _int(1),
    "max_messages": _int(1),
    "max_stop_strings": _int(1),
    "max_stop_string_chars": _int(1),
    "max_stop_token_ids": _int(1),
    "max_choices": _int(1),
    "max_logprobs": _int(1, maximum=20),
}
_WATCHDOG: dict[str, Callable] = {
    "stall_timeout_s": _number(0.001),
    "max_consecutive_failed_steps": _int(1),
    "interval_s": _number(0.001),
    "exit_after_s": _number(0.0),
}
_METRICS: dict[str, Callable] = {
    "enabled": _bool,
    "target_queue_depth": _number(0.001),
    "kv_cache_usage_target": _number(0.001),
    "tenants": _names,
    "workflows": _names,
    "max_label_values": _int(1),
}
# Sections built into their own dataclass: key -> (checks, type)
_SECTIONS = {"limits": (_LIMITS, RequestLimits), "watchdog": (_WATCHDOG, WatchdogConfig),
             "metrics": (_METRICS, MetricsConfig)}
_KV_EVENTS: dict[str, Callable] = {
    "enabled": _bool,
    "endpoint": _str(),
    "replay_endpoint": _str(none_ok=True),
    "topic": _str(none_ok=True),
    "max_queue_size": _int(1),
    "buffer_steps": _int(1),
    "hwm": _int(0),
    "include_salt": _bool,
}
_SECTIONS["kv_events"] = (_KV_EVENTS, KVEventsConfig)
_ENGINE: dict[str, Callable] = {
    "max_num_seqs": _int(1),
    "max_num_batched_tokens": _int(1),
    "kv_cache_memory_bytes": _bytes,
    "max_model_len": _int(2, none_ok=True),
    "enable_prefix_caching": _bool,
    "enable_chunked_prefill": _bool,
    "max_waiting": _int(1, none_ok=True),
    "block_size": _int(1),
    "dtype": _str(),
    "quantization": _str(),
    "quant_cpu_path": _str(),
    "device": _str(),
    "num_threads": _int(1, none_ok=True),
    "tenant_weights": _weights,
    "backend": _str(),
}


_ENGINE_FIELDS = {f.name for f in fields(EngineConfig)} - {"model"}  # `model` is a top-level key


def _check_keys(section: dict, allowed: dict, prefix: str) -> None:
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(prefix + str(k) for k in unknown)}; allowed: "
                          f"{', '.join(prefix + k for k in allowed)}")


def config_from_dict(raw: dict, overrides: dict | None = None) -> ServeConfig:
    """Validates a parsed YAML mapping, then applies overrides (command-line flags; None means not given)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the configuration must be a mapping of keys to values, got {type(raw).__name__}")
    _check_keys(raw, {**_TOP_LEVEL, "engine": None, **_SECTIONS, "control": None, "caches": None,
                      "optimizer": None, "models": None, "router": None}, "")
    values = {key: _TOP_LEVEL[key](key, value) for key, value in raw.items() if key in _TOP_LEVEL}
    for name, (checks, cls) in _SECTIONS.items():
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{name} must be a mapping, got {section!r}")
        _check_keys(section, checks, f"{name}.")
        kwargs = {key: checks[key](f"{name}.{key}", value) for key, value in section.items()}
        try:
            values[name] = cls(**kwargs)
        except ValueError as e:  # the dataclass's own cross-field checks name the field
            raise ConfigError(f"{name}.{e}") from e
    try:
        values["control"] = control_config(raw.get("control"))
    except ValueError as e:  # pydantic's error, already naming the key
        raise ConfigError(str(e)) from None
    try:
        values["caches"] = caches_config(raw.get("caches"))
        values["optimizer"] = optimizer_config(raw.get("optimizer"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        values["models"] = models_config(raw.get("models"))
        values["router"] = _router(raw.get("router"), values["models"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if values["models"] and (raw.get("model") is not None or raw.get("served_model_name") is not None):
        raise ConfigError("model and served_model_name must be null when models: lists the served models")
    engine = raw.get("engine") or {}
    if not isinstance(engine, dict):
        raise ConfigError(f"engine must be a mapping of engine settings, got {engine!r}")
    _check_keys(engine, {k: check for k, check in _ENGINE.items() if k in _ENGINE_FIELDS}, "engine.")
    values["engine"] = {key: _ENGINE[key](f"engine.{key}", value) for key, value in engine.items()}
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _TOP_LEVEL[key](key, value)
    config = ServeConfig(**values)
    if config.model is not None and not os.path.exists(os.path.expanduser(config.model)):
        raise ConfigError(f"model: no such file or directory: {config.model}")
    if config.http_port is not None and config.http_port == config.grpc_port and config.grpc_port != 0:
        raise ConfigError(f"http_port and grpc_port must differ, both are {config.grpc_port}")
    config.engine_config()  # the engine's own checks (dtype, device names), with the key named
    for entry in config.models:
        if entry.path is not None and not os.path.exists(os.path.expanduser(entry.path)):
            raise ConfigError(f"models[{entry.id}].path: no such file or directory: {entry.path}")
        if not entry.external:
            config.model_engine_config(entry, entry.path or entry.package)
    return config


def _router(raw, models: list[ModelEntry]) -> RouterConfig | None:
    """The router over `models:`: its routes default to one per model, and every self-hosted route must name a
    served model. None when there is nothing to route (no router section and fewer than two models)."""
    if raw is None and len(models) < 2:
        return None
    if raw is not None and not isinstance(raw, dict):
        raise ValueError(f"router must be a mapping, got {type(raw).__name__}")
    raw = dict(raw or {})
    if not raw.get("routes"):
        if not models:
            raise ValueError("router.routes: give the routes, or list the served models under models:")
        raw["routes"] = derived_routes(models)
    config = router_config(raw)
    served = {e.route_model for e in models}
    for i, route in enumerate(config.routes):
        if models and route.model not in served:
            raise ValueError(f"router.routes[{i}].model: {route.model!r} is not one of the models: "
                             f"{', '.join(sorted(served))}")
    return config


def load_config(path: str | None, overrides: dict | None = None) -> ServeConfig:
    """Reads and validates the YAML file at `path` (None: built-in defaults). Raises ConfigError."""
    raw: Any = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
        raw = {} if raw is None else raw
    try:
        return config_from_dict(raw, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
