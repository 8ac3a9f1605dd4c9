"""Shared by the HTTP tests: the app around a real AsyncLLM, served by uvicorn on a free loopback port in a thread,
so OpenAI's own client talks to it over real HTTP."""
from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass

import openai
import uvicorn

from serving.config import EngineConfig
from serving.control.config import control_config
from serving.control.plane import ControlPlane
from serving.engine.async_engine import AsyncLLM
from serving.engine.llm_engine import LLMEngine
from serving.engine.tokenizer_pool import TokenizerPool
from serving.http.app import create_app
from serving.limits import RequestLimits
from serving.server_state import ServerState

MODEL_NAME = "smollm2-135m-instruct"


@dataclass
class Served:
    state: ServerState  # the state the app serves from; tests flip `draining` on it
    base_url: str  # http://127.0.0.1:PORT

    @property
    def engine(self):
        return self.state.async_llm.engine

    def client(self, **kwargs) -> openai.OpenAI:
        # No retries: a test that expects a 429 or 503 must see it, not the client's backoff.
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, timeout=120,
                             **kwargs)

    def wait_idle(self, timeout: float = 20.0) -> bool:
        """True once the engine tracks no request and every KV block is free (aborts travel asynchronously)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.engine.has_unfinished_requests() and \
                    self.engine.stats().num_free_blocks == self.engine.num_blocks:
                return True
            time.sleep(0.02)
        return False


@contextlib.contextmanager
def serve(loaded_model, limits: RequestLimits | None = None, control: dict | None = None, **engine_config):
    """Yields a `Served` app on its own engine; keyword arguments are EngineConfig fields, `control` the
    control plane's config (its ledger goes to a temporary directory unless it says otherwise)."""
    engine_config.setdefault("kv_cache_memory_bytes", 96 << 20)
    engine_config.setdefault("max_model_len", 1024)
    async_llm = AsyncLLM(engine=LLMEngine(EngineConfig(**engine_config), loaded=loaded_model))
    data_dir = tempfile.mkdtemp(prefix="frugal-http-test-")
    accounting = async_llm.engine.accounting
    plane = ControlPlane.open(control_config({"data_dir": data_dir, **(control or {})}), MODEL_NAME,
                              solo_s_per_token=lambda: accounting.solo_s_per_token,
                              busy_s=lambda: accounting.totals.step_time_s)
    state = ServerState(async_llm=async_llm, tokenizers=TokenizerPool(async_llm.tokenizer), control=plane,
                        model_name=MODEL_NAME, max_model_len=async_llm.engine.max_model_len,
                        limits=limits or RequestLimits(), ready=True)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield Served(state=state, base_url=f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        async_llm.shutdown()
        state.tokenizers.close()
        plane.ledger.close()
        plane.db.dispose()
        shutil.rmtree(data_dir, ignore_errors=True)
