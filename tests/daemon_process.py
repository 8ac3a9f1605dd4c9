"""The daemon tests' name for benchmarks/daemon.py (the real `frugal serve` on free loopback ports)."""
from benchmarks.daemon import REPO_ROOT, START_TIMEOUT_S, DaemonProcess, free_port, http_app_available

__all__ = ["REPO_ROOT", "START_TIMEOUT_S", "DaemonProcess", "free_port", "http_app_available"]
