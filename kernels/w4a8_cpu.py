"""CPU quantized matmul with int8 activations (W4A8; W8A8 for int8 weights): integer dot products, as llama.cpp.

At run time each activation row is quantized per block of 32 input features (`xq = round(x / d)`, d = max|x| /
127), and the kernel multiplies the int8 activations against the weight codes with u8 x s8 dot instructions
(AVX-512 VNNI, AVX-VNNI, else pmaddubsw / pmaddwd; a portable loop elsewhere), scaling once per block:
    y[m, n] = sum_b (s[n, g] * d[m, b]) * sum_k(code * xq)  +  min[n, g] * d[m, b] * sum_k(xq)
with the weight as `code * s + min` (int4) or `(code - 128) * s` (int8 codes stored offset, min = -128 * s).
This approximates the fp32-activation kernels (kernels/weight_quant_cpu.py) by the activation rounding only;
the engine checks its greedy agreement against fp32 weights (benchmarks/quant_cpu.py, tests/test_w4a8_cpu.py).

THE BLOCK-LANE LAYOUT. Outputs are taken L at a time (L = 16 with AVX-512BW, else 8), and within each block of 32
input features the codes of an output's 4 consecutive features share one 32-bit lane:
    int4: codes uint8 [N_pad / L, K / 32, 4, L, 4]  byte [p, b, c, i, r] = code(n = pL + i, k = 32b + 4c + r)
                                                    | code(n, k + 16) << 4   (GGUF Q4_1's order within a block)
    int8: codes uint8 [N_pad / L, K / 32, 8, L, 4]  byte [p, b, t, i, r] = code(n, k = 32b + 4t + r) + 128
    scales (mins, int4) fp16 [N_pad / L, K / G, L]
stored flattened as [N_pad / L, K / 32, 16L or 32L]. It is a permutation of the packed bytes (int8: offset by
128): `pack_w4a8` builds it at load and `W4A8Weight.rows` reads rows back in the packed layout.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.cpu_ops import LazyExtension
from kernels.weight_quant_cpu import to_panels  # the scales (and mins) take the panel view as they are

QK = 32  # input features per activation block
_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "w4a8_cpu.cpp")
# NOTE: no -ffast-math and no FMA contraction: the activation rounding must match quantize_activations_ref.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"]
_LDFLAGS = ["-fopenmp"]
_extension = LazyExtension("frugal_w4a8_cpu", [_SOURCE], _CFLAGS, _LDFLAGS, fallback="fp32-activation kernel",
                           headers=("spin_pool.h",))


def w4a8_kernels():
    """The compiled module, or None when disabled or the build failed (logged once)."""
    return _extension.get()


def supports(fmt: str, group_size: int, k: int) -> bool:
    """Whether a weight of this format, group size and K fits the layout (K and G whole blocks of 32)."""
    return fmt in ("int4", "int8") and k % QK == 0 and group_size % QK == 0 and k % group_size == 0


@dataclass(slots=True)
class W4A8Weight:
    """A packed weight in the block-lane layout above, as the kernel reads it."""

    format: str  # "int4" or "int8"
    group_size: int  # G: input features sharing one scale (and min)
    codes: torch.Tensor  # uint8 [N_pad / L, K / 32, 16L (int4) or 32L (int8)]
    scales: torch.Tensor  # fp16 [N_pad / L, K / G, L]
    mins: torch.Tensor | None  # int4: fp16 [N_pad / L, K / G, L]; int8: None
    shape: tuple[int, int]  # (N, K) of the float weight, before padding

    @property
    def lanes(self) -> int:
        return self.scales.shape[2]

    @property
    def nbytes(self) -> int:
        tensors = [self.codes, self.scales] + ([self.mins] if self.mins is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(qweight, scales, mins) of rows `index` back in the packed layout (serving/quant/layout.py)."""
        lanes, k = self.lanes, self.shape[1]
        panel, lane = index // lanes, index % lanes
        chunks = 4 if self.format == "int4" else 8
        codes = self.codes.view(self.codes.shape[0], k // QK, chunks, lanes, 4)[panel, :, :, lane, :]
        mins = None if self.mins is None else self.mins[panel, :, lane]
        scales = self.scales[panel, :, lane]
        if self.format == "int8":
            return (codes.reshape(len(index), k) ^ 0x80).view(torch.int8), scales, mins
        nibbles = torch.cat([codes & 0x0F, codes >> 4], dim=2).reshape(len(index), k)  # [n, K] codes in k order
        return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), scales, mins


def pack_w4a8(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, group_size: int,
              shape: tuple[int, int], lanes: int | None = None) -> W4A8Weight:
    """The packed layout (int4 uint8 [N, K / 2], int8 [N, K]; fp16 scales / mins [N, K / G]) -> block-lane."""
    lanes = lanes or w4a8_kernels().lane_count()
    n, k = shape
    if not supports("int4" if mins is not None else "int8", group_size, k):
        raise ValueError(f"the W4A8 layout needs K and the group size in whole blocks of {QK}, got K={k}, G={group_size}")
    if mins is not None:
        codes = torch.stack([qweight & 0x0F, qweight >> 4], dim=-1).reshape(n, k)
    else:
        codes = qweight.view(torch.uint8) ^ 0x80
    codes = F.pad(codes, (0, 0, 0, -n % lanes)) if n % lanes else codes
    num_panels = codes.shape[0] // lanes
    if mins is not None:
        # [p, i, b, half, c, r] -> [p, b, c, i, r, half]; byte = low half | high half << 4
        split = codes.reshape(num_panels, lanes, k // QK, 2, 4, 4).permute(0, 2, 4, 1, 5, 3)
        blocks = split[..., 0] | (split[..., 1] << 4)
    else:
        blocks = codes.reshape(num_panels, lanes, k // QK, 8, 4).permute(0, 2, 3, 1, 4)
    codes = blocks.reshape(num_panels, k // QK, -1).contiguous()
    return W4A8Weight("int4" if mins is not None else "int8", group_size, codes, to_panels(scales, lanes),
                      None if mins is None else to_panels(mins, lanes), shape)


def w4a8_linear(x: torch.Tensor, weight: W4A8Weight) -> torch.Tensor:
    """x: [M, K] fp32 -> [M, N] fp32. Needs the compiled module."""
    n, k = weight.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {tuple(x.shape)}")
    int4 = weight.mins is not None
    mins = weight.mins if int4 else weight.scales.new_empty(0)
    return w4a8_kernels().w4a8_linear(x, weight.codes, weight.scales, mins, n, weight.group_size, int4)


def quantize_activations_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] fp32 -> (xq int8 [M, K], d fp32 [M, K / 32]), rounding as the kernel does."""
    blocks = x.float().reshape(x.shape[0], -1, QK)
    d = blocks.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    xq = torch.round(blocks * inv.unsqueeze(-1)).to(torch.int8)
    return xq.reshape(x.shape), d


def w4a8_block_terms_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                         group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms the kernel adds per block of 32 features, in fp64: (s * d) * dot(code, xq) and
    min * d * sum(xq), each [M, N, K / 32]. Their sum over blocks is the kernel's output."""
    # qweight: int4 uint8 [N, K // 2] (even k low nibble) or int8 [N, K]; scales/mins: fp16 [N, K // G]
    xq, d = quantize_activations_ref(x)
    m, k = xq.shape
    if mins is not None:
        codes = torch.stack([qweight & 0x0F, qweight >> 4], dim=-1).reshape(qweight.shape[0], k).long()
    else:
        codes = qweight.long() + 128
    n = codes.shape[0]
    dots = torch.einsum("mbk,nbk->mnb", xq.long().reshape(m, -1, QK), codes.reshape(n, -1, QK)).double()
    sums = xq.long().reshape(m, -1, QK).sum(-1).double()  # [M, K / 32]
    s = scales.double().repeat_interleave(group_size // QK, dim=1)  # [N, K / 32]
    mn = (mins.double() if mins is not None else -128 * scales.double()).repeat_interleave(group_size // QK, dim=1)
    d = d.double()
    return dots * (s.unsqueeze(0) * d.unsqueeze(1)), mn.unsqueeze(0) * (d * sums).unsqueeze(1)


def w4a8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                    group_size: int) -> torch.Tensor:
    """The kernel's arithmetic in torch, over the packed layout: exact integer dots, scaled per block."""
    dot_terms, min_terms = w4a8_block_terms_ref(x, qweight, scales, mins, group_size)
    return (dot_terms.sum(-1) + min_terms.sum(-1)).float()
