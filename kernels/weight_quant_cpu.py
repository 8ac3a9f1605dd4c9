"""CPU weight-only quantized matmul (fp32 activations) over a panel view of serving/quant/layout.py's layout.

THE PANEL LAYOUT. The packed weight's rows (output features) are taken P at a time, P being the vector width
the kernel was compiled for (16 with AVX-512, else 8), and each group of P rows is transposed so that one
vector load reads one input feature for P outputs:
    qweight  int4: uint8 [N_pad / P, K / 2, P]   byte [p, j, i] = the packed byte [p * P + i, j]: k = 2j in the
                                                 low nibble, k = 2j + 1 in the high one, as in the packed layout
             int8: int8  [N_pad / P, K, P]
    scales   fp16 [N_pad / P, K / G, P]; mins likewise (int4)
N is padded to a multiple of P with zero rows. It is a pure permutation of the packed bytes (no re-encoding):
`pack_panels` builds it at load and `PanelWeight.rows` reads rows back in the packed layout.

Compiled on first use like kernels/cpu_ops.py (torch C++ extension, cached under TORCH_EXTENSIONS_DIR once per
CPU feature set); `weight_quant_kernels()` returns None when FRUGAL_CPU_KERNELS=0 or the build fails (the reason
in `_extension.error`), and callers fall back to dequantize-then-matmul. The launcher checks shapes; `quant_linear_cpu_ref` is the pure-torch reference.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


@dataclass(slots=True)
class PanelWeight:
    """A packed weight in the panel layout above, as the CPU kernel reads it."""

    format: str  # "int4" or "int8"
    group_size: int  # G: input features sharing one scale (and min)
    qweight: torch.Tensor  # int4: uint8 [N_pad / P, K / 2, P]; int8: int8 [N_pad / P, K, P]
    scales: torch.Tensor  # fp16 [N_pad / P, K / G, P]
    mins: torch.Tensor | None  # int4: fp16 [N_pad / P, K / G, P]; int8: None
    shape: tuple[int, int]  # (N, K) of the float weight, before padding

    @property
    def nbytes(self) -> int:
        tensors = [self.qweight, self.scales] + ([self.mins] if self.mins is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def padded_rows(self) -> int:
        return self.qweight.shape[0] * self.qweight.shape[2]

    def slice(self, start: int, stop: int) -> PanelWeight:
        """Panels [start, stop) as a weight of their own (views, no copy)."""
        width = self.qweight.shape[2]
        stop = min(stop, self.qweight.shape[0])
        mins = None if self.mins is None else self.mins[start:stop]
        n = min(self.shape[0], stop * width) - start * width
        return PanelWeight(self.format, self.group_size, self.qweight[start:stop], self.scales[start:stop], mins,
                           (n, self.shape[1]))

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(qweight, scales, mins) of rows `index` back in the packed layout, e.g. for embedding lookups."""
        width = self.qweight.shape[2]
        panel, lane = index // width, index % width
        mins = None if self.mins is None else self.mins[panel, :, lane]
        return self.qweight[panel, :, lane], self.scales[panel, :, lane], mins


def to_panels(t: torch.Tensor, width: int) -> torch.Tensor:
    # [N, C] -> zero-pad N to a multiple of width -> [N_pad / width, C, width]
    n = t.shape[0]
    t = F.pad(t, (0, 0, 0, -n % width)) if n % width else t
    return t.reshape(-1, width, t.shape[1]).transpose(1, 2).contiguous()


def pack_panels(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, group_size: int,
                shape: tuple[int, int], width: int | None = None) -> PanelWeight:
    """The packed layout -> the panel layout (width defaults to the compiled kernel's vector width)."""
    width = width or weight_quant_kernels().panel_width()
    fmt = "int4" if mins is not None else "int8"
    return PanelWeight(fmt, group_size, to_panels(qweight, width), to_panels(scales, width),
                       None if mins is None else to_panels(mins, width), shape)


def quant_linear_cpu(x: torch.Tensor, weight: PanelWeight) -> torch.Tensor:
    """x: [M, K] fp32 -> [M, N] fp32. Needs the compiled module."""
    n, k = weight.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {tuple(x.shape)}")
    int4 = weight.mins is not None
    mins = weight.mins if int4 else weight.scales.new_empty(0)
    return weight_quant_kernels().panel_linear(x, weight.qweight, weight.scales, mins, n, weight.group_size, int4)


def dequant_panels_t(weight: PanelWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """The weight dequantized and transposed, fp32 [K, N] (a view of [K, N_pad], into `out` when given):
    bit-identical to dequant_ref(...).T."""
    n, k = weight.shape
    out = torch.empty(k, weight.padded_rows) if out is None else out
    int4 = weight.mins is not None
    mins = weight.mins if int4 else weight.scales.new_empty(0)
    weight_quant_kernels().dequant_panels_t(weight.qweight, weight.scales, mins, weight.group_size, int4, out)
    return out[:, :n]


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
