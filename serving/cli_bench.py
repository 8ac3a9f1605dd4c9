"""`frugal bench throughput|latency|prefix|single-stream [--peers vllm,llamacpp,transformers] --out DIR`: frugal
against the serving stacks an operator would pick instead, on one seeded workload in one run (benchmarks/bench.py
says how); `make bench-peers` installs the peers."""
from __future__ import annotations

import sys


def add_bench(sub) -> None:
    from benchmarks.bench_args import add_arguments

    p = sub.add_parser("bench", help="benchmark frugal against vLLM, llama.cpp and transformers servers",
                       description=__doc__)
    add_arguments(p)


def cmd_bench(args) -> int:
    from benchmarks.bench import finish_arguments, markdown, run

    try:
        finish_arguments(args)
        report = run(args, log=lambda line: print(line, flush=True))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(markdown(report))
    print(f"wrote {args.out}/report.md and report.json")
    for name, why in report["failed_peers"].items():  # NOTE: asked for, installed, and broken: not a pass
        print(f"error: {name} failed: {why.splitlines()[0]}", file=sys.stderr)
    return 1 if report["failed_peers"] else 0
