"""`frugal:saturation`: how close one replica is to the load it should carry, the signal an HPA or KEDA scales on.

    saturation = max(num_requests_waiting / target_queue_depth, kv_cache_usage / kv_cache_usage_target)

1.0 means the replica is at its target; an HPA with a pods metric target of averageValue 1 then keeps
`ceil(replicas * mean saturation)` replicas. Queue depth is the main input: requests that wait are latency users
feel, and it is what the field scales LLM servers on. KV usage is secondary: running requests hold blocks, so
usage alone stays under its target on a healthy replica and only lifts the signal when the pool nears full (the
moment new requests start to queue or preemptions begin). GPU memory is no input (engines pre-allocate it) and
GPU utilisation none either (a replica can be busy and still keep up).
"""
from __future__ import annotations


def saturation(num_waiting: int, kv_cache_usage: float, target_queue_depth: float,
               kv_cache_usage_target: float) -> float:
    return max(num_waiting / target_queue_depth, kv_cache_usage / kv_cache_usage_target)
