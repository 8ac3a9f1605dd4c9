"""The kernel benchmark's accounting (bytes, FLOPs, table rows) and its refusal to run without CUDA."""
import pytest
import torch

from benchmarks.kernels import (HEADER, Problem, format_row, main, problem_bytes, problem_flops, quant_group_size,
                                weight_bytes)


def test_weight_bytes_per_format():
    k, n = 4096, 11008
    assert weight_bytes(Problem(1, n, k, "fp16", k)) == 2 * n * k
    # int4: half a byte per weight, plus fp16 scale and min per group of 128
    assert weight_bytes(Problem(1, n, k, "w4a16", 128)) == n * k // 2 + 4 * n * (k // 128)
    # int8 per channel: one byte per weight, one fp16 scale per row
    assert weight_bytes(Problem(1, n, k, "w8a16", k)) == n * k + 2 * n
    with pytest.raises(ValueError, match="unknown format"):
        weight_bytes(Problem(1, n, k, "w3a16", 128))


def test_problem_bytes_and_flops():
    p = Problem(16, 4096, 11008, "w4a16", 128)
    assert problem_bytes(p) == weight_bytes(p) + 2 * 16 * 11008 + 2 * 16 * 4096
    assert problem_flops(p) == 2 * 16 * 4096 * 11008
    assert quant_group_size("w8a16", 11008, 128) == 11008 and quant_group_size("w4a16", 11008, 64) == 64


def test_format_row_ratios():
    p = Problem(1, 4096, 4096, "w4a16", 128)
    ms = problem_bytes(p) / 1e9  # exactly 1 TB/s -> 1000 GB/s
    row = format_row(p, ms, fp16_ms=4 * ms, peak_gbs=2000.0, peak_tflops=100.0)
    assert " 1000 " in row and "50%" in row and "4.00x" in row
    assert HEADER.split()[:4] == ["M", "K", "N", "format"] and HEADER.endswith("vs fp16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_main_exits_clearly_without_cuda(capsys):
    assert main(["--m", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
