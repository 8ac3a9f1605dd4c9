"""QuantLinear on every CPU path, and the CPU kernel, against dequantize-then-matmul."""
import pytest
import torch

import serving.quant.linear as quant_linear
from kernels.weight_quant_cpu import (dequant_cpu, dequant_ref, quant_linear_cpu, quant_linear_cpu_ref,
                                      split_columns, weight_quant_kernels)
from serving.quant.layout import dequantize, quantize
from serving.quant.linear import QuantLinear

needs_kernel = pytest.mark.skipif(weight_quant_kernels() is None, reason="CPU weight-quant kernel did not build")
# (N, K, format): odd N, K that is a single group, and the portable (non-AVX2) path via int8 with K % 32 != 0
SHAPES = [(37, 96, "int4-g32"), (960, 576, "int4-g64"), (5, 128, "int4-g128"), (33, 96, "int8"), (9, 40, "int8")]


@needs_kernel
@pytest.mark.parametrize("n,k,fmt", SHAPES)
def test_kernel_matches_reference(n, k, fmt):
    torch.manual_seed(0)
    qw = quantize(torch.randn(n, k), fmt)
    args = (qw.qweight, qw.scales, qw.mins, qw.group_size)
    assert torch.equal(dequant_cpu(*args), dequant_ref(*args))
    assert torch.equal(dequant_ref(*args), dequantize(qw))
    if qw.format == "int4":  # the split column order is a pure permutation of the same values
        assert torch.equal(dequant_cpu(*args, split=True), split_columns(dequantize(qw)))
    rows = []
    for m in (1, 3, 17):
        x = torch.randn(m, k)
        y = quant_linear_cpu(x, *args)
        assert y.shape == (m, n) and torch.isfinite(y).all()
        torch.testing.assert_close(y, quant_linear_cpu_ref(x, *args), rtol=1e-5, atol=1e-4)
        rows.append((x[0], y[0]))
    # batch invariance: a row's result does not depend on what else is in the batch
    x0 = torch.stack([rows[0][0], rows[1][0]])
    assert torch.equal(quant_linear_cpu(x0[:1], *args)[0], quant_linear_cpu(x0, *args)[0])


@pytest.mark.parametrize("path,tol", [("kernel", 1e-4), ("dequant", 0.0), ("int4pack", 0.05), ("fbgemm", 0.3)])
@pytest.mark.parametrize("m", [1, 5, quant_linear.KERNEL_MAX_M + 3])
def test_quant_linear_paths_match_dequantized_linear(path, tol, m):
    torch.manual_seed(1)
    qw = quantize(torch.randn(96, 128) * 0.05, "int4-g32")
    bias = torch.randn(96)
    layer = QuantLinear(qw, bias, cpu_path=path)
    x = torch.randn(2, m, 128)  # leading dims are flattened and restored
    ref = torch.nn.functional.linear(x, dequantize(qw), bias)
    y = layer(x)
    assert y.shape == (2, m, 96) and y.dtype == torch.float32 and torch.isfinite(y).all()
    # tolerance relative to the output scale: bf16 activations (int4pack), int8 activations (fbgemm)
    assert (y - ref).abs().max() <= tol * ref.abs().max() + 1e-5, layer.path


def test_path_choice_and_errors():
    qw = quantize(torch.randn(16, 64), "int8")
    assert QuantLinear(qw, cpu_path="int4pack").path == "dequant"  # int4pack needs int4 weights
    assert QuantLinear(qw, cpu_path="dequant").weight_nbytes == qw.nbytes
    with pytest.raises(ValueError, match="cpu quant path must be one of kernel, fbgemm"):
        QuantLinear(qw, cpu_path="magic")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", ["int4-g32", "int4-g128", "int8"])
def test_gpu_path_matches_dequantized_linear(fmt):
    qw = quantize(torch.randn(96, 256) * 0.05, fmt)
    layer = QuantLinear(qw, dtype=torch.float16, device="cuda")
    assert layer.path in ("triton", "dequant")
    x = torch.randn(5, 256, device="cuda", dtype=torch.float16)
    ref = torch.nn.functional.linear(x.float(), dequantize(qw).cuda())
    y = layer(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
