"""Gemma 3 checkpoints (text only): GGUF files (`general.architecture` "gemma3") and HF safetensors directories
(`model_type` "gemma3_text"), into serving/models/gemma3.py's parameter names.

Details that matter for exactness:
- Gemma's RMSNorm scales by (1 + w). llama.cpp's converter stores 1 + w in GGUF; transformers subtracts 1 on
  load and adds it back at run time. Our norm weight is that run-time 1 + w, computed the same way in fp32.
- GGUF has no key for what llama.cpp hard-codes for gemma3: every 6th layer global, local rope base 10,000, and
  the query scale (1/sqrt(head_dim), but 1/sqrt(hidden / heads) for the 62-layer 27B). We use the same.
- Gemma 3 rotates in the neox layout, so Q/K rows are not permuted in GGUF (unlike llama's).
- Gemma 3 has no attention-score softcapping: transformers' Gemma3Attention and llama.cpp's gemma3 graph both
  ignore `attn_logit_softcapping`, so a value there is ignored here too (with a warning), as the references do.
- Any gemma3.* metadata key not understood here is refused, as is any tensor the model does not use.
"""
from __future__ import annotations

import logging

import torch

from serving.loaders.gguf_loader import (CheckpointError, _field, _optional, _rope_scaling, _take,
                                         read_gguf_tensors, refuse_leftovers)
from serving.models.gemma3 import FULL, SLIDING, Gemma3Args, pattern_layer_types
from serving.quant.install import fuse_rows

logger = logging.getLogger(__name__)

ARCH = "gemma3"
HF_MODEL_TYPE = "gemma3_text"
DEFAULT_SLIDING_PATTERN = 6  # llama.cpp's and transformers' default for gemma3
LOCAL_ROPE_THETA = 10000.0  # llama.cpp: rope_freq_base_train_swa for gemma3
GELU_TANH = "gelu_pytorch_tanh"

# GGUF name (after "blk.N.") -> ours (after "layers.N."), for the tensors that are (1 + w) norm weights
_GGUF_NORMS = {
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_HF_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight",
             "post_feedforward_layernorm.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight")
# gemma3.* keys read below ({arch}.rope.scaling.* are checked by _rope_scaling)
_GGUF_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
              "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
              "attention.layer_norm_rms_epsilon", "attention.sliding_window", "attention.sliding_window_pattern",
              "rope.freq_base", "rope.dimension_count", "attn_logit_softcapping", "final_logit_softcapping")


def _gemma_norm(stored: torch.Tensor) -> torch.Tensor:
    """GGUF's 1 + w -> the scale transformers multiplies by: 1 + (stored - 1), both in fp32."""
    return 1.0 + (stored.float() - 1.0)


def _softcap(value) -> float | None:
    return float(value) if value else None  # NOTE: llama.cpp writes 0 for "no softcapping"


def _ignore_attn_softcap(value, where: str) -> None:
    if _softcap(value) is not None:
        logger.warning("%s: attn_logit_softcapping %s is ignored, as transformers and llama.cpp ignore it for "
                       "Gemma 3", where, value)


def gemma3_gguf_args(reader) -> Gemma3Args:
    prefix = f"{ARCH}."
    unknown = sorted(k for k in reader.fields if k.startswith(prefix) and k[len(prefix):] not in _GGUF_KEYS
                     and not k.startswith(prefix + "rope.scaling."))
    if unknown:
        raise CheckpointError(f"GGUF metadata keys {', '.join(unknown)} are not supported for {ARCH}")

    def get(key, default=None):
        return _field(reader, prefix + key, default)

    try:
        num_heads, num_layers = int(get("attention.head_count")), int(get("block_count"))
        hidden = int(get("embedding_length"))
        head_dim = int(get("attention.key_length", hidden // num_heads))
        value_dim = int(get("attention.value_length", head_dim))
        rotary_dim = int(get("rope.dimension_count", head_dim))
    except TypeError as e:  # per-layer arrays (Gemma 3n) where one value is expected
        raise CheckpointError(f"GGUF {ARCH} metadata holds per-layer values we do not support: {e}") from e
    if value_dim != head_dim or rotary_dim != head_dim:
        raise CheckpointError(f"{ARCH}: key_length {head_dim}, value_length {value_dim} and rope.dimension_count "
                              f"{rotary_dim} must all be equal")
    _ignore_attn_softcap(_optional(reader, prefix + "attn_logit_softcapping"), "GGUF file")
    layer_types = _gguf_layer_types(_optional(reader, prefix + "attention.sliding_window_pattern"), num_layers)
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else 0
    tensor_names = {t.name for t in reader.tensors}
    eos = _optional(reader, "tokenizer.ggml.eos_token_id")
    bos = _optional(reader, "tokenizer.ggml.bos_token_id")
    # NOTE: llama.cpp's gemma3 graph scales queries by 1/sqrt(hidden / heads) for the 27B (62 layers) only
    query_pre_attn_scalar = hidden / num_heads if num_layers == 62 else head_dim
    try:
        return Gemma3Args(
            arch=ARCH,
            vocab_size=int(get("vocab_size", vocab)),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(get("attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(get("rope.freq_base", 1_000_000.0)),
            rope_scaling=_rope_scaling(reader, ARCH),
            max_position_embeddings=int(get("context_length", 32768)),
            tie_word_embeddings="output.weight" not in tensor_names,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=[] if eos is None else [int(eos)],
            sliding_window=int(get("attention.sliding_window")),
            layer_types=layer_types,
            rope_local_theta=LOCAL_ROPE_THETA,
            query_pre_attn_scalar=float(query_pre_attn_scalar),
            final_logit_softcapping=_softcap(_optional(reader, prefix + "final_logit_softcapping")),
        )
    except ValueError as e:
        raise CheckpointError(f"GGUF {ARCH} metadata is inconsistent: {e}") from e


def _gguf_layer_types(pattern, num_layers: int) -> list[str]:
    """`sliding_window_pattern` as llama.cpp reads it: absent (every 6th layer global), one period, or one
    flag per layer (True: sliding-window layer)."""
    if pattern is None:
        return pattern_layer_types(num_layers, DEFAULT_SLIDING_PATTERN)
    if isinstance(pattern, list):
        if len(pattern) != num_layers:
            raise CheckpointError(f"{ARCH}.attention.sliding_window_pattern has {len(pattern)} flags for "
                                  f"{num_layers} layers")
        return [SLIDING if flag else FULL for flag in pattern]
    if int(pattern) < 1:
        raise CheckpointError(f"{ARCH}.attention.sliding_window_pattern must be positive, got {pattern}")
    return pattern_layer_types(num_layers, int(pattern))


def load_gemma3_gguf_state_dict(reader, args: Gemma3Args, quantization: str = "none") -> dict:
    """Our parameter names -> tensors (QuantizedWeights for linear layers under a quantization policy)."""
    raw = read_gguf_tensors(reader, quantization)
    state = {"embed_tokens.weight": _take(raw, "token_embd.weight"),
             "norm.weight": _gemma_norm(_take(raw, "output_norm.weight"))}
    if not args.tie_word_embeddings:
        state["lm_head.weight"] = _take(raw, "output.weight")
    for i in range(args.num_layers):
        p, ours = f"blk.{i}.", f"layers.{i}."
        state[ours + "self_attn.qkv_proj.weight"] = fuse_rows([_take(raw, p + f"attn_{n}.weight") for n in "qkv"])
        state[ours + "self_attn.o_proj.weight"] = _take(raw, p + "attn_output.weight")
        state[ours + "mlp.gate_up_proj.weight"] = fuse_rows([_take(raw, p + "ffn_gate.weight"),
                                                             _take(raw, p + "ffn_up.weight")])
        state[ours + "mlp.down_proj.weight"] = _take(raw, p + "ffn_down.weight")
        for src, dst in _GGUF_NORMS.items():
            state[ours + dst] = _gemma_norm(_take(raw, p + src))
    refuse_leftovers(raw, "GGUF file")
    return state


def gemma3_hf_args(cfg: dict, config_path: str) -> Gemma3Args:
    """config.json of a Gemma3ForCausalLM (transformers 4.5x keys or 5.x `rope_parameters`)."""
    refusals = []
    if cfg.get("hidden_activation", GELU_TANH) != GELU_TANH:
        refusals.append(f"hidden_activation {cfg['hidden_activation']!r} (supported: {GELU_TANH!r})")
    if cfg.get("attention_bias"):
        refusals.append("attention_bias true")
    if cfg.get("use_bidirectional_attention"):
        refusals.append("use_bidirectional_attention true")
    rope = cfg.get("rope_parameters") or {}
    global_rope = dict(rope.get(FULL) or cfg.get("rope_scaling") or {})
    local_rope = dict(rope.get(SLIDING) or {})
    theta = global_rope.pop("rope_theta", cfg.get("rope_theta", 1_000_000.0))
    local_theta = local_rope.pop("rope_theta", cfg.get("rope_local_base_freq", LOCAL_ROPE_THETA))
    if local_rope.get("rope_type", "default") != "default":
        refusals.append(f"rope scaling on the sliding-window layers ({local_rope})")
    if refusals:
        raise CheckpointError(f"{config_path}: not supported for {HF_MODEL_TYPE}: {'; '.join(refusals)}")
    if global_rope.get("rope_type", global_rope.get("type", "default")) == "default":
        global_rope = None
    num_heads, num_layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    layer_types = cfg.get("layer_types") or pattern_layer_types(
        num_layers, cfg.get("sliding_window_pattern", DEFAULT_SLIDING_PATTERN))
    _ignore_attn_softcap(cfg.get("attn_logit_softcapping"), config_path)
    eos = cfg.get("eos_token_id")
    try:
        return Gemma3Args(
            arch=ARCH,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=global_rope,
            max_position_embeddings=cfg.get("max_position_embeddings", 131072),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=[] if eos is None else (list(eos) if isinstance(eos, list) else [eos]),
            sliding_window=cfg.get("sliding_window") or 4096,
            layer_types=list(layer_types),
            rope_local_theta=float(local_theta),
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
        )
    except ValueError as e:
        raise CheckpointError(f"{config_path}: {e}") from e


def load_gemma3_safetensors_state_dict(raw: dict, args: Gemma3Args, model_dir: str) -> dict:
    """`raw`: the directory's tensors with "model." dropped (safetensors_loader.read_tensors); consumed."""
    def take(name: str) -> torch.Tensor:
        if name not in raw:
            raise CheckpointError(f"checkpoint in {model_dir} lacks tensor {name!r}")
        return raw.pop(name).float()

    state = {"embed_tokens.weight": take("embed_tokens.weight"), "norm.weight": 1.0 + take("norm.weight")}
    if not args.tie_word_embeddings:
        state["lm_head.weight"] = take("lm_head.weight")
    for i in range(args.num_layers):
        p = f"layers.{i}."
        state[p + "self_attn.qkv_proj.weight"] = torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        state[p + "self_attn.o_proj.weight"] = take(p + "self_attn.o_proj.weight")
        state[p + "mlp.gate_up_proj.weight"] = torch.cat([take(p + "mlp.gate_proj.weight"),
                                                          take(p + "mlp.up_proj.weight")])
        state[p + "mlp.down_proj.weight"] = take(p + "mlp.down_proj.weight")
        for name in _HF_NORMS:
            state[p + name] = 1.0 + take(p + name)
    return state
