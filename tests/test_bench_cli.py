"""`frugal bench`: its command line refuses bad values by name, its figures are the arithmetic they claim, and one
real run of frugal beside a real peer server (`transformers serve`, which the project's venv carries as part of
transformers) with another peer not installed, which must be reported as absent."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench_report import Phase, Point, markdown, summarise
from benchmarks.serving_clients import RequestResult

REPO_ROOT = Path(__file__).resolve().parent.parent


def _frugal(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.cli", "bench", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args,named", [
    (["throughput", "--peers", "vllm,sglang"], "sglang"),
    (["throughput", "--concurrency", "8,0"], "8,0"),
    (["latency", "--rates", "1,-2"], "1,-2"),
    (["single-stream", "--max-output-len", "2"], "--max-output-len"),
    (["prefix", "--workload", "long-context"], "long-context"),
    (["throughput", "--repeats", "0"], "--repeats"),
])
def test_bad_arguments_are_refused_by_name(tmp_path, args, named):
    result = _frugal(*args, "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert named in result.stderr
    assert not (tmp_path / "out" / "report.json").exists()  # refused before anything ran


def _phase(peer: str, repeat: int, concurrency: int, duration_s: float, num_tokens: int) -> Phase:
    # TTFT 0.1, 0.2, 0.3, 0.4 s, then 10 ms for every token after the first
    results = [RequestResult(10, num_tokens, num_tokens, ttft_s=0.1 * (i + 1),
                             e2e_s=0.1 * (i + 1) + 0.01 * (num_tokens - 1)) for i in range(4)]
    return Phase(peer, repeat, Point(concurrency=concurrency), results, duration_s, peak_rss_bytes=(100 + repeat) << 20)


def test_summary_is_median_over_repeats_with_cost_and_ratio():
    # frugal: 400 tokens in 2 s and in 4 s (median 150 tok/s); the peer: 400 tokens in 8 s twice (50 tok/s)
    phases = [_phase("frugal", 0, 8, 2.0, 100), _phase("vllm", 0, 8, 8.0, 100),
              _phase("frugal", 1, 8, 4.0, 100), _phase("vllm", 1, 8, 8.0, 100)]
    rows = {r["peer"]: r for r in summarise(phases, price_per_hour=0.36)}
    assert rows["frugal"]["output_tok_s"] == pytest.approx(150.0)
    assert rows["vllm"]["output_tok_s"] == pytest.approx(50.0)
    assert rows["vllm"]["frugal_ratio"] == pytest.approx(3.0)
    # 0.36 USD an hour at 50 tok/s: 180,000 tokens an hour, 2 USD per million
    assert rows["vllm"]["usd_per_million_output_tokens"] == pytest.approx(2.0)
    assert rows["frugal"]["peak_rss_mib"] == pytest.approx(101.0)  # the larger repeat's
    assert rows["frugal"]["requests"] == 8 and rows["frugal"]["exact_length"] == 8
    # every request's TPOT is 0.01 s, so each percentile is 10 ms and one stream decodes 100 tok/s
    assert rows["vllm"]["tpot_ms"]["p99"] == pytest.approx(10.0)
    assert rows["vllm"]["decode_tok_s"] == pytest.approx(100.0)


def test_failed_requests_count_no_tokens():
    phase = _phase("frugal", 0, 4, 1.0, 10)
    phase.results[0].error = "HTTP 500: boom"
    row = summarise([phase], price_per_hour=1.0)[0]
    assert row["failed"] == 1 and row["output_tok_s"] == pytest.approx(30.0)


def test_real_run_beside_a_real_peer_and_an_absent_one(tmp_path):
    transformers_cli = Path(sys.executable).parent / "transformers"
    assert transformers_cli.is_file(), "the venv's transformers has no CLI: the peer this test runs is missing"
    out = tmp_path / "report"
    env = {"FRUGAL_BENCH_VLLM": str(tmp_path / "no-vllm" / "python"),
           "FRUGAL_BENCH_TRANSFORMERS": str(transformers_cli)}
    result = _frugal("throughput", "--peers", "vllm,transformers", "--num-requests", "3", "--max-output-len", "5",
                     "--concurrency", "3", "--repeats", "2", "--kv-cache-mib", "64", "--out", str(out),
                     env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())

    assert "no-vllm" in report["absent"]["vllm"]  # not installed: named, with where it was looked for
    assert report["failed_peers"] == {}
    assert [(r["peer"], r["concurrency"]) for r in report["rows"]] == [("frugal", 3), ("transformers", 3)]
    for row in report["rows"]:
        # the same work on both stacks: every request completed with exactly the tokens asked for
        assert row["failed"] == 0 and row["exact_length"] == row["requests"] == 6, row
        assert row["output_tok_s"] > 0 and row["peak_rss_mib"] > 50
        assert row["ttft_ms"]["p50"] > 0 and row["tpot_ms"]["p50"] > 0
    by_key = {(r["peer"], r["concurrency"]): r for r in report["rows"]}
    assert by_key[("transformers", 3)]["frugal_ratio"] == pytest.approx(
        by_key[("frugal", 3)]["output_tok_s"] / by_key[("transformers", 3)]["output_tok_s"])
    # A B A B: each stack ran once per repeat, the repeats in turn
    order = [(d["peer"], d["repeat"]) for d in report["requests_detail"]]
    assert order == [("frugal", 0), ("transformers", 0), ("frugal", 1), ("transformers", 1)]

    text = (out / "report.md").read_text()
    assert "**vllm: absent**" in text and "| transformers | concurrency 3 |" in text
    assert (out / "throughput.png").stat().st_size > 0 and (out / "latency_cdf.png").stat().st_size > 0
    assert markdown(report) == text
