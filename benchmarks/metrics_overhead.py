"""What the metrics cost on the hot path: the same seeded ShareGPT workload through one engine with its stat
logger on (every counter and histogram recorded per step, and a scrape of the whole registry every second, far
more often than Prometheus scrapes) and off, alternating A B A B, printed side by side.

    python -m benchmarks.metrics_overhead [--num-requests 48] [--rounds 3] [--quantization auto]

Target: output tok/s with metrics on within 2% of metrics off.
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time

from benchmarks.sharegpt import sample_requests
from benchmarks.throughput import default_model_path, load_tokenizer

TARGET_RATIO = 0.98


class Scraper:
    """Renders the registry every `interval_s` from another thread while the engine runs, as a scrape would."""

    def __init__(self, registry, interval_s: float = 1.0):
        self.registry, self.interval_s = registry, interval_s
        self.stop = threading.Event()
        self.num_scrapes = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from prometheus_client import generate_latest

        while not self.stop.wait(self.interval_s):
            generate_latest(self.registry)
            self.num_scrapes += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def run_once(llm, requests, metrics_on: bool, registry, stat_logger) -> tuple[float, int]:
    from serving import SamplingParams

    llm.engine.stat_logger = stat_logger if metrics_on else None
    params = [SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0.0) for r in requests]
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    scraper = Scraper(registry)
    t0 = time.monotonic()
    if metrics_on:
        with scraper:
            outputs = llm.generate(prompts, params)
    else:
        outputs = llm.generate(prompts, params)
    elapsed = time.monotonic() - t0
    num_tokens = sum(len(o.token_ids) for o in outputs)
    return num_tokens / elapsed, scraper.num_scrapes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--num-requests", type=int, default=48)
    p.add_argument("--max-prompt-len", type=int, default=256)
    p.add_argument("--max-output-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="A B pairs (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantization", default="auto", help="engine weights (default auto: what `frugal serve` runs)")
    args = p.parse_args(argv)
    model = args.model or default_model_path()

    from prometheus_client import CollectorRegistry

    from serving import LLM
    from serving.metrics.config import MetricsConfig
    from serving.metrics.engine import EngineCollector, EngineStatLogger

    llm = LLM(model, quantization=args.quantization, max_num_seqs=64, max_num_batched_tokens=512)
    requests = sample_requests(load_tokenizer(model), args.num_requests, args.seed, args.max_prompt_len,
                               args.max_output_len)
    registry = CollectorRegistry(auto_describe=False)
    stat_logger = EngineStatLogger(registry, "bench", llm.engine.max_model_len)
    registry.register(EngineCollector(llm.engine.stats, "bench", MetricsConfig(), {}))
    llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in requests[:4]])  # warm-up
    on, off, scrapes = [], [], 0
    for i in range(args.rounds):
        for metrics_on in (True, False) if i % 2 == 0 else (False, True):
            tok_s, n = run_once(llm, requests, metrics_on, registry, stat_logger)
            (on if metrics_on else off).append(tok_s)
            scrapes += n
            print(f"round {i + 1}: metrics {'on ' if metrics_on else 'off'} {tok_s:7.1f} output tok/s", flush=True)
    ratio = statistics.median(on) / statistics.median(off)
    samples = registry.get_sample_value("frugal:generation_tokens_total", {"model_name": "bench"})
    print(f"\n{len(requests)} ShareGPT requests (seed {args.seed}), {args.rounds} rounds A B, {scrapes} scrapes; "
          f"metrics counted {samples:.0f} generated tokens")
    print(f"metrics on : {statistics.median(on):7.1f} output tok/s (median)")
    print(f"metrics off: {statistics.median(off):7.1f} output tok/s (median)   <- baseline")
    print(f"ratio on/off: {ratio:.3f}  (target >= {TARGET_RATIO}: {'met' if ratio >= TARGET_RATIO else 'MISSED'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
