"""GPTQ checkpoints (AutoGPTQ / GPTQModel / optimum) loaded natively into our packed layout.

On disk, per quantized linear layer `X` (W is [N, K], K = input features, G = group size):
    X.qweight  int32 [K * bits / 32, N]   codes packed along K, low bits first (k = 8i + j in bits 4j..4j+3)
    X.qzeros   int32 [K / G, N * bits / 32] zero points packed along N, low bits first
    X.scales   fp16  [K / G, N]
    X.g_idx    int32 [K]                   group of each input feature (k // G, or a permutation: act-order)
    dequant:  w[n, k] = scales[g, n] * (q[k, n] - z[g, n]),  g = g_idx[k]
checkpoint_format "gptq" (v1, the AutoGPTQ default) stores z - 1 and the readers add 1 back (a zero of 0
wraps to 2^bits - 1 and reads back as 2^bits, a bug kept for compatibility); "gptq_v2" (GPTQModel) stores z.

Into our layout (serving/quant/layout.py):
- int4, g_idx == k // G: lossless in codes: scales = s, mins = -z * s. mins is computed in fp32 and rounded to
  fp16 (z * s needs up to 15 significant bits), so a weight moves by at most half an fp16 ulp of |z * s|,
  below 2^-11 * 16 * s; tests measure it. group_size -1 (per channel) becomes G = K.
- int4 with act-order (g_idx not k // G): dequantized exactly in fp32 and re-quantized round-to-nearest to our
  int4 at the checkpoint's group size. NOTE: this is lossy (a contiguous K block mixes groups). The lossless
  alternative, sorting K by g_idx and permuting x at run time, needs an input permutation in QuantizedWeight
  and QuantLinear; fused Q/K/V (and gate/up) share one g_idx because GPTQ's order comes from the shared input.
- 8-bit, symmetric (z = 128): lossless to our int8 (q - 128, scales = s). 8-bit asymmetric: float weights.
"""
from __future__ import annotations

import json
import logging
import os

import torch

from serving.loaders.gguf_loader import CheckpointError
from serving.loaders.safetensors_loader import read_tensors, refuse_hf_leftovers
from serving.models.llama import ModelArgs
from serving.quant.install import fuse_rows
from serving.quant.layout import INT4_GROUP_SIZES, QuantizedWeight, pack_nibbles, quantize_int4

logger = logging.getLogger(__name__)

PROJ_GROUPS = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
                "self_attn.o_proj": ("self_attn.o_proj",), "mlp.down_proj": ("mlp.down_proj",)}
NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


def gptq_config(model_dir: str) -> dict | None:
    """quantization_config of a GPTQ checkpoint (config.json, else quantize_config.json), or None if not GPTQ."""
    for name, key in (("config.json", "quantization_config"), ("quantize_config.json", None)):
        try:
            with open(os.path.join(model_dir, name)) as f:
                cfg = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        cfg = cfg.get(key) if key else cfg
        if cfg and cfg.get("quant_method", "gptq") == "gptq" and "bits" in cfg:
            return cfg
    return None


def is_gptq_checkpoint(model_dir: str) -> bool:
    return gptq_config(model_dir) is not None


def _checked_config(model_dir: str) -> dict:
    cfg = gptq_config(model_dir)
    bits, fmt = cfg.get("bits"), cfg.get("checkpoint_format", "gptq")
    if bits not in (4, 8):
        raise CheckpointError(f"{model_dir}: GPTQ bits={bits} is not supported; supported: 4, 8")
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"{model_dir}: GPTQ checkpoint_format={fmt!r} is not supported; "
                              "supported: gptq, gptq_v2 (repack marlin/bitblas checkpoints to gptq first)")
    if cfg.get("dynamic"):
        raise CheckpointError(f"{model_dir}: per-module GPTQ overrides (`dynamic`) are not supported")
    return {"bits": bits, "group_size": cfg.get("group_size", 128), "v1": fmt == "gptq", "sym": cfg.get("sym")}


def unpack_gptq_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] packed along rows -> int32 [R * 32 / bits, C], low bits first (qweight)."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32) * bits
    values = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)
    return values.reshape(-1, packed.shape[1])


def unpack_gptq_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] packed along columns -> int32 [R, C * 32 / bits], low bits first (qzeros)."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32) * bits
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0], -1)


def gptq_dequantize(qweight, qzeros, scales, g_idx, bits: int, v1: bool) -> torch.Tensor:
    """The float weight [N, K] (fp32) by the GPTQ formula; the reference our conversion is checked against."""
    q = unpack_gptq_rows(qweight, bits)  # [K, N]
    z = unpack_gptq_cols(qzeros, bits)[:, :q.shape[1]] + (1 if v1 else 0)  # [num_groups, N]
    if g_idx is None:
        g_idx = torch.arange(q.shape[0]) // (q.shape[0] // scales.shape[0])
    g = g_idx.long()
    return (scales.float()[g] * (q - z[g]).float()).T.contiguous()


def gptq_to_quantized(qweight, qzeros, scales, g_idx, bits: int, group_size: int, v1: bool
                      ) -> QuantizedWeight | torch.Tensor:
    """One GPTQ layer in our layout (see the module docstring for which cases are exact)."""
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    num_groups = scales.shape[0]
    g = k if group_size == -1 else group_size
    if num_groups * g != k or scales.shape[1] != n:
        raise CheckpointError(f"GPTQ tensors disagree: qweight gives [N={n}, K={k}], scales {tuple(scales.shape)}, "
                              f"group_size {group_size}")
    if g_idx is None:
        g_idx = torch.arange(k, dtype=torch.int32) // g
    act_order = not torch.equal(g_idx.long(), torch.arange(k) // g)
    z = (unpack_gptq_cols(qzeros, bits) + (1 if v1 else 0))[:, :n]  # [num_groups, N]
    if act_order:
        if bits != 4:
            return gptq_dequantize(qweight, qzeros, scales, g_idx, bits, v1)
        weight = gptq_dequantize(qweight, qzeros, scales, g_idx, bits, v1)
        return quantize_int4(weight, g if g in INT4_GROUP_SIZES else 128 if k % 128 == 0 else 32)
    q = unpack_gptq_rows(qweight, bits).T.contiguous()  # [N, K]
    if bits == 4:
        mins = (-z.float() * scales.float()).T.contiguous().half()
        return QuantizedWeight("int4", g, pack_nibbles(q), scales.T.contiguous(), mins, (n, k))
    if bool((z == 128).all()):
        return QuantizedWeight("int8", g, (q - 128).to(torch.int8), scales.T.contiguous(), None, (n, k))
    # NOTE: asymmetric 8-bit has no lossless home in our symmetric int8; keep it float.
    return gptq_dequantize(qweight, qzeros, scales, g_idx, bits, v1)


def _take_linear(raw: dict, name: str, cfg: dict, keep_packed: bool, model_dir: str
                 ) -> QuantizedWeight | torch.Tensor:
    if f"{name}.qweight" in raw:
        tensors = [raw.pop(f"{name}.{part}", None) for part in ("qweight", "qzeros", "scales", "g_idx")]
        if tensors[1] is None or tensors[2] is None:
            raise CheckpointError(f"GPTQ checkpoint in {model_dir} lacks {name}.qzeros or {name}.scales")
        if not keep_packed:
            return gptq_dequantize(*tensors, cfg["bits"], cfg["v1"])
        return gptq_to_quantized(*tensors, cfg["bits"], cfg["group_size"], cfg["v1"])
    if f"{name}.weight" in raw:  # a layer left unquantized (e.g. lm_head)
        return raw.pop(f"{name}.weight").float()
    raise CheckpointError(f"GPTQ checkpoint in {model_dir} lacks {name}.qweight (and {name}.weight)")


def take_biases(raw: dict, names: tuple[str, ...], wanted: bool, model_dir: str) -> torch.Tensor | None:
    biases = [raw.pop(f"{n}.bias", None) for n in names]
    if wanted:
        if any(b is None for b in biases):
            raise CheckpointError(f"checkpoint in {model_dir} lacks a bias of {names}")
        return torch.cat([b.float() for b in biases])
    # AutoGPTQ writes all-zero biases for bias-free layers; anything else would be silently dropped.
    if any(b is not None and bool(b.any()) for b in biases):
        raise CheckpointError(f"{model_dir}: {names} have non-zero biases but the model has none")
    return None


def assemble_llama_state(raw: dict, args: ModelArgs, take_linear, model_dir: str) -> dict:
    """Our state dict from a quantized HF Llama-family checkpoint; `take_linear(raw, hf_name)` pops one linear
    layer's tensors and returns a QuantizedWeight or an fp32 tensor (always fp32 with packed=False). Projections are fused as our model has them."""
    def take(name: str) -> torch.Tensor:
        if name not in raw:
            raise CheckpointError(f"checkpoint in {model_dir} lacks tensor {name!r}")
        return raw.pop(name).float()

    state = {"embed_tokens.weight": take("embed_tokens.weight"), "norm.weight": take("norm.weight")}
    if not args.tie_word_embeddings:
        # NOTE: float even when stored packed: the model's compute_logits reads lm_head.weight directly.
        state["lm_head.weight"] = take_linear(raw, "lm_head", packed=False)
    for i in range(args.num_layers):
        p = f"layers.{i}."
        for ours, theirs in PROJ_GROUPS.items():
            names = tuple(p + t for t in theirs)
            state[p + ours + ".weight"] = fuse_rows([take_linear(raw, n) for n in names])
            bias = take_biases(raw, names, args.attention_bias and ours == "self_attn.qkv_proj", model_dir)
            if bias is not None:
                state[p + ours + ".bias"] = bias
        for name in NORMS:
            state[p + name] = take(p + name)
    refuse_hf_leftovers(raw, state, args, model_dir)
    return state


def load_gptq_state_dict(model_dir: str, args: ModelArgs, keep_packed: bool = True
                         ) -> dict[str, torch.Tensor | QuantizedWeight]:
    """Our parameter names -> fp32 tensors (embedding, norms, biases, unquantized layers) or QuantizedWeight
    (keep_packed=False: every weight dequantized to fp32 by the GPTQ formula)."""
    cfg = _checked_config(model_dir)

    def take_linear(raw: dict, name: str, packed: bool = True):
        return _take_linear(raw, name, cfg, keep_packed and packed, model_dir)

    return assemble_llama_state(read_tensors(model_dir), args, take_linear, model_dir)
