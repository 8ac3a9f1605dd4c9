// Weight-only quantized matmul on the CPU for fp32 activations, over serving/quant/layout.py's packed layout.
//
// y[m, n] = sum_k x[m, k] * w[n, k], with w dequantized in registers 32 weights at a time and multiplied into
// every activation row, so the weight is read from memory once per call in its packed form (0.56 bytes per
// weight for int4-g32 instead of 4). Dequantization is `q * scale + min` in two roundings (no FMA), the same
// arithmetic as serving.quant.layout.dequantize: `dequant` here is bit-identical to it, and `quant_linear`
// differs from "dequantize, then matmul" only in summation order. AVX2 where compiled for it (group sizes
// that are multiples of 32), a portable scalar loop otherwise.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

// NOTE: rows per thread are sized so each thread gets at least this many weights: waking a second OpenMP
// thread costs more than dequantizing a 576 x 1024 tile (measured: 2 threads slower than 1 below ~1M weights).
constexpr int64_t kWeightsPerThread = int64_t{1} << 21;
constexpr int64_t kRows = 4;  // portable loop: output rows dequantized into a buffer and dotted together

// One row of weights -> fp32. int4: qweight row of K/2 bytes (even k low nibble); int8: K int8 codes.
// With `split` (int4, G % 16 == 0) each 16 weights come out as [k, k+2, ..., k+14, k+1, ..., k+15].
void dequant_row(const uint8_t* q, const at::Half* scales, const at::Half* mins, int64_t K, int64_t G,
                 bool int4, float* out, bool split = false) {
  for (int64_t g = 0; g < K / G; ++g) {
    const float s = static_cast<float>(scales[g]);
    float* o = out + g * G;
    if (int4 && split) {
      const float m = static_cast<float>(mins[g]);
      const uint8_t* qg = q + g * G / 2;
      for (int64_t c = 0; c < G / 16; ++c)
        for (int64_t j = 0; j < 8; ++j) {
          o[16 * c + j] = static_cast<float>(qg[8 * c + j] & 0x0F) * s + m;
          o[16 * c + 8 + j] = static_cast<float>(qg[8 * c + j] >> 4) * s + m;
        }
    } else if (int4) {
      const float m = static_cast<float>(mins[g]);
      const uint8_t* qg = q + g * G / 2;
#pragma omp simd
      for (int64_t j = 0; j < G / 2; ++j) {
        o[2 * j] = static_cast<float>(qg[j] & 0x0F) * s + m;
        o[2 * j + 1] = static_cast<float>(qg[j] >> 4) * s + m;
      }
    } else {
      const int8_t* qg = reinterpret_cast<const int8_t*>(q) + g * G;
#pragma omp simd
      for (int64_t j = 0; j < G; ++j) o[j] = static_cast<float>(qg[j]) * s;
    }
  }
}

#ifdef __AVX2__
// 16 int4 weights (8 bytes, even k in the low nibble) -> two fp32 vectors in natural k order.
inline void load16_int4(const uint8_t* q, __m256 s, __m256 m, __m256& w0, __m256& w1) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
  const __m256 lo = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15))), s), m);
  const __m256 hi = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), s), m);
  const __m256 a = _mm256_unpacklo_ps(lo, hi), c = _mm256_unpackhi_ps(lo, hi);  // [k0..3 | k8..11], [k4..7 | k12..15]
  w0 = _mm256_permute2f128_ps(a, c, 0x20);
  w1 = _mm256_permute2f128_ps(a, c, 0x31);
}

inline __m256 load8_int8(const int8_t* q, __m256 s) {
  const __m256i b = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(b), s);
}

// 16 int4 weights -> [even k..., odd k...] without the interleaving shuffles; the fused loop pairs them with
// activations de-interleaved the same way (see quant_linear).
inline void load16_int4_split(const uint8_t* q, __m256 s, __m256 m, __m256& w0, __m256& w1) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
  w0 = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15))), s), m);
  w1 = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), s), m);
}

// 32 weights of row n starting at k (a multiple of 32 inside one group) -> w[4]: natural k order, or for int4
// with `split` each 16 as [k, k+2, ..., k+14, k+1, ..., k+15].
inline void load32(const uint8_t* row, const at::Half* scales, const at::Half* mins, int64_t k, int64_t G,
                   bool int4, __m256 w[4], bool split = false) {
  const __m256 s = _mm256_set1_ps(static_cast<float>(scales[k / G]));
  if (int4 && split) {
    const __m256 m = _mm256_set1_ps(static_cast<float>(mins[k / G]));
    load16_int4_split(row + k / 2, s, m, w[0], w[1]);
    load16_int4_split(row + k / 2 + 8, s, m, w[2], w[3]);
  } else if (int4) {
    const __m256 m = _mm256_set1_ps(static_cast<float>(mins[k / G]));
    load16_int4(row + k / 2, s, m, w[0], w[1]);
    load16_int4(row + k / 2 + 8, s, m, w[2], w[3]);
  } else {
    const int8_t* q = reinterpret_cast<const int8_t*>(row) + k;
    for (int i = 0; i < 4; ++i) w[i] = load8_int8(q + 8 * i, s);
  }
}

inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// One row -> fp32 (natural or split order). NOTE: noinline, here and below: inlined into the OpenMP-outlined
// parallel_for body, the loops compiled about 3x slower (measured).
__attribute__((noinline)) void dequant_row_avx2(const uint8_t* row, const at::Half* scales, const at::Half* mins,
                                                int64_t K, int64_t G, bool int4, bool split, float* out) {
  __m256 w[4];
  for (int64_t k = 0; k < K; k += 32) {
    load32(row, scales, mins, k, G, int4, w, split);
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + k + 8 * i, w[i]);
  }
}

// y[:, n] for one row n: four accumulators per activation row break the FMA dependency chain.
__attribute__((noinline)) void row_dot_avx2(const uint8_t* row, const at::Half* scales, const at::Half* mins,
                                            const float* x, int64_t M, int64_t K, int64_t G, bool int4, float* y,
                                            int64_t ldy, std::vector<__m256>& acc) {
  __m256 w[4];
  if (M == 1) {  // decode: accumulators stay in registers
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K; k += 32) {
      load32(row, scales, mins, k, G, int4, w, true);
      a0 = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(x + k), a0);
      a1 = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x + k + 8), a1);
      a2 = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x + k + 16), a2);
      a3 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x + k + 24), a3);
    }
    y[0] = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    return;
  }
  for (auto& a : acc) a = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    load32(row, scales, mins, k, G, int4, w, true);
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K + k;
      __m256* a = acc.data() + 4 * m;
      for (int i = 0; i < 4; ++i) a[i] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xm + 8 * i), a[i]);
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    const __m256* a = acc.data() + 4 * m;
    y[m * ldy] = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
  }
}
#endif

void check(const torch::Tensor& qweight, const torch::Tensor& scales, const torch::Tensor& mins, int64_t K,
           int64_t G, bool int4) {
  TORCH_CHECK(qweight.is_contiguous() && scales.is_contiguous(), "qweight and scales must be contiguous");
  TORCH_CHECK(scales.scalar_type() == at::kHalf, "scales must be float16");
  TORCH_CHECK(G > 0 && K % G == 0 && (!int4 || G % 2 == 0), "group size must divide K (and be even for int4)");
  TORCH_CHECK(scales.size(1) == K / G, "scales must be [N, K / G]");
  if (int4) {
    TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.size(1) * 2 == K, "int4 qweight must be uint8 [N, K/2]");
    TORCH_CHECK(mins.is_contiguous() && mins.scalar_type() == at::kHalf && mins.sizes() == scales.sizes(),
                "mins must be float16 [N, K / G]");
  } else {
    TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.size(1) == K, "int8 qweight must be int8 [N, K]");
  }
}

}  // namespace

// x: [M, K] fp32; qweight: int4 uint8 [N, K/2] or int8 [N, K]; scales/mins: fp16 [N, K/G]  ->  [M, N] fp32
torch::Tensor quant_linear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor mins,
                           int64_t group_size, bool int4) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be fp32 [M, K]");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), G = group_size;
  check(qweight, scales, mins, K, G, int4);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const uint8_t* qp = reinterpret_cast<const uint8_t*>(qweight.data_ptr());
  const at::Half* sp = scales.data_ptr<at::Half>();
  const at::Half* mp = int4 ? mins.data_ptr<at::Half>() : nullptr;
  const int64_t row_bytes = int4 ? K / 2 : K, num_groups = K / G;
#ifdef __AVX2__
  if (G % 32 == 0) {
    // int4: de-interleave each 16 activations into [even k, odd k] to match load16_int4_split
    const torch::Tensor xs = int4 ? x.reshape({M, K / 16, 8, 2}).transpose(2, 3).contiguous() : x;
    xp = xs.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(8, kWeightsPerThread / K);
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      std::vector<__m256> acc(4 * M);
      for (int64_t n = begin; n < end; ++n)
        row_dot_avx2(qp + n * row_bytes, sp + n * num_groups, int4 ? mp + n * num_groups : nullptr, xp, M, K, G,
                     int4, yp + n, N, acc);
    });
    return y;
  }
#endif
  const int64_t num_blocks = (N + kRows - 1) / kRows;
  at::parallel_for(0, num_blocks, std::max<int64_t>(1, kWeightsPerThread / (kRows * K)), [&](int64_t begin,
                                                                                               int64_t end) {
    std::vector<float> buf(kRows * K, 0.0f);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kRows, rows = std::min(kRows, N - n0);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = n0 + r;
        dequant_row(qp + n * row_bytes, sp + n * num_groups, int4 ? mp + n * num_groups : nullptr, K, G, int4,
                    buf.data() + r * K);
      }
      const float *w0 = buf.data(), *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = xp + m * K;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int64_t k = 0; k < K; ++k) {
          a0 = std::fma(xm[k], w0[k], a0);
          a1 = std::fma(xm[k], w1[k], a1);
          a2 = std::fma(xm[k], w2[k], a2);
          a3 = std::fma(xm[k], w3[k], a3);
        }
        const float acc[kRows] = {a0, a1, a2, a3};
        for (int64_t r = 0; r < rows; ++r) yp[m * N + n0 + r] = acc[r];
      }
    }
  });
  return y;
}

// The weight as fp32 [N, K] (for large batches, where a float GEMM beats the fused loop), written into `w`
// when it is given (a reused tile buffer: a fresh multi-MB allocation costs page faults on every call).
// With `split` (int4 only) the columns come in the de-interleaved order of dequant_row: the caller permutes the
// activations' columns the same way, which saves the interleaving shuffles.
torch::Tensor dequant(torch::Tensor qweight, torch::Tensor scales, torch::Tensor mins, int64_t group_size, bool int4,
                      c10::optional<torch::Tensor> out, bool split) {
  const int64_t N = qweight.size(0), K = int4 ? qweight.size(1) * 2 : qweight.size(1), G = group_size;
  check(qweight, scales, mins, K, G, int4);
  split = split && int4;
  TORCH_CHECK(!split || G % 16 == 0, "split order needs a group size that is a multiple of 16");
  torch::Tensor w = out.has_value() ? *out : torch::empty({N, K}, scales.options().dtype(at::kFloat));
  TORCH_CHECK(w.is_contiguous() && w.scalar_type() == at::kFloat && w.size(0) == N && w.size(1) == K,
              "out must be contiguous fp32 [N, K]");
  const uint8_t* qp = reinterpret_cast<const uint8_t*>(qweight.data_ptr());
  const at::Half* sp = scales.data_ptr<at::Half>();
  const at::Half* mp = int4 ? mins.data_ptr<at::Half>() : nullptr;
  float* wp = w.data_ptr<float>();
  const int64_t row_bytes = int4 ? K / 2 : K, num_groups = K / G;
  at::parallel_for(0, N, std::max<int64_t>(16, kWeightsPerThread / K), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
#ifdef __AVX2__
      if (G % 32 == 0) {
        dequant_row_avx2(qp + n * row_bytes, sp + n * num_groups, int4 ? mp + n * num_groups : nullptr, K, G, int4,
                         split, wp + n * K);
        continue;
      }
#endif
      dequant_row(qp + n * row_bytes, sp + n * num_groups, int4 ? mp + n * num_groups : nullptr, K, G, int4,
                  wp + n * K, split);
    }
  });
  return w;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_linear", &quant_linear, "weight-only quantized linear, fp32 activations");
  m.def("dequant", &dequant, "packed weight -> fp32", py::arg("qweight"), py::arg("scales"), py::arg("mins"),
        py::arg("group_size"), py::arg("int4"), py::arg("out") = py::none(), py::arg("split") = false);
}
