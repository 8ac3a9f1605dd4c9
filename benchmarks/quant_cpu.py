"""Weight-only quantization on the CPU: the per-shape table of matmul paths, then decode speed and weight memory
of the packed int4 model against fp32, in one run.

    python -m benchmarks.quant_cpu [--max-tokens 48] [--skip-table] [--quick]

Part 1 times every CPU path of serving/quant/linear.py on SmolLM2-135M's shapes (N x K) at M = 1, 32, 64,
256 rows, beside fp32 `F.linear` on the same weight. In isolation a 2-8 MB fp32 weight stays in the CPU cache,
so this table flatters fp32; part 2 is the real figure: whole-model greedy decode through the engine at batch
1 and batch 32, bundled Q4_1 weights kept packed ("auto": int4 linears, the Q8_0 embedding as int8 shared
with the tied lm_head), on fp32 activations ("kernel") and on int8 activations ("w4a8"), against the same weights
dequantized to fp32 ("none").
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see serving/__init__.py
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

from benchmarks.metrics import CpuSnapshot

SHAPES = [(960, 576, "qkv_proj"), (576, 576, "o_proj"), (3072, 576, "gate_up_proj"), (576, 1536, "down_proj")]
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village by the sea,",
           "1, 2, 3, 4, 5,", "The three laws of thermodynamics are", "SELECT name FROM users WHERE",
           "In 1969, the first humans", "Translate to French: Good morning, how are you?"]


def _time_us(fn, min_s: float = 0.2) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_s:
        fn()
        n += 1
    return (time.perf_counter() - start) / n * 1e6


def path_table(rows=(1, 32, 64, 256)) -> None:
    from serving.quant.layout import quantize
    from serving.quant.linear import QuantLinear

    paths = ["w4a8", "kernel", "dequant", "fbgemm", "int4pack"]
    print("Part 1: us per call, int4-g32 weight (int8pack: per-channel int8 weight); fp32 F.linear is the baseline")
    print(f"{'shape':>22} {'M':>4} {'fp32':>8} " + " ".join(f"{p:>9}" for p in paths) + f" {'int8pack':>9}")
    for n, k, name in SHAPES:
        weight = torch.randn(n, k) * 0.02
        qw = quantize(weight, "int4-g32")
        layers = {p: QuantLinear(qw, cpu_path=p) for p in paths}
        q8 = quantize(weight, "int8")
        q8_scales = q8.scales.float().squeeze(1)
        for m in rows:
            x = torch.randn(m, k)
            base = _time_us(lambda: F.linear(x, weight))
            cells = [_time_us(lambda layer=layers[p]: layer(x)) for p in paths]
            cells.append(_time_us(lambda: torch.ops.aten._weight_int8pack_mm(x, q8.qweight, q8_scales), 0.05))
            print(f"{name + f' {n}x{k}':>22} {m:>4} {base:>8.0f} " + " ".join(f"{c:>9.0f}" for c in cells),
                  flush=True)


def decode(llm, batch: int, max_tokens: int) -> tuple[float, int]:
    """Output tokens per second of `batch` concurrent greedy requests (prompts are short: decode dominates)."""
    from serving import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(batch)]
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    num_tokens = sum(len(o.token_ids) for o in outs)
    return num_tokens / elapsed, num_tokens


def model_comparison(max_tokens: int, batches=(1, 32)) -> None:
    from serving import LLM
    from serving.loaders import load_model
    from serving.quant.install import quant_summary

    print("\nPart 2: whole-model greedy decode, bundled SmolLM2-135M (Q4_1 weights)")
    runs = (("fp32", "none", None), ("int4 fp32-act", "auto", "kernel"), ("int4 w4a8", "auto", "w4a8"))
    results = {}
    for label, quantization, cpu_path in runs:
        loaded = load_model(quantization=quantization, quant_cpu_path=cpu_path)
        llm = LLM(loaded=loaded, quantization=quantization, kv_cache_memory_bytes=256 << 20, max_model_len=512)
        speeds = {}
        for batch in batches:
            before = CpuSnapshot.take()
            speeds[batch], _ = decode(llm, batch, max_tokens)
            speeds[f"others{batch}"] = before.others_share(CpuSnapshot.take())
        results[label] = (quant_summary(loaded.model), speeds)
        del llm, loaded
    base_mem, base_speed = results["fp32"]
    print(f"{'':28} " + " ".join(f"{label:>14}" for label, _, _ in runs) + "  (ratio to fp32)")
    print(f"{'weight memory (MiB)':28} " + " ".join(
        f"{mem['total_bytes'] / 2**20:>7.1f} ({mem['total_bytes'] / base_mem['total_bytes']:.2f})"
        for mem, _ in results.values()))
    for batch in batches:
        print(f"{f'decode tok/s, batch {batch}':28} " + " ".join(
            f"{speed[batch]:>7.1f} ({speed[batch] / base_speed[batch]:.2f})" for _, speed in results.values()))
    shares = ", ".join(f"{100 * speed[f'others{b}']:.0f}%" for _, speed in results.values() for b in batches)
    print(f"(CPU taken by other processes during the phases: {shares})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens generated per request")
    parser.add_argument("--skip-table", action="store_true", help="only the whole-model comparison")
    parser.add_argument("--quick", action="store_true", help="smoke run: M = 1, 32 and 8 tokens")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*quantize_per_.*|.*quantized tensor.*")
    if not args.skip_table:
        path_table((1, 32) if args.quick else (1, 32, 64, 256))
    model_comparison(8 if args.quick else args.max_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
