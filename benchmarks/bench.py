"""`frugal bench`: frugal against the serving stacks an operator would pick instead, on one workload, in one run.

    frugal bench throughput|latency|prefix|single-stream [--peers vllm,llamacpp,transformers] --out DIR

Every stack runs as its own server process (benchmarks.peers) on the same model and the same seeded requests,
one at a time so none of them shares the CPUs with another, in the order frugal, peer, peer, ... and again for
each repeat (A B A B), so a drift of the machine shows in every stack's figures alike. Modes:

- throughput: ShareGPT requests, closed loop at each --concurrency (requests in flight at once).
- latency: the same requests as a Poisson arrival schedule at each --rates (requests a second).
- prefix: one long shared system prompt before short ShareGPT questions, prefix caching on in every stack.
- single-stream: one request at a time with long outputs: decode speed as one user sees it.

--workload long-context draws prompts of 1024-3072 tokens instead of ShareGPT's usual short ones.

Figures per stack and point: output tok/s, TTFT and TPOT p50 / p95 / p99, the server's peak memory (PSS summed
over the process and its children), cost per million output tokens at --price-per-device-hour, and frugal's ratio
against each peer. DIR gets report.json, report.md and, when matplotlib is installed, throughput.png (output
tok/s against load) and latency_cdf.png (TTFT and TPOT distributions at the heaviest load).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see benchmarks/throughput.py
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import asyncio
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.bench_args import add_arguments, finish_arguments
from benchmarks.bench_report import Phase, Point, cpu_name, markdown, plots, summarise
from benchmarks.metrics import PeakRSS
from benchmarks.peers import Peer, PeerServer, ServerSpec, all_peers
from benchmarks.serving_clients import HttpClient, RequestResult, arrival_offsets, run_schedule
from benchmarks.sharegpt import SampledRequest, sample_requests, shared_prefix_requests
from benchmarks.throughput import load_tokenizer

# ---------------------------------------------------------------------------------------------- workloads


def build_requests(args, tokenizer) -> list[SampledRequest]:
    """The run's requests, the same for every stack: seeded ShareGPT, a shared prefix, or long prompts."""
    if args.mode == "prefix":
        prefix, prompts = shared_prefix_requests(tokenizer, args.num_requests, prefix_len=args.prefix_len,
                                                 max_question_len=128, seed=args.seed)
        # NOTE: the text goes to servers that take only text; it tokenizes back to these ids for this tokenizer.
        return [SampledRequest(tokenizer.decode(ids), ids, args.max_output_len) for ids in prompts]
    if args.workload == "long-context":
        return sample_requests(tokenizer, args.num_requests, args.seed, max_prompt_len=3072,
                               max_output_len=args.max_output_len, min_prompt_len=1024,
                               pool_size=max(20_000, 200 * args.num_requests))
    # NOTE: every request asks for the reply's length up to max_output_len; single-stream fixes it so each
    # request shows the steady decode speed.
    min_output = args.max_output_len if args.mode == "single-stream" else 4
    return sample_requests(tokenizer, args.num_requests, args.seed, max_prompt_len=args.max_prompt_len,
                           max_output_len=args.max_output_len, min_output_len=min_output)


def points(args) -> list[Point]:
    if args.mode == "latency":
        return [Point(rate=r) for r in args.rates]
    if args.mode == "single-stream":
        return [Point(concurrency=1)]
    if args.mode == "prefix":
        return [Point(concurrency=args.concurrency[0])]
    return [Point(concurrency=c) for c in args.concurrency]


def server_spec(args, requests: list[SampledRequest], hf_dir: str | None) -> ServerSpec:
    longest = max(r.prompt_len + r.output_len for r in requests)
    max_model_len = 1 << max(10, math.ceil(math.log2(longest + 16)))  # room for the longest request, a power of 2
    concurrency = max(p.concurrency or args.num_requests for p in points(args))
    return ServerSpec(model=args.model, hf_dir=hf_dir, max_concurrency=min(concurrency, args.num_requests),
                      max_model_len=max_model_len, prefix_caching=args.mode == "prefix",
                      num_threads=args.threads, kv_cache_mib=args.kv_cache_mib)


# ---------------------------------------------------------------------------------------------- running


async def closed_loop(send, requests: list[SampledRequest], concurrency: int) -> tuple[list[RequestResult], float]:
    """At most `concurrency` requests in flight; the next one goes as soon as one ends."""
    gate = asyncio.Semaphore(concurrency)

    async def one(request):
        async with gate:
            return await send(request)

    return await run_schedule(one, requests, [0.0] * len(requests))


async def _run_point(peer: Peer, server: PeerServer, spec: ServerSpec, requests: list[SampledRequest],
                     point: Point, seed: int) -> tuple[list[RequestResult], float]:
    client = HttpClient(server.target, fields=lambda r: peer.request_fields(r, spec),
                        text_prompts=not peer.token_prompts, ends_with_done=peer.ends_with_done)
    try:
        if point.rate is not None:
            return await run_schedule(client.send, requests, arrival_offsets(len(requests), point.rate, seed))
        return await closed_loop(client.send, requests, point.concurrency)
    finally:
        await client.close()


def check_server(peer: Peer, server: PeerServer, spec: ServerSpec, request: SampledRequest) -> None:
    """One real completion of exactly the tokens asked for before anything is timed: a server that answers its
    health check but cannot generate, or ignores the equal-work fields, fails here with its log."""
    probe = SampledRequest(request.prompt, request.prompt_token_ids, 4)
    result = asyncio.run(_run_point(peer, server, spec, [probe], Point(concurrency=1), 0))[0][0]
    if not result.ok:
        raise RuntimeError(f"{peer.name}: the check request failed ({result.error or 'wrong token count'}: "
                           f"{result.num_output_tokens} of 4 tokens)\n{server.log_tail()}")


def run_peer(peer: Peer, spec: ServerSpec, requests: list[SampledRequest], warmup: SampledRequest,
             run_points: list[Point], repeat: int, seed: int, workdir: Path, log) -> tuple[list[Phase], float]:
    """Starts the stack, checks it, then every point; returns the phases and the start-up time."""
    phases = []
    with PeerServer(peer, spec, workdir) as server:
        check_server(peer, server, spec, warmup)
        for point in run_points:
            with PeakRSS(interval_s=0.1, pid=server.proc.pid, children=True) as rss:
                results, duration = asyncio.run(_run_point(peer, server, spec, requests, point, seed))
            phase = Phase(peer.name, repeat, point, results, duration, rss.peak_bytes)
            failed = [r for r in results if r.error is not None]
            log(f"  {peer.name:<12} repeat {repeat + 1} {point.label:<16} {phase.output_tok_s:8.1f} output tok/s "
                f"in {duration:6.1f} s, peak {rss.peak_bytes / 2**20:6.0f} MiB"
                + (f", {len(failed)} failed: {failed[0].error}" if failed else ""))
            phases.append(phase)
    return phases, server.start_s


# ---------------------------------------------------------------------------------------------- the command


def run(args, log=print) -> dict:
    """The whole benchmark; writes DIR/report.json and DIR/report.md (and the plots) and returns the report."""
    from serving.loaders.convert import hf_dir_for
    from serving.loaders import default_model_path

    args.model = os.path.abspath(args.model or default_model_path())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    peers = all_peers()
    chosen = [peers["frugal"]] + [peers[name] for name in args.peers]
    absent = {p.name: why for p in chosen if (why := p.missing()) is not None}
    running = [p for p in chosen if p.name not in absent]
    for name, why in absent.items():
        log(f"{name}: absent ({why})")

    tokenizer = load_tokenizer(args.model)
    requests = build_requests(args, tokenizer)
    warmup, requests = (requests[0], requests[1:]) if args.mode == "prefix" else (requests[0], requests)
    needs_hf = any(p.name not in ("frugal", "llamacpp") for p in running)
    spec = server_spec(args, [warmup, *requests], hf_dir_for(args.model) if needs_hf else None)
    run_points = points(args)
    log(f"frugal bench {args.mode}: {len(requests)} requests, {', '.join(p.label for p in run_points)}; "
        f"stacks {', '.join(p.name for p in running)}; {args.repeats} repeats")

    phases: list[Phase] = []
    failed_peers: dict[str, str] = {}
    start_s: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="frugal-bench-") as workdir:
        for repeat in range(args.repeats):
            for peer in running:
                if peer.name in failed_peers:
                    continue
                try:
                    done, started = run_peer(peer, spec, requests, warmup, run_points, repeat, args.seed,
                                             Path(workdir) / f"repeat{repeat}", log)
                except RuntimeError as e:
                    failed_peers[peer.name] = str(e)
                    log(f"{peer.name}: failed: {e}")
                    continue
                phases += done
                start_s.setdefault(peer.name, []).append(started)
    if "frugal" in failed_peers:
        raise RuntimeError(f"frugal itself failed: {failed_peers['frugal']}")
    phases = [p for p in phases if p.peer not in failed_peers]  # a stack that failed a later repeat: no figures
    rows = summarise(phases, args.price_per_device_hour)
    report = {
        "mode": args.mode, "workload": "shared-prefix" if args.mode == "prefix" else args.workload,
        "model": args.model, "num_requests": len(requests), "seed": args.seed, "repeats": args.repeats,
        "mean_prompt_len": statistics.mean(r.prompt_len for r in requests),
        "mean_output_len": statistics.mean(r.output_len for r in requests),
        "threads": args.threads, "price_per_device_hour": args.price_per_device_hour,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": sys.version.split()[0]},
        "server": asdict(spec), "absent": absent, "failed_peers": failed_peers,
        "start_s": start_s, "rows": rows, "plots": [], "plots_skipped": None,
        "requests_detail": [{"peer": p.peer, "repeat": p.repeat, "point": p.point.label,
                             "duration_s": p.duration_s, "results": [asdict(r) for r in p.results]}
                            for p in phases],
    }
    try:
        report["plots"] = plots(out, phases, rows, args.mode)
    except ImportError:
        report["plots_skipped"] = "matplotlib is not installed (pip install matplotlib)"
    (out / "report.json").write_text(json.dumps(report, indent=1, default=_json_default))
    (out / "report.md").write_text(markdown(report))
    return report


def _json_default(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"{type(value).__name__} is not JSON")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        finish_arguments(args)
    except ValueError as e:
        parser.error(str(e))
    started = time.monotonic()
    report = run(args)
    print(markdown(report))
    print(f"wrote {Path(args.out) / 'report.md'} and report.json in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
