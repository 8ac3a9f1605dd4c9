"""External routes: clients for upstream OpenAI-compatible APIs (a hosted provider, or another frugal daemon)."""
from serving.control.upstream.circuit import CircuitBreaker, CircuitState
from serving.control.upstream.client import UpstreamClient, UpstreamResult
from serving.control.upstream.config import CircuitConfig, TimeoutConfig, UpstreamRoute, upstream_routes
from serving.control.upstream.errors import KINDS, UpstreamError
from serving.control.upstream.stream import StreamChunk, UpstreamStream
from serving.control.upstream.usage import UpstreamUsage

__all__ = ["CircuitBreaker", "CircuitConfig", "CircuitState", "KINDS", "StreamChunk", "TimeoutConfig",
           "UpstreamClient", "UpstreamError", "UpstreamResult", "UpstreamRoute", "UpstreamStream", "UpstreamUsage",
           "upstream_routes"]
