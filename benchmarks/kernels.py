"""Fused dequant matmul kernels (W4A16, W8A16) against fp16 torch.matmul, and against the device's own ceilings.

    python -m benchmarks.kernels [--m 1 16 256 4096] [--group-size 128] [--shapes llama7b]

Needs a CUDA GPU. In one run it measures the device's ceilings (a device-to-device copy for bandwidth, a large
bf16 torch.matmul for FLOP/s), then for each (M, N, K) of Llama-7B-like linear layers times the W4A16 and W8A16
kernels and the fp16 torch.matmul baseline with triton.testing.do_bench (median), and prints one table: time,
achieved GB/s and TFLOP/s, their fraction of the measured ceilings, and the speed-up over fp16.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

# (K, N) of Llama-7B's linear layers: q/k/v/o, gate/up, down.
LLAMA7B_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
DEFAULT_MS = [1, 16, 256, 4096]


@dataclass(slots=True, frozen=True)
class Problem:
    m: int  # tokens (rows of x)
    n: int  # output features
    k: int  # input features
    fmt: str  # "w4a16", "w8a16" or "fp16"
    group_size: int  # quantization group along K (ignored for fp16)


def weight_bytes(p: Problem) -> int:
    """Bytes of weight state a kernel must read once: codes plus fp16 scales (and mins for int4)."""
    if p.fmt == "fp16":
        return 2 * p.n * p.k
    num_groups = p.k // p.group_size
    if p.fmt == "w4a16":
        return p.n * p.k // 2 + 2 * (2 * p.n * num_groups)
    if p.fmt == "w8a16":
        return p.n * p.k + 2 * p.n * num_groups
    raise ValueError(f"unknown format {p.fmt!r}; expected w4a16, w8a16 or fp16")


def problem_bytes(p: Problem) -> int:
    """Minimum bytes moved: the weights once, fp16 activations in, fp16 outputs out."""
    return weight_bytes(p) + 2 * p.m * p.k + 2 * p.m * p.n


def problem_flops(p: Problem) -> int:
    return 2 * p.m * p.n * p.k


def quant_group_size(fmt: str, k: int, group_size: int) -> int:
    # NOTE: int8 uses per-channel scales (G = K), the usual W8A16 layout; int4 uses the requested group.
    return k if fmt == "w8a16" else group_size


def measure_copy_gbs(torch, do_bench, num_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + bytes written per second): the memory ceiling."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * num_bytes / (ms * 1e-3) / 1e9


def measure_matmul_tflops(torch, do_bench, size: int = 8192) -> float:
    """A large bf16 torch.matmul: the compute ceiling."""
    a = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
    ms = do_bench(lambda: torch.matmul(a, b), return_mode="median")
    return 2 * size ** 3 / (ms * 1e-3) / 1e12


def _make_inputs(torch, p: Problem):
    x = torch.randn(p.m, p.k, dtype=torch.float16, device="cuda")
    groups = p.k // p.group_size
    if p.fmt == "fp16":
        return x, (torch.randn(p.n, p.k, dtype=torch.float16, device="cuda") * 0.02,)
    scales = torch.rand(p.n, groups, device="cuda").half() * 0.01 + 0.001
    if p.fmt == "w4a16":
        qweight = torch.randint(0, 256, (p.n, p.k // 2), dtype=torch.uint8, device="cuda")
        return x, (qweight, scales, (-8 * scales.float()).half())
    return x, (torch.randint(-128, 128, (p.n, p.k), dtype=torch.int8, device="cuda"), scales)


def bench_problem(torch, do_bench, p: Problem) -> float:
    """Median milliseconds of one call (after autotuning, which the first call does)."""
    from kernels.quant_matmul import w4a16_matmul, w8a16_matmul

    x, weights = _make_inputs(torch, p)
    if p.fmt == "fp16":
        (w,) = weights
        fn = lambda: torch.matmul(x, w.T)  # noqa: E731
    elif p.fmt == "w4a16":
        fn = lambda: w4a16_matmul(x, *weights, p.group_size)  # noqa: E731
    else:
        fn = lambda: w8a16_matmul(x, *weights, p.group_size)  # noqa: E731
    fn()
    return do_bench(fn, return_mode="median")


def format_row(p: Problem, ms: float, fp16_ms: float, peak_gbs: float, peak_tflops: float) -> str:
    gbs = problem_bytes(p) / (ms * 1e-3) / 1e9
    tflops = problem_flops(p) / (ms * 1e-3) / 1e12
    return (f"{p.m:>5} {p.k:>6} {p.n:>6} {p.fmt:>6} {ms * 1e3:>10.1f} {gbs:>8.0f} {gbs / peak_gbs:>6.0%} "
            f"{tflops:>8.1f} {tflops / peak_tflops:>6.0%} {fp16_ms / ms:>8.2f}x")


HEADER = (f"{'M':>5} {'K':>6} {'N':>6} {'format':>6} {'time(us)':>10} {'GB/s':>8} {'%bw':>6} "
          f"{'TFLOP/s':>8} {'%flop':>6} {'vs fp16':>9}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="+", default=DEFAULT_MS, help="token counts M")
    parser.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128], help="int4 group size")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("benchmarks.kernels needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.",
              file=sys.stderr)
        return 2
    try:
        from triton.testing import do_bench
    except ImportError:
        print("benchmarks.kernels needs triton (pip install triton); nothing measured.", file=sys.stderr)
        return 2
    peak_gbs, peak_tflops = measure_copy_gbs(torch, do_bench), measure_matmul_tflops(torch, do_bench)
    print(f"device: {torch.cuda.get_device_name()}  ceilings measured now: copy {peak_gbs:.0f} GB/s, "
          f"bf16 matmul {peak_tflops:.0f} TFLOP/s; int4 group size {args.group_size}, int8 per channel")
    print(HEADER)
    for k, n in LLAMA7B_SHAPES:
        for m in args.m:
            fp16 = Problem(m, n, k, "fp16", k)
            fp16_ms = bench_problem(torch, do_bench, fp16)
            print(format_row(fp16, fp16_ms, fp16_ms, peak_gbs, peak_tflops))
            for fmt in ("w4a16", "w8a16"):
                p = Problem(m, n, k, fmt, quant_group_size(fmt, k, args.group_size))
                print(format_row(p, bench_problem(torch, do_bench, p), fp16_ms, peak_gbs, peak_tflops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
