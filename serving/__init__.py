"""frugal serving: model code, loaders and the inference engine.

NOTE: OpenMP threads must sleep while they wait (OMP_WAIT_POLICY=PASSIVE). With the default busy-wait, two
torch threads on two cores stall whenever another process holds a core (a contended forward went from 83 ms
to 1.9 s). OpenMP reads the variable once, when torch loads, so it is set here before anything imports torch.
On a node whose cores belong to the engine alone, a short spin before sleeping is faster (GOMP_SPINCOUNT=50000
made a 64-sequence decode step 25% faster here, and 80% slower with one core taken by another process); setting
OMP_WAIT_POLICY or GOMP_SPINCOUNT yourself keeps this default out of the way.
"""
import os

if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

from serving.engine.sampling_params import SamplingParams  # noqa: E402
from serving.engine.outputs import RequestOutput  # noqa: E402


def __getattr__(name):
    # LLM and AsyncLLM pull in torch and transformers; load them on first use.
    if name == "LLM":
        from serving.engine.llm import LLM
        return LLM
    if name == "AsyncLLM":
        from serving.engine.async_engine import AsyncLLM
        return AsyncLLM
    raise AttributeError(name)


__all__ = ["LLM", "AsyncLLM", "SamplingParams", "RequestOutput"]
