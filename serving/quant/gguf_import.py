"""GGUF quantized blocks -> our packed layout (serving/quant/layout.py), straight from the file's bytes.

Q4_0, Q4_1 and Q8_0 map onto the layout without loss (their dequantized weights are bit-identical to
`gguf.quants.dequantize`, see tests/test_quant_gguf.py). llama.cpp stores a 4-bit block of 32 weights as 16
bytes whose LOW nibbles are weights 0..15 and HIGH nibbles weights 16..31; our layout pairs neighbours
(k = 2j low, 2j + 1 high), so the nibbles are unpacked and packed again. Other types (the K-quants, ...)
have no lossless mapping: they are dequantized with `gguf` and quantized again (or kept in float).
"""
from __future__ import annotations

import numpy as np
import torch

from serving.quant.layout import QuantizedWeight, pack_nibbles, quantize

GGUF_BLOCK = 32  # weights per Q4_0 / Q4_1 / Q8_0 block
# type name -> bytes per block: fp16 d (+ fp16 m) then the codes
_BLOCK_BYTES = {"Q4_0": 2 + 16, "Q4_1": 2 + 2 + 16, "Q8_0": 2 + 32}
LOSSLESS_TYPES = tuple(_BLOCK_BYTES)
FLOAT_TYPES = ("F32", "F16", "BF16")


def import_gguf_blocks(type_name: str, data: np.ndarray, shape: tuple[int, int]) -> QuantizedWeight:
    """Raw GGUF bytes of a Q4_0 / Q4_1 / Q8_0 matrix -> QuantizedWeight.

    data: uint8 [N, K // 32 * block_bytes] as `gguf.GGUFReader` exposes it; shape: (N, K) in torch order.
    """
    if type_name not in _BLOCK_BYTES:
        raise ValueError(f"no lossless import for GGUF type {type_name}; lossless types: {', '.join(LOSSLESS_TYPES)}")
    n, k = shape
    if k % GGUF_BLOCK:
        raise ValueError(f"GGUF {type_name} tensor has K={k}, not a multiple of {GGUF_BLOCK}")
    block_bytes = _BLOCK_BYTES[type_name]
    raw = torch.from_numpy(np.array(data, dtype=np.uint8, copy=True)).reshape(n, k // GGUF_BLOCK, block_bytes)
    d = raw[..., 0:2].contiguous().view(torch.float16).reshape(n, k // GGUF_BLOCK)
    if type_name == "Q8_0":
        q = raw[..., 2:].contiguous().view(torch.int8).reshape(n, k)
        return QuantizedWeight("int8", GGUF_BLOCK, q, d.clone(), None, (n, k))
    if type_name == "Q4_1":
        mins = raw[..., 2:4].contiguous().view(torch.float16).reshape(n, k // GGUF_BLOCK).clone()
        codes = raw[..., 4:]
    else:  # Q4_0: w = d * (q - 8) = q * d + (-8 d); -8 d is exact in fp16 (a power-of-two multiple)
        mins = d * -8
        codes = raw[..., 2:]
    # codes: [N, blocks, 16]; block weight i < 16 is byte i's low nibble, weight 16 + i its high nibble
    q = torch.cat([codes & 0x0F, codes >> 4], dim=-1).reshape(n, k)
    return QuantizedWeight("int4", GGUF_BLOCK, pack_nibbles(q), d.clone(), mins, (n, k))


def gguf_tensor_to_weight(tensor, policy: str) -> torch.Tensor | QuantizedWeight:
    """One GGUF matrix as the loader should hold it under an EngineConfig.quantization `policy`.

    "none": float32. "auto": lossless types stay packed, other quantized types become int4-g32, float types
    stay float. "int4-g*" / "int8": quantized from the float weights (a lossless type already in the asked
    format is imported as is).
    """
    import gguf

    type_name = tensor.tensor_type.name
    n, k = int(tensor.shape[1]), int(tensor.shape[0])  # GGUF lists dims fastest first
    if policy != "none" and type_name in LOSSLESS_TYPES:
        packed = import_gguf_blocks(type_name, tensor.data, (n, k))
        if policy == "auto" or (policy == "int8" and packed.format == "int8") or (
                policy == "int4-g32" and packed.format == "int4"):
            return packed
    weight = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type),
                                       dtype=np.float32, copy=True)).reshape(n, k)
    if policy == "none" or (policy == "auto" and type_name in FLOAT_TYPES):
        return weight
    return quantize(weight, "int4-g32" if policy == "auto" else policy)
