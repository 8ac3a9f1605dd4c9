"""Prometheus metrics of the daemon: the engine's (vLLM v1 names and meaning under `frugal:`), the control plane's
(cost, refusals, budgets, outcomes), the GPU's and the `frugal:saturation` autoscaling signal. `Metrics`
(serving/metrics/registry.py) owns one registry per daemon, rendered by GET /metrics on the HTTP port."""
