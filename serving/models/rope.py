"""Rotary position embeddings (neox / HF "rotate_half" layout), with Llama-3 and linear scaling and
llama.cpp's per-frequency factors.

cos/sin are precomputed once for every position up to the model's context length and indexed by position at
run time, so a step costs one gather, not a trig call per token.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kernels.cpu_ops import fused_ops

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None,
                  freq_factors: list[float] | None = None) -> torch.Tensor:
    """The rotary frequencies under HF-style `scaling`, each then divided by its `freq_factors` entry: llama.cpp
    stores Llama-3 scaling as such divisors (GGUF `rope_freqs.weight`) and its rope applies them on top."""
    inv_freq = _scaled_inv_freq(head_dim, theta, scaling)
    if freq_factors is None:
        return inv_freq
    if len(freq_factors) != inv_freq.numel():
        raise ValueError(f"rope freq_factors has {len(freq_factors)} entries; expected {inv_freq.numel()} "
                         f"(head_dim {head_dim} / 2)")
    return inv_freq / torch.tensor(freq_factors, dtype=torch.float32)


def _scaled_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"rope_scaling.rope_type {rope_type!r} is not supported; "
                     f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth blend between.
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None = None,
                 attention_factor: float = 1.0, freq_factors: list[float] | None = None):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling, freq_factors)
        positions = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        # cos/sin: [max_positions, head_dim]
        self.register_buffer("cos", emb.cos() * attention_factor, persistent=False)
        self.register_buffer("sin", emb.sin() * attention_factor, persistent=False)

    def rotate_qkv_(self, positions: torch.Tensor, qkv: torch.Tensor, num_heads: int, num_kv_heads: int) -> bool:
        """Rotates the query and key heads of a fused [T, (H + 2 KV) * head_dim] qkv in place with the compiled
        CPU op; False (nothing done) where it does not apply, and the caller rotates with `forward`."""
        ops = fused_ops(qkv)
        if ops is None or qkv.dim() != 2 or qkv.stride(1) != 1 or self.cos.dtype != torch.float32:
            return False
        ops.rotary_(qkv, positions, self.cos, self.sin, num_heads, num_kv_heads, self.cos.shape[1])
        return True

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        # q: [T, num_heads, head_dim], k: [T, num_kv_heads, head_dim], positions: [T]
        cos = self.cos.index_select(0, positions).unsqueeze(1).to(q.dtype)
        sin = self.sin.index_select(0, positions).unsqueeze(1).to(q.dtype)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
