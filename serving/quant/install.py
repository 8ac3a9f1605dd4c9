"""The module swap: puts QuantLinear layers where a loaded state dict holds QuantizedWeights.

Kept apart from the primitives (layout.py) and the layer (linear.py): loaders produce a state dict whose linear
weights may be QuantizedWeight objects; `install` replaces those nn.Linear modules and returns the rest of the
state for `load_state_dict`.
"""
from __future__ import annotations

import torch
from torch import nn

from serving.quant.layout import QuantizedWeight, concat_rows, dequantize, quantize
from serving.quant.linear import QuantEmbedding, QuantLinear

# EngineConfig.quantization values (see serving/config.py)
QUANTIZATION_POLICIES = ("none", "auto", "int4-g32", "int4-g64", "int4-g128", "int8")


def fuse_rows(parts: list[torch.Tensor | QuantizedWeight]) -> torch.Tensor | QuantizedWeight:
    """Concatenates projections along N whatever form each part is in.

    NOTE: parts in different packed formats (a GGUF mixing Q8_0 and Q4_1 within one fused layer) are
    requantized together: int4-g32 if any part is int4, else per-channel int8.
    """
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)
    quantized = [p for p in parts if isinstance(p, QuantizedWeight)]
    if len(quantized) == len(parts) and len({(p.format, p.group_size) for p in quantized}) == 1:
        return concat_rows(quantized)
    fmt = "int4-g32" if any(p.format == "int4" for p in quantized) else "int8"
    weight = torch.cat([dequantize(p) if isinstance(p, QuantizedWeight) else p for p in parts])
    return quantize(weight, fmt)


def permute_rows(weight: torch.Tensor | QuantizedWeight, permute) -> torch.Tensor | QuantizedWeight:
    """Applies a row permutation function (written for tensors) to a tensor or a packed weight alike."""
    if isinstance(weight, torch.Tensor):
        return permute(weight)
    return weight.select_rows(permute(torch.arange(weight.shape[0])))


def quantize_state(state: dict, policy: str, linear_names: set[str]) -> dict:
    """Quantizes the float weights of `linear_names` in place for an "int4-g*"/"int8" policy (safetensors loads)."""
    if policy in ("none", "auto"):
        return state
    for name in linear_names:
        if isinstance(state.get(name), torch.Tensor):
            state[name] = quantize(state[name], policy)
    return state


def linear_weight_names(model: nn.Module) -> set[str]:
    """State-dict names of every nn.Linear weight (the tied lm_head has none: it reuses the embedding)."""
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def install(model: nn.Module, state: dict, dtype: torch.dtype, device: str | torch.device,
            cpu_path: str | None = None) -> dict:
    """Swaps in a QuantLinear for every QuantizedWeight in `state`; returns the float rest of the state.

    A packed token embedding becomes a QuantEmbedding and, when the lm_head is tied to it, also a QuantLinear
    lm_head whose tensors the embedding reads its rows from (the logits GEMV then reads int8, not fp32).
    Other packed weights that stand in for non-linear tensors are dequantized to `dtype`.
    """
    rest = {}
    linears = linear_weight_names(model)
    for name, value in state.items():
        if not isinstance(value, QuantizedWeight):
            rest[name] = value
        elif name == "embed_tokens.weight":
            tied = model.lm_head is None
            if tied:  # the lm_head holds the table and the embedding reads its rows from it
                model.lm_head = QuantLinear(value, dtype=dtype, device=device, cpu_path=cpu_path)
            shared = tied and model.lm_head.can_select_rows
            model.embed_tokens = QuantEmbedding(model.lm_head if shared else value, dtype, device)
        elif name not in linears:
            rest[name] = dequantize(value, dtype)
    for name, value in state.items():
        if not isinstance(value, QuantizedWeight) or name not in linears:
            continue
        module_name = name.removesuffix(".weight")
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        bias = rest.pop(f"{module_name}.bias", None)
        setattr(parent, child, QuantLinear(value, bias, dtype=dtype, device=device, cpu_path=cpu_path))
    return rest


def quant_summary(model: nn.Module) -> dict[str, int]:
    """Weight bytes held by the model: packed layers (a tied embedding counted once), and float parameters."""
    packed = sum(m.weight_nbytes for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding)))
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"packed_bytes": packed, "float_bytes": dense, "total_bytes": packed + dense}
