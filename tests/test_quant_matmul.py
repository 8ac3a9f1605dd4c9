"""Fused dequant matmul kernels against their torch references: odd shapes, both variants, NaN/inf, batch invariance.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (small shapes only).
"""
import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # NOTE: must be set before triton.jit wraps the kernels; a module imported earlier without it is reloaded below.
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

if "kernels.quant_matmul" in sys.modules and not sys.modules["kernels.quant_matmul"]._INTERPRET \
        and not torch.cuda.is_available():
    importlib.reload(sys.modules["kernels.quant_matmul"])
from kernels import quant_matmul as qm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _int4_weight(n, k, group_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    scales = (torch.rand(n, k // group_size, generator=g) * 0.02 + 0.005).half()
    mins = (-8 * scales.float() + torch.randn(n, k // group_size, generator=g) * 0.01).half()
    return qweight.to(DEVICE), scales.to(DEVICE), mins.to(DEVICE)


def _int8_weight(n, k, group_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    scales = (torch.rand(n, k // group_size, generator=g) * 0.002 + 0.0005).half()
    return qweight.to(DEVICE), scales.to(DEVICE)


def _x(m, k, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype).to(DEVICE)


def _assert_close(out, ref, dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    # The kernel rounds the dequantized weight to x's dtype before the dot; the reference keeps fp32.
    tol = {torch.float16: 2e-2, torch.bfloat16: 8e-2, torch.float32: 1e-4}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("n, k, group_size", [(40, 96, 32), (72, 128, 64), (24, 256, 128)])
def test_w4a16_matches_reference(m, n, k, group_size):
    qweight, scales, mins = _int4_weight(n, k, group_size)
    bias = torch.randn(n).half().to(DEVICE) if m % 2 else None
    x = _x(m, k, torch.float16)
    out = qm.w4a16_matmul(x, qweight, scales, mins, group_size, bias=bias)
    _assert_close(out, qm.w4a16_matmul_ref(x, qweight, scales, mins, group_size, bias=bias), torch.float16)


@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("n, k, group_size", [(40, 96, 32), (24, 80, 80)])  # 80: per channel, G = K
def test_w8a16_matches_reference(m, n, k, group_size):
    qweight, scales = _int8_weight(n, k, group_size)
    bias = torch.randn(n).half().to(DEVICE) if m % 2 else None
    x = _x(m, k, torch.float16)
    out = qm.w8a16_matmul(x, qweight, scales, group_size, bias=bias)
    _assert_close(out, qm.w8a16_matmul_ref(x, qweight, scales, group_size, bias=bias), torch.float16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("variant", ["decode", "prefill"])
def test_activation_dtypes_and_variants(dtype, variant):
    n, k, group_size = 40, 96, 32
    qweight, scales, mins = _int4_weight(n, k, group_size)
    x = _x(5, k, dtype)
    out = qm.w4a16_matmul(x, qweight, scales, mins, group_size, variant=variant)
    _assert_close(out, qm.w4a16_matmul_ref(x, qweight, scales, mins, group_size), dtype)
    q8, s8 = _int8_weight(n, k, group_size)
    out8 = qm.w8a16_matmul(x, q8, s8, group_size, variant=variant)
    _assert_close(out8, qm.w8a16_matmul_ref(x, q8, s8, group_size), dtype)


def test_extreme_codes_stay_finite():
    # Every nibble 15 (or 0) with fp16-sized scales: the fp32 accumulator must not overflow to inf.
    n, k, group_size = 32, 128, 32
    for code in (0x00, 0xFF):
        qweight = torch.full((n, k // 2), code, dtype=torch.uint8, device=DEVICE)
        scales = torch.full((n, k // group_size), 0.05, dtype=torch.float16, device=DEVICE)
        mins = torch.full((n, k // group_size), -0.4, dtype=torch.float16, device=DEVICE)
        for m in (1, 20):
            x = torch.full((m, k), 4.0, dtype=torch.float16, device=DEVICE)
            out = qm.w4a16_matmul(x, qweight, scales, mins, group_size)
            ref = qm.w4a16_matmul_ref(x, qweight, scales, mins, group_size)
            assert not torch.isnan(out).any() and not torch.isinf(out).any()
            torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("bits", [4, 8])
def test_batch_invariance(bits):
    """Row i of a batched call equals the same row computed alone (decode), or in a different batch (prefill)."""
    n, k, group_size = 40, 96, 32
    if bits == 4:
        qweight, scales, mins = _int4_weight(n, k, group_size)

        def run(x):
            return qm.w4a16_matmul(x, qweight, scales, mins, group_size)
    else:
        qweight, scales = _int8_weight(n, k, group_size)

        def run(x):
            return qm.w8a16_matmul(x, qweight, scales, group_size)
    x = _x(64, k, torch.float16)
    batched = run(x[:3])
    for i in range(3):
        assert torch.equal(batched[i], run(x[i:i + 1])[0])
    # Both in the same prefill bucket (17..64). NOTE: the slice starts on a BLOCK_M boundary because the
    # interpreter's tl.dot is numpy BLAS, whose rounding may depend on a row's position inside a tile.
    big, small = run(x), run(x[32:49])
    assert torch.equal(big[32:49], small)


def test_leading_dims_and_empty():
    n, k, group_size = 40, 96, 32
    qweight, scales, mins = _int4_weight(n, k, group_size)
    x = _x(6, k, torch.float16).reshape(2, 3, k)
    out = qm.w4a16_matmul(x, qweight, scales, mins, group_size)
    assert out.shape == (2, 3, n)
    torch.testing.assert_close(out.reshape(6, n), qm.w4a16_matmul(x.reshape(6, k), qweight, scales, mins, group_size))
    assert qm.w4a16_matmul(x[:0, 0], qweight, scales, mins, group_size).shape == (0, n)


def test_bad_inputs_have_clear_errors():
    n, k, group_size = 40, 96, 32
    qweight, scales, mins = _int4_weight(n, k, group_size)
    x = _x(2, k, torch.float16)
    with pytest.raises(ValueError, match="qweight .* does not match K"):
        qm.w4a16_matmul(_x(2, 64, torch.float16), qweight, scales, mins, group_size)
    with pytest.raises(ValueError, match="group_size"):
        qm.w4a16_matmul(x, qweight, scales, mins, 40)
    with pytest.raises(ValueError, match="mins must be float16"):
        qm.w4a16_matmul(x, qweight, scales, mins.float(), group_size)
    with pytest.raises(ValueError, match="x must be float16"):
        qm.w4a16_matmul(x.to(torch.int32), qweight, scales, mins, group_size)
    with pytest.raises(ValueError, match="bias must be"):
        qm.w4a16_matmul(x, qweight, scales, mins, group_size, bias=torch.zeros(n + 1, dtype=torch.float16))
    with pytest.raises(ValueError, match="qweight must be 2-D torch.int8"):
        qm.w8a16_matmul(x, qweight, scales, group_size)


def test_split_k_depends_on_problem_not_batch():
    dev = torch.device("cpu")
    assert qm.choose_split_k(40, 96, 32, dev) == 3  # K // G = 3 slices
    assert qm.choose_split_k(4096, 4096, 4096, dev) == 1  # enough N blocks already
    assert qm.m_bucket(1) == qm.m_bucket(16) == 16
    assert qm.m_bucket(17) == qm.m_bucket(64) == 64
    assert qm.m_bucket(65) == 256 and qm.m_bucket(100000) == 4096


@pytest.mark.parametrize("bucket, n, k, group_size", [(16, 40, 96, 32), (64, 4096, 4096, 128), (4096, 24, 80, 80)])
def test_configs_stay_inside_one_group(bucket, n, k, group_size):
    for k_per_split in (None, group_size):
        configs = qm.quant_matmul_configs(bucket, n, k, group_size, k_per_split)
        assert configs and all(group_size % c.kwargs["BLOCK_K"] == 0 for c in configs)
