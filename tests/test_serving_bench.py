"""The serving benchmark (benchmarks/serving.py): its pure parts, and one smoke run against a real daemon."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

from benchmarks.serving import QUICK, ServingResult, format_table
from benchmarks.serving_clients import DONE, RequestResult, arrival_offsets, sse_payload


# ---------------------------------------------------------------------------------------------- arrivals


def test_poisson_schedule_is_reproducible_per_seed():
    assert arrival_offsets(50, 4.0, seed=7) == arrival_offsets(50, 4.0, seed=7)
    assert arrival_offsets(50, 4.0, seed=7) != arrival_offsets(50, 4.0, seed=8)


def test_poisson_schedule_starts_at_zero_and_increases():
    offsets = arrival_offsets(100, 2.0, seed=0)
    assert offsets[0] == 0.0
    assert all(b > a for a, b in zip(offsets, offsets[1:]))


@pytest.mark.parametrize("rate", [0.5, 4.0, 100.0])
def test_poisson_gaps_have_mean_one_over_rate(rate):
    num_requests = 20_000
    offsets = arrival_offsets(num_requests, rate, seed=1)
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    mean = sum(gaps) / len(gaps)
    # exponential gaps: std = mean, so the sample mean is within 3% with ~4 sigma to spare
    assert mean == pytest.approx(1 / rate, rel=0.03)
    std = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps))
    assert std == pytest.approx(1 / rate, rel=0.05)


def test_infinite_rate_sends_everything_at_once():
    assert arrival_offsets(5, math.inf, seed=0) == [0.0] * 5


@pytest.mark.parametrize("rate", [0.0, -1.0, math.nan])
def test_non_positive_rate_is_refused(rate):
    with pytest.raises(ValueError, match="rate"):
        arrival_offsets(3, rate, seed=0)


# ---------------------------------------------------------------------------------------------- aggregation


def _result(ttft: float, e2e: float, num_tokens: int, expected: int | None = None, error: str | None = None):
    return RequestResult(prompt_len=10, expected_output_len=expected or num_tokens, num_output_tokens=num_tokens,
                         ttft_s=ttft, e2e_s=e2e, error=error)


def test_tpot_is_decode_time_over_tokens_after_the_first():
    assert _result(0.5, 2.5, 5).tpot_s == pytest.approx(0.5)
    assert _result(0.5, 0.5, 1).tpot_s is None  # one token: no decode interval
    assert _result(0.5, 2.5, 5, error="boom").tpot_s is None


def test_figures_on_synthetic_timings():
    # 11 requests, TTFT 0.0, 0.1, ..., 1.0 s; each 11 tokens with 1 s of decode -> TPOT 0.1 s
    results = [_result(ttft=i / 10, e2e=i / 10 + 1.0, num_tokens=11) for i in range(11)]
    figures = ServingResult("grpc", results, duration_s=5.5).figures()
    assert figures["requests completed"] == 11
    assert figures["requests/s"] == pytest.approx(2.0)
    assert figures["output tok/s"] == pytest.approx(121 / 5.5)
    assert figures["total tok/s"] == pytest.approx((110 + 121) / 5.5)
    assert figures["TTFT p50 (ms)"] == pytest.approx(500.0)
    assert figures["TTFT p95 (ms)"] == pytest.approx(950.0)
    assert figures["TTFT p99 (ms)"] == pytest.approx(990.0)
    assert figures["TPOT p99 (ms)"] == pytest.approx(100.0)
    assert figures["E2E p50 (ms)"] == pytest.approx(1500.0)


def test_failed_requests_are_left_out_of_the_figures_and_reported():
    results = [_result(0.1, 1.1, 11), _result(0.2, 9.9, 0, expected=11, error="UNAVAILABLE: gone"),
               _result(0.3, 1.3, 7, expected=11)]
    served = ServingResult("http", results, duration_s=2.0)
    figures = served.figures()
    assert figures["requests completed"] == 2  # the short one completed, just not with the expected tokens
    assert figures["output tok/s"] == pytest.approx(18 / 2.0)
    assert figures["E2E p99 (ms)"] < 2000
    line = served.check_line()
    assert line.startswith("http: 1/3 requests completed with the expected output tokens (18 of 33 tokens)")
    assert "UNAVAILABLE: gone" in line


def test_table_has_a_column_per_phase_and_dashes_for_missing_values():
    served = ServingResult("grpc", [_result(0.1, 0.1, 1)], duration_s=1.0)  # one token: no TPOT
    table = format_table([served, ServingResult("offline engine", [_result(0.1, 0.5, 5)], 1.0)])
    header, *rows = table.splitlines()
    assert header.split() == ["grpc", "offline", "engine"]
    tpot = next(row for row in rows if row.startswith("TPOT p50"))
    assert tpot.split()[-2:] == ["-", "100.0"]


# ---------------------------------------------------------------------------------------------- SSE


def test_sse_payload_parses_data_lines_and_done():
    chunk = '{"id": "cmpl-1", "choices": [{"index": 0, "text": "Hi"}]}'
    assert sse_payload(f"data: {chunk}") == {"id": "cmpl-1", "choices": [{"index": 0, "text": "Hi"}]}
    assert sse_payload("data:" + chunk)["choices"][0]["text"] == "Hi"  # the space after the colon is optional
    assert sse_payload("data: [DONE]") is DONE


@pytest.mark.parametrize("line", ["", ": keep-alive", "event: message", "id: 3", "retry: 1000"])
def test_sse_payload_ignores_everything_but_data(line):
    assert sse_payload(line) is None


def test_sse_payload_passes_error_events_through():
    assert sse_payload('data: {"error": {"message": "queue full"}}') == {"error": {"message": "queue full"}}


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_quick_run_against_a_daemon(tmp_path):
    from daemon_process import REPO_ROOT, DaemonProcess, http_app_available

    if not http_app_available():
        pytest.skip("the HTTP app does not import")
    # the settings benchmarks.serving --quick gives the offline engine, so the fraction compares like with like
    engine = {"kv_cache_memory_bytes": QUICK["kv_cache_mib"] << 20, "quantization": "none",
              "enable_prefix_caching": False, "max_waiting": None}
    daemon = DaemonProcess(tmp_path, engine=engine, http=True).start()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.serving", "--quick", "--protocol", "both",
             "--target", daemon.target, "--http-target", f"127.0.0.1:{daemon.http_port}"],
            cwd=REPO_ROOT, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, capture_output=True, text=True,
            timeout=240,
        )
    finally:
        daemon.stop()
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    num_requests, num_tokens = QUICK["num_requests"], None
    for protocol in ("grpc", "http"):
        match = re.search(rf"^{protocol}: (\d+)/(\d+) requests completed with the expected output tokens "
                          rf"\((\d+) of (\d+) tokens\)$", out, re.MULTILINE)
        assert match, out
        assert match.group(1) == match.group(2) == str(num_requests)
        assert match.group(3) == match.group(4)
        num_tokens = num_tokens or match.group(3)
        assert match.group(3) == num_tokens  # both protocols asked for the same work
        assert re.search(rf"^{protocol} output tok/s / offline engine: [\d.]+%", out, re.MULTILINE), out
    header = next(line for line in out.splitlines() if line.split()[:2] == ["grpc", "http"])
    assert header.split() == ["grpc", "http", "offline", "engine"]
    for row in ("requests completed", "output tok/s", "total tok/s", "TTFT p99 (ms)", "TPOT p50 (ms)", "E2E p95 (ms)"):
        assert re.search(rf"^{re.escape(row)} ", out, re.MULTILINE), row
    completed = next(line for line in out.splitlines() if line.startswith("requests completed"))
    assert completed.split()[2:] == [str(num_requests)] * 3
