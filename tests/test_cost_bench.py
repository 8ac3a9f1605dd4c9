"""The cost benchmark end to end on a few requests of its default workload: two real daemons, both runs, the
JSON a user's scripts read (`--json`), and costs that come from the ledger."""
from __future__ import annotations

import json

import pytest

from benchmarks import cost

pytestmark = pytest.mark.slow


def test_the_cost_benchmark_runs_both_ways_and_writes_every_answer(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert cost.main(["--limit", "6", "--concurrency", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cost per task" in printed and "quality proxy (vs naive)" in printed
    report = json.loads(out.read_text())
    items = cost.load_workload(cost.DEFAULT_WORKLOAD, 6)
    for name in ("naive", "frugal"):
        run = report[name]
        assert run["requests"] == 6 and run["errors"] == 0
        assert run["cost_per_task_usd"] > 0 and run["cost_usd"] == pytest.approx(run["cost_per_task_usd"] * run["tasks"])
        assert [a["index"] for a in run["answers"]] == list(range(6))  # workload order
        assert [a["task_id"] for a in run["answers"]] == [i["task_id"] for i in items]
        assert all(a["text"] for a in run["answers"])
    assert set(report["naive"]["route_mix"]) == {"external:strong"}  # naive: the strong model for everything
    assert report["naive"]["quality_proxy"] == 1.0 and 0.0 <= report["frugal"]["quality_proxy"] <= 1.0
    # the ledger holds every row: a cascade's first answer is paid for too
    assert report["frugal"]["cost_usd"] >= sum(a["cost_usd"] for a in report["frugal"]["answers"]) - 1e-12
