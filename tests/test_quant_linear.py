"""QuantLinear on every CPU path, and the CPU kernel, against dequantize-then-matmul."""
import pytest
import torch

import serving.quant.linear as quant_linear
from kernels.weight_quant_cpu import (_extension, dequant_panels_t, dequant_ref, pack_panels, quant_linear_cpu,
                                      quant_linear_cpu_ref)
from serving.quant.layout import dequantize, quantize
from serving.quant.linear import QuantLinear
from cpu_builds import OTHER_BUILD_IDS, OTHER_BUILDS, build_variant, require


@pytest.fixture
def built_kernel():
    return require(_extension)


needs_kernel = pytest.mark.usefixtures("built_kernel")
# (N, K, format): N that fills no panel / ends mid-panel / an odd number of panels, K that is a single group,
# per-channel int8 with an odd K
SHAPES = [(37, 96, "int4-g32"), (960, 576, "int4-g64"), (5, 128, "int4-g128"), (33, 96, "int8"), (9, 41, "int8"),
          (48, 64, "int4-g32")]
# every row count of the fused loop, both sides of it, and several blocks of the micro-kernel with a remainder
ROWS = (1, 2, 3, 4, 5, 13, 40)


@needs_kernel
@pytest.mark.parametrize("n,k,fmt", SHAPES)
def test_kernel_matches_reference(n, k, fmt):
    torch.manual_seed(0)
    qw = quantize(torch.randn(n, k), fmt)
    args = (qw.qweight, qw.scales, qw.mins, qw.group_size)
    assert torch.equal(dequant_ref(*args), dequantize(qw))
    panels = pack_panels(*args, qw.shape)
    x = torch.randn(max(ROWS), k)
    for m in ROWS:
        y = quant_linear_cpu(x[:m], panels)
        assert y.shape == (m, n) and torch.isfinite(y).all()
        torch.testing.assert_close(y, quant_linear_cpu_ref(x[:m], *args), rtol=1e-5, atol=1e-4)
        # batch invariance within a path: a row's result does not depend on the other rows of the call
        assert torch.equal(quant_linear_cpu(x[:m].flip(0), panels).flip(0), y)


@needs_kernel
def test_panels_are_a_permutation_of_the_packed_bytes():
    qw = quantize(torch.randn(37, 64), "int4-g32")
    panels = pack_panels(qw.qweight, qw.scales, qw.mins, qw.group_size, qw.shape, width=8)
    assert panels.qweight.shape == (5, 32, 8) and panels.scales.shape == (5, 2, 8)
    unpanelled = panels.qweight.transpose(1, 2).reshape(40, 32)
    assert unpanelled[:37].equal(qw.qweight) and not unpanelled[37:].any()  # zero rows pad N to 40
    index = torch.tensor([36, 0, 8, 17])
    qweight, scales, mins = panels.rows(index)
    assert qweight.equal(qw.qweight[index]) and scales.equal(qw.scales[index]) and mins.equal(qw.mins[index])
    with pytest.raises(ValueError, match=r"x must be \[M, 64\]"):
        quant_linear_cpu(torch.randn(2, 32), pack_panels(qw.qweight, qw.scales, qw.mins, 32, qw.shape))


@pytest.mark.parametrize("path,tol", [("kernel", 1e-4), ("dequant", 0.0), ("int4pack", 0.05), ("fbgemm", 0.3)])
@pytest.mark.parametrize("m", [1, 5, 31, quant_linear.KERNEL_GEMM_MIN_M + 3])
def test_quant_linear_paths_match_dequantized_linear(path, tol, m):
    torch.manual_seed(1)
    qw = quantize(torch.randn(96, 128) * 0.05, "int4-g32")
    bias = torch.randn(96)
    if path == "kernel":  # the kernel path, not the dequant fallback it takes when the build fails
        require(_extension)
    layer = QuantLinear(qw, bias, cpu_path=path)
    assert layer.path == path
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
    with pytest.raises(ValueError, match="cpu quant path must be one of auto, w4a8, kernel, fbgemm"):
        QuantLinear(qw, cpu_path="magic")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", ["int4-g32", "int4-g128", "int8"])
def test_gpu_path_matches_dequantized_linear(fmt):
    qw = quantize(torch.randn(96, 256) * 0.05, fmt)
    layer = QuantLinear(qw, dtype=torch.float16, device="cuda")
    # NOTE: a CUDA node has triton (it ships with torch's CUDA build): a fallback to "dequant" is the failure
    assert layer.path == "triton", "kernels.quant_matmul did not import: the layer fell back to dequantize + matmul"
    x = torch.randn(5, 256, device="cuda", dtype=torch.float16)
    ref = torch.nn.functional.linear(x.float(), dequantize(qw).cuda())
    y = layer(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_packed_layer_of_the_engine_runs_triton_on_gpu():
    from serving.loaders import load_model

    loaded = load_model(quantization="auto", dtype=torch.float16, device="cuda")
    paths = {name: m.path for name, m in loaded.model.named_modules() if isinstance(m, QuantLinear)}
    assert paths and set(paths.values()) == {"triton"}, {n: p for n, p in paths.items() if p != "triton"}


@needs_kernel
@pytest.mark.parametrize("label,arch_flags", OTHER_BUILDS, ids=OTHER_BUILD_IDS)
def test_other_vector_widths_match_reference(label, arch_flags):
    from kernels.weight_quant_cpu import _CFLAGS, _LDFLAGS, _SOURCE

    ext = build_variant("frugal_weight_quant_cpu", [_SOURCE], _CFLAGS, _LDFLAGS, label, arch_flags,
                        siblings=OTHER_BUILDS)
    width = ext.panel_width()
    for n, k, fmt in SHAPES:
        torch.manual_seed(0)
        qw = quantize(torch.randn(n, k), fmt)
        panels = pack_panels(qw.qweight, qw.scales, qw.mins, qw.group_size, qw.shape, width=width)
        mins = panels.mins if panels.mins is not None else panels.scales.new_empty(0)
        for m in ROWS:
            x = torch.randn(m, k)
            y = ext.panel_linear(x, panels.qweight, panels.scales, mins, n, qw.group_size, qw.format == "int4")
            ref = quant_linear_cpu_ref(x, qw.qweight, qw.scales, qw.mins, qw.group_size)
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("n,k,fmt", SHAPES)
def test_dequantized_panels_are_bit_exact(n, k, fmt):
    qw = quantize(torch.randn(n, k), fmt)
    panels = pack_panels(qw.qweight, qw.scales, qw.mins, qw.group_size, qw.shape)
    assert torch.equal(dequant_panels_t(panels), dequantize(qw).T)
    width = panels.qweight.shape[2]
    if panels.qweight.shape[0] > 1:  # a tile of panels stands alone
        tile = panels.slice(1, 2)
        assert tile.shape == (min(n, 2 * width) - width, k)
        assert torch.equal(dequant_panels_t(tile), dequantize(qw)[width:2 * width].T)
