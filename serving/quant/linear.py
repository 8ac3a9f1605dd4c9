"""`QuantLinear`: a linear layer over a QuantizedWeight, and the per-device matmul paths it runs.

The path is chosen once, when the layer is built (`choose_path`), and each path turns the QuantizedWeight into
what its kernel reads (`_prepare_*`). CPU paths, measured on this project's CPUs by benchmarks/quant_cpu.py:
- "w4a8": kernels/w4a8_cpu.py: activations quantized per block of 32 to int8 at run time, integer dot products
  against the packed codes (VNNI / pmaddubsw), every row count. 1.4-3.5x the "kernel" path per layer and faster
  than fp32 GEMM up to prefill sizes; it rounds activations, so its greedy outputs agree with fp32's on most
  tokens, not all (the agreement gate: serving/quant/path_gate.py, tests/test_quant_engine.py).
- "kernel": kernels/weight_quant_cpu.py on fp32 activations, over the panel view of the packed weight it
  takes at load: dequantized in registers for a few rows, in cache-sized panels under a register-blocked
  micro-kernel for more, and from `KERNEL_GEMM_MIN_M` rows (prefill) dequantized whole into a reused buffer
  for the float GEMM, whose blocking wins once the dequantization is spread over that many rows.
- "fbgemm": int8 weights prepacked for fbgemm (`quantized.linear_dynamic`), activations quantized per call.
- "int4pack": torch's int4 CPU kernel (`_weight_int4pack_mm_for_cpu`) on bf16 activations.
- "dequant": dequantize to the compute dtype on every call, then a float matmul: the reference every other
  path is checked against, and the fallback for shapes the kernels refuse.
GPU: "triton" calls kernels.quant_matmul's fused dequant-matmul when that module exists, else "dequant".
"""
from __future__ import annotations

import importlib
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from kernels.weight_quant_cpu import (PanelWeight, dequant_panels_t, pack_panels, quant_linear_cpu,
                                      weight_quant_kernels)
from kernels.w4a8_cpu import W4A8Weight, pack_w4a8, w4a8_kernels, w4a8_linear
from kernels.w4a8_cpu import supports as w4a8_supports
from serving.quant.layout import QuantizedWeight, dequantize, unpack_nibbles

CPU_PATHS = ("auto", "w4a8", "kernel", "fbgemm", "int4pack", "dequant")
# NOTE: measured in benchmarks/quant_cpu.py: fbgemm is the fastest per layer but quantizes activations per
# tensor, and the bundled model's greedy outputs diverge at once (0% token agreement); int4pack rounds
# activations and outputs to bf16 (86% agreement, slower than fp32 at M >= 32). "kernel" keeps fp32
# activations (100% agreement on the engine test). "w4a8" rounds activations to int8 per block of 32: 96-98%
# greedy agreement with fp32 at 1.4-3.5x the speed per layer. Its rounding turns any last-bit difference into a
# different code, so it is only safe because every row is rounded on its own here and the CPU attention kernel
# rounds a token the same however it is batched. "auto" (serving/quant/path_gate.py) takes it where it builds,
# fits and meets the agreement gate; the engine's default (EngineConfig.quant_cpu_path) asks for "auto", a layer
# built on its own keeps "kernel".
DEFAULT_CPU_PATH = "kernel"
KERNEL_GEMM_MIN_M = 128  # from here on the float GEMM over a dequantized weight wins (benchmarks/quant_cpu.py)
KERNEL_TILE_PANELS = 256  # panels dequantized per GEMM: whole layers, the lm_head in tiles of 2-4k rows
_tile_buffers = threading.local()  # per thread: one fp32 buffer reused for every tile (fresh MBs page-fault)


def _tile_buffer(numel: int) -> torch.Tensor:
    buffer = getattr(_tile_buffers, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        buffer = _tile_buffers.buffer = torch.empty(numel)
    return buffer[:numel]


def _triton_ops():
    try:
        return importlib.import_module("kernels.quant_matmul")
    except ImportError:
        return None


def choose_path(qw: QuantizedWeight, device: torch.device, cpu_path: str | None = None) -> str:
    """The matmul path for this weight on this device; called once per layer at load."""
    if device.type == "cuda":
        return "triton" if _triton_ops() is not None else "dequant"
    path = cpu_path or DEFAULT_CPU_PATH
    if path not in CPU_PATHS:
        raise ValueError(f"cpu quant path must be one of {', '.join(CPU_PATHS)}, got {path!r}")
    if path in ("auto", "w4a8"):
        if w4a8_kernels() is not None and w4a8_supports(qw.format, qw.group_size, qw.shape[1]):
            return "w4a8"
        path = "kernel"
    if path == "kernel" and weight_quant_kernels() is None:
        return "dequant"
    if path == "int4pack" and (qw.format != "int4" or qw.shape[1] % qw.group_size or qw.group_size < 32):
        return "dequant"
    return path


class QuantLinear(nn.Module):
    """Drop-in for nn.Linear(K, N) whose weight is a QuantizedWeight; forward dispatches to `self.path`."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", cpu_path: str | None = None):
        super().__init__()
        device = torch.device(device)
        self.device = device
        self.out_features, self.in_features = qw.shape
        self.format, self.group_size = qw.format, qw.group_size
        self.dtype = dtype  # compute dtype of the activations it gets and returns
        self.path = choose_path(qw, device, cpu_path)
        self.bias = None if bias is None else nn.Parameter(bias.to(device, dtype), requires_grad=False)
        # Each path keeps only the tensors its kernel reads, so the weight is held once.
        self.qw: QuantizedWeight | None = None  # our layout: "dequant" and "triton"
        self.panels: PanelWeight | None = None  # its panel view: "kernel"
        self.lanes: W4A8Weight | None = None  # its block-lane view: "w4a8"
        self.packed = None  # fbgemm's prepacked int8 weight
        self.int4pack: tuple[torch.Tensor, torch.Tensor] | None = None  # torch int4 layout, [K/G, N, 2] bf16
        self._prepare(qw.to(device))

    # -- preparation (once, at load) --------------------------------------------------------------------
    def _prepare(self, qw: QuantizedWeight) -> None:
        """Builds `self.path`'s view of the weight and looks up that path's matmul once, for every forward."""
        getattr(self, f"_prepare_{self.path}")(qw)
        self._mm = getattr(self, f"_mm_{self.path}")

    def _prepare_dequant(self, qw: QuantizedWeight) -> None:
        self.qw = qw

    _prepare_triton = _prepare_dequant

    def _prepare_kernel(self, qw: QuantizedWeight) -> None:
        self.panels = pack_panels(qw.qweight, qw.scales, qw.mins, qw.group_size, qw.shape)

    def _prepare_w4a8(self, qw: QuantizedWeight) -> None:
        self.lanes = pack_w4a8(qw.qweight, qw.scales, qw.mins, qw.group_size, qw.shape)

    def _prepare_fbgemm(self, qw: QuantizedWeight) -> None:
        weight = dequantize(qw)
        if qw.format == "int8" and qw.group_size == qw.shape[1]:  # already per-channel int8: no requantization
            q, scales = qw.qweight, qw.scales.double().squeeze(1)
        else:
            scales = (weight.abs().amax(1) / 127).clamp_min(1e-12).double()
            q = (weight / scales.unsqueeze(1)).round().clamp(-127, 127).to(torch.int8)
        zeros = torch.zeros(qw.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensor creation warns of a future deprecation
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(q, scales, zeros, 0)
            self.packed = torch.ops.quantized.linear_prepack(qweight, None)

    def _prepare_int4pack(self, qw: QuantizedWeight) -> None:
        codes = unpack_nibbles(qw.qweight).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        # torch's kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale
        scales, mins = qw.scales.float(), qw.mins.float()
        zeros = torch.stack([scales, mins + 8 * scales], dim=-1).transpose(0, 1).contiguous()
        self.int4pack = (packed, zeros.to(torch.bfloat16))

    def set_path(self, cpu_path: str) -> None:
        """Rebuilds the weight for another CPU path, from this layer's own packed bytes (the load-time agreement
        gate, serving/quant/path_gate.py). The layer object stays, so a tied embedding keeps reading from it."""
        qw = self.select_rows(torch.arange(self.out_features, device=self.device))
        self.qw = self.panels = self.lanes = self.packed = self.int4pack = None
        self.path = choose_path(qw, self.device, cpu_path)
        self._prepare(qw)

    # -- forward ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        matmul = self._mm
        if x.dim() == 2 and self.bias is None:  # the decoder's case: no reshapes, no bias
            y = matmul(x)
            return y if y.dtype == self.dtype else y.to(self.dtype)
        shape = x.shape
        y = matmul(x.reshape(-1, self.in_features))
        y = y.to(self.dtype) if self.bias is None else y.to(self.dtype) + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def _mm_dequant(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.qw, x.dtype))

    def _mm_kernel(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[0] < KERNEL_GEMM_MIN_M:
            return quant_linear_cpu(x, self.panels)
        panels, outs = self.panels, []
        for p0 in range(0, panels.qweight.shape[0], KERNEL_TILE_PANELS):
            tile = panels.slice(p0, p0 + KERNEL_TILE_PANELS)
            w_t = dequant_panels_t(tile, _tile_buffer(tile.shape[1] * tile.padded_rows).view(tile.shape[1], -1))
            outs.append(x @ w_t)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _mm_w4a8(self, x: torch.Tensor) -> torch.Tensor:
        return w4a8_linear(x.float(), self.lanes)

    def _mm_fbgemm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed)

    def _mm_int4pack(self, x: torch.Tensor) -> torch.Tensor:
        packed, zeros = self.int4pack
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, self.group_size, zeros)

    def _mm_triton(self, x: torch.Tensor) -> torch.Tensor:
        ops, qw = _triton_ops(), self.qw
        if qw.format == "int4":
            return ops.w4a16_matmul(x, qw.qweight, qw.scales, qw.mins, qw.group_size)
        return ops.w8a16_matmul(x, qw.qweight, qw.scales, qw.group_size)

    # -- rows and accounting ----------------------------------------------------------------------------
    @property
    def can_select_rows(self) -> bool:
        return self.qw is not None or self.panels is not None or self.lanes is not None

    def select_rows(self, index: torch.Tensor) -> QuantizedWeight:
        """Weight rows `index` in the packed layout, read from this layer's own tensors (a tied embedding's
        lookups), for the paths that keep the packed bytes ("w4a8", "kernel", "dequant", "triton")."""
        if self.qw is not None:
            return self.qw.select_rows(index)
        qweight, scales, mins = (self.panels or self.lanes).rows(index)
        return QuantizedWeight(self.format, self.group_size, qweight, scales, mins, (len(index), self.in_features))

    @property
    def weight_nbytes(self) -> int:
        """Bytes this layer holds for its weight in the path's own layout (bias excluded)."""
        if self.qw is not None:
            return self.qw.nbytes
        if self.panels is not None:
            return self.panels.nbytes
        if self.lanes is not None:
            return self.lanes.nbytes
        if self.int4pack is not None:
            return sum(t.numel() * t.element_size() for t in self.int4pack)
        weight, _ = torch.ops.quantized.linear_unpack(self.packed)  # a view of the int8 codes
        return weight.numel() + self.out_features * 16  # int8 codes + a double scale and a long zero per row

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"group_size={self.group_size}, path={self.path}")


class QuantEmbedding(nn.Module):
    """Token embedding over a packed table (a GGUF Q8_0 table imported as is): looked-up rows are dequantized.

    `source` is the QuantizedWeight itself, or the tied lm_head QuantLinear built over it: then the rows are
    read from the lm_head's tensors, the table is held once and `weight_nbytes` is 0 here.
    """

    def __init__(self, source: QuantizedWeight | QuantLinear, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.shared_with_lm_head = isinstance(source, QuantLinear)
        if self.shared_with_lm_head and not source.can_select_rows:
            raise ValueError(f"the lm_head's {source.path!r} path keeps no packed rows to look up")
        self.source = source if self.shared_with_lm_head else source.to(device)
        self.embedding_dim = source.in_features if self.shared_with_lm_head else source.shape[1]
        self.dtype = dtype

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        rows = self.source.select_rows(token_ids.reshape(-1))
        return dequantize(rows, self.dtype).reshape(*token_ids.shape, self.embedding_dim)

    @property
    def weight_nbytes(self) -> int:
        return 0 if self.shared_with_lm_head else self.source.nbytes
