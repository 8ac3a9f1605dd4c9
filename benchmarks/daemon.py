"""Starts the real `frugal serve` as a subprocess on free loopback ports, for the daemon tests and the benchmarks
that need a whole daemon (benchmarks/cost.py)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 300  # model load plus, on a fresh machine, the first CPU-kernel build


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_app_available() -> bool:
    try:
        import serving.http.app  # noqa: F401
    except Exception:
        return False
    return True


class DaemonProcess:
    """One daemon: a temp YAML config, a log file, start / wait until SERVING / stop."""

    def __init__(self, workdir: Path, engine: dict, http: bool = False, env: dict | None = None,
                 **top_level) -> None:
        self.extra_env = env or {}  # added to the daemon's environment
        self.grpc_port = free_port()
        self.http_port = free_port() if http else None
        self.target = f"127.0.0.1:{self.grpc_port}"
        control = {"data_dir": str(workdir), **top_level.pop("control", {})}  # the ledger stays in the test's dir
        config = {"host": "127.0.0.1", "grpc_port": self.grpc_port, "http_port": self.http_port,
                  "log_level": "INFO", **top_level, "engine": engine, "control": control}
        self.config_path = workdir / "frugal.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "DaemonProcess":
        self.launch()
        self.wait_serving()
        return self

    def launch(self) -> "DaemonProcess":
        """Starts the process without waiting for it (several daemons load their models side by side)."""
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
               **self.extra_env}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", "--config",
                                          str(self.config_path)], cwd=REPO_ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
        return self

    def log_tail(self, num_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:]

    def health(self, service: str = "", timeout: float = 2.0) -> int:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status

    def wait_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.health() == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass  # not listening yet
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"daemon not SERVING after {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no drain, no flush, as a crash."""
        self.proc.kill()
        self.proc.wait(timeout=30)

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time; safe to call twice."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
