"""Gemma 3 text decoder (270M .. 27B, text only) over a paged KV cache, beside the Llama family in llama.py.

What differs from Llama, all of it checked token-exact against transformers' `Gemma3ForCausalLM`:
- layers alternate sliding-window (local) and global attention (`layer_types`); local layers mask keys older
  than `sliding_window` positions and rotate with their own rope base (10k), global ones with `rope_theta`
  (1M) and the checkpoint's rope scaling;
- RMSNorm on each query and key head before the rotation (QK-norm), and queries scaled by
  query_pre_attn_scalar ** -0.5 rather than head_dim ** -0.5;
- four norms per layer: on the input, on the attention output, before and after the MLP (a GeGLU, gelu tanh);
- the embedding is multiplied by sqrt(hidden_size); optional softcapping of the output logits. (Gemma 3 has no
  attention-score softcapping: transformers and llama.cpp ignore the config's attn_logit_softcapping, so do we.)
Gemma's RMSNorm scales by (1 + w). The loaders store 1 + w (computed in fp32, as transformers does at run time)
as the norm weight, so Llama's RMSNorm, with its fused CPU op, is Gemma's too.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kernels.paged_attention import AttentionMetadata, paged_attention, write_kv
from serving.models.llama import MLP, ModelArgs, RMSNorm
from serving.models.rope import RotaryEmbedding

SLIDING, FULL = "sliding_attention", "full_attention"  # layer_types values, as transformers spells them


@dataclass(slots=True)
class Gemma3Args(ModelArgs):
    sliding_window: int = 4096  # local layers see this many positions, their own included
    layer_types: list[str] = field(default_factory=list)  # per layer: SLIDING or FULL
    rope_local_theta: float = 10000.0  # RoPE base of the local layers (rope_theta is the global layers')
    query_pre_attn_scalar: float = 256.0  # queries are scaled by its inverse square root
    final_logit_softcapping: float | None = None  # output logits likewise

    def __post_init__(self):
        ModelArgs.__post_init__(self)  # NOTE: slots dataclasses break zero-argument super()
        if len(self.layer_types) != self.num_layers or set(self.layer_types) - {SLIDING, FULL}:
            raise ValueError(f"Gemma3Args.layer_types must list {SLIDING!r} or {FULL!r} for each of the "
                             f"{self.num_layers} layers, got {self.layer_types}")
        if self.sliding_window <= 0:
            raise ValueError(f"Gemma3Args.sliding_window must be positive, got {self.sliding_window}")
        if self.query_pre_attn_scalar <= 0:
            raise ValueError(f"Gemma3Args.query_pre_attn_scalar must be positive, got {self.query_pre_attn_scalar}")


def pattern_layer_types(num_layers: int, pattern: int) -> list[str]:
    """Every `pattern`-th layer global, the rest local (Gemma 3's default pattern is 6: five local, one global)."""
    return [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers)]


class Gemma3Attention(nn.Module):
    def __init__(self, args: Gemma3Args, layer_idx: int):
        super().__init__()
        self.num_heads = args.num_heads
        self.num_kv_heads = args.num_kv_heads
        self.head_dim = args.head_dim
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim
        self.scale = args.query_pre_attn_scalar ** -0.5
        self.is_sliding = args.layer_types[layer_idx] == SLIDING
        self.sliding_window = args.sliding_window if self.is_sliding else None
        # qkv_proj: [q_size + 2 * kv_size, hidden]
        self.qkv_proj = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=False)
        self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, meta: AttentionMetadata,
                kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # QK-norm per head: rows of [T * heads, head_dim], so the fused 2-D RMSNorm applies
        q = self.q_norm(q.reshape(-1, self.head_dim)).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_norm(k.reshape(-1, self.head_dim)).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = rope(meta.positions, q, k)
        k_cache, v_cache = kv_cache
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale, self.sliding_window)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class Gemma3MLP(MLP):
    """GeGLU: the gated MLP with gelu (tanh approximation) for the gate."""

    act = staticmethod(functools.partial(F.gelu, approximate="tanh"))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, args: Gemma3Args, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Gemma3Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = Gemma3MLP(args)
        self.post_feedforward_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, residual, rope, meta, kv_cache):
        """As Llama's layer: x is the previous layer's output not yet added to `residual` (None before the first
        layer); each residual add is fused into the norm that follows it."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)
        h = self.post_attention_layernorm(self.self_attn(h, rope, meta, kv_cache))
        h = self.pre_feedforward_layernorm(h, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class Gemma3ForCausalLM(nn.Module):
    def __init__(self, args: Gemma3Args):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.build_rope()

    @property
    def has_sliding_window(self) -> bool:
        """Its local layers decode past their window on the torch path, which reads unwritten cache slots."""
        return SLIDING in self.args.layer_types

    def build_rope(self) -> None:
        """The rope tables (buffers computed here, so rebuilt for real after a meta-device init)."""
        args = self.args
        self.rope = RotaryEmbedding(args.head_dim, args.max_position_embeddings, args.rope_theta, args.rope_scaling,
                                    freq_factors=args.rope_freq_factors)
        self.rope_local = RotaryEmbedding(args.head_dim, args.max_position_embeddings, args.rope_local_theta)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Runs one flat batch; returns hidden states of the tokens in meta.logits_indices."""
        x = self.embed_tokens(input_ids)
        # NOTE: a tensor in the activations' dtype, as transformers rounds the scale (sqrt(640) is not exact)
        x = x * torch.tensor(self.args.hidden_size ** 0.5, dtype=x.dtype, device=x.device)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            rope = self.rope_local if layer.self_attn.is_sliding else self.rope
            x, residual = layer(x, residual, rope, meta, kv_cache)
        x, residual = x.index_select(0, meta.logits_indices), residual.index_select(0, meta.logits_indices)
        return self.norm(x, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # NOTE: called as a module, so a packed lm_head (serving/quant) runs its own matmul path
        if self.lm_head is not None:
            logits = self.lm_head(hidden).float()
        else:
            logits = F.linear(hidden, self.embed_tokens.weight).float()
        cap = self.args.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
