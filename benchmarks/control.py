"""Control-plane benchmark: the latency the control plane adds to each request (authenticate, rate limits, agent
task, budget reservation, settlement and the ledger commit), at a few hundred requests a second.

    python -m benchmarks.control [--rate 300] [--seconds 10] [--skip-postgres]

Requests arrive open-loop (a Poisson process at --rate) and go through the real ControlPlane with max_tokens 1;
the engine's part is left out (each request "finishes" the moment it is admitted), so what is timed is the
control plane alone, from `authenticate` to the committed ledger row. Four setups in one run:
  - auth: none, no budgets (the baseline: the ledger row only), SQLite;
  - auth: keys, rate limits, a tenant budget and an agent task budget, SQLite and counters in this process;
  - auth: none again, with the ledger in PostgreSQL;
  - keys, limits and budgets with PostgreSQL and Redis, as several replicas would run (real servers on loopback).
Targets: p50 under 1 ms and p99 under 5 ms added over auth: none on the same storage.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import random
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass

from benchmarks.metrics import percentile

TARGET_P50_MS, TARGET_P99_MS = 1.0, 5.0
MODEL = "bench-model"


@dataclass(slots=True)
class Result:
    name: str
    latencies_ms: list[float]
    errors: int
    duration_s: float

    def line(self) -> str:
        p50, p99 = percentile(self.latencies_ms, 50), percentile(self.latencies_ms, 99)
        return (f"{self.name:<44}{len(self.latencies_ms) / self.duration_s:>8.0f}{p50:>9.3f}{p99:>9.3f}"
                f"{max(self.latencies_ms):>9.2f}{self.errors:>8}")


def _control(data_dir: str, full: bool, database_url: str | None = None, redis_url: str | None = None) -> dict:
    raw = {"data_dir": data_dir, "database_url": database_url, "redis_url": redis_url}
    if full:
        raw.update(auth="keys", tenants={"*": {"rpm": 10**6, "tpm": 10**9}},
                   budgets=[{"scope": "tenant", "id": "*", "usd": 10**6, "period": "day", "mode": "hard"}],
                   tasks={"max_calls": 10**9, "max_tokens": 10**12})
    return raw


async def _run(name: str, raw: dict, rate: float, seconds: float, seed: int) -> Result:
    from serving.control.config import control_config
    from serving.control.context import Caller
    from serving.control.plane import ControlPlane
    from serving.engine.async_engine import EngineDone
    from serving.engine.outputs import RequestMetrics, RequestOutput

    plane = ControlPlane.open(control_config(raw), MODEL, solo_s_per_token=lambda: 0.02)
    keys = [plane.keys.create(f"tenant-{i}", rpm=10**6)[0] for i in range(8)] if raw.get("auth") == "keys" else [None]
    rng = random.Random(seed)
    latencies: list[float] = []
    errors = 0

    async def one(i: int) -> None:
        nonlocal errors
        started = time.perf_counter()
        try:
            ctx = await plane.authenticate(Caller(keys[i % len(keys)], "bench-workflow", f"task-{i % 64}"))
            admission = await plane.admit(ctx, f"req-{i}", MODEL, prompt_tokens=32, max_tokens=1)
            out = RequestOutput(req_id=f"req-{i}", prompt=None, prompt_token_ids=[1] * 32, token_ids=[7],
                                finished=True, finish_reason="length",
                                metrics=RequestMetrics(arrival_time=time.monotonic(), busy_s=0.001))
            admission.expect()(EngineDone(f"req-{i}", accepted=True, output=out))
            await admission.settled()
        except Exception:
            errors += 1
            return
        latencies.append(1000 * (time.perf_counter() - started))

    for i in range(64):  # warm-up: caches, connections, prepared scripts, every task id's budget line
        await one(i)
    latencies.clear()
    gc.collect()
    gc.freeze()  # as the daemon does once it is warm
    tasks, t0, next_at, i = [], time.perf_counter(), 0.0, 0
    while next_at < seconds:
        delay = t0 + next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
        i += 1
        next_at += rng.expovariate(rate)
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    await plane.close()
    return Result(name, latencies, errors, duration)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=300.0, help="requests a second (default 300)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each phase (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-postgres", action="store_true", help="skip the PostgreSQL + Redis phase")
    args = p.parse_args(argv)
    results = []
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="frugal-control-bench-"))
        phases = [("auth: none, no budgets (baseline), SQLite", _control(f"{tmp}/none", False)),
                  ("keys + limits + budgets + task, SQLite", _control(f"{tmp}/full", True))]
        if not args.skip_postgres:
            from benchmarks.services import postgres_server, redis_server

            pg = stack.enter_context(postgres_server())
            rd = stack.enter_context(redis_server())
            phases.append(("auth: none, no budgets (baseline), PostgreSQL", _control(f"{tmp}/pg0", False, pg)))
            phases.append(("keys + limits + budgets + task, PG + Redis", _control(f"{tmp}/pg", True, pg, rd)))
        for name, raw in phases:
            print(f"{name} ...", flush=True)
            results.append(asyncio.run(_run(name, raw, args.rate, args.seconds, args.seed)))
    print(f"\ncontrol plane, {args.rate:.0f} requests/s offered for {args.seconds:.0f} s each, max_tokens 1, "
          "engine left out")
    print(f"{'setup':<44}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'errors':>8}")
    for r in results:
        print(r.line())
    ok = True
    for baseline, r in ((results[0], results[1]), *(((results[2], results[3]),) if len(results) > 3 else ())):
        p50, p99 = percentile(r.latencies_ms, 50), percentile(r.latencies_ms, 99)
        add50, add99 = p50 - percentile(baseline.latencies_ms, 50), p99 - percentile(baseline.latencies_ms, 99)
        within = add50 < TARGET_P50_MS and add99 < TARGET_P99_MS
        ok &= within and r.errors == 0
        print(f"  {r.name}: adds {add50:+.3f} ms p50 (target < {TARGET_P50_MS:g}) and {add99:+.3f} ms p99 (target < "
              f"{TARGET_P99_MS:g}) over auth: none on the same storage: {'met' if within else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
