"""Engine backends on one ShareGPT workload: frugal's native engine, vLLM with its own scheduler, and vLLM with
frugal's scheduler (`engine.backend: vllm`), in one run.

    .venv-vllm/bin/python -m benchmarks.backends [--num-requests 64] [--max-output-len 128] [--seed 0]
                                                 [--max-num-seqs 64] [--flood-requests 32] [--quiet-requests 8]
                                                 [--flood-seats 8]
                                                 [--quick] [--json FILE]

Two phases per engine, each on a fresh engine over the same weights (fp32; the native engine also with its
default packed int4 weights):
- throughput: every request submitted at once (offline, as vLLM's benchmark_throughput): output tok/s, TTFT and
  TPOT p50 / p95;
- flood: tenant "flood" submits --flood-requests at once, one step later tenant "quiet" submits --quiet-requests;
  the figure is each tenant's share of the output tokens generated while both still had work. FCFS serves the
  flood first (the quiet share stays near 0); fair share should split the engine about evenly.

All three engines are driven the same way (add_request, then step() until done), so the only differences are
the engine and its scheduler. Needs the vLLM venv (`make vllm-venv`).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass

from benchmarks.metrics import PhaseResult, percentile
from benchmarks.sharegpt import sample_requests

QUICK = dict(num_requests=6, max_output_len=12, flood_requests=6, quiet_requests=2, max_prompt_len=256, flood_seats=2)


@dataclass(slots=True)
class FloodResult:
    """Who got the engine while both tenants waited."""

    name: str  # engine
    flood_tokens: int  # output tokens of the flooding tenant in the contended window
    quiet_tokens: int  # output tokens of the quiet tenant in that window
    quiet_done_s: float  # from the quiet tenant's arrival to its last request's finish

    @property
    def quiet_share(self) -> float:
        total = self.flood_tokens + self.quiet_tokens
        return self.quiet_tokens / total if total else float("nan")


def engines(source: str, model: str, args, max_num_seqs: int) -> list[tuple[str, callable]]:
    """`source`: the GGUF (the native int4 default keeps its weights packed); `model`: its fp32 HF copy."""
    from serving.config import EngineConfig
    from serving.engine.llm_engine import LLMEngine
    from serving.engine.vllm.engine import VllmEngine

    common = dict(model=model, max_model_len=args.max_model_len, max_num_seqs=max_num_seqs,
                  kv_cache_memory_bytes=args.kv_cache_mib << 20, max_num_batched_tokens=512)
    return [
        ("frugal native (int4)", lambda: LLMEngine(EngineConfig(**{**common, "model": source}))),
        ("frugal native (fp32)", lambda: LLMEngine(EngineConfig(quantization="none", **common))),
        ("vLLM, its scheduler", lambda: VllmEngine(EngineConfig(backend="vllm", **common), scheduler="vllm")),
        ("vLLM, frugal's scheduler", lambda: VllmEngine(EngineConfig(backend="vllm", **common))),
    ]


def drive(engine) -> dict:
    """Steps until every request finished; {req_id: final output}."""
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.req_id] = out
    return finals


def throughput(name: str, engine, requests) -> PhaseResult:
    from serving.engine.sampling_params import SamplingParams

    for i, r in enumerate(requests[:2]):  # warm-up, not timed
        engine.add_request(r.prompt_token_ids, SamplingParams(max_tokens=2, temperature=0), req_id=f"warm-{i}")
    drive(engine)
    t0 = time.monotonic()
    for i, r in enumerate(requests):
        engine.add_request(r.prompt_token_ids, SamplingParams(max_tokens=r.output_len, temperature=0,
                                                              ignore_eos=True), req_id=f"r{i}")
    finals = drive(engine)
    t1 = time.monotonic()
    outs = [finals[f"r{i}"] for i in range(len(requests))]
    for out, r in zip(outs, requests):
        if len(out.token_ids) != r.output_len:
            raise RuntimeError(f"{name}: {out.req_id} made {len(out.token_ids)} tokens, wanted {r.output_len}")
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs]
    tpot = [(o.metrics.finish_time - o.metrics.first_token_time) / (len(o.token_ids) - 1)
            for o in outs if len(o.token_ids) > 1]
    return PhaseResult(name, len(outs), sum(len(r.prompt_token_ids) for r in requests),
                       sum(r.output_len for r in requests), t1 - t0, ttft, tpot)


def flood(name: str, engine, requests, num_flood: int, num_quiet: int) -> FloodResult:
    from serving.engine.sampling_params import SamplingParams

    def add(i, tenant):
        r = requests[i % len(requests)]
        engine.add_request(r.prompt_token_ids, SamplingParams(max_tokens=r.output_len, temperature=0,
                                                              ignore_eos=True), req_id=f"{tenant}-{i}",
                           tenant_id=tenant)

    for i in range(num_flood):
        add(i, "flood")
    engine.step()
    quiet_arrival = time.monotonic()
    for i in range(num_quiet):
        add(num_flood + i, "quiet")
    unfinished = {"flood": num_flood, "quiet": num_quiet}
    tokens = {"flood": 0, "quiet": 0}
    quiet_done = None
    while engine.has_unfinished_requests():
        contended = unfinished["flood"] > 0 and unfinished["quiet"] > 0
        for out in engine.step():
            tenant = out.req_id.split("-", 1)[0]
            if contended:
                tokens[tenant] += len(out.delta_token_ids)
            if out.finished:
                unfinished[tenant] -= 1
                if tenant == "quiet" and unfinished["quiet"] == 0:
                    quiet_done = time.monotonic() - quiet_arrival
    return FloodResult(name, tokens["flood"], tokens["quiet"], quiet_done or float("nan"))


def report(results: list[PhaseResult], floods: list[FloodResult]) -> str:
    base = results[0]
    rows = [("output tok/s", lambda r: f"{r.output_tok_s:.1f}"),
            ("  vs frugal native (int4)", lambda r: f"{r.output_tok_s / base.output_tok_s:.2f}x"),
            ("TTFT p50 / p95 (ms)", lambda r: f"{1e3 * percentile(r.ttft_s, 50):.0f} / {1e3 * percentile(r.ttft_s, 95):.0f}"),
            ("TPOT p50 / p95 (ms)", lambda r: f"{1e3 * percentile(r.tpot_s, 50):.1f} / {1e3 * percentile(r.tpot_s, 95):.1f}")]
    names = [r.name for r in results]
    width = max(max(len(n) for n in names), 14) + 2
    lines = [f"{'':28}" + "".join(f"{n:>{width}}" for n in names)]
    for label, fmt in rows:
        lines.append(f"{label:28}" + "".join(f"{fmt(r):>{width}}" for r in results))
    by_name = {f.name: f for f in floods}
    lines.append(f"{'flood: shares flood / quiet':28}" + "".join(
        f"{f'{1 - by_name[n].quiet_share:.0%} / {by_name[n].quiet_share:.0%}':>{width}}" if n in by_name
        else f"{'-':>{width}}" for n in names))
    lines.append(f"{'flood: quiet tenant done (s)':28}" + "".join(
        f"{by_name[n].quiet_done_s:>{width}.1f}" if n in by_name else f"{'-':>{width}}" for n in names))
    return "\n".join(lines)


def _close(engine) -> None:
    engine.close()
    del engine
    gc.collect()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-prompt-len", type=int, default=512)
    parser.add_argument("--max-output-len", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=64, help="seats per step in the throughput phase")
    parser.add_argument("--flood-seats", type=int, default=8, help="seats per step in the flood phase: few, so "
                                                                    "the queue order decides who runs")
    parser.add_argument("--kv-cache-mib", type=int, default=512)
    parser.add_argument("--flood-requests", type=int, default=32)
    parser.add_argument("--quiet-requests", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few requests")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    from serving.loaders.convert import hf_dir_for
    from serving.loaders import default_model_path, load_tokenizer

    source = args.model or default_model_path()
    model = hf_dir_for(source)  # its fp32 HF copy: the same weights for every engine
    tokenizer = load_tokenizer(model)
    requests = sample_requests(tokenizer, args.num_requests, args.seed, args.max_prompt_len, args.max_output_len)
    flood_set = sample_requests(tokenizer, args.flood_requests + args.quiet_requests, args.seed + 1,
                                args.max_prompt_len, args.max_output_len)
    print(f"# {len(requests)} ShareGPT requests (seed {args.seed}), {args.max_num_seqs} seats; flood "
          f"{args.flood_requests} + quiet {args.quiet_requests} on {args.flood_seats} seats", flush=True)
    results, floods = [], []
    for name, make in engines(source, model, args, args.max_num_seqs):
        engine = make()
        results.append(throughput(name, engine, requests))
        print(f"# {name}: {results[-1].output_tok_s:.1f} output tok/s", flush=True)
        _close(engine)
    for name, make in engines(source, model, args, args.flood_seats):
        if "int4" in name:  # the same policy as fp32: one native run shows it
            continue
        engine = make()
        floods.append(flood(name, engine, flood_set, args.flood_requests, args.quiet_requests))
        print(f"# {name}: quiet tenant share {floods[-1].quiet_share:.0%}", flush=True)
        _close(engine)
    print(report(results, floods))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"throughput": [{**asdict(r), "output_tok_s": r.output_tok_s} for r in results],
                       "flood": [{**asdict(f), "quiet_share": f.quiet_share} for f in floods]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
