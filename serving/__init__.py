"""frugal serving: model code, loaders and the inference engine.

NOTE: OpenMP threads must sleep while they wait (OMP_WAIT_POLICY=PASSIVE). With the default busy-wait, two
torch threads on two cores stall whenever another process holds a core (a contended forward went from 83 ms
to 1.9 s). OpenMP reads the variable once, when torch loads, so it is set here before anything imports torch.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
