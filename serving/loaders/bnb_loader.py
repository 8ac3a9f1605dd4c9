"""bitsandbytes checkpoints (transformers `BitsAndBytesConfig` + `save_pretrained`) decoded by our own code.

On disk, per quantized linear layer `X`:
- 8-bit (LLM.int8): `X.weight` int8 [N, K], `X.SCB` fp32 [N] (row absmax), `X.weight_format` uint8 (0 = row);
  w = q * SCB / 127. Into our per-channel int8: the codes as they are, scales = SCB / 127 rounded to fp16
  (the only change: a relative scale error below 2^-11).
- 4-bit (nf4 / fp4): `X.weight` uint8 [(N * K + 1) // 2, 1], the row-major flat weight two codes a byte, the
  first in the HIGH nibble; `X.weight.quant_map` fp32 [16] (the code table); `X.weight.absmax` one scale per
  `blocksize` elements: fp32, or with double quantization uint8 codes into `X.weight.nested_quant_map` [256]
  scaled per 256 by `X.weight.nested_absmax` plus `nested_offset`; `X.weight.quant_state.bitsandbytes__nf4`
  (or __fp4) uint8 bytes of JSON {quant_type, blocksize, dtype, shape, nested_blocksize, nested_offset}.
  w = quant_map[code] * absmax[i // blocksize]. NF4/FP4 levels are not uniform, so no int4 layout holds them:
  we dequantize exactly and re-quantize round-to-nearest to our int4-g64 (NOTE: lossy, about the error of a
  second 4-bit rounding; the test measures it).

Everything here is plain torch and runs anywhere; bitsandbytes itself is never imported (the tests use it,
where it installs, only to write real checkpoints and to cross-check the decoder).
"""
from __future__ import annotations

import json
import logging
import os

import torch

from serving.loaders.gguf_loader import CheckpointError
from serving.loaders.gptq_loader import assemble_llama_state
from serving.loaders.safetensors_loader import read_tensors
from serving.models.llama import ModelArgs
from serving.quant.layout import QuantizedWeight, quantize_int4

logger = logging.getLogger(__name__)

REQUANT_GROUP_SIZE = 64  # our int4 group for re-quantized nf4/fp4 (bnb's default blocksize is 64 too)

# The code tables bitsandbytes writes (bitsandbytes.functional.get_4bit_type), used to check `quant_map`.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
# FP4 (e2m1 with bnb's bit order): 0b000 = 0, 0b001 = 0.0625, 0b010 = 8, 0b011 = 12, 0b100 = 4, 0b101 = 6,
# 0b110 = 2, 0b111 = 3; bit 3 is the sign; normalized by the largest magnitude (12).
FP4_CODE = tuple(v / 12.0 for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                                    -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0))
_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}

def is_bnb_checkpoint(model_dir: str) -> bool:
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    return (cfg.get("quantization_config") or {}).get("quant_method") == "bitsandbytes"


def decode_blockwise_8bit(codes: torch.Tensor, code_map: torch.Tensor, absmax: torch.Tensor, blocksize: int
                          ) -> torch.Tensor:
    """bnb's blockwise 8-bit dequantization (used for double-quantized absmax): code_map[q] * absmax[i // bs]."""
    values = code_map.float()[codes.long().flatten()]
    scale = absmax.float().repeat_interleave(blocksize)[: values.numel()]
    return values * scale


def dequantize_4bit(packed: torch.Tensor, quant: dict, raw_state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fp32 weight of one bnb 4-bit tensor. `quant` is the parsed quant_state JSON; `raw_state` holds
    absmax, quant_map and (double quantization) nested_absmax, nested_quant_map."""
    quant_type, blocksize, shape = quant["quant_type"], quant["blocksize"], quant["shape"]
    if quant_type not in _CODES:
        raise CheckpointError(f"bitsandbytes quant_type {quant_type!r} is not supported; supported: nf4, fp4")
    code = raw_state.get("quant_map")
    code = torch.tensor(_CODES[quant_type]) if code is None else code.float()
    numel = shape[0] * shape[1]
    flat = packed.flatten()
    codes = torch.stack([flat >> 4, flat & 0xF], dim=-1).flatten()[:numel].long()  # first element: high nibble
    absmax = raw_state["absmax"]
    if "nested_absmax" in raw_state:
        absmax = decode_blockwise_8bit(absmax, raw_state["nested_quant_map"], raw_state["nested_absmax"],
                                       quant["nested_blocksize"]) + quant["nested_offset"]
    scale = absmax.float().repeat_interleave(blocksize)[:numel]
    return (code[codes] * scale).reshape(shape)


def _take_linear(raw: dict, name: str, keep_packed: bool, model_dir: str) -> QuantizedWeight | torch.Tensor:
    state_keys = [k for k in raw if k.startswith(f"{name}.weight.quant_state.bitsandbytes__")]
    if state_keys:
        quant = json.loads(bytes(raw.pop(state_keys[0]).tolist()).decode())
        parts = {}
        for part in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"):
            if f"{name}.weight.{part}" in raw:
                parts[part] = raw.pop(f"{name}.weight.{part}")
        if "absmax" not in parts:
            raise CheckpointError(f"bitsandbytes checkpoint in {model_dir} lacks {name}.weight.absmax")
        weight = dequantize_4bit(raw.pop(f"{name}.weight"), quant, parts)
        group_size = REQUANT_GROUP_SIZE if weight.shape[1] % REQUANT_GROUP_SIZE == 0 else 32
        return quantize_int4(weight, group_size) if keep_packed else weight
    if f"{name}.SCB" in raw:
        weight_format = raw.pop(f"{name}.weight_format", None)
        if weight_format is not None and int(weight_format) != 0:
            raise CheckpointError(f"{name}: bitsandbytes int8 weight_format {int(weight_format)} is not supported; "
                                  "only the row-major format (0) written by bitsandbytes >= 0.41 is")
        q, scb = raw.pop(f"{name}.weight"), raw.pop(f"{name}.SCB").float()
        if not keep_packed:
            return q.float() * (scb / 127).unsqueeze(1)
        return QuantizedWeight("int8", q.shape[1], q.contiguous(), (scb / 127).half().unsqueeze(1), None,
                               tuple(q.shape))
    if f"{name}.weight" in raw:  # skipped by llm_int8_skip_modules (lm_head, by default)
        return raw.pop(f"{name}.weight").float()
    raise CheckpointError(f"bitsandbytes checkpoint in {model_dir} lacks {name}.weight")


def load_bnb_state_dict(model_dir: str, args: ModelArgs, keep_packed: bool = True
                        ) -> dict[str, torch.Tensor | QuantizedWeight]:
    """Our parameter names -> fp32 tensors or QuantizedWeight (keep_packed=False: every weight as fp32)."""
    def take_linear(raw: dict, name: str, packed: bool = True):
        return _take_linear(raw, name, keep_packed and packed, model_dir)

    return assemble_llama_state(read_tensors(model_dir), args, take_linear, model_dir)
