"""Pure-tensor quantization primitives: packing, quantize/dequantize round trips, fusing and row permutation."""
import pytest
import torch

from serving.quant.install import fuse_rows, permute_rows
from serving.quant.layout import (QuantizedWeight, concat_rows, dequantize, pack_nibbles, quantize, quantize_int4,
                                  unpack_nibbles)


def test_pack_unpack_nibbles_layout():
    q = torch.tensor([[1, 2, 15, 0, 7, 8]])
    packed = pack_nibbles(q)
    # byte j: k = 2j in the low nibble, k = 2j + 1 in the high nibble
    assert packed.tolist() == [[0x21, 0x0F, 0x87]] and packed.dtype == torch.uint8
    codes = torch.randint(0, 16, (7, 96))
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes.to(torch.uint8))
    with pytest.raises(ValueError, match="even"):
        pack_nibbles(torch.zeros(2, 3))


@pytest.mark.parametrize("fmt,n,k", [("int4-g32", 7, 96), ("int4-g64", 13, 128), ("int4-g128", 3, 384),
                                     ("int8", 5, 72)])
def test_round_trip_error_is_within_half_a_step(fmt, n, k):
    torch.manual_seed(0)
    weight = torch.randn(n, k) * 0.1
    weight[0, :] = 0.25  # a constant row: zero range must not divide by zero
    qw = quantize(weight, fmt)
    back = dequantize(qw)
    assert back.shape == (n, k) and torch.isfinite(back).all()
    g = qw.group_size
    step = qw.scales.float().repeat_interleave(g, dim=1)
    # half a quantization step, plus the fp16 rounding of the scale and min
    assert ((back - weight).abs() <= step / 2 + 1e-3 * weight.abs().max()).all()
    assert torch.allclose(back[0], weight[0], atol=1e-4)
    if fmt.startswith("int4"):
        assert qw.qweight.shape == (n, k // 2) and qw.mins.shape == (n, k // g) and g == int(fmt[6:])
    else:
        assert qw.qweight.dtype == torch.int8 and qw.scales.shape == (n, 1) and qw.mins is None


def test_group_size_falls_back_to_one_that_divides_k():
    assert quantize(torch.randn(4, 576), "int4-g128").group_size == 64
    assert quantize(torch.randn(4, 1536), "int4-g128").group_size == 128
    with pytest.raises(ValueError, match="divide K"):
        quantize(torch.randn(4, 48), "int4-g32")


def test_dequantize_is_the_documented_formula():
    qw = quantize_int4(torch.randn(4, 64), 32)
    q = unpack_nibbles(qw.qweight).float()
    expect = q * qw.scales.float().repeat_interleave(32, 1) + qw.mins.float().repeat_interleave(32, 1)
    assert torch.equal(dequantize(qw), expect)


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="int4-g32, int4-g64"):
        quantize(torch.randn(4, 64), "int3")
    with pytest.raises(ValueError, match="group size"):
        quantize_int4(torch.randn(4, 48), 32)
    with pytest.raises(ValueError, match="scales has shape"):
        QuantizedWeight("int4", 32, torch.zeros(4, 32, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.float16),
                        torch.zeros(4, 2, dtype=torch.float16), (4, 64))


def test_fusing_and_permuting_packed_rows_match_float():
    parts = [quantize(torch.randn(n, 64), "int4-g32") for n in (8, 4, 4)]
    fused = fuse_rows(parts)
    assert torch.equal(dequantize(fused), torch.cat([dequantize(p) for p in parts]))
    assert fused.shape == (16, 64)
    perm = lambda t: t.flip(0)  # noqa: E731  any row permutation written for tensors
    assert torch.equal(dequantize(permute_rows(fused, perm)), perm(dequantize(fused)))
    mixed = fuse_rows([parts[0], quantize(torch.randn(4, 64), "int8")])  # requantized together
    assert mixed.format == "int4" and mixed.shape == (12, 64)
    with pytest.raises(ValueError, match="cannot fuse"):
        concat_rows([parts[0], quantize(torch.randn(4, 64), "int4-g64")])
