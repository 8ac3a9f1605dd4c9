"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2-style QKV biases) over a paged KV cache.

One flat file in the spirit of gpt-fast: a config dataclass, RMSNorm, RoPE, GQA attention and a SwiGLU MLP.
The model never sees requests or blocks: it gets a flat batch of tokens (every scheduled sequence's new tokens
laid end to end) and an `AttentionMetadata` that says where each token's keys and values live in the paged
cache. Projections are fused (QKV in one matmul, gate+up in another) because on both CPU and GPU one larger
GEMM beats several small ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kernels.cpu_ops import fused_ops
from kernels.paged_attention import AttentionMetadata, paged_attention, write_kv
from serving.models.rope import RotaryEmbedding


@dataclass(slots=True)
class ModelArgs:
    arch: str  # architecture name as the checkpoint spells it ("llama", "mistral", "qwen2")
    vocab_size: int  # rows of the embedding table
    hidden_size: int  # model width
    intermediate_size: int  # MLP width
    num_layers: int  # decoder blocks
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when smaller than num_heads)
    head_dim: int  # width of one head
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: dict | None = None  # HF-style rope scaling dict ("llama3", "linear") or None
    rope_freq_factors: list[float] | None = None  # head_dim / 2 divisors of the rope frequencies (GGUF rope_freqs)
    max_position_embeddings: int = 2048  # longest context the model was trained for
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix
    attention_bias: bool = False  # Q/K/V projections carry a bias (Qwen2)
    bos_token_id: int | None = None  # beginning-of-sequence token
    eos_token_ids: list[int] = field(default_factory=list)  # tokens that end generation

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelArgs.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelArgs.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """norm(x); with `residual`, first residual += x in place (the residual stream's add) and norm that."""
        ops = fused_ops(x)
        if ops is not None and x.dim() == 2:
            return ops.rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = residual.add_(x)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = args.num_heads
        self.num_kv_heads = args.num_kv_heads
        self.head_dim = args.head_dim
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim
        self.scale = args.head_dim ** -0.5
        # qkv_proj: [q_size + 2 * kv_size, hidden]
        self.qkv_proj = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, meta: AttentionMetadata,
                kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        rotated = rope.rotate_qkv_(meta.positions, qkv, self.num_heads, self.num_kv_heads)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if not rotated:
            q, k = rope(meta.positions, q, k)
        k_cache, v_cache = kv_cache
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.intermediate_size = args.intermediate_size
        # gate_up_proj: [2 * intermediate, hidden]; gate rows first
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    act = staticmethod(F.silu)  # SwiGLU; subclasses swap the activation only (Gemma: GeGLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        ops = fused_ops(gate_up)
        if ops is not None and gate_up.dim() == 2 and self.act is F.silu:
            return self.down_proj(ops.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, residual, rope, meta, kv_cache):
        """x: the previous layer's output, not yet added to `residual` (the residual stream; None before the
        first layer, where x is the embedding). Returns this layer's output and the stream, likewise: each
        add is fused into the norm that follows it."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, meta, kv_cache)
        h = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.build_rope()

    def build_rope(self) -> None:
        """The rope tables (buffers computed here, so rebuilt for real after a meta-device init)."""
        args = self.args
        self.rope = RotaryEmbedding(args.head_dim, args.max_position_embeddings, args.rope_theta,
                                    args.rope_scaling, freq_factors=args.rope_freq_factors)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Runs one flat batch; returns hidden states of the tokens in meta.logits_indices."""
        x, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, self.rope, meta, kv_cache)
        x, residual = x.index_select(0, meta.logits_indices), residual.index_select(0, meta.logits_indices)
        return self.norm(x, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # NOTE: called as a module, so a packed lm_head (serving/quant) runs its own matmul path
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        return F.linear(hidden, self.embed_tokens.weight).float()
