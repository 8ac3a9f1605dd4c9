"""The GPU suite for a CUDA node (an H200, or any NVIDIA GPU): one command, one report.

    python -m benchmarks.gpu_suite [--out gpu-report] [--quick]      (or: make gpu-suite)

Runs, one after the other, writing each one's output and a summary to OUT/report.md:
1. `pytest -m gpu`: the Triton W4A16 / W8A16 kernels against their torch references, and the engine's packed
   layers, which must all run the "triton" path (a fallback to dequantize + matmul fails the tests);
2. `benchmarks.kernels` at M = 1, 2, 4, ..., 256: each kernel's time beside fp16 torch.matmul, and its achieved
   bandwidth and FLOP/s as a fraction of the ceilings (HBM copy, bf16 matmul) measured in the same run;
3. `benchmarks.throughput --device cuda`: the engine benchmark (ShareGPT, prefix caching on and off) on the GPU.
Exits 2 without a CUDA device, 1 when any part failed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOFLINE_MS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def _run(name: str, cmd: list[str], out_dir: str, timeout: int) -> tuple[int, float, str]:
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = 124, f"{(e.stdout or b'').decode(errors='replace')}\n(timed out after {timeout} s)"
    elapsed = time.monotonic() - start
    with open(os.path.join(out_dir, f"{name}.txt"), "w") as f:
        f.write(text)
    print(f"{name}: exit {rc} in {elapsed:.0f} s", flush=True)
    return rc, elapsed, text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-report", help="report folder (default gpu-report)")
    parser.add_argument("--quick", action="store_true", help="fewer M values and a smoke engine run")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("the GPU suite needs a CUDA device (torch.cuda.is_available() is False); nothing run", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    py = sys.executable
    ms = [1, 16, 256] if args.quick else ROOFLINE_MS
    parts = [
        ("pytest_gpu", [py, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider",
                        f"--junitxml={os.path.join(args.out, 'pytest_gpu.xml')}"], 1200),
        ("kernels", [py, "-m", "benchmarks.kernels", "--m", *map(str, ms)], 1200),
        ("engine", [py, "-m", "benchmarks.throughput", "--device", "cuda", "--quantization", "auto", "--skip-hf",
                    *(["--quick"] if args.quick else [])], 1800),
    ]
    lines = [f"# GPU suite: {torch.cuda.get_device_name()}", "",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", ""]
    failed = False
    for name, cmd, timeout in parts:
        rc, elapsed, text = _run(name, cmd, args.out, timeout)
        failed |= rc != 0
        lines += [f"## {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'}, {elapsed:.0f} s", "",
                  f"`{' '.join(cmd[1:])}`", "", "```", *text.strip().splitlines()[-60:], "```", ""]
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"report: {os.path.join(args.out, 'report.md')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
