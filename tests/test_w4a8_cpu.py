"""The W4A8 / W8A8 CPU kernel (int8 activations, integer dot products) against its torch reference, on every
vector width its source carries, and the block-lane layout as a permutation of the packed bytes."""
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kernels.w4a8_cpu import (_CFLAGS, _LDFLAGS, _SOURCE, _extension, pack_w4a8, quantize_activations_ref, supports,
                              w4a8_block_terms_ref, w4a8_linear, w4a8_linear_ref)
from serving.quant.layout import QuantizedWeight, dequantize, quantize
from serving.quant.linear import QuantLinear
from cpu_builds import CPU_FLAGS, build_variant, require

# (label, flags replacing -march=native): each dot-product flavour the source has that this host can run
VARIANTS = [("portable", ["-march=x86-64"])]
if "avx2" in CPU_FLAGS:
    VARIANTS.append(("avx2_maddubs", ["-march=native", "-mno-avx512f", "-mno-avxvnni"]))
if "avx_vnni" in CPU_FLAGS:
    VARIANTS.append(("avx2_vnni", ["-march=native", "-mno-avx512f"]))
if "avx512bw" in CPU_FLAGS:
    VARIANTS.append(("avx512_maddubs", ["-march=native", "-mno-avx512vnni"]))
# (N, K, format): N that fills no panel / ends mid-panel / several panels; one block; groups of 64 and 128;
# per-channel int8
SHAPES = [(37, 96, "int4-g32"), (200, 576, "int4-g64"), (5, 128, "int4-g128"), (33, 96, "int8"), (48, 64, "int4-g32")]
ROWS = (1, 2, 5, 6, 7, 13, 40)  # each row-block size of both widths, and several blocks with a remainder


def _q8_g32(weight: torch.Tensor) -> QuantizedWeight:
    """int8 with one scale per 32 features (a GGUF Q8_0 table, as the bundled lm_head)."""
    n, k = weight.shape
    blocks = weight.reshape(n, k // 32, 32)
    scales = (blocks.abs().amax(-1) / 127).clamp_min(1e-8).half()
    q = torch.round(blocks / scales.float().unsqueeze(-1)).clamp(-128, 127).to(torch.int8).reshape(n, k)
    return QuantizedWeight("int8", 32, q, scales, None, (n, k))


def _weights():
    torch.manual_seed(0)
    out = [quantize(torch.randn(n, k), fmt) for n, k, fmt in SHAPES]
    weight = torch.randn(45, 160)
    weight[:, 3] = 40.0  # codes at both ends of the byte: the pairwise sums that would saturate pmaddubsw
    out.append(_q8_g32(weight))
    return out


def _rounding_bound(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """[M, N]: how far the kernel's fp32 sum may honestly drift from the fp64 reference: a few units in the last
    place of the terms it adds, block by block (its integer dots are exact; only their scaling and sum round).

    NOTE: int8 codes are stored offset by 128, so each block adds `-128 * s * d * sum(xq)` and takes almost as much
    back in the dot term; on a row with an outlier these terms reach the thousands while y stays small, and a fixed
    atol fails on fp32 rounding alone (about one draw in twenty did). A code off by one moves y by s * d, which
    stays above this bound."""
    dot_terms, min_terms = w4a8_block_terms_ref(x, qw.qweight, qw.scales, qw.mins, qw.group_size)
    return (4 * 2.0**-24 * (dot_terms.abs() + min_terms.abs()).sum(-1)).float()


def _check(module, qw: QuantizedWeight) -> None:
    weight = pack_w4a8(qw.qweight, qw.scales, qw.mins, qw.group_size, qw.shape, lanes=module.lane_count())
    int4 = qw.mins is not None
    # seeded per weight: the same draw whatever ran before in this process
    x = torch.randn(max(ROWS), qw.shape[1], generator=torch.Generator().manual_seed(qw.shape[0] * qw.shape[1]))
    x[0, 5] = 30.0  # an outlier: its block gets a coarse scale, the others keep theirs
    x[1] = 0.0  # an all-zero row: d = 0 must give zeros, not NaN
    for m in ROWS:
        mins = weight.mins if int4 else qw.scales.new_empty(0)
        y = module.w4a8_linear(x[:m], weight.codes, weight.scales, mins, qw.shape[0], qw.group_size, int4)
        assert y.shape == (m, qw.shape[0]) and torch.isfinite(y).all()
        ref = w4a8_linear_ref(x[:m], qw.qweight, qw.scales, qw.mins, qw.group_size)
        err = (y - ref).abs() - (1e-5 * ref.abs() + 1e-5 + _rounding_bound(x[:m], qw))
        assert err.max() <= 0, f"rows {m}: off by {(y - ref).abs().max().item():.3g} beyond the fp32 rounding bound"
        # batch invariance: a row's result does not depend on the other rows of the call
        flipped = module.w4a8_linear(x[:m].flip(0), weight.codes, weight.scales, mins, qw.shape[0], qw.group_size,
                                     int4)
        assert torch.equal(flipped.flip(0), y)
    if m > 1:
        assert not y[1].any()


@pytest.mark.parametrize("qw", _weights(), ids=lambda qw: f"{qw.format}-g{qw.group_size}-{qw.shape[0]}x{qw.shape[1]}")
def test_kernel_matches_reference(qw):
    _check(require(_extension), qw)


@pytest.mark.parametrize("label,flags", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_other_widths_match_reference(label, flags):
    module = build_variant("frugal_w4a8_cpu", [_SOURCE], _CFLAGS, _LDFLAGS, label, flags, siblings=VARIANTS)
    for qw in _weights():
        _check(module, qw)


def test_reference_is_close_to_fp32_activations():
    torch.manual_seed(1)
    qw = quantize(torch.randn(64, 256), "int4-g32")
    x = torch.randn(4, 256)
    exact = x @ dequantize(qw).T
    approx = w4a8_linear_ref(x, qw.qweight, qw.scales, qw.mins, qw.group_size)
    assert (approx - exact).norm() / exact.norm() < 0.02  # int8 per block of 32: ~0.5% measured
    xq, d = quantize_activations_ref(x)
    assert xq.abs().max() <= 127 and torch.allclose(xq.float().reshape(4, -1, 32) * d.unsqueeze(-1),
                                                    x.reshape(4, -1, 32), atol=d.max().item())


def test_layout_is_a_permutation_of_the_packed_bytes():
    require(_extension)
    for qw in _weights():
        weight = pack_w4a8(qw.qweight, qw.scales, qw.mins, qw.group_size, qw.shape)
        index = torch.tensor([qw.shape[0] - 1, 0, 3, qw.shape[0] // 2])
        qweight, scales, mins = weight.rows(index)
        assert qweight.equal(qw.qweight[index]) and scales.equal(qw.scales[index])
        assert mins is None if qw.mins is None else mins.equal(qw.mins[index])


def test_quant_linear_takes_w4a8_where_the_layout_fits():
    require(_extension)
    qw = quantize(torch.randn(40, 64), "int4-g32")
    assert QuantLinear(qw).path == "kernel"  # the default keeps fp32 activations
    layer = QuantLinear(qw, cpu_path="auto")
    assert layer.path == "w4a8" and layer.select_rows(torch.arange(40)).qweight.equal(qw.qweight)
    odd = quantize(torch.randn(9, 41), "int8")  # K = 41 is not whole blocks of 32
    assert not supports("int8", odd.group_size, 41) and QuantLinear(odd, cpu_path="w4a8").path == "kernel"
    with pytest.raises(ValueError, match="whole blocks of 32"):
        pack_w4a8(odd.qweight, odd.scales, None, odd.group_size, odd.shape)
    with pytest.raises(ValueError, match=r"x must be \[M, 64\]"):
        w4a8_linear(torch.randn(2, 32), layer.lanes)


def test_small_calls_from_many_threads_and_after_a_fork():
    """Calls of up to MR rows run on the kernel's spin pool and release the GIL: calls from several threads at once
    (one gets the pool, the others run on their own thread) and calls in a forked child (which has none of the
    parent's helper threads) return, with the bits a lone call gives."""
    require(_extension)
    torch.manual_seed(2)
    qw = quantize(torch.randn(300, 576), "int4-g32")
    weight = pack_w4a8(qw.qweight, qw.scales, qw.mins, qw.group_size, qw.shape)
    # NOTE: up to 4 rows, what every build's spin pool takes (MR: 6 with AVX-512, 4 with AVX2 or portable). Larger
    # calls run in an OpenMP region, and GNU OpenMP, used before a fork, hangs in the child (torch's own ops too).
    xs = [torch.randn(m, 576) for m in (1, 2, 3, 4)]
    expected = [w4a8_linear(x, weight) for x in xs]

    def agrees(_) -> bool:
        return all(torch.equal(w4a8_linear(x, weight), e) for _ in range(40) for x, e in zip(xs, expected))

    with ThreadPoolExecutor(4) as threads:
        assert all(threads.map(agrees, range(4)))
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 when it agrees; it never returns into pytest
        try:
            os._exit(0 if agrees(0) else 1)
        finally:
            os._exit(2)
    deadline = time.monotonic() + 120
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("a small call in a forked child did not return (its spin pool waited on the parent's helpers)")
    assert os.waitstatus_to_exitcode(done[1]) == 0
