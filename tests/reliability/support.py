"""What the reliability tests share: the daemon wrapper, the canary, the leak check and the report table.

Every test adds its figures to `REPORT`; conftest.py prints the table at the end of the run (the README quotes
it).
"""
from __future__ import annotations

import time

import grpc
import httpx

from serving.rpc.gen.frugal.v1 import inference_pb2 as pb
from serving.rpc.gen.frugal.v1 import inference_pb2_grpc as pb_grpc

# Request ids with these prefixes fail on purpose inside the shared daemon (serving/engine/faults.py).
POISON_SAMPLE, POISON_DETOKENIZE = "poison-sample-", "poison-detok-"
FAULTS = f"sample={POISON_SAMPLE},detokenize={POISON_DETOKENIZE}"
# NOTE: a short context keeps every fuzzed request to a few dozen tokens, so the fuzzers try many inputs.
MAX_MODEL_LEN = 128
CANARY_PROMPT = "The capital of France is"

REPORT: dict[str, str] = {}  # row name -> figure, in the order the README table shows them
REPORT_ROWS = [
    "HTTP inputs fuzzed (schemathesis)",
    "gRPC requests fuzzed (hypothesis)",
    "answers that were 5xx / UNKNOWN / INTERNAL / UNAVAILABLE",
    "poison requests sent",
    "honest requests harmed",
    "requests cancelled, timed out or disconnected",
    "requests left in the engine",
    "KV blocks leaked",
    "soak: requests, error rate",
    "soak: RSS growth after warm-up",
    "watchdog: hung step to NOT_SERVING",
]


def report(row: str, value) -> None:
    assert row in REPORT_ROWS, row
    REPORT[row] = str(value)


def add_count(row: str, n: int) -> None:
    REPORT[row] = str(int(REPORT.get(row, "0")) + n)


class Daemon:
    """The shared daemon and the clients the tests use on it."""

    def __init__(self, proc):
        self.proc = proc
        self.channel = grpc.insecure_channel(proc.target)
        self.stub = pb_grpc.InferenceServiceStub(self.channel)
        self.debug = pb_grpc.DebugServiceStub(self.channel)
        self.http_url = f"http://127.0.0.1:{proc.http_port}"

    def stats(self) -> pb.EngineStats:
        return self.debug.GetEngineStats(pb.GetEngineStatsRequest(), timeout=10)

    def wait_idle(self, timeout: float = 30.0) -> pb.EngineStats:
        """Waits until no request is held anywhere and every KV block is back in the free queue; returns the
        stats then. Aborts travel to the engine asynchronously, so this polls."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if s.num_unfinished == 0 and s.num_running == 0 and s.num_waiting == 0 and s.num_streams == 0 \
                    and s.num_free_blocks == s.num_total_blocks:
                return s
            if time.monotonic() > deadline:
                return s
            time.sleep(0.05)

    def canary(self) -> tuple[str, list[int]]:
        """A plain greedy request: its answer must never change, whatever came before."""
        resp = self.stub.Generate(pb.GenerateRequest(prompt=CANARY_PROMPT, sampling=pb.SamplingParams(
            max_tokens=12, temperature=0.0)), timeout=60)
        return resp.text, list(resp.token_ids)

    def http_canary(self) -> str:
        resp = httpx.post(f"{self.http_url}/v1/completions", timeout=60,
                          json={"prompt": CANARY_PROMPT, "max_tokens": 12, "temperature": 0})
        assert resp.status_code == 200, resp.text
        return resp.json()["choices"][0]["text"]


def assert_clean(daemon: Daemon) -> pb.EngineStats:
    """Nothing held, nothing leaked, engine healthy; records the counts for the report."""
    s = daemon.wait_idle()
    leaked = s.num_total_blocks - s.num_free_blocks
    report("requests left in the engine", max(int(REPORT.get("requests left in the engine", "0")),
                                              s.num_unfinished + s.num_streams))
    report("KV blocks leaked", max(int(REPORT.get("KV blocks leaked", "0")), leaked))
    assert s.healthy, s.unhealthy_reason
    assert (s.num_unfinished, s.num_running, s.num_waiting, s.num_streams) == (0, 0, 0, 0), s
    assert leaked == 0, s
    return s


