"""Soak test: streaming clients over gRPC and HTTP for a set time; throughput, tail latency, errors, and whether
the daemon's memory stays flat.

    python -m benchmarks.soak [--duration-s 300] [--warmup-s 30] [--clients 4] [--max-output-len 32]
                              [--target HOST:PORT --http-target HOST:PORT --pid PID]

`--clients` closed-loop clients per protocol send ShareGPT prompts (token ids, greedy, ignore_eos, so each
request does a known amount of work) one after another until the time is up. Requests that finish inside the
warm-up are left out of the figures. The daemon's resident memory is sampled every second; the report sets
the RSS at the end beside the RSS after warm-up (the baseline): a leak shows as growth that does not level
off. Without --target the benchmark starts `frugal serve` itself.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import asyncio
import itertools
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from benchmarks.metrics import percentile
from benchmarks.serving_clients import GrpcClient, HttpClient, RequestResult
from benchmarks.sharegpt import SampledRequest, sample_requests

PROTOCOLS = ("grpc", "http")


@dataclass(slots=True)
class ProtocolFigures:
    """What the clients of one protocol saw after warm-up."""

    protocol: str  # "grpc" or "http"
    results: list[RequestResult] = field(default_factory=list)  # requests finished after warm-up

    @property
    def num_errors(self) -> int:
        return sum(not r.ok for r in self.results)

    @property
    def error_rate(self) -> float:
        return self.num_errors / len(self.results) if self.results else 0.0

    def latency_s(self, q: float) -> float:
        return percentile([r.e2e_s for r in self.results if r.ok], q)


@dataclass(slots=True)
class SoakReport:
    duration_s: float  # measured time after warm-up
    figures: list[ProtocolFigures]  # one per protocol
    rss_after_warmup_bytes: int  # the daemon's RSS when warm-up ended (the baseline)
    rss_end_bytes: int  # its RSS at the end
    rss_peak_bytes: int  # the highest sample after warm-up
    errors: list[str]  # the distinct error messages seen (at most a few)

    @property
    def rss_growth_bytes(self) -> int:
        return self.rss_end_bytes - self.rss_after_warmup_bytes

    @property
    def num_requests(self) -> int:
        return sum(len(f.results) for f in self.figures)

    @property
    def num_errors(self) -> int:
        return sum(f.num_errors for f in self.figures)

    def format(self) -> str:
        mib = 2**20
        lines = [f"{'protocol':<9}{'requests':>9}{'errors':>8}{'err rate':>10}{'req/s':>8}{'out tok/s':>11}"
                 f"{'p50 s':>8}{'p99 s':>8}"]
        for f in self.figures:
            tokens = sum(r.num_output_tokens for r in f.results)
            lines.append(f"{f.protocol:<9}{len(f.results):>9}{f.num_errors:>8}{f.error_rate:>10.2%}"
                         f"{len(f.results) / self.duration_s:>8.2f}{tokens / self.duration_s:>11.1f}"
                         f"{f.latency_s(50):>8.2f}{f.latency_s(99):>8.2f}")
        growth = self.rss_growth_bytes
        lines.append(f"daemon RSS: {self.rss_end_bytes / mib:.1f} MiB at the end vs {self.rss_after_warmup_bytes / mib:.1f}"
                     f" MiB after warm-up ({growth / mib:+.1f} MiB, {growth / self.rss_after_warmup_bytes:+.1%});"
                     f" peak {self.rss_peak_bytes / mib:.1f} MiB")
        lines += [f"error: {e}" for e in self.errors]
        return "\n".join(lines)


async def soak(grpc_target: str, http_target: str | None, pid: int, requests: list[SampledRequest],
               duration_s: float, warmup_s: float, num_clients: int) -> SoakReport:
    """Runs the closed-loop clients against a running daemon (process `pid`) and measures it."""
    process = psutil.Process(pid)
    start = time.monotonic()
    warm_end, end = start + warmup_s, start + warmup_s + duration_s
    protocols = [p for p in PROTOCOLS if p == "grpc" or http_target]
    figures = {p: ProtocolFigures(p) for p in protocols}
    samples: list[tuple[float, int]] = []  # (time, RSS bytes)
    next_request = itertools.cycle(requests).__next__

    async def client_loop(protocol: str) -> None:
        client = GrpcClient(grpc_target) if protocol == "grpc" else HttpClient(http_target)
        try:
            while time.monotonic() < end:
                result = await client.send(next_request())
                if time.monotonic() > warm_end:
                    figures[protocol].results.append(result)
        finally:
            await client.close()

    async def sample_rss() -> None:
        while time.monotonic() < end:
            samples.append((time.monotonic(), process.memory_info().rss))
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample_rss())
    await asyncio.gather(*(client_loop(p) for p in protocols for _ in range(num_clients)))
    samples.append((time.monotonic(), process.memory_info().rss))
    await sampler
    after_warmup = [rss for t, rss in samples if t >= warm_end] or [samples[-1][1]]
    errors = sorted({r.error or "wrong number of output tokens" for f in figures.values() for r in f.results
                     if not r.ok})[:5]
    return SoakReport(duration_s=time.monotonic() - warm_end, figures=list(figures.values()),
                      rss_after_warmup_bytes=after_warmup[0], rss_end_bytes=after_warmup[-1],
                      rss_peak_bytes=max(after_warmup), errors=errors)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-s", type=float, default=300.0, help="measured time after warm-up (default 300)")
    p.add_argument("--warmup-s", type=float, default=30.0, help="warm-up left out of the figures (default 30)")
    p.add_argument("--clients", type=int, default=4, help="streaming clients per protocol (default 4)")
    p.add_argument("--max-prompt-len", type=int, default=256, help="longest ShareGPT prompt kept (default 256)")
    p.add_argument("--max-output-len", type=int, default=32, help="output tokens per request (default 32)")
    p.add_argument("--num-prompts", type=int, default=64, help="distinct prompts cycled through (default 64)")
    p.add_argument("--seed", type=int, default=0, help="ShareGPT sampling seed (default 0)")
    p.add_argument("--target", help="gRPC HOST:PORT of a running daemon (default: start one)")
    p.add_argument("--http-target", help="HTTP HOST:PORT of that daemon (default: gRPC only with --target)")
    p.add_argument("--pid", type=int, help="process id of that daemon (needed with --target, for its RSS)")
    p.add_argument("--model", default=None, help="GGUF file or model directory (default: bundled SmolLM2-135M)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="engine: most running requests (default 64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="engine: token budget a step")
    p.add_argument("--quantization", default="auto", help="engine weights (default auto, as `frugal serve`)")
    p.add_argument("--kv-cache-mib", type=int, default=256, help="engine KV cache (default 256 MiB)")
    args = p.parse_args(argv)
    if args.target and args.pid is None:
        p.error("--target needs --pid (the daemon's process id, for its memory)")
    if args.clients < 1 or args.duration_s <= 0 or args.warmup_s < 0:
        p.error("--clients must be >= 1, --duration-s > 0 and --warmup-s >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    from benchmarks.serving import local_daemon
    from benchmarks.throughput import default_model_path, load_tokenizer

    args = parse_args(argv)
    args.model = args.model or default_model_path()
    requests = sample_requests(load_tokenizer(args.model), args.num_prompts, args.seed, args.max_prompt_len,
                               args.max_output_len)
    print(f"soak: {args.duration_s:.0f} s after a {args.warmup_s:.0f} s warm-up, {args.clients} streaming clients "
          f"per protocol, {len(requests)} ShareGPT prompts, {args.max_output_len} output tokens each", flush=True)
    if args.target:
        report = asyncio.run(soak(args.target, args.http_target, args.pid, requests, args.duration_s, args.warmup_s,
                                  args.clients))
    else:
        with tempfile.TemporaryDirectory(prefix="frugal-soak-") as workdir:
            with local_daemon(args, Path(workdir)) as (grpc_target, http_target, pid):
                report = asyncio.run(soak(grpc_target, http_target, pid, requests, args.duration_s, args.warmup_s,
                                          args.clients))
    print(report.format())
    return 0 if report.num_errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
