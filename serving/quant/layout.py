"""Packed weight layouts and the pure-tensor primitives over them (quantize, dequantize, pack, unpack).

THE PACKED LAYOUT (shared with kernels/quant_matmul*; this docstring is the one place it is written down)

int4 ("int4", group-wise asymmetric, group size G in {32, 64, 128}):
    qweight  uint8   [N, K // 2]   row n = output feature; byte j holds k = 2j in the LOW nibble and
                                   k = 2j + 1 in the HIGH nibble; values 0..15
    scales   float16 [N, K // G]
    mins     float16 [N, K // G]
    dequant: w[n, k] = q[n, k] * scales[n, k // G] + mins[n, k // G]
    GGUF Q4_1 (d, m fp16 per 32) imports losslessly as scales = d, mins = m; GGUF Q4_0 (w = d * (q - 8))
    imports losslessly as scales = d, mins = -8 * d (exact in fp16).

int8 ("int8"):
    qweight  int8    [N, K]
    scales   float16 [N, K // G]   G = K for per-channel (scales [N, 1]); G = 32 for GGUF Q8_0 (w = d * q)
    mins     None
    dequant: w[n, k] = q[n, k] * scales[n, k // G]

Rows are independent, so fusing projections (QKV, gate+up) is a concatenation of qweight, scales and mins
along dim 0, and a row permutation (llama.cpp's Q/K interleave) applies to all three alike.
Dequantization computes in float32 as `q * scale + min` (two roundings, no FMA), the same arithmetic as
`gguf.quants.dequantize`, so imported GGUF blocks dequantize bit-identically.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FORMATS = ("int4", "int8")
INT4_GROUP_SIZES = (32, 64, 128)


@dataclass(slots=True)
class QuantizedWeight:
    """One linear layer's weight in the packed layout above."""

    format: str  # "int4" or "int8"
    group_size: int  # G: input features sharing one scale (and min); K for per-channel int8
    qweight: torch.Tensor  # int4: uint8 [N, K // 2], two nibbles per byte; int8: int8 [N, K]
    scales: torch.Tensor  # float16 [N, K // G]
    mins: torch.Tensor | None  # int4: float16 [N, K // G]; int8: None (symmetric)
    shape: tuple[int, int]  # (N, K) of the float weight it stands for

    def __post_init__(self):
        n, k = self.shape
        if self.format not in FORMATS:
            raise ValueError(f"QuantizedWeight.format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.group_size < 1 or k % self.group_size:
            raise ValueError(f"QuantizedWeight.group_size ({self.group_size}) must divide K ({k})")
        packed_k = k // 2 if self.format == "int4" else k
        expect = {"qweight": (n, packed_k), "scales": (n, k // self.group_size)}
        if self.format == "int4":
            expect["mins"] = (n, k // self.group_size)
        for name, want in expect.items():
            got = tuple(getattr(self, name).shape)
            if got != want:
                raise ValueError(f"QuantizedWeight.{name} has shape {got}, expected {want} for {self.format} "
                                 f"weight {self.shape} with group size {self.group_size}")

    @property
    def nbytes(self) -> int:
        tensors = [self.qweight, self.scales] + ([self.mins] if self.mins is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device) -> QuantizedWeight:
        mins = None if self.mins is None else self.mins.to(device)
        return QuantizedWeight(self.format, self.group_size, self.qweight.to(device), self.scales.to(device),
                               mins, self.shape)

    def select_rows(self, index: torch.Tensor) -> QuantizedWeight:
        """The weight with its output rows reordered by `index` (e.g. undoing llama.cpp's Q/K permutation)."""
        mins = None if self.mins is None else self.mins[index]
        return QuantizedWeight(self.format, self.group_size, self.qweight[index], self.scales[index], mins,
                               (len(index), self.shape[1]))


def concat_rows(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Fuses projections along N (QKV, gate+up); all parts must share format, group size and K."""
    first = weights[0]
    for w in weights[1:]:
        if (w.format, w.group_size, w.shape[1]) != (first.format, first.group_size, first.shape[1]):
            raise ValueError(f"cannot fuse {w.format}/g{w.group_size}/K={w.shape[1]} with "
                             f"{first.format}/g{first.group_size}/K={first.shape[1]}")
    mins = None if first.mins is None else torch.cat([w.mins for w in weights])
    return QuantizedWeight(first.format, first.group_size, torch.cat([w.qweight for w in weights]),
                           torch.cat([w.scales for w in weights]), mins,
                           (sum(w.shape[0] for w in weights), first.shape[1]))


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[N, K] integer values 0..15 -> uint8 [N, K // 2]; even k in the low nibble, odd k in the high one."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of input features, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> uint8 [N, K] values 0..15 (inverse of pack_nibbles)."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)


def quantize_int4(weight: torch.Tensor, group_size: int = 32) -> QuantizedWeight:
    """Round-to-nearest asymmetric int4: per group of `group_size` inputs, the 16 levels span [min, max]."""
    n, k = weight.shape
    if group_size not in INT4_GROUP_SIZES or k % group_size:
        raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES} and divide K ({k}), got {group_size}")
    groups = weight.float().reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    # Scales and mins are rounded to fp16 first, so the codes are chosen against the values dequant will use.
    scales = ((hi - lo) / 15).to(torch.float16)
    mins = lo.to(torch.float16)
    safe = torch.where(scales == 0, torch.ones_like(scales), scales).float()
    q = ((groups - mins.float().unsqueeze(-1)) / safe.unsqueeze(-1)).round().clamp(0, 15)
    return QuantizedWeight("int4", group_size, pack_nibbles(q.reshape(n, k)), scales, mins, (n, k))


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """Symmetric per-channel int8: one scale per output row, absmax maps to 127."""
    n, k = weight.shape
    w = weight.float()
    scales = (w.abs().amax(-1, keepdim=True) / 127).to(torch.float16)
    safe = torch.where(scales == 0, torch.ones_like(scales), scales).float()
    q = (w / safe).round().clamp(-127, 127).to(torch.int8)
    return QuantizedWeight("int8", k, q, scales, None, (n, k))


def quantize(weight: torch.Tensor, fmt: str) -> QuantizedWeight:
    """`fmt` is a quantization name as EngineConfig spells it: "int4-g32", "int4-g64", "int4-g128", "int8".

    NOTE: for int4 the group size is an upper bound: a K it does not divide takes the largest allowed group
    size that does (SmolLM2's K = 576 with int4-g128 gets g64), so one format serves every layer of a model.
    """
    if fmt == "int8":
        return quantize_int8(weight)
    if fmt.startswith("int4-g") and fmt[6:].isdigit() and int(fmt[6:]) in INT4_GROUP_SIZES:
        k = weight.shape[1]
        fitting = [g for g in INT4_GROUP_SIZES if g <= int(fmt[6:]) and k % g == 0]
        return quantize_int4(weight, fitting[-1] if fitting else int(fmt[6:]))
    raise ValueError(f"unknown quantization format {fmt!r}; allowed: int4-g32, int4-g64, int4-g128, int8")


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [N, K] the packed one stands for (computed in fp32, then cast to `dtype`)."""
    n, k = qw.shape
    g = qw.group_size
    if qw.format == "int4":
        q = unpack_nibbles(qw.qweight).reshape(n, k // g, g).float()
        w = q * qw.scales.float().unsqueeze(-1) + qw.mins.float().unsqueeze(-1)
    else:
        w = qw.qweight.reshape(n, k // g, g).float() * qw.scales.float().unsqueeze(-1)
    return w.reshape(n, k).to(dtype)
