"""Attention over a paged KV cache, in plain torch (the CPU path; also correct on CUDA).

Cache layout, per layer: k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]. Token at position
p of a sequence lives in slot block_table[p // block_size] * block_size + p % block_size.

A step's flat batch holds decode tokens first (one query token per sequence) and then prefill chunks. Decodes
run as one batched call over their gathered blocks; the query heads that share a KV head are folded into the
query-length axis, so GQA needs no copy of K/V per query head. Each prefill chunk runs on its own: a fresh
prompt attends to its own keys with a causal mask (no gather at all); a chunk behind a cached prefix gathers
its blocks and uses an offset causal mask.

On the CPU (fp32) decodes and prefill chunks instead go through a compiled kernel
(kernels/csrc/paged_attention_cpu.cpp) that reads K/V in place and runs every token as a decode over its own
context: a token's output is then the same, bit for bit, however it was scheduled (whole prompt, chunk, cached
prefix, decode) and whatever ran beside it.

Sliding-window (local) layers pass `sliding_window`: a query at position p sees keys p - window < k <= p (as
transformers' `sliding_window_overlay`). The cache still holds every key; the window is a mask. The compiled CPU
kernel has no window argument, so windowed decodes and prefill chunks whose context is longer than the window
(and every attention with logit softcapping) take the torch path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kernels.cpu_ops import cpu_kernels, fused_ops


@dataclass(slots=True)
class PrefillChunk:
    token_start: int  # first index of the chunk in the flat batch
    token_end: int  # one past its last index
    start_pos: int  # sequence position of its first token (tokens before it are in the cache)
    block_table: torch.Tensor  # [num_blocks] int64, covering start_pos + (token_end - token_start) tokens


@dataclass(slots=True)
class AttentionMetadata:
    positions: torch.Tensor  # [T] int64, sequence position of each token
    slot_mapping: torch.Tensor  # [T] int64, cache slot each token's K/V is written to
    logits_indices: torch.Tensor  # [S] int64, flat index of each token whose next token is sampled
    block_size: int  # tokens per KV block
    num_decode_tokens: int = 0  # tokens [0, num_decode_tokens) are single-token decodes, one per sequence
    decode_block_tables: torch.Tensor | None = None  # [num_decodes, max_blocks] int64, padded with block 0
    decode_context_lens: torch.Tensor | None = None  # [num_decodes] int64, tokens each decode attends to
    decode_mask: torch.Tensor | None = None  # [num_decodes, 1, 1, max_blocks * block_size] bool; torch path only
    decode_window_mask: torch.Tensor | None = None  # decode_mask of the sliding-window layers; torch path only
    prefills: list[PrefillChunk] = field(default_factory=list)  # chunks after the decodes, in batch order


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    # k, v: [T, num_kv_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim]
    ops = fused_ops(k)
    if ops is not None and k_cache.dtype == torch.float32 and k.stride(2) == 1 and k.stride(1) == k.shape[2] \
            and v.stride(2) == 1 and v.stride(1) == v.shape[2]:
        ops.write_kv(k.flatten(1), v.flatten(1), k_cache, v_cache, slot_mapping)
        return
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[num_blocks, bs, kv, d] x [B, nb] -> [B, kv, nb * bs, d]"""
    batch, num_blocks = block_tables.shape
    _, block_size, num_kv_heads, head_dim = cache.shape
    gathered = cache.index_select(0, block_tables.reshape(-1))
    return gathered.view(batch, num_blocks * block_size, num_kv_heads, head_dim).transpose(1, 2)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """q: [T, H, d]; k, v: [T, kv, d] (this step's keys, already written to the cache). Returns [T, H, d].
    `sliding_window`: keys older than that many positions are masked (local layers); `softcap`: scores become
    softcap * tanh(scores / softcap) before the softmax (Gemma 2 style)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, not q's strides (a qkv view)
    num_decodes = meta.num_decode_tokens
    if num_decodes and softcap is None and _use_cpu_kernel(q, k_cache) and \
            (sliding_window is None or int(meta.decode_context_lens.max()) <= sliding_window):
        # NOTE: the kernel reads q in place (a view of the fused qkv) and writes straight into `out`
        cpu_kernels().paged_decode_attention(q[:num_decodes], k_cache, v_cache, meta.decode_block_tables,
                                             meta.decode_context_lens, scale, out[:num_decodes])
    elif num_decodes:
        mask = _decode_mask(meta, sliding_window, q.device)
        # [B, H, d] -> [B, kv, group, d]: a KV head's query heads become its "query positions".
        q_dec = q[:num_decodes].view(num_decodes, num_kv_heads, group, head_dim)
        k_ctx = gather_blocks(k_cache, meta.decode_block_tables)
        v_ctx = gather_blocks(v_cache, meta.decode_block_tables)
        o = _attend(q_dec, k_ctx.to(q.dtype), v_ctx.to(q.dtype), mask, scale, softcap)
        out[:num_decodes] = o.reshape(num_decodes, num_heads, head_dim)
    use_kernel = bool(meta.prefills) and softcap is None and _use_cpu_kernel(q, k_cache)
    for chunk in meta.prefills:
        s, e = chunk.token_start, chunk.token_end
        windowed = sliding_window is not None and chunk.start_pos + (e - s) > sliding_window
        if use_kernel and not windowed:
            # NOTE: not SDPA: its blocking depends on the chunk's length, so a token would round differently when
            # prefilled whole, in chunks, behind a cached prefix or beside other work, and int8 activations turn
            # such last-bit differences into different tokens. The kernel runs each query as a decode.
            cpu_kernels().paged_prefill_attention(q[s:e], k_cache, v_cache, chunk.block_table, chunk.start_pos,
                                                  scale, out[s:e])
            continue
        q_c = q[s:e].transpose(0, 1).unsqueeze(0)  # [1, H, n, d]
        if chunk.start_pos == 0 and not windowed and softcap is None:
            k_c = k[s:e].transpose(0, 1).unsqueeze(0)
            v_c = v[s:e].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(q_c, k_c, v_c, is_causal=True, scale=scale, enable_gqa=True)
        else:
            context_len = chunk.start_pos + (e - s)
            if chunk.start_pos == 0:
                k_c, v_c = k[s:e].transpose(0, 1).unsqueeze(0), v[s:e].transpose(0, 1).unsqueeze(0)
            else:
                k_c = gather_blocks(k_cache, chunk.block_table.unsqueeze(0))[:, :, :context_len].to(q.dtype)
                v_c = gather_blocks(v_cache, chunk.block_table.unsqueeze(0))[:, :, :context_len].to(q.dtype)
            mask = causal_mask(e - s, chunk.start_pos, context_len, q.device, sliding_window)
            o = _attend(q_c, k_c, v_c, mask, scale, softcap)
        out[s:e] = o.squeeze(0).transpose(0, 1)
    return out


def _decode_mask(meta: AttentionMetadata, sliding_window: int | None, device) -> torch.Tensor:
    """[num_decodes, 1, 1, max_blocks * block_size] bool, built once per step (per kind of layer)."""
    if sliding_window is None and meta.decode_mask is not None:
        return meta.decode_mask
    if sliding_window is not None and meta.decode_window_mask is not None:
        return meta.decode_window_mask
    key_pos = torch.arange(meta.decode_block_tables.shape[1] * meta.block_size, device=device)
    context_lens = meta.decode_context_lens.unsqueeze(1)
    mask = key_pos < context_lens
    if sliding_window is None:
        meta.decode_mask = mask.view(meta.num_decode_tokens, 1, 1, -1)
        return meta.decode_mask
    # the query sits at position context_len - 1
    mask &= key_pos >= context_lens - sliding_window
    meta.decode_window_mask = mask.view(meta.num_decode_tokens, 1, 1, -1)
    return meta.decode_window_mask


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
            softcap: float | None) -> torch.Tensor:
    """q: [B, H, n, d], k, v: [B, kv, L, d], mask: bool broadcastable to [B, H, n, L]."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    # NOTE: SDPA has no softcap; this is transformers' eager attention, which is what it is checked against.
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), v)


def _use_cpu_kernel(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype == torch.float32 and k_cache.dtype == torch.float32
            and cpu_kernels() is not None)


def causal_mask(num_queries: int, start_pos: int, context_len: int, device,
                sliding_window: int | None = None) -> torch.Tensor:
    """[n, L] bool: query i (at position start_pos + i) sees keys 0..start_pos + i, and with a `sliding_window`
    only the last sliding_window of them."""
    q_pos = torch.arange(start_pos, start_pos + num_queries, device=device).unsqueeze(1)
    k_pos = torch.arange(context_len, device=device).unsqueeze(0)
    if sliding_window is None:
        return k_pos <= q_pos
    return (k_pos <= q_pos) & (k_pos > q_pos - sliding_window)


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: list[list[int]], start_positions: list[int],
                        query_lens: list[int], scale: float, sliding_window: int | None = None,
                        softcap: float | None = None) -> torch.Tensor:
    """Naive reference: per sequence, rebuild contiguous K/V token by token from the cache, repeat KV heads,
    softmax in float64. q: [T, H, d], sequences laid end to end in the order given."""
    num_heads = q.shape[1]
    block_size = k_cache.shape[1]
    outs = []
    offset = 0
    for table, start, n in zip(block_tables, start_positions, query_lens):
        context_len = start + n
        slots = [table[p // block_size] * block_size + p % block_size for p in range(context_len)]
        k = k_cache.reshape(-1, *k_cache.shape[2:])[slots].double()  # [L, kv, d]
        v = v_cache.reshape(-1, *v_cache.shape[2:])[slots].double()
        group = num_heads // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        qs = q[offset:offset + n].double()  # [n, H, d]
        scores = torch.einsum("nhd,lhd->hnl", qs, k) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        mask = causal_mask(n, start, context_len, q.device, sliding_window)
        scores = scores.masked_fill(~mask, float("-inf"))
        outs.append(torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v))
        offset += n
    return torch.cat(outs).to(q.dtype)
