"""Paged attention against its naive float64 reference, on odd shapes, both the torch path and the CPU kernel; the
kernel's outputs do not depend on the rest of the batch or on how a prompt was split into chunks."""
import os

import pytest
import torch

from kernels.cpu_ops import _CFLAGS, _CSRC, _LDFLAGS, _paged_attention, cpu_kernels
from kernels.paged_attention import (AttentionMetadata, PrefillChunk, paged_attention, paged_attention_ref,
                                     write_kv)
from cpu_builds import OTHER_BUILD_IDS, OTHER_BUILDS, build_variant, require

SHAPES = [
    (9, 3, 64, 16, [(0, 1), (15, 1), (16, 1), (40, 1), (0, 7), (5, 11)]),
    (4, 4, 32, 8, [(3, 1), (0, 33)]),
    (8, 1, 16, 4, [(100, 1), (1, 1), (2, 1), (9, 5)]),
    (6, 2, 48, 16, [(0, 19)]),
    (2, 2, 8, 1, [(6, 1), (0, 3), (4, 2)]),
    (4, 2, 96, 16, [(20, 1), (0, 18)]),  # 6 vectors of AVX-512, 12 of AVX2
    (2, 1, 256, 16, [(7, 1), (0, 9)]),  # Gemma 3's head: 16 and 32 vectors
]


def _case(seed, num_heads, num_kv_heads, head_dim, block_size, seqs):
    """seqs: list of (start_pos, num_query_tokens). Returns inputs with a shuffled block pool."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum((s + n + block_size - 1) // block_size for s, n in seqs) + 3
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, offset = [], 0
    for s, n in seqs:
        nb = (s + n + block_size - 1) // block_size
        tables.append(perm[offset:offset + nb])
        offset += nb
    total = sum(n for _, n in seqs)
    q = torch.randn(total, num_heads, head_dim, generator=g)
    k = torch.randn(total, num_kv_heads, head_dim, generator=g)
    v = torch.randn(total, num_kv_heads, head_dim, generator=g)
    return q, k, v, k_cache, v_cache, tables


def _meta(seqs, tables, block_size):
    positions, slots = [], []
    for (s, n), table in zip(seqs, tables):
        for p in range(s, s + n):
            positions.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
    decodes = [i for i, (_, n) in enumerate(seqs) if n == 1]
    assert decodes == list(range(len(decodes))), "decodes first"
    meta = AttentionMetadata(positions=torch.tensor(positions), slot_mapping=torch.tensor(slots),
                             logits_indices=torch.tensor([0]), block_size=block_size,
                             num_decode_tokens=len(decodes))
    if decodes:
        lens = [seqs[i][0] + 1 for i in decodes]
        max_blocks = max((n + block_size - 1) // block_size for n in lens)
        meta.decode_block_tables = torch.tensor([tables[i][:max_blocks] + [0] * (max_blocks - len(tables[i][:max_blocks]))
                                                 for i in decodes])
        meta.decode_context_lens = torch.tensor(lens)
    offset = len(decodes)
    for (s, n), table in list(zip(seqs, tables))[len(decodes):]:
        nb = (s + n + block_size - 1) // block_size
        meta.prefills.append(PrefillChunk(offset, offset + n, s, torch.tensor(table[:nb])))
        offset += n
    return meta


@pytest.mark.parametrize("use_kernel", [False, True])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, block_size, seqs", SHAPES)
def test_paged_attention_matches_reference(monkeypatch, use_kernel, num_heads, num_kv_heads, head_dim,
                                           block_size, seqs):
    if use_kernel:
        require(_paged_attention)
    else:  # the torch path throughout, the KV write included
        monkeypatch.setattr("kernels.paged_attention._use_cpu_kernel", lambda q, k: False)
        monkeypatch.setattr("kernels.paged_attention.fused_ops", lambda x=None: None)
    q, k, v, k_cache, v_cache, tables = _case(0, num_heads, num_kv_heads, head_dim, block_size, seqs)
    meta = _meta(seqs, tables, block_size)
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    scale = head_dim ** -0.5
    out = paged_attention(q, k, v, k_cache, v_cache, meta, scale)
    ref = paged_attention_ref(q, k_cache, v_cache, tables, [s for s, _ in seqs], [n for _, n in seqs], scale)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_decode_kernel_is_batch_invariant():
    require(_paged_attention)
    seqs = [(s, 1) for s in (3, 17, 64, 130)]
    q, _, _, k_cache, v_cache, tables = _case(1, 9, 3, 64, 16, seqs)
    meta = _meta(seqs, tables, 16)
    together = cpu_kernels().paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables,
                                                    meta.decode_context_lens, 0.125)
    for i in range(len(seqs)):
        alone = cpu_kernels().paged_decode_attention(q[i:i + 1], k_cache, v_cache, meta.decode_block_tables[i:i + 1],
                                                     meta.decode_context_lens[i:i + 1], 0.125)
        assert torch.equal(alone[0], together[i])


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, block_size", [(9, 3, 64, 16), (4, 2, 20, 8)])
def test_prefill_kernel_rounds_as_decode(num_heads, num_kv_heads, head_dim, block_size):
    """A prefilled token's attention is bit for bit its decode, and a chunk behind cached tokens gives the rows
    of the whole prefill: a token rounds the same however its prompt was scheduled."""
    require(_paged_attention)
    n = 45
    q, k, v, k_cache, v_cache, tables = _case(3, num_heads, num_kv_heads, head_dim, block_size, [(0, n)])
    write_kv(k, v, k_cache, v_cache, _meta([(0, n)], tables, block_size).slot_mapping)
    table, scale = torch.tensor(tables[0]), head_dim ** -0.5
    ext = cpu_kernels()
    whole = ext.paged_prefill_attention(q, k_cache, v_cache, table, 0, scale)
    ref = paged_attention_ref(q, k_cache, v_cache, tables, [0], [n], scale)
    torch.testing.assert_close(whole, ref, rtol=1e-5, atol=1e-5)
    for split in (1, block_size, 30, n - 1):
        assert torch.equal(ext.paged_prefill_attention(q[split:], k_cache, v_cache, table, split, scale), whole[split:])
        assert torch.equal(ext.paged_prefill_attention(q[:split], k_cache, v_cache, table, 0, scale), whole[:split])
    decoded = ext.paged_decode_attention(q, k_cache, v_cache, table.expand(n, -1).contiguous(),
                                         torch.arange(1, n + 1), scale)
    assert torch.equal(decoded, whole)


def test_kernels_read_and_write_strided_rows():
    """q as the model passes it (a view of the fused qkv rows) and `out` given: the same bits as contiguous
    tensors, written in place, and nothing beside the rows touched."""
    require(_paged_attention)
    n, num_heads, num_kv_heads, head_dim = 21, 9, 3, 64
    q, k, v, k_cache, v_cache, tables = _case(5, num_heads, num_kv_heads, head_dim, 16, [(0, n)])
    write_kv(k, v, k_cache, v_cache, _meta([(0, n)], tables, 16).slot_mapping)
    qkv = torch.cat([q.flatten(1), torch.randn(n, 2 * num_kv_heads * head_dim)], dim=1)
    q_view = qkv[:, :num_heads * head_dim].view(n, num_heads, head_dim)
    table, ext = torch.tensor(tables[0]), cpu_kernels()
    padded = torch.full((n, num_heads * head_dim + 7), 7.0)
    out = padded[:, :num_heads * head_dim].view(n, num_heads, head_dim)
    assert ext.paged_prefill_attention(q_view, k_cache, v_cache, table, 0, 0.125, out) is not None
    assert torch.equal(out, ext.paged_prefill_attention(q, k_cache, v_cache, table, 0, 0.125))
    assert (padded[:, num_heads * head_dim:] == 7.0).all()
    tables_b, lens = table.expand(n, -1).contiguous(), torch.arange(1, n + 1)
    out_d = torch.empty(n, num_heads, head_dim)
    ext.paged_decode_attention(q_view, k_cache, v_cache, tables_b, lens, 0.125, out_d)
    assert torch.equal(out_d, ext.paged_decode_attention(q, k_cache, v_cache, tables_b, lens, 0.125))
    with pytest.raises(RuntimeError, match="out must be fp32 like q"):
        ext.paged_decode_attention(q, k_cache, v_cache, tables_b, lens, 0.125, torch.empty(n, num_heads, 1))


def test_prefill_kernel_rejects_a_chunk_past_its_block_table():
    require(_paged_attention)
    q, _, _, k_cache, v_cache, tables = _case(4, 4, 2, 16, 4, [(0, 8)])
    with pytest.raises(RuntimeError, match="does not fit the block table"):
        cpu_kernels().paged_prefill_attention(q, k_cache, v_cache, torch.tensor(tables[0][:1]), 0, 0.25)


@pytest.mark.parametrize("label,arch_flags", OTHER_BUILDS, ids=OTHER_BUILD_IDS)
def test_kernel_other_vector_widths(label, arch_flags):
    require(_paged_attention)
    ext = build_variant("frugal_cpu_kernels", [os.path.join(_CSRC, "paged_attention_cpu.cpp")], _CFLAGS, _LDFLAGS,
                        label, arch_flags, siblings=OTHER_BUILDS)
    for num_heads, num_kv_heads, head_dim, block_size, seqs in SHAPES:
        for start, n in [(s, n) for s, n in seqs if n > 1]:
            q, k, v, k_cache, v_cache, tables = _case(2, num_heads, num_kv_heads, head_dim, block_size, [(start, n)])
            write_kv(k, v, k_cache, v_cache, _meta([(start, n)], tables, block_size).slot_mapping)
            out = ext.paged_prefill_attention(q, k_cache, v_cache, torch.tensor(tables[0]), start, head_dim ** -0.5)
            ref = paged_attention_ref(q, k_cache, v_cache, tables, [start], [n], head_dim ** -0.5)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        decodes = [(s, n) for s, n in seqs if n == 1]
        if not decodes:
            continue
        q, _, _, k_cache, v_cache, tables = _case(2, num_heads, num_kv_heads, head_dim, block_size, decodes)
        meta = _meta(decodes, tables, block_size)
        out = ext.paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens,
                                         head_dim ** -0.5)
        ref = paged_attention_ref(q, k_cache, v_cache, tables, [s for s, _ in decodes], [1] * len(decodes),
                                  head_dim ** -0.5)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
