"""Serving benchmark: the daemon under load over gRPC and HTTP, against the offline engine on the same work.

    python -m benchmarks.serving [--protocol grpc|http|both] [--rate R] [--num-requests N] [--max-output-len L]
                                 [--seed S] [--target HOST:PORT --http-target HOST:PORT] [--quick]

ShareGPT prompts go out as token ids with max_tokens fixed and ignore_eos at temperature 0, so every request does
a known amount of work; arrivals are a seeded Poisson process at --rate requests a second, or all at once with
--rate inf (the default: saturation). Without --target the benchmark starts `frugal serve` itself with the same
engine settings it then gives the offline engine. The phases never overlap (the daemon is stopped before the
offline engine loads), so the two sides never share the CPUs.
"""
from __future__ import annotations

import os

# NOTE: set before torch loads, as in benchmarks/throughput.py: busy-waiting OpenMP threads stall on a shared CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import asyncio
import contextlib
import math
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from benchmarks.metrics import CpuSnapshot, percentile
from benchmarks.serving_clients import RequestResult, arrival_offsets, run_protocol
from benchmarks.sharegpt import SampledRequest, sample_requests
from benchmarks.throughput import default_model_path, engine_kwargs, load_tokenizer, release_memory

REPO_ROOT = Path(__file__).resolve().parent.parent
DAEMON_START_TIMEOUT_S = 300  # model load plus, on a fresh machine, the first CPU-kernel build
PROTOCOLS = ("grpc", "http")
TARGET_FRACTION = 0.9  # daemon output tok/s at saturation over the offline engine's

# Defaults keep a full run (daemon start, gRPC and HTTP at saturation, offline engine) under ~8 minutes on 2 CPU
# cores; --quick is a smoke run of well under a minute after the model loads.
DEFAULTS = dict(num_requests=32, max_prompt_len=1024, max_output_len=64, kv_cache_mib=1024)
QUICK = dict(num_requests=4, max_prompt_len=256, max_output_len=8, kv_cache_mib=128)


@dataclass(slots=True)
class ServingResult:
    """One phase: every request's client-side timings and the phase's wall time."""

    name: str  # "grpc", "http" or "offline engine"
    results: list[RequestResult]  # per request, in request order
    duration_s: float  # from the first send to the last completion
    client_cpu_s: float = 0.0  # CPU seconds the load generator itself used in the phase (it shares the machine)
    num_steps: int | None = None  # engine steps the phase took; None: the daemon did not say
    others_cpu_share: float | None = None  # share of the machine's CPU other processes took; None: unknown

    @property
    def completed(self) -> list[RequestResult]:
        return [r for r in self.results if r.error is None]

    @property
    def num_output_tokens(self) -> int:
        return sum(r.num_output_tokens for r in self.completed)

    @property
    def output_tok_s(self) -> float:
        return self.num_output_tokens / self.duration_s

    def figures(self) -> dict[str, float]:
        """The table rows, in order: label -> value; times in milliseconds."""
        done = self.completed
        num_prompt_tokens = sum(r.prompt_len for r in done)
        rows: dict[str, float] = {
            "requests completed": len(done),
            "duration (s)": self.duration_s,
            "requests/s": len(done) / self.duration_s,
            "output tok/s": self.output_tok_s,
            "total tok/s": (num_prompt_tokens + self.num_output_tokens) / self.duration_s,
        }
        samples = {"TTFT": [r.ttft_s for r in done], "TPOT": [r.tpot_s for r in done if r.tpot_s is not None],
                   "E2E": [r.e2e_s for r in done]}
        for metric, values in samples.items():
            for q in (50, 95, 99):
                rows[f"{metric} p{q} (ms)"] = 1e3 * percentile(values, q)
        return rows

    def check_line(self) -> str:
        num_ok = sum(r.ok for r in self.results)
        expected = sum(r.expected_output_len for r in self.results)
        line = (f"{self.name}: {num_ok}/{len(self.results)} requests completed with the expected output tokens "
                f"({self.num_output_tokens} of {expected} tokens)")
        failed = [r for r in self.results if not r.ok]
        if failed:
            first = failed[0]
            reason = first.error or f"{first.num_output_tokens} of {first.expected_output_len} tokens"
            line += f"; {len(failed)} failed, the first: {reason}"
        return line


@dataclass(slots=True)
class CpuMark:
    """A CpuSnapshot plus the CPU seconds of the daemon this run started, which the snapshot only counts (as a
    child) once the daemon has exited; two marks give the CPU share other processes took between them."""

    snapshot: CpuSnapshot
    daemon_s: float  # CPU seconds of the local daemon so far; 0 when there is none

    @classmethod
    def take(cls, daemon_pid: int | None) -> CpuMark:
        daemon_s = 0.0
        if daemon_pid is not None:
            times = psutil.Process(daemon_pid).cpu_times()
            daemon_s = times.user + times.system
        return cls(CpuSnapshot.take(), daemon_s)

    def others_share(self, later: CpuMark) -> float:
        capacity = (later.snapshot.wall_s - self.snapshot.wall_s) * (psutil.cpu_count() or 1)
        daemon_share = (later.daemon_s - self.daemon_s) / capacity if capacity > 0 else 0.0
        return max(0.0, self.snapshot.others_share(later.snapshot) - daemon_share)


def format_table(results: list[ServingResult]) -> str:
    """One column a phase, one figure a row."""
    columns = [r.figures() for r in results]
    width = max(len(label) for label in columns[0])
    col = max(14, *(len(r.name) for r in results))
    lines = [f"{'':<{width}}" + "".join(f"  {r.name:>{col}}" for r in results)]
    for label in columns[0]:
        cells = []
        for column in columns:
            value = column[label]
            cells.append(str(value) if isinstance(value, int) else "-" if math.isnan(value) else f"{value:,.1f}")
        lines.append(f"{label:<{width}}" + "".join(f"  {cell:>{col}}" for cell in cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the daemon


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def daemon_engine_config(args) -> dict:
    """The YAML `engine:` section: the settings the offline engine gets too (engine_kwargs)."""
    return {
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "kv_cache_memory_bytes": args.kv_cache_mib << 20,
        "quantization": args.quantization,
        # NOTE: off on both sides: gRPC runs first on the same prompts, and HTTP would find them all cached.
        "enable_prefix_caching": False,
        "max_waiting": None,  # NOTE: unbounded, as the offline engine: a refusal would be a lost request here
    }


@contextlib.contextmanager
def local_daemon(args, workdir: Path):
    """Runs `frugal serve` on free loopback ports until the block ends; yields (grpc_target, http_target, pid)."""
    import yaml

    grpc_port, http_port = _free_port(), _free_port()
    config = {"model": args.model, "host": "127.0.0.1", "grpc_port": grpc_port, "http_port": http_port,
              "log_level": "INFO", "engine": daemon_engine_config(args)}
    config_path, log_path = workdir / "frugal.yaml", workdir / "daemon.log"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TRANSFORMERS_VERBOSITY": "error"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", "--config", str(config_path)],
                                cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_serving(proc, f"127.0.0.1:{grpc_port}", log_path)
        yield f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}", proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _wait_serving(proc: subprocess.Popen, target: str, log_path: Path) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass  # not listening yet
            time.sleep(0.5)
    raise RuntimeError(f"daemon not SERVING after {DAEMON_START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")


@contextlib.contextmanager
def daemon_targets(args):
    """(grpc_target, http_target, pid) of the daemon under test: --target's (pid None), or one started for this
    run."""
    if args.target:
        yield args.target, args.http_target, None
        return
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="frugal-serving-bench-") as workdir:
        with local_daemon(args, Path(workdir)) as targets:
            print(f"daemon SERVING after {time.monotonic() - started:.0f} s", flush=True)
            yield targets


# ---------------------------------------------------------------------------------------------- offline engine


def daemon_num_steps(target: str) -> int | None:
    """The daemon's engine step count (DebugService); None when it does not answer."""
    import grpc

    from serving.rpc.gen.frugal.v1 import inference_pb2 as pb
    from serving.rpc.gen.frugal.v1 import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            return pb_grpc.DebugServiceStub(channel).GetEngineStats(pb.GetEngineStatsRequest(), timeout=10).num_steps
        except grpc.RpcError:
            return None


def run_load(protocol: str, targets: tuple[str, str, int | None], requests: list[SampledRequest],
             offsets: list[float]) -> ServingResult:
    """One protocol against the daemon: an untimed warm-up request, then the timed schedule."""
    grpc_target, http_target, daemon_pid = targets
    target = grpc_target if protocol == "grpc" else http_target
    warmup = SampledRequest(requests[0].prompt, requests[0].prompt_token_ids, 2)  # the offline engine's warm-up
    asyncio.run(run_protocol(protocol, target, [warmup], [0.0]))
    steps_before, cpu_before, mark = daemon_num_steps(grpc_target), time.process_time(), CpuMark.take(daemon_pid)
    results, duration_s = asyncio.run(run_protocol(protocol, target, requests, offsets))
    others = mark.others_share(CpuMark.take(daemon_pid)) if daemon_pid is not None else None
    client_cpu_s = time.process_time() - cpu_before
    steps_after = daemon_num_steps(grpc_target)
    num_steps = steps_after - steps_before if steps_before is not None and steps_after is not None else None
    return ServingResult(protocol, results, duration_s, client_cpu_s, num_steps, others)


def run_offline(args, requests: list[SampledRequest]) -> ServingResult:
    """serving.LLM in this process on the same prompts and sampling, all submitted at once, after a warm-up."""
    from serving import LLM, SamplingParams

    def generate(llm, batch: list[SampledRequest], max_tokens: list[int]):
        params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0) for n in max_tokens]
        return llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in batch], params)

    llm = LLM(**engine_kwargs(args, enable_prefix_caching=False, max_waiting=None))
    generate(llm, requests[:1], [2])  # warm-up, not timed; the daemon gets the same one
    steps_before, mark = llm.engine.scheduler.num_steps, CpuMark.take(None)
    t0 = time.monotonic()
    outputs = generate(llm, requests, [r.output_len for r in requests])
    duration_s = time.monotonic() - t0
    others = mark.others_share(CpuMark.take(None))
    results = []
    for request, out in zip(requests, outputs):
        m = out.metrics
        results.append(RequestResult(request.prompt_len, request.output_len, len(out.token_ids),
                                     ttft_s=m.first_token_time - m.arrival_time, e2e_s=m.finish_time - m.arrival_time))
    return ServingResult("offline engine", results, duration_s, num_steps=llm.engine.scheduler.num_steps - steps_before,
                         others_cpu_share=others)


# ---------------------------------------------------------------------------------------------- report


def _machine_note(start: CpuSnapshot, target: str | None) -> str:
    share = start.others_share(CpuSnapshot.take())  # a daemon we started was waited for: its CPU counts as ours
    note = f"other processes{' (the --target daemon among them)' if target else ''} used {share:.0%} of the " \
           "machine's CPU during the run"
    if share > 0.1:
        note += ": absolute figures are pessimistic, rerun on a quiet machine for them"
    return note


def print_report(args, requests: list[SampledRequest], served: list[ServingResult], offline: ServingResult | None,
                 cpu_start: CpuSnapshot) -> None:
    rate = "inf (all at once: saturation)" if math.isinf(args.rate) else f"{args.rate:g} req/s (Poisson)"
    print()
    print("=" * 78)
    print(f"ShareGPT: {len(requests)} requests, seed {args.seed}, prompt tokens mean "
          f"{sum(r.prompt_len for r in requests) / len(requests):.0f} / max {max(r.prompt_len for r in requests)}, "
          f"output tokens mean {sum(r.output_len for r in requests) / len(requests):.0f} (cap {args.max_output_len})")
    print(f"engine: max_num_seqs={args.max_num_seqs} max_num_batched_tokens={args.max_num_batched_tokens} "
          f"kv_cache={args.kv_cache_mib} MiB quantization={args.quantization} prefix caching off")
    daemon = f"--target {args.target} (assumed to run these settings)" if args.target else "started by the benchmark"
    print(f"daemon: {daemon}; arrival rate {rate}")
    print()
    print(format_table(served + ([offline] if offline else [])))
    print()
    for result in served:
        print(result.check_line())
    phases = served + ([offline] if offline else [])
    client_cpu = ", ".join(f"{r.name} {r.client_cpu_s:.1f} s in {r.duration_s:.1f} s" for r in served)
    print(f"load generator CPU: {client_cpu} (taken from the daemon's cores)")
    print("engine steps: " + ", ".join(f"{r.name} {'?' if r.num_steps is None else r.num_steps}" for r in phases))
    print("other processes' CPU share: " + ", ".join(
        f"{r.name} {'?' if r.others_cpu_share is None else f'{r.others_cpu_share:.0%}'}" for r in phases))
    if offline is not None:
        for result in served:
            fraction = result.output_tok_s / offline.output_tok_s
            line = f"{result.name} output tok/s / offline engine: {fraction:.1%}"
            if math.isinf(args.rate):
                met = "met" if fraction >= TARGET_FRACTION else "NOT met"
                line += f" (target >= {TARGET_FRACTION:.0%} at saturation: {met})"
            else:
                line += " (not at saturation: the target applies to --rate inf)"
            print(line)
    print(_machine_note(cpu_start, args.target))
    print("=" * 78)


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=(*PROTOCOLS, "both"), default="both", help="client protocol (default both)")
    p.add_argument("--rate", type=float, default=math.inf, help="requests a second, Poisson; inf: all at once "
                   "(default inf)")
    p.add_argument("--num-requests", type=int, help=f"ShareGPT requests (default {DEFAULTS['num_requests']})")
    p.add_argument("--max-prompt-len", type=int, help=f"longest prompt kept (default {DEFAULTS['max_prompt_len']})")
    p.add_argument("--max-output-len", type=int, help=f"output length cap (default {DEFAULTS['max_output_len']})")
    p.add_argument("--seed", type=int, default=0, help="sampling and arrival seed (default 0)")
    p.add_argument("--target", help="gRPC HOST:PORT of a running daemon (default: start one)")
    p.add_argument("--http-target", help="HTTP HOST:PORT of that daemon; needed with --target for http")
    p.add_argument("--model", default=None, help="GGUF file or model directory (default: bundled SmolLM2-135M)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="engine: most running requests (default 64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="engine: token budget a step (default 512)")
    p.add_argument("--quantization", default="none", help="engine weights (default none, as benchmarks.throughput)")
    p.add_argument("--kv-cache-mib", type=int, help=f"engine KV cache (default {DEFAULTS['kv_cache_mib']} MiB)")
    p.add_argument("--skip-offline", action="store_true", help="skip the offline engine baseline")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: 4 requests, 8 output tokens")
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not args.rate > 0:
        p.error(f"--rate must be > 0 (inf: all at once), got {args.rate}")
    args.protocols = PROTOCOLS if args.protocol == "both" else (args.protocol,)
    if args.target and "http" in args.protocols and not args.http_target:
        p.error("--target with --protocol http or both needs --http-target HOST:PORT")
    args.model = args.model or default_model_path()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpu_start = CpuSnapshot.take()
    tokenizer = load_tokenizer(args.model)
    requests = sample_requests(tokenizer, args.num_requests, args.seed, args.max_prompt_len, args.max_output_len)
    offsets = arrival_offsets(len(requests), args.rate, args.seed)

    served = []
    with daemon_targets(args) as targets:
        for protocol in args.protocols:
            print(f"load: {protocol}, {len(requests)} requests ...", flush=True)
            served.append(run_load(protocol, targets, requests, offsets))
            print(f"  {served[-1].duration_s:.1f} s, {served[-1].output_tok_s:.1f} output tok/s", flush=True)
    offline = None
    if not args.skip_offline:
        print("offline engine on the same requests ...", flush=True)
        release_memory()
        offline = run_offline(args, requests)
        print(f"  {offline.duration_s:.1f} s, {offline.output_tok_s:.1f} output tok/s", flush=True)
    print_report(args, requests, served, offline, cpu_start)
    return 0 if all(r.ok for result in served for r in result.results) else 1


if __name__ == "__main__":
    sys.exit(main())
