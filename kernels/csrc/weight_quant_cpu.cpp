// Weight-only quantized matmul on the CPU for fp32 activations, over the panel layout of
// kernels/weight_quant_cpu.py (serving/quant/layout.py's packed weight with each P output rows transposed
// into a panel, so one vector load yields one input feature k for P consecutive output features).
//
// y[m, n] = sum_k x[m, k] * w[n, k], with w dequantized as `q * scale + min` in two roundings (no FMA): the
// same arithmetic as serving.quant.layout.dequantize, so the result differs from "dequantize, then matmul"
// only in summation order.
//
// Two loops, both parallel over panels:
// - few rows (decode): each panel is dequantized in registers, k by k, and multiplied straight into the
//   activation rows: the weight is read once, packed (0.56 bytes per weight for int4-g32 instead of 4).
// - many rows (batched decode, prefill): each panel is dequantized once into a [K, P] buffer that stays in
//   the core's cache, then a register-blocked micro-kernel (MR rows x P columns of accumulators, one
//   broadcast-FMA per row and k) runs every block of MR activation rows over it.
// P is the vector width: 16 floats with AVX-512, 8 with AVX2, 8 in a portable loop elsewhere.
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>
#include <ATen/Parallel.h>

#include "vec.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <utility>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int MR = 12;  // 2 x 12 accumulators + 2 weight vectors of 32 registers
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
constexpr int MR = 6;  // 2 x 6 accumulators + 2 weight vectors + a broadcast of 16 registers
#else
constexpr int MR = 4;
#endif

// NOTE: a panel's share of the work below this many weights is not worth waking a second OpenMP thread for.
constexpr int64_t kWeightsPerThread = int64_t{1} << 18;

// One panel's tensors: q int4 [K / 2, P] bytes (low nibble k = 2j, high k = 2j + 1) or int8 [K, P];
// scales (and mins) fp16 [K / G, P].
struct Panel {
  const uint8_t* q;
  const at::Half* scales;
  const at::Half* mins;
};

// The dequantization arithmetic, in one place: `q * scale + min` (int4) or `q * scale` (int8), each step
// rounded, as serving.quant.layout.dequantize does. int4: P bytes -> the weights of k and k + 1.
inline void dequant_int4_pair(const uint8_t* q, vec s, vec m, vec& w0, vec& w1) {
  vec lo, hi;
  vnibbles(q, lo, hi);
  w0 = vadd(vmul(lo, s), m);
  w1 = vadd(vmul(hi, s), m);
}
inline vec dequant_int8(const int8_t* q, vec s) { return vmul(vint8(q), s); }

// The panel as fp32 [K, P] with row stride ld: buf[k * ld + j] = w[n0 + j, k].
// NOTE: noinline, here and below: inlined into the OpenMP-outlined parallel_for body the loops compiled
// several times slower (measured).
__attribute__((noinline)) void dequant_panel(Panel p, int64_t K, int64_t G, bool int4, float* buf, int64_t ld) {
  for (int64_t g = 0; g < K / G; ++g) {
    const vec s = vhalf(p.scales + g * P);
    if (int4) {
      const vec m = vhalf(p.mins + g * P);
      for (int64_t k = g * G; k < (g + 1) * G; k += 2) {
        vec w0, w1;
        dequant_int4_pair(p.q + k / 2 * P, s, m, w0, w1);
        vstore(buf + k * ld, w0);
        vstore(buf + (k + 1) * ld, w1);
      }
    } else {
      const int8_t* q = reinterpret_cast<const int8_t*>(p.q);
      for (int64_t k = g * G; k < (g + 1) * G; ++k) vstore(buf + k * ld, dequant_int8(q + k * P, s));
    }
  }
}

// Accumulators -> y rows; the last panel of a weight whose N is not a multiple of P stores `cols` columns.
template <int R>
inline void store_rows(const vec* acc, float* y, int64_t ldy, int64_t cols) {
  for (int i = 0; i < R; ++i) {
    if (cols == P) {
      vstore(y + i * ldy, acc[i]);
    } else {
      alignas(64) float tmp[P];
      vstore(tmp, acc[i]);
      std::copy(tmp, tmp + cols, y + i * ldy);
    }
  }
}

// y[0:R, panel a | panel b] = x[0:R, :] @ [buf_a | buf_b]: 2 x R vector accumulators, two weight loads and R
// broadcasts per k. x comes packed as [K, MR] (row i of the block at xb[k * MR + i]) so every broadcast is an
// offset from one pointer. `two` is false for a lone last panel.
template <int R>
__attribute__((noinline)) void micro_kernel(const float* buf, bool two, const float* xb, int64_t K, float* y,
                                            int64_t ldy, int64_t cols_a, int64_t cols_b) {
  vec acc_a[R], acc_b[R];
  for (int i = 0; i < R; ++i) acc_a[i] = acc_b[i] = vzero();
  if (two) {
    for (int64_t k = 0; k < K; ++k) {
      const vec wa = vload(buf + k * 2 * P), wb = vload(buf + k * 2 * P + P);
      for (int i = 0; i < R; ++i) {
        const vec xv = vbcast(xb + k * MR + i);
        acc_a[i] = vfma(wa, xv, acc_a[i]);
        acc_b[i] = vfma(wb, xv, acc_b[i]);
      }
    }
    store_rows<R>(acc_b, y + P, ldy, cols_b);
  } else {
    for (int64_t k = 0; k < K; ++k) {
      const vec wa = vload(buf + k * P);
      for (int i = 0; i < R; ++i) acc_a[i] = vfma(wa, vbcast(xb + k * MR + i), acc_a[i]);
    }
  }
  store_rows<R>(acc_a, y, ldy, cols_a);
}

// x [M, K] -> [ceil(M / MR), K, MR], rows past M zero.
void pack_rows(const float* x, int64_t M, int64_t K, float* out) {
  for (int64_t m0 = 0; m0 < M; m0 += MR) {
    float* block = out + m0 * K;
    for (int64_t i = 0; i < MR; ++i) {
      const float* row = x + (m0 + i) * K;
      if (m0 + i < M) {
        for (int64_t k = 0; k < K; ++k) block[k * MR + i] = row[k];
      } else {
        for (int64_t k = 0; k < K; ++k) block[k * MR + i] = 0.0f;
      }
    }
  }
}

// Few rows: dequantize in registers and multiply straight in. Even and odd k accumulate apart so that one
// row (decode) has two FMA chains in flight.
template <int R>
__attribute__((noinline)) void fused_kernel(Panel p, const float* x, int64_t ldx, int64_t K, int64_t G, bool int4,
                                            float* y, int64_t ldy, int64_t cols) {
  vec even[R], odd[R];
  for (int i = 0; i < R; ++i) even[i] = odd[i] = vzero();
  for (int64_t g = 0; g < K / G; ++g) {
    const vec s = vhalf(p.scales + g * P);
    if (int4) {
      const vec m = vhalf(p.mins + g * P);
      for (int64_t k = g * G; k < (g + 1) * G; k += 2) {
        vec w0, w1;
        dequant_int4_pair(p.q + k / 2 * P, s, m, w0, w1);
        for (int i = 0; i < R; ++i) {
          even[i] = vfma(w0, vbcast(x + i * ldx + k), even[i]);
          odd[i] = vfma(w1, vbcast(x + i * ldx + k + 1), odd[i]);
        }
      }
    } else {
      const int8_t* q = reinterpret_cast<const int8_t*>(p.q);
      int64_t k = g * G;
      for (; k + 1 < (g + 1) * G; k += 2) {
        const vec w0 = dequant_int8(q + k * P, s), w1 = dequant_int8(q + (k + 1) * P, s);
        for (int i = 0; i < R; ++i) {
          even[i] = vfma(w0, vbcast(x + i * ldx + k), even[i]);
          odd[i] = vfma(w1, vbcast(x + i * ldx + k + 1), odd[i]);
        }
      }
      if (k < (g + 1) * G) {  // odd group size (per-channel int8 with an odd K)
        const vec w0 = dequant_int8(q + k * P, s);
        for (int i = 0; i < R; ++i) even[i] = vfma(w0, vbcast(x + i * ldx + k), even[i]);
      }
    }
  }
  for (int i = 0; i < R; ++i) even[i] = vadd(even[i], odd[i]);
  store_rows<R>(even, y, ldy, cols);
}

// NOTE: the fused loop holds 2 x rows accumulators; past 4 rows they no longer fit AVX2's 16 registers next to
// the weights, and the buffered micro-kernel takes over.
constexpr int kFusedMaxRows = 4;

using MicroFn = void (*)(const float*, bool, const float*, int64_t, float*, int64_t, int64_t, int64_t);
using FusedFn = void (*)(Panel, const float*, int64_t, int64_t, int64_t, bool, float*, int64_t, int64_t);

template <int... Rs>
constexpr std::array<MicroFn, sizeof...(Rs)> micro_table(std::integer_sequence<int, Rs...>) {
  return {&micro_kernel<Rs + 1>...};
}
template <int... Rs>
constexpr std::array<FusedFn, sizeof...(Rs)> fused_table(std::integer_sequence<int, Rs...>) {
  return {&fused_kernel<Rs + 1>...};
}
// kMicro[r - 1] handles r rows
constexpr auto kMicro = micro_table(std::make_integer_sequence<int, MR>{});
constexpr auto kFused = fused_table(std::make_integer_sequence<int, kFusedMaxRows>{});

}  // namespace

int64_t panel_width() { return P; }

// x: [M, K] fp32; qweight: int4 uint8 [N_pad / P, K / 2, P] or int8 [N_pad / P, K, P];
// scales/mins: fp16 [N_pad / P, K / G, P]; n: the real N (<= N_pad)  ->  [M, n] fp32
at::Tensor panel_linear(at::Tensor x, at::Tensor qweight, at::Tensor scales, at::Tensor mins,
                           int64_t n, int64_t group_size, bool int4) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be fp32 [M, K]");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), G = group_size, num_panels = qweight.size(0);
  TORCH_CHECK(qweight.dim() == 3 && qweight.size(2) == P && qweight.is_contiguous(),
              "qweight must be a contiguous [N_pad / P, ., P] panel tensor with P = ", P);
  TORCH_CHECK(G > 0 && K % G == 0 && (!int4 || G % 2 == 0), "group size must divide K (and be even for int4)");
  TORCH_CHECK(n > 0 && n <= num_panels * P && n > (num_panels - 1) * P, "n must fall in the last panel");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  scales.sizes() == at::IntArrayRef({num_panels, K / G, P}),
              "scales must be contiguous fp16 [N_pad / P, K / G, P]");
  if (int4) {
    TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.size(1) * 2 == K, "int4 qweight must be uint8 [., K / 2, P]");
    TORCH_CHECK(mins.scalar_type() == at::kHalf && mins.is_contiguous() && mins.sizes() == scales.sizes(),
                "mins must be contiguous fp16 [N_pad / P, K / G, P]");
  } else {
    TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.size(1) == K, "int8 qweight must be int8 [., K, P]");
  }
  auto y = at::empty({M, n}, x.options());
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const uint8_t* qp = reinterpret_cast<const uint8_t*>(qweight.data_ptr());
  const at::Half* sp = scales.data_ptr<at::Half>();
  const at::Half* mp = int4 ? mins.data_ptr<at::Half>() : nullptr;
  const int64_t q_stride = qweight.size(1) * P, s_stride = K / G * P;
  const auto panel = [&](int64_t p) {
    return Panel{qp + p * q_stride, sp + p * s_stride, int4 ? mp + p * s_stride : nullptr};
  };
  const auto cols = [&](int64_t p) { return p < num_panels ? std::min<int64_t>(P, n - p * P) : int64_t{0}; };
  if (M <= kFusedMaxRows) {
    const int64_t grain = std::max<int64_t>(1, kWeightsPerThread / (K * P));
    at::parallel_for(0, num_panels, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) kFused[M - 1](panel(p), xp, K, K, G, int4, yp + p * P, n, cols(p));
    });
    return y;
  }
  std::vector<float> packed(((M + MR - 1) / MR) * MR * K);
  pack_rows(xp, M, K, packed.data());
  const int64_t num_pairs = (num_panels + 1) / 2;
  const int64_t grain = std::max<int64_t>(1, kWeightsPerThread / (K * 2 * P));
  at::parallel_for(0, num_pairs, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(K * 2 * P);
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t pa = 2 * pair, pb = pa + 1;
      const bool two = pb < num_panels;
      dequant_panel(panel(pa), K, G, int4, buf.data(), two ? 2 * P : P);
      if (two) dequant_panel(panel(pb), K, G, int4, buf.data() + P, 2 * P);
      for (int64_t m0 = 0; m0 < M; m0 += MR) {
        const int64_t rows = std::min<int64_t>(MR, M - m0);
        kMicro[rows - 1](buf.data(), two, packed.data() + m0 * K, K, yp + m0 * n + pa * P, n, cols(pa), cols(pb));
      }
    }
  });
  return y;
}

// The whole weight dequantized as w^T into `out` (fp32 [K, N_pad], contiguous): for prefill-sized batches, where a
// float GEMM over it beats the micro-kernel. Same values as serving.quant.layout.dequantize, bit for bit.
at::Tensor dequant_panels_t(at::Tensor qweight, at::Tensor scales, at::Tensor mins, int64_t group_size,
                               bool int4, at::Tensor out) {
  const int64_t num_panels = qweight.size(0), K = int4 ? qweight.size(1) * 2 : qweight.size(1), G = group_size;
  TORCH_CHECK(qweight.dim() == 3 && qweight.size(2) == P && qweight.is_contiguous(), "qweight must be panels");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.size(1) * G == K,
              "scales must be contiguous fp16 [N_pad / P, K / G, P]");
  TORCH_CHECK(!int4 || (mins.is_contiguous() && mins.sizes() == scales.sizes()), "mins must match scales");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.size(0) == K &&
                  out.size(1) == num_panels * P, "out must be contiguous fp32 [K, N_pad]");
  const uint8_t* qp = reinterpret_cast<const uint8_t*>(qweight.data_ptr());
  const at::Half* sp = scales.data_ptr<at::Half>();
  const at::Half* mp = int4 ? mins.data_ptr<at::Half>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t q_stride = qweight.size(1) * P, s_stride = K / G * P, ld = num_panels * P;
  at::parallel_for(0, num_panels, std::max<int64_t>(1, kWeightsPerThread / (K * P)), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      dequant_panel(Panel{qp + p * q_stride, sp + p * s_stride, int4 ? mp + p * s_stride : nullptr}, K, G, int4,
                    op + p * P, ld);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dequant_panels_t", &dequant_panels_t, "panels -> fp32 w^T [K, N_pad]",
        py::call_guard<py::gil_scoped_release>());
  m.def("panel_width", &panel_width, "output features per panel (the vector width this build uses)");
  m.def("panel_linear", &panel_linear, "weight-only quantized linear over the panel layout, fp32 activations",
        py::call_guard<py::gil_scoped_release>());
}
