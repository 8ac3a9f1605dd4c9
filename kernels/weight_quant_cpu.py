"""CPU weight-only quantized matmul (fp32 activations) over the packed layout of serving/quant/layout.py.

Compiled on first use like kernels/cpu_ops.py (torch C++ extension, cached under TORCH_EXTENSIONS_DIR);
`weight_quant_kernels()` returns None when FRUGAL_CPU_KERNELS=0 or the build fails, and callers fall back to
dequantize-then-matmul. Launchers check shapes; `quant_linear_cpu_ref` is the pure-torch reference.
"""
from __future__ import annotations

import os

import torch

from kernels.cpu_ops import LazyExtension

_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "weight_quant_cpu.cpp")
# NOTE: no -ffast-math and no FMA contraction: dequantization must round exactly as the torch reference does.
# -fopenmp makes at::parallel_for parallel (without it the pragma is dropped and the loops run on one thread);
# libgomp.so.1 resolves to the copy torch has already loaded, so there is one OpenMP runtime.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"]
_LDFLAGS = ["-fopenmp"]
_extension = LazyExtension("frugal_weight_quant_cpu", [_SOURCE], _CFLAGS, _LDFLAGS,
                           fallback="dequantize + matmul")


def weight_quant_kernels():
    """The compiled module, or None when disabled or the build failed (logged once)."""
    return _extension.get()


def _no_mins(scales: torch.Tensor) -> torch.Tensor:
    return scales.new_empty(0)


def quant_linear_cpu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                     group_size: int) -> torch.Tensor:
    """x: [M, K] fp32; qweight: int4 uint8 [N, K // 2] (mins given) or int8 [N, K] (mins None);
    scales, mins: fp16 [N, K // group_size]  ->  [M, N] fp32. Needs the compiled module."""
    int4 = mins is not None
    return weight_quant_kernels().quant_linear(x, qweight, scales, mins if int4 else _no_mins(scales),
                                               group_size, int4)


def dequant_cpu(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, group_size: int,
                out: torch.Tensor | None = None, split: bool = False) -> torch.Tensor:
    """The packed weight as fp32 [N, K] (into `out` when given), bit-identical to dequant_ref; with `split`
    (int4) its columns are in `split_columns` order."""
    int4 = mins is not None
    return weight_quant_kernels().dequant(qweight, scales, mins if int4 else _no_mins(scales), group_size, int4,
                                          out, split)


def split_columns(x: torch.Tensor) -> torch.Tensor:
    """[M, K] -> each 16 columns reordered as [k, k+2, ..., k+14, k+1, ..., k+15] (dequant_cpu's split order)."""
    m, k = x.shape
    return x.reshape(m, k // 16, 8, 2).transpose(2, 3).reshape(m, k)


def dequant_ref(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                group_size: int) -> torch.Tensor:
    # qweight: int4 uint8 [N, K // 2] (even k low nibble) or int8 [N, K]; scales/mins: fp16 [N, K // G]
    if mins is not None:
        q = torch.stack([qweight & 0x0F, qweight >> 4], dim=-1).reshape(qweight.shape[0], -1)
    else:
        q = qweight
    n, k = q.shape
    q = q.reshape(n, k // group_size, group_size).float()
    w = q * scales.float().unsqueeze(-1)
    if mins is not None:
        w = w + mins.float().unsqueeze(-1)
    return w.reshape(n, k)


def quant_linear_cpu_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                         group_size: int) -> torch.Tensor:
    return x.float() @ dequant_ref(qweight, scales, mins, group_size).T
