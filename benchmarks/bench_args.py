"""`frugal bench`'s command line, kept apart from the benchmark so that `frugal --help` loads nothing heavy."""
from __future__ import annotations

import argparse
import os

MODES = ("throughput", "latency", "prefix", "single-stream")
WORKLOADS = ("sharegpt", "long-context")
PEER_NAMES = ("vllm", "llamacpp", "transformers")  # --peers takes these; frugal always runs


def _csv_ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need a comma-separated list of integers >= 1, got {text!r}")
    return values


def _csv_floats(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or not all(v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"need a comma-separated list of rates > 0, got {text!r}")
    return values


def _peer_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in PEER_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer {unknown[0]!r}: the peers are {', '.join(PEER_NAMES)}")
    return list(dict.fromkeys(names))


MODE_DEFAULTS = {  # num_requests, max_output_len
    "throughput": (64, 64), "latency": (64, 64), "prefix": (32, 32), "single-stream": (8, 128),
}


def add_arguments(p) -> None:
    p.add_argument("mode", choices=MODES, help="what to measure")
    p.add_argument("--peers", type=_peer_list, default=list(PEER_NAMES),
                   help=f"comma-separated stacks to run beside frugal (default: {','.join(PEER_NAMES)}; "
                        "'' for frugal alone); one that is not installed is reported as absent")
    p.add_argument("--out", required=True, help="directory for report.json, report.md and the plots")
    p.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M Q4_1)")
    p.add_argument("--workload", choices=WORKLOADS, default="sharegpt",
                   help="ShareGPT prompts as they come, or long ones of 1024-3072 tokens (not for prefix)")
    p.add_argument("--num-requests", type=int, default=None, help="requests per point (default: by mode)")
    p.add_argument("--max-output-len", type=int, default=None, help="output tokens per request, at most")
    p.add_argument("--max-prompt-len", type=int, default=1024, help="ShareGPT prompt tokens, at most")
    p.add_argument("--prefix-len", type=int, default=1024, help="prefix: shared system-prompt tokens")
    p.add_argument("--concurrency", type=_csv_ints, default=[8, 32, 64],
                   help="throughput: requests in flight at each point (prefix: the first one)")
    p.add_argument("--rates", type=_csv_floats, default=[1.0, 2.0, 4.0], help="latency: requests a second")
    p.add_argument("--repeats", type=int, default=2, help="times through every stack, alternating (A B A B)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads per server (default: all cores)")
    p.add_argument("--kv-cache-mib", type=int, default=2048, help="KV cache per server")
    p.add_argument("--price-per-device-hour", type=float, default=0.10,
                   help="USD an hour for the machine the servers run on (default 0.10, a 2-core CPU node)")
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def finish_arguments(args) -> None:
    """Fills the defaults that depend on the mode; raises ValueError naming a bad value."""
    num_requests, max_output_len = MODE_DEFAULTS[args.mode]
    args.num_requests = args.num_requests or num_requests
    args.max_output_len = args.max_output_len or max_output_len
    args.threads = args.threads or len(os.sched_getaffinity(0))
    for name in ("num_requests", "max_output_len", "max_prompt_len", "prefix_len", "repeats", "threads",
                 "kv_cache_mib"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_output_len < 4:
        raise ValueError(f"--max-output-len must be >= 4, got {args.max_output_len}")
    if args.price_per_device_hour < 0:
        raise ValueError(f"--price-per-device-hour must be >= 0, got {args.price_per_device_hour}")
    if args.mode == "prefix" and args.workload != "sharegpt":
        raise ValueError("--workload long-context does not apply to prefix, whose prompts are the shared prefix")
