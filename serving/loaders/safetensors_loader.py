"""Hugging Face checkpoint directories: config.json plus one or more *.safetensors files."""
from __future__ import annotations

import glob
import json
import os
import re

import torch

from serving.loaders.gemma3_loader import HF_MODEL_TYPE as GEMMA3_TYPE
from serving.loaders.gemma3_loader import gemma3_hf_args, load_gemma3_safetensors_state_dict
from serving.loaders.gguf_loader import CheckpointError, refuse_leftovers
from serving.models.llama import ModelArgs

# HF model_type -> our arch name; all run on the Llama-family model code.
SUPPORTED_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}

# Per-layer tensors whose names are the same in HF checkpoints and in our model.
_LAYER_SAME_NAMES = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight",
                     "mlp.down_proj.weight")
# Tensors an HF checkpoint may carry that the model derives itself, so leaving them unused changes nothing.
# NOTE: older transformers versions saved each layer's rotary `inv_freq` buffer; it follows from config.json's
# rope_theta / rope_scaling, which is what our RotaryEmbedding reads.
_DERIVED_TENSORS = re.compile(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def hf_model_args(model_dir: str) -> ModelArgs:
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in model directory {model_dir}")
    try:
        with open(config_path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path} is not valid JSON: {e}") from e
    model_type = cfg.get("model_type")
    if model_type == GEMMA3_TYPE:
        return gemma3_hf_args(cfg, config_path)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"unsupported model_type {model_type!r} in {config_path}; supported: "
                              f"{', '.join((*SUPPORTED_MODEL_TYPES, GEMMA3_TYPE))}")
    num_heads = cfg["num_attention_heads"]
    eos = cfg.get("eos_token_id")
    rope_scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    rope_theta = cfg.get("rope_theta") or (rope_scaling or {}).get("rope_theta", 10000.0)
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
        rope_scaling = None
    return ModelArgs(
        arch=SUPPORTED_MODEL_TYPES[model_type],
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        rope_freq_factors=cfg.get("rope_freq_factors"),  # written by our quantized checkpoints (see checkpoint.py)
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        attention_bias=cfg.get("attention_bias", model_type == "qwen2"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=[] if eos is None else (list(eos) if isinstance(eos, list) else [eos]),
    )


def read_tensors(model_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's *.safetensors files, with HF's "model." prefix dropped."""
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    raw: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            raw.update(load_file(path))
        except Exception as e:
            raise CheckpointError(f"cannot read {path}: {e}") from e
    return {k.removeprefix("model."): v for k, v in raw.items()}


def load_safetensors_state_dict(model_dir: str, args: ModelArgs) -> dict[str, torch.Tensor]:
    raw = read_tensors(model_dir)
    if args.arch == "gemma3":
        state = load_gemma3_safetensors_state_dict(raw, args, model_dir)
        refuse_hf_leftovers(raw, state, args, model_dir)
        return state

    def take(name: str) -> torch.Tensor:
        if name not in raw:
            raise CheckpointError(f"checkpoint in {model_dir} lacks tensor {name!r}")
        return raw.pop(name).float()

    state = {"embed_tokens.weight": take("embed_tokens.weight"), "norm.weight": take("norm.weight")}
    if not args.tie_word_embeddings:
        state["lm_head.weight"] = take("lm_head.weight")
    for i in range(args.num_layers):
        p = f"layers.{i}."
        state[p + "self_attn.qkv_proj.weight"] = torch.cat(
            [take(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        if args.attention_bias:
            state[p + "self_attn.qkv_proj.bias"] = torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
        state[p + "mlp.gate_up_proj.weight"] = torch.cat([take(p + "mlp.gate_proj.weight"),
                                                          take(p + "mlp.up_proj.weight")])
        for name in _LAYER_SAME_NAMES:
            state[p + name] = take(p + name)
    refuse_hf_leftovers(raw, state, args, model_dir)
    return state


def refuse_hf_leftovers(raw: dict, state: dict, args: ModelArgs, model_dir: str) -> None:
    """Raises for every tensor in `raw` (what the loader did not take) but the derivable ones above.

    NOTE: a tied checkpoint may still store lm_head.weight; it is accepted only if it is the embedding itself,
    since a different one would mean the config's tie_word_embeddings is wrong for these weights.
    """
    lm_head = raw.pop("lm_head.weight", None) if args.tie_word_embeddings else None
    if lm_head is not None and not torch.equal(lm_head.float(), state["embed_tokens.weight"]):
        raise CheckpointError(f"{model_dir}: config.json ties the word embeddings, but lm_head.weight differs "
                              "from embed_tokens.weight")
    refuse_leftovers([n for n in raw if not _DERIVED_TENSORS.fullmatch(n)], f"checkpoint in {model_dir}")
