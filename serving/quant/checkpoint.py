"""Quantized checkpoints on disk: an HF-style directory that `load_model(DIR)` reads back.

    DIR/config.json           HF config (model_type, sizes, ...) plus a `quantization_config` entry
    DIR/model.safetensors     our state-dict names (fused qkv_proj / gate_up_proj); a packed weight `X.weight`
                              is stored as `X.qweight`, `X.scales` (and `X.mins` for int4) in the layout of
                              serving/quant/layout.py; its format and group size are in the file's metadata
    DIR/tokenizer*            the tokenizer, saved by transformers
"""
from __future__ import annotations

import json
import os

import torch

from serving.models.llama import ModelArgs
from serving.quant.layout import QuantizedWeight

QUANT_METHOD = "frugal"  # quantization_config.quant_method of the checkpoints written here
_METADATA_KEY = "frugal.quantized"  # safetensors metadata: JSON {weight name: [format, group_size, N, K]}


def hf_config(args: ModelArgs, quantization: dict) -> dict:
    """config.json for our checkpoint, in the field names serving/loaders/safetensors_loader.py reads."""
    config = {
        "model_type": args.arch, "architectures": ["LlamaForCausalLM"], "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_layers, "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads, "head_dim": args.head_dim, "rms_norm_eps": args.rms_norm_eps,
        "rope_theta": args.rope_theta, "rope_scaling": args.rope_scaling,
        "max_position_embeddings": args.max_position_embeddings, "tie_word_embeddings": args.tie_word_embeddings,
        "attention_bias": args.attention_bias, "bos_token_id": args.bos_token_id,
        "eos_token_id": args.eos_token_ids[0] if len(args.eos_token_ids) == 1 else args.eos_token_ids,
    }
    if args.rope_freq_factors is not None:
        # NOTE: our own key: HF configs have no field for llama.cpp's per-frequency rope factors (a Llama-3.1 GGUF).
        config["rope_freq_factors"] = list(args.rope_freq_factors)
    config["quantization_config"] = {"quant_method": QUANT_METHOD, **quantization}
    return config


def save_checkpoint(out_dir: str, args: ModelArgs, state: dict, tokenizer, quantization: dict) -> None:
    """Writes config.json, model.safetensors and the tokenizer files into `out_dir`."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    packed: dict[str, list] = {}
    for name, value in state.items():
        if isinstance(value, QuantizedWeight):
            stem = name.removesuffix(".weight")
            tensors[f"{stem}.qweight"] = value.qweight.contiguous()
            tensors[f"{stem}.scales"] = value.scales.contiguous()
            if value.mins is not None:
                tensors[f"{stem}.mins"] = value.mins.contiguous()
            packed[name] = [value.format, value.group_size, *value.shape]
        else:
            tensors[name] = value.contiguous()
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={_METADATA_KEY: json.dumps(packed)})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(args, quantization), f, indent=2)
    tokenizer.save_pretrained(out_dir)


def is_quantized_checkpoint(model_dir: str) -> bool:
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    return (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


def load_checkpoint_state(model_dir: str) -> dict:
    """Our state dict back from model.safetensors, packed weights as QuantizedWeight objects."""
    from safetensors import safe_open

    path = os.path.join(model_dir, "model.safetensors")
    with safe_open(path, framework="pt") as f:
        packed = json.loads((f.metadata() or {}).get(_METADATA_KEY, "{}"))
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    state = {}
    for name, (fmt, group_size, n, k) in packed.items():
        stem = name.removesuffix(".weight")
        state[name] = QuantizedWeight(fmt, group_size, tensors.pop(f"{stem}.qweight"),
                                      tensors.pop(f"{stem}.scales"), tensors.pop(f"{stem}.mins", None), (n, k))
    state.update(tensors)
    return state
