import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """vLLM-backend tests run only where FRUGAL_TEST_VLLM=1 (`make test-vllm`, in the vLLM venv). There vLLM must
    import: a missing vLLM fails them rather than skipping them."""
    if os.environ.get("FRUGAL_TEST_VLLM") == "1":
        return
    skip = pytest.mark.skip(reason="the vLLM backend's tests run with FRUGAL_TEST_VLLM=1 (make test-vllm)")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def loaded_model():
    """The bundled SmolLM2-135M-Instruct, loaded once for the whole session (fp32, CPU)."""
    from serving.loaders import load_model

    return load_model(quantization="none")


@pytest.fixture(scope="session")
def hf_model(loaded_model):
    """transformers' own implementation of the same GGUF weights: the reference for greedy outputs."""
    import torch
    from transformers import AutoModelForCausalLM

    path = loaded_model.path
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture
def make_llm(loaded_model):
    """Builds an LLM on the shared weights with a small KV cache; keyword arguments are EngineConfig fields."""
    from serving import LLM

    def make(**kwargs):
        kwargs.setdefault("kv_cache_memory_bytes", 96 << 20)
        kwargs.setdefault("max_model_len", 1024)
        # NOTE: the parity tests compare with transformers on dequantized weights; packed weights have
        # their own agreement test (tests/test_quant_engine.py).
        kwargs.setdefault("quantization", "none")
        return LLM(loaded=loaded_model, **kwargs)

    return make


@pytest.fixture(scope="session")
def redis_url():
    """A real redis-server for the session (benchmarks/services.py)."""
    from benchmarks.services import redis_server

    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL cluster for the session (benchmarks/services.py)."""
    from benchmarks.services import postgres_server

    with postgres_server() as url:
        yield url
