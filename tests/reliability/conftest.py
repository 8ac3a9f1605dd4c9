"""The reliability suite: hostile input, poison requests, cancel storms, a hung step and a soak, over the real
daemon on loopback. One daemon (with fault injection armed for request ids that ask for it) serves the suite;
the watchdog test starts its own, since it ends with a dead engine.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: daemon_process
sys.path.insert(0, str(Path(__file__).resolve().parent))  # support

from daemon_process import DaemonProcess  # noqa: E402
from support import FAULTS, MAX_MODEL_LEN, REPORT, REPORT_ROWS, Daemon  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    if not REPORT:
        return
    terminalreporter.section("reliability")
    width = max(len(r) for r in REPORT_ROWS)
    terminalreporter.write_line(f"| {'measure':<{width}} | result |")
    terminalreporter.write_line(f"| {'-' * width} | ------ |")
    for row in REPORT_ROWS:
        if row in REPORT:
            terminalreporter.write_line(f"| {row:<{width}} | {REPORT[row]} |")


@pytest.fixture(scope="package")
def daemon(tmp_path_factory):
    proc = DaemonProcess(tmp_path_factory.mktemp("reliability"), http=True, env={"FRUGAL_FAULTS": FAULTS},
                         engine={"kv_cache_memory_bytes": "32MiB", "max_model_len": MAX_MODEL_LEN,
                                 "max_num_seqs": 16, "max_waiting": 128})
    proc.start()
    d = Daemon(proc)
    d.reference = d.canary()
    d.http_reference = d.http_canary()
    yield d
    d.channel.close()
    proc.stop()
    # NOTE: a bug in a handler is logged as "unhandled error"; no input may reach one.
    assert "unhandled error" not in proc.log_path.read_text(), proc.log_tail()
