"""Engine configuration: one slots dataclass that validates itself and names the bad field."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

_DTYPES = ("float32", "bfloat16", "float16")
_DEVICES = ("cpu", "cuda")
_BACKENDS = ("native", "vllm")  # native: frugal's own engine; vllm: vLLM's (serving/engine/vllm/)
_QUANTIZATIONS = ("none", "auto", "int4-g32", "int4-g64", "int4-g128", "int8")  # serving/quant/install.py
_QUANT_CPU_PATHS = ("auto", "w4a8", "kernel", "fbgemm", "int4pack", "dequant")  # serving/quant/linear.py
_ZMQ_TRANSPORTS = ("tcp://", "ipc://", "inproc://")


@dataclass(slots=True, kw_only=True)
class KVEventsConfig:
    """Prefix-cache events on a ZMQ PUB socket, in vLLM's format (serving/engine/kv_events.py), for routers such
    as llm-d's precise prefix-cache scorer. Names follow vLLM's --kv-events-config."""

    enabled: bool = False  # publish events; off: nothing is recorded and no socket is opened
    # PUB address; with "*" (tcp://*:5557), "::", ipc:// or inproc:// it binds, otherwise it connects (vLLM's
    # rule, so a subscriber that binds, tcp://indexer:5557, works too)
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None  # ROUTER address serving missed batches from a sequence number; None: none
    # ZMQ topic of every message; None: "kv@<hostname>@<served model name>", the form llm-d parses
    topic: str | None = None
    max_queue_size: int = 10_000  # batches waiting for the publisher thread; when full the oldest is dropped
    buffer_steps: int = 10_000  # batches kept for replay
    hwm: int = 100_000  # ZMQ send high-water mark of the PUB socket (messages); 0: unbounded
    # put each block's hash salt (the tenant, or the client's cache salt) in the event's extra_keys
    include_salt: bool = False

    def __post_init__(self):
        for name in ("enabled", "include_salt"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _check_zmq_address("endpoint", self.endpoint)
        if self.replay_endpoint is not None:
            _check_zmq_address("replay_endpoint", self.replay_endpoint)
        if self.replay_endpoint == self.endpoint and not self.endpoint.endswith(":*"):  # ":*": any free port
            raise ValueError(f"replay_endpoint must differ from endpoint, both are {self.endpoint!r}")
        if self.topic is not None and not isinstance(self.topic, str):
            raise ValueError(f"topic must be a string or None, got {self.topic!r}")
        for name, minimum in (("max_queue_size", 1), ("buffer_steps", 1), ("hwm", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(slots=True, kw_only=True)
class EngineConfig:
    model: str | None = None  # GGUF file or HF directory; None: the bundled SmolLM2-135M-Instruct
    dtype: str = "float32"  # compute dtype; fp32 is the fast one on CPUs without bf16 units
    device: str = "cpu"  # "cpu" or "cuda" (or "cuda:N")
    # weight quantization: "none" dequantizes to `dtype`; "auto" keeps GGUF Q4_0/Q4_1/Q8_0 and our quantized
    # checkpoints packed (other GGUF quant types become int4-g32); "int4-g32|g64|g128"/"int8" quantize at load
    quantization: str = "auto"
    # matmul path of packed layers on the CPU (serving/quant/linear.py): "auto" takes int8 activations with integer
    # dot products ("w4a8", the fastest, each row rounded on its own) where they meet the greedy-agreement gate
    # against fp32 (serving/quant/path_gate.py); "kernel" keeps fp32 activations (exact to the dequantized weights)
    quant_cpu_path: str = "auto"
    block_size: int = 16  # tokens per KV block
    kv_cache_memory_bytes: int = 2 << 30  # memory budget of the paged KV cache; the block pool is sized from it
    max_num_seqs: int = 64  # most sequences in one step
    max_num_batched_tokens: int = 512  # token budget of one step
    max_model_len: int | None = None  # context length; None: the model's own, capped at 8192
    enable_prefix_caching: bool = True  # reuse KV blocks of shared prefixes
    enable_chunked_prefill: bool = True  # split long prompts across steps
    max_waiting: int | None = None  # bounded waiting queue (backpressure); None: unbounded
    num_threads: int | None = None  # torch intra-op threads; None: the CPUs this process may use
    tenant_weights: dict[str, float] = field(default_factory=dict)  # fair-share weights per tenant
    kv_events: KVEventsConfig = field(default_factory=KVEventsConfig)  # prefix-cache events for routers
    backend: str = "native"  # "native" (frugal's engine) or "vllm" (vLLM's, with frugal's scheduling policy)

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.device.split(":")[0] not in _DEVICES:
            raise ValueError(f"device must be one of {', '.join(_DEVICES)} (optionally cuda:N), got {self.device!r}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(_BACKENDS)}, got {self.backend!r}")
        if self.quantization not in _QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(_QUANTIZATIONS)}, got {self.quantization!r}")
        if self.quant_cpu_path not in _QUANT_CPU_PATHS:
            raise ValueError(f"quant_cpu_path must be one of {', '.join(_QUANT_CPU_PATHS)}, "
                             f"got {self.quant_cpu_path!r}")
        for name in ("block_size", "kv_cache_memory_bytes", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads < 1):
            raise ValueError(f"num_threads must be a positive integer, got {self.num_threads!r}")
        if self.model is not None and not isinstance(self.model, str):
            raise ValueError(f"model must be a path string, got {self.model!r}")
        if not isinstance(self.kv_events, KVEventsConfig):
            raise ValueError(f"kv_events must be a KVEventsConfig, got {type(self.kv_events).__name__}")
        if self.backend == "vllm" and self.kv_events.enabled:
            raise ValueError("backend: vllm publishes vLLM's own KV events (its kv_events_config); turn kv_events off")


def _check_zmq_address(name: str, value: object) -> None:
    transport = value.split("://", 1)[0] + "://" if isinstance(value, str) else None
    if transport not in _ZMQ_TRANSPORTS or value == transport:
        raise ValueError(f"{name} must be a ZMQ address starting with {', '.join(_ZMQ_TRANSPORTS)} "
                         f"(e.g. tcp://*:5557), got {value!r}")


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(slots=True, kw_only=True)
class WatchdogConfig:
    # NOTE: a whole step (a 512-token prefill of a 7B model on a CPU) can take tens of seconds; a minute without
    # any progress while work waits is a hang, not a slow step.
    stall_timeout_s: float = 60.0  # work waits and no step made progress for this long: dead
    max_consecutive_failed_steps: int = 5  # this many failed steps in a row: dead
    interval_s: float = 0.25  # how often the watchdog looks
    exit_after_s: float = 10.0  # the daemon exits this long after the engine died (probes fail meanwhile)

    def __post_init__(self):
        for name in ("stall_timeout_s", "interval_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        if not isinstance(self.exit_after_s, (int, float)) or isinstance(self.exit_after_s, bool) \
                or self.exit_after_s < 0:
            raise ValueError(f"exit_after_s must be a number >= 0, got {self.exit_after_s!r}")
        n = self.max_consecutive_failed_steps
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"max_consecutive_failed_steps must be an integer >= 1, got {n!r}")
