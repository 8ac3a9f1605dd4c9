"""Real Redis, PostgreSQL and Prometheus servers for the tests and benchmarks, on free loopback ports.

`make test` installs the Debian packages (redis-server, postgresql, prometheus); a missing binary is a test failure, not a
skip. PostgreSQL refuses to run as root, so as root its cluster belongs to the `postgres` user.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str, dirs=()) -> str:
    for d in dirs:
        if (d / name).exists():
            return str(d / name)
    path = shutil.which(name)
    assert path, f"{name} is not installed (`make services` installs it, with redis-server, postgresql and prometheus)"
    return path


@contextlib.contextmanager
def redis_server():
    """Yields redis://127.0.0.1:PORT/0 of a fresh server without persistence."""
    port = free_port()
    proc = subprocess.Popen([_binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def postgres_server():
    """Yields postgresql+psycopg://postgres@127.0.0.1:PORT/postgres of a fresh cluster."""
    port = free_port()
    root = Path(tempfile.mkdtemp(prefix="frugal-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    initdb, pg_ctl = _binary("initdb", PG_BIN_DIRS), _binary("pg_ctl", PG_BIN_DIRS)
    subprocess.run(_as_postgres([initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8"]),
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200"
    subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-o", options, "-w", "-t", "60", "-l",
                                 str(root / "log"), "start"]), check=True, stdout=subprocess.DEVNULL)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"]),
                       stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def prometheus_server(targets: list[str], scrape_interval_s: float = 1.0):
    """Yields http://127.0.0.1:PORT of a fresh Prometheus scraping `targets` ("host:port", path /metrics)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="frugal-prom-") as tmp:
        config = Path(tmp) / "prometheus.yml"
        config.write_text(
            "global:\n"
            f"  scrape_interval: {int(scrape_interval_s * 1000)}ms\n"
            f"  scrape_timeout: {int(scrape_interval_s * 1000)}ms\n"
            "scrape_configs:\n"
            "  - job_name: frugal\n"
            "    metrics_path: /metrics\n"
            f"    static_configs: [{{targets: [{', '.join(repr(t) for t in targets)}]}}]\n")
        log = open(Path(tmp) / "prometheus.log", "wb")
        proc = subprocess.Popen([_binary("prometheus"), f"--config.file={config}",
                                 f"--storage.tsdb.path={Path(tmp) / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            import httpx

            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                        break
                assert proc.poll() is None and time.monotonic() < deadline, \
                    f"prometheus did not start: {(Path(tmp) / 'prometheus.log').read_text()[-2000:]}"
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=20)
            log.close()
