"""GGUF checkpoints (llama.cpp's format) read with the `gguf` package.

Weights are dequantized to the compute dtype here, unless a quantization policy keeps them packed
(serving/quant/gguf_import.py). Two details matter for exactness:
- llama.cpp's converter permutes the rows of Q and K so its RoPE can rotate adjacent pairs; our RoPE (like
  transformers') rotates the two halves of each head, so the permutation is undone on load.
- GGUF lists dimensions fastest-first; `gguf.quants.dequantize` already returns torch's [out, in] order.
- RoPE scaling: llama.cpp's converter writes Llama-3 scaling as no metadata but a tensor of per-frequency
  divisors (`rope_freqs.weight`), and linear scaling as `{arch}.rope.scaling.type/factor`. Both are read into
  ModelArgs; any other scaling, and any tensor the model does not use, is refused rather than dropped.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

from serving.models.llama import ModelArgs
from serving.quant.gguf_import import LOSSLESS_TYPES, gguf_tensor_to_weight, import_gguf_blocks
from serving.quant.install import fuse_rows, permute_rows

logger = logging.getLogger(__name__)

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")  # the Llama-family model code
GEMMA3_ARCH = "gemma3"  # serving/models/gemma3.py, loaded by serving/loaders/gemma3_loader.py
# llama.cpp's converter permutes Q/K rows only for these; Qwen2 is stored in the neox layout already.
_PERMUTED_QK_ARCHS = ("llama", "mistral")

# GGUF tensor name (after "blk.N.") -> our parameter name (after "layers.N.")
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
ROPE_FREQS = "rope_freqs.weight"  # Llama-3 rope factors, read into ModelArgs.rope_freq_factors
# {arch}.rope.scaling.* keys read here, or that say nothing for the scalings we run.
_ROPE_SCALING_KEYS = ("type", "factor", "original_context_length", "finetuned")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or of an architecture we do not run."""


def open_gguf(path: str):
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises bare ValueError/struct errors on garbage
        raise CheckpointError(f"{path} is not a valid GGUF file: {e}") from e


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise CheckpointError(f"GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def _optional(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def refuse_leftovers(names, where: str) -> None:
    """Raises naming every tensor a loader did not place: a tensor the model does not use may be one that
    changes its output (as rope_freqs does), so it is never dropped silently."""
    names = sorted(names)
    if names:
        shown = ", ".join(names[:5]) + (f", ... ({len(names) - 5} more)" if len(names) > 5 else "")
        raise CheckpointError(f"{where} has {len(names)} tensor(s) the model does not use: {shown}")


def gguf_model_args(reader) -> ModelArgs:
    arch = _field(reader, "general.architecture")
    if arch == GEMMA3_ARCH:
        from serving.loaders.gemma3_loader import gemma3_gguf_args

        return gemma3_gguf_args(reader)
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(f"unsupported architecture {arch!r} in GGUF file; supported: "
                              f"{', '.join((*SUPPORTED_ARCHS, GEMMA3_ARCH))}")
    num_heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // num_heads))
    rotary_dim = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise CheckpointError(f"{arch}.rope.dimension_count is {rotary_dim} but head_dim is {head_dim}: "
                              "rotating part of a head is not supported")
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None
    tensor_names = {t.name for t in reader.tensors}
    eos = reader.fields.get("tokenizer.ggml.eos_token_id")
    bos = reader.fields.get("tokenizer.ggml.bos_token_id")
    return ModelArgs(
        arch=arch,
        vocab_size=int(_field(reader, f"{arch}.vocab_size", vocab or 0)),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=num_heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, arch),
        rope_freq_factors=_rope_freq_factors(reader, head_dim),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=int(bos.contents()) if bos is not None else None,
        eos_token_ids=[int(eos.contents())] if eos is not None else [],
    )


def _rope_scaling(reader, arch: str) -> dict | None:
    """{arch}.rope.scaling.* as an HF-style rope_scaling dict; None when the model is not scaled."""
    prefix = f"{arch}.rope.scaling."
    unknown = sorted(k for k in reader.fields if k.startswith(prefix) and k[len(prefix):] not in _ROPE_SCALING_KEYS)
    if unknown:
        raise CheckpointError(f"GGUF rope scaling keys {', '.join(unknown)} are not supported")
    rope_type, factor = _optional(reader, prefix + "type"), _optional(reader, prefix + "factor")
    if rope_type is None:
        # NOTE: llama.cpp reads a factor without a type as linear scaling, so we do too.
        rope_type = "none" if factor is None else "linear"
    if rope_type == "none" or (rope_type == "linear" and not factor):  # llama.cpp: factor 0 means unscaled
        return None
    if rope_type != "linear":
        raise CheckpointError(f"GGUF rope scaling type {rope_type!r} ({prefix}type) is not supported; supported: "
                              f"none, linear, and Llama-3 frequency factors ({ROPE_FREQS})")
    return {"rope_type": "linear", "factor": float(factor)}


def _rope_freq_factors(reader, head_dim: int) -> list[float] | None:
    """The `rope_freqs.weight` divisors, one per rotary frequency, or None when the file has none."""
    tensor = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if tensor is None:
        return None
    shape = tuple(int(d) for d in tensor.shape)
    if shape != (head_dim // 2,):
        raise CheckpointError(f"GGUF tensor {ROPE_FREQS} has shape {list(shape)}; expected [{head_dim // 2}] "
                              f"(one factor per rotary frequency of head_dim {head_dim})")
    factors = _dequantize(tensor).flatten()
    if not bool((factors.isfinite() & (factors > 0)).all()):
        raise CheckpointError(f"GGUF tensor {ROPE_FREQS} holds factors that are not positive and finite")
    return factors.tolist()


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of each head's rotary halves (rows of Q/K weights and biases)."""
    # The converter viewed each head's rows as [2, half] and stored them as [half, 2]; view as [half, 2], swap back.
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _dequantize(tensor) -> torch.Tensor:
    import gguf

    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    # F32 tensors come back as read-only views of the mmap; copy so the model owns its weights.
    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))


def load_gguf_state_dict(reader, args: ModelArgs, quantization: str = "none") -> dict:
    """Returns our parameter names -> float32 tensors, with QKV and gate/up fused.

    Under a `quantization` policy other than "none", linear weights are QuantizedWeight objects instead
    (see serving/quant/gguf_import.py); fusing and the Q/K un-permutation act on their packed rows.
    """
    if args.arch == GEMMA3_ARCH:
        from serving.loaders.gemma3_loader import load_gemma3_gguf_state_dict

        return load_gemma3_gguf_state_dict(reader, args, quantization)
    raw = read_gguf_tensors(reader, quantization)
    state = {"embed_tokens.weight": _take(raw, "token_embd.weight"), "norm.weight": _take(raw, "output_norm.weight")}
    if not args.tie_word_embeddings:
        state["lm_head.weight"] = _take(raw, "output.weight")
    permuted = args.arch in _PERMUTED_QK_ARCHS

    def qk(name: str, num_heads: int) -> torch.Tensor:
        tensor = _take(raw, name)
        return permute_rows(tensor, lambda t: unpermute_qk(t, num_heads)) if permuted else tensor

    for i in range(args.num_layers):
        p = f"blk.{i}."
        q = qk(p + "attn_q.weight", args.num_heads)
        k = qk(p + "attn_k.weight", args.num_kv_heads)
        v = _take(raw, p + "attn_v.weight")
        state[f"layers.{i}.self_attn.qkv_proj.weight"] = fuse_rows([q, k, v])
        if args.attention_bias:
            qb = qk(p + "attn_q.bias", args.num_heads)
            kb = qk(p + "attn_k.bias", args.num_kv_heads)
            state[f"layers.{i}.self_attn.qkv_proj.bias"] = torch.cat([qb, kb, _take(raw, p + "attn_v.bias")])
        gate, up = _take(raw, p + "ffn_gate.weight"), _take(raw, p + "ffn_up.weight")
        state[f"layers.{i}.mlp.gate_up_proj.weight"] = fuse_rows([gate, up])
        for src, dst in _LAYER_TENSORS.items():
            state[f"layers.{i}.{dst}"] = _take(raw, p + src)
    if args.rope_freq_factors is not None:
        _take(raw, ROPE_FREQS)  # already in args, read by gguf_model_args
    refuse_leftovers(raw, "GGUF file")
    return state


def read_gguf_tensors(reader, quantization: str) -> dict:
    """Every tensor of the file by its GGUF name: float32, or packed (QuantizedWeight) under `quantization`."""
    raw = {}
    for tensor in reader.tensors:
        try:
            if quantization != "none" and _is_linear(tensor):
                raw[tensor.name] = gguf_tensor_to_weight(tensor, quantization)
            elif quantization == "auto" and tensor.name == "token_embd.weight" and \
                    tensor.tensor_type.name in LOSSLESS_TYPES:
                # NOTE: only a losslessly packed table stays packed; a K-quant embedding is not requantized
                raw[tensor.name] = import_gguf_blocks(tensor.tensor_type.name, tensor.data,
                                                      (int(tensor.shape[1]), int(tensor.shape[0])))
            else:
                raw[tensor.name] = _dequantize(tensor)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {tensor.name} ({tensor.tensor_type.name}): {e}") from e
    return raw


def _is_linear(tensor) -> bool:
    """A 2-D weight of a linear layer (the token embedding is a lookup table, kept in float)."""
    return tensor.name.endswith(".weight") and len(tensor.shape) == 2 and tensor.name != "token_embd.weight"


def _take(raw: dict, name: str) -> torch.Tensor:
    if name not in raw:
        raise CheckpointError(f"GGUF file lacks tensor {name!r}")
    return raw.pop(name)
