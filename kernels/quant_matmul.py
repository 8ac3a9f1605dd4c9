"""Fused dequant matmul: y = x @ dequant(W).T (+ bias) for int4 (W4A16) and int8 (W8A16) weights, in Triton.

Packed layout (shared with serving/quant):
- int4, group-wise asymmetric: qweight uint8 [N, K // 2] (byte j of row n holds k = 2j in the low nibble and
  k = 2j + 1 in the high nibble), scales fp16 [N, K // G], mins fp16 [N, K // G];
  w[n, k] = q[n, k] * scales[n, k // G] + mins[n, k // G].
- int8: qweight int8 [N, K], scales fp16 [N, K // G] (G = K per channel, or a group size); w = q * scale.

Two variants, chosen by M (the number of tokens):
- decode (M <= DECODE_MAX_M): split-K. The grid covers N blocks times SPLIT_K slices of K so that even one token
  fills the GPU; every weight byte is read once. Each slice writes an fp32 partial and a second small kernel sums
  the partials in a fixed order (no atomics), adds the bias and casts.
- prefill (larger M): a tiled GEMM with tl.dot; each weight tile is dequantized in registers.
Both dequantize a [BLOCK_K, BLOCK_N] weight tile that lies inside one quantization group (BLOCK_K divides G), so
the scales (and mins) of a tile are one [BLOCK_N] vector.

Batch invariance: the config is keyed on the M bucket (not M) and SPLIT_K depends on (N, K, device) only, so a
row's result does not depend on the other rows as long as the calls fall in the same bucket.

The kernels run under TRITON_INTERPRET=1 on CPU tensors (tests); the interpreter must be selected before this
module is imported.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

DECODE_MAX_M = 16  # M up to this runs the split-K decode variant
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# NOTE: the interpreter multiplies bf16 operands of tl.dot as raw uint16 bits (Triton 3.5/3.9), so under it a bf16
# dot runs in fp32; bf16 products are exact in fp32, so only the summation order differs from the GPU.
_MIN_BLOCK_K = 16  # tl.dot needs K >= 16


# ---------------------------------------------------------------------------------------------------------------
# Autotune configs
# ---------------------------------------------------------------------------------------------------------------
def _config(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


if _INTERPRET:  # one small config: the interpreter cannot benchmark, and small tiles keep tests fast
    _GEMM_CONFIGS = [_config(16, 32, 16, 4, 1)]
    _SPLITK_CONFIGS = [_config(16, 32, 16, 4, 1)]
else:
    _GEMM_CONFIGS = [_config(bm, bn, bk, w, s) for bm, bn, bk, w, s in [
        (32, 64, 32, 4, 4), (64, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4), (128, 128, 32, 8, 3),
        (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 32, 8, 3), (256, 128, 32, 8, 3)]]
    _SPLITK_CONFIGS = [_config(16, bn, bk, w, s) for bn, bk, w, s in [
        (32, 64, 4, 4), (64, 32, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3), (128, 32, 4, 4), (128, 64, 4, 3),
        (128, 128, 8, 3), (256, 64, 8, 3)]]


def m_bucket(m: int) -> int:
    """The autotune key for M: one bucket for all of decode, then powers of four."""
    if m <= DECODE_MAX_M:
        return DECODE_MAX_M
    bucket = 64
    while bucket < m and bucket < 4096:
        bucket *= 4
    return bucket


def quant_matmul_configs(m_bucket: int, n: int, k: int, group_size: int, k_per_split: int | None = None
                         ) -> list[triton.Config]:
    """Candidate configs for a problem: tiles that stay inside one group and are not much larger than the problem."""
    split_k = k_per_split is not None
    pool = _SPLITK_CONFIGS if split_k else _GEMM_CONFIGS
    picked = []
    for c in pool:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if group_size % bk or (split_k and k_per_split % bk):
            continue
        if not _INTERPRET and (bn > max(32, triton.next_power_of_2(n)) or bm > max(32, m_bucket)):
            continue
        picked.append(c)
    if not picked:  # the shape checks guarantee G % 16 == 0, so the smallest BLOCK_K always fits
        picked = [_config(16, 32, _MIN_BLOCK_K, 4, 2)]
    return picked


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    return quant_matmul_configs(args["M_BUCKET"], args["N"], args["K"], args["GROUP_SIZE"], args.get("K_PER_SPLIT"))


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _dequant_tile(qw_ptr, s_ptr, m_ptr, offs_n, k0, N,
                  stride_qn, stride_qk, stride_sn, stride_sg,
                  BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """The fp32 weight tile [BLOCK_N, BLOCK_K] for k in [k0, k0 + BLOCK_K) (inside one group); rows >= N are 0.

    The packed bytes are loaded as a row-major [BLOCK_N, bytes] tile, contiguous along K like the tensor, so
    the loads coalesce and vectorize; the nibbles are split and interleaved back into K order in registers.
    """
    n_mask = offs_n < N
    if BITS == 4:
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_b[None, :] * stride_qk,
                         mask=n_mask[:, None], other=0)
        q = tl.interleave(packed & 0xF, packed >> 4).to(tl.float32)  # k = 2j (low), 2j + 1 (high)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        q = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_k[None, :] * stride_qk,
                    mask=n_mask[:, None], other=0).to(tl.float32)
    group = k0 // GROUP_SIZE
    scale = tl.load(s_ptr + offs_n * stride_sn + group * stride_sg, mask=n_mask, other=0).to(tl.float32)
    w = q * scale[:, None]
    if BITS == 4:
        w += tl.load(m_ptr + offs_n * stride_sn + group * stride_sg, mask=n_mask, other=0).to(tl.float32)[:, None]
    return w


@triton.jit
def _tile_dot(x, w, acc, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """acc += x [BLOCK_M, BLOCK_K] @ w.T, w being the [BLOCK_N, BLOCK_K] dequantized tile."""
    if DOT_FP32:
        acc = tl.dot(x.to(tl.float32), tl.trans(w), acc)
    elif IEEE:  # fp32 activations: keep fp32 accuracy rather than TF32
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    else:
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    return acc


@triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def quant_matmul_kernel(x_ptr, qw_ptr, s_ptr, m_ptr, bias_ptr, out_ptr, M, N, K, M_BUCKET,
                        stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_om, stride_on,
                        BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                        DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Prefill: out[BLOCK_M, BLOCK_N] tile = x @ dequant(W).T over all of K."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row blocks walk the same weight columns together, so weight tiles hit in L2.
    group_id = pid // (GROUP_M * num_pid_n)
    first_m = group_id * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_rows)
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                    mask=m_mask[:, None], other=0.0)
        w = _dequant_tile(qw_ptr, s_ptr, m_ptr, offs_n, k0, N, stride_qn, stride_qk, stride_sn, stride_sg,
                          BITS, GROUP_SIZE, BLOCK_K)
        acc = _tile_dot(x, w, acc, DOT_FP32, IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out_mask = m_mask[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.autotune(configs=_SPLITK_CONFIGS, key=["M_BUCKET", "N", "K", "K_PER_SPLIT"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def quant_matmul_splitk_kernel(x_ptr, qw_ptr, s_ptr, m_ptr, part_ptr, M, N, K, M_BUCKET, K_PER_SPLIT,
                               stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg,
                               stride_ps, stride_pm, stride_pn,
                               BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, DOT_FP32: tl.constexpr,
                               IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Decode: the fp32 partial sum of x @ dequant(W).T over one K slice, for one BLOCK_N block of outputs."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for k_off in range(0, K_PER_SPLIT, BLOCK_K):
        k0 = k_start + k_off
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                    mask=m_mask[:, None], other=0.0)
        w = _dequant_tile(qw_ptr, s_ptr, m_ptr, offs_n, k0, N, stride_qn, stride_qk, stride_sn, stride_sg,
                          BITS, GROUP_SIZE, BLOCK_K)
        acc = _tile_dot(x, w, acc, DOT_FP32, IEEE)
    out_mask = m_mask[:, None] & (offs_n < N)[None, :]
    tl.store(part_ptr + pid_k * stride_ps + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn, acc,
             mask=out_mask)


@triton.jit
def splitk_reduce_kernel(part_ptr, bias_ptr, out_ptr, M, N, SPLIT_K, stride_ps, stride_om, stride_on,
                         HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out = sum of the SPLIT_K partials, always in slice order (deterministic), + bias, cast to out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT_K):
        acc += tl.load(part_ptr + s * stride_ps + offs, mask=mask, other=0.0)
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + (offs // N) * stride_om + n * stride_on, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------
_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a small count, so CPU tests exercise several K slices


def choose_split_k(n: int, k: int, group_size: int, device: torch.device) -> int:
    """K slices for decode: enough programs for about two waves, slices a whole number of 16-wide K units.

    NOTE: depends on (N, K, G, device) only, never on M, so that decode stays batch invariant.
    """
    unit = group_size
    while unit > 256 and unit % 2 == 0 and (unit // 2) % _MIN_BLOCK_K == 0:  # per-channel int8: G = K
        unit //= 2
    num_units = k // unit
    n_blocks = triton.cdiv(n, 64)
    target = max(1, triton.cdiv(2 * _num_sms(device), n_blocks))
    split_k = 1
    for s in range(1, min(num_units, target) + 1):
        if num_units % s == 0:
            split_k = s
    return split_k


def _check(x, qweight, scales, mins, group_size, bias, bits):
    """Validates shapes, dtypes and devices; returns (M, N, K) with x already 2-D."""
    def fail(msg):
        raise ValueError(f"w{bits}a16_matmul: {msg}")

    if x.dim() != 2:
        fail(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in _ACT_DTYPES:
        fail(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    m, k = x.shape
    want_q = torch.uint8 if bits == 4 else torch.int8
    if qweight.dtype != want_q or qweight.dim() != 2:
        fail(f"qweight must be 2-D {want_q}, got {qweight.dtype} with shape {tuple(qweight.shape)}")
    n = qweight.shape[0]
    if qweight.shape[1] * (2 if bits == 4 else 1) != k:
        fail(f"qweight {tuple(qweight.shape)} does not match K={k} of x {tuple(x.shape)}")
    if group_size <= 0 or group_size % _MIN_BLOCK_K or k % group_size:
        fail(f"group_size={group_size} must be a positive multiple of {_MIN_BLOCK_K} that divides K={k}")
    tensors = {"scales": scales} if bits == 8 else {"scales": scales, "mins": mins}
    for name, t in tensors.items():
        if t is None or t.dtype != torch.float16 or tuple(t.shape) != (n, k // group_size):
            got = None if t is None else (t.dtype, tuple(t.shape))
            fail(f"{name} must be float16 [{n}, {k // group_size}], got {got}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        fail(f"bias must be [{n}], got shape {tuple(bias.shape)}")
    for name, t in {"qweight": qweight, **tensors, "bias": bias}.items():
        if t is not None and t.device != x.device:
            fail(f"{name} is on {t.device} but x is on {x.device}")
    return m, n, k


def quant_matmul(x, qweight, scales, mins, group_size, bits, bias=None, variant=None):
    """x @ dequant(W).T (+ bias) in x's dtype; variant None picks 'decode' or 'prefill' by M."""
    # x: [..., K] fp16/bf16/fp32 -> [M, K]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m, n, k = _check(x2, qweight, scales, mins, group_size, bias, bits)
    # qweight: [N, K // 2] uint8 (int4) or [N, K] int8; scales, mins: [N, K // G] fp16; bias: [N]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)  # out: [M, N]
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    if variant is None:
        variant = "decode" if m <= DECODE_MAX_M else "prefill"
    if variant not in ("decode", "prefill"):
        raise ValueError(f"variant must be 'decode', 'prefill' or None, got {variant!r}")
    mins_arg = mins if bits == 4 else scales  # unused by the int8 path; any valid pointer
    bias_arg = bias if bias is not None else out
    flags = dict(BITS=bits, GROUP_SIZE=group_size, DOT_FP32=_INTERPRET and x.dtype == torch.bfloat16,
                 IEEE=x.dtype == torch.float32)
    bucket = m_bucket(m)
    if variant == "prefill":
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        quant_matmul_kernel[grid](x2, qweight, scales, mins_arg, bias_arg, out, m, n, k, bucket,
                                  x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1),
                                  scales.stride(0), scales.stride(1), out.stride(0), out.stride(1),
                                  HAS_BIAS=bias is not None, **flags)
        return out.reshape(*lead, n)
    split_k = choose_split_k(n, k, group_size, x.device)
    partials = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)  # partials: [SPLIT_K, M, N]

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), split_k, triton.cdiv(m, meta["BLOCK_M"]))

    quant_matmul_splitk_kernel[grid](x2, qweight, scales, mins_arg, partials, m, n, k, bucket, k // split_k,
                                     x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1),
                                     scales.stride(0), scales.stride(1),
                                     partials.stride(0), partials.stride(1), partials.stride(2), **flags)
    block = 1024 if not _INTERPRET else 256
    splitk_reduce_kernel[(triton.cdiv(m * n, block),)](partials, bias_arg, out, m, n, split_k, partials.stride(0),
                                                       out.stride(0), out.stride(1),
                                                       HAS_BIAS=bias is not None, BLOCK=block)
    return out.reshape(*lead, n)


def w4a16_matmul(x, qweight, scales, mins, group_size, bias=None, variant=None):
    """x [M, K] @ dequant(int4 W [N, K]).T + bias -> [M, N] in x's dtype."""
    return quant_matmul(x, qweight, scales, mins, group_size, 4, bias, variant)


def w8a16_matmul(x, qweight, scales, group_size, bias=None, variant=None):
    """x [M, K] @ dequant(int8 W [N, K]).T + bias -> [M, N] in x's dtype."""
    return quant_matmul(x, qweight, scales, None, group_size, 8, bias, variant)


# ---------------------------------------------------------------------------------------------------------------
# References (pure torch, fp32)
# ---------------------------------------------------------------------------------------------------------------
def unpack_int4_ref(qweight: torch.Tensor) -> torch.Tensor:
    """[N, K // 2] uint8 -> [N, K] uint8 codes in 0..15 (low nibble first)."""
    return torch.stack([qweight & 0xF, qweight >> 4], dim=-1).reshape(qweight.shape[0], -1)


def w4a16_dequantize_ref(qweight, scales, mins, group_size) -> torch.Tensor:
    q = unpack_int4_ref(qweight).float()
    return (q * scales.float().repeat_interleave(group_size, dim=1)
            + mins.float().repeat_interleave(group_size, dim=1))


def w8a16_dequantize_ref(qweight, scales, group_size) -> torch.Tensor:
    return qweight.float() * scales.float().repeat_interleave(group_size, dim=1)


def _matmul_ref(x, w, bias):
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def w4a16_matmul_ref(x, qweight, scales, mins, group_size, bias=None):
    return _matmul_ref(x, w4a16_dequantize_ref(qweight, scales, mins, group_size), bias)


def w8a16_matmul_ref(x, qweight, scales, group_size, bias=None):
    return _matmul_ref(x, w8a16_dequantize_ref(qweight, scales, group_size), bias)
