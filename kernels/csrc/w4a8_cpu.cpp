// Quantized matmul with int8 activations on the CPU (W4A8, and W8A8 for int8 weights), over the block-lane layout
// of kernels/w4a8_cpu.py: activations are quantized per block of 32 input features at run time and multiplied
// against the packed weight codes with integer dot products, as llama.cpp's Q4_1 x Q8_1 does.
//
// For one block b of 32 features, output n and row m, with the weight as `code * s + min` (int4) or
// `(code - 128) * s` (int8 codes stored offset by 128, so that every code is an unsigned byte) and the activation
// as `xq * d` (xq int8, d = max|x| / 127):
//     y[m, n] += (s * d) * sum_k(code_k * xq_k)  +  min * (d * sum_k(xq_k))      min = -128 * s for int8
// The integer sum is exact; only the scaling rounds. Four codes of one output sit in one 32-bit lane, so a single
// u8 x s8 dot instruction (VNNI vpdpbusd, else pmaddubsw + pmaddwd) adds four products into each of L outputs.
//
// Each panel of L outputs is read once per call: for a block of up to MR activation rows the weight codes are
// loaded and unpacked once and multiplied into every row of the block. A row's arithmetic does not depend on the
// other rows of the call, so results are batch invariant. Calls of up to MR rows (decode at small batch) read
// each weight once and are bound by memory; they run on spin_pool.h's threads instead of an OpenMP region.
// L is 16 with AVX-512BW (VNNI when the build has it), 8 with AVX2 (AVX-VNNI when present), 8 in a portable loop.
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "spin_pool.h"
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int QK = 32;  // input features per activation block (and the smallest weight group)

inline int32_t load4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return v;
}

#if defined(__AVX512BW__)
constexpr int L = 16;
constexpr int MR = 6;  // 2 x 6 accumulators + codes, scales and broadcasts of 32 registers
using wvec = __m512i;  // 4L code bytes: 4 consecutive input features of each of L outputs
using avec = __m512i;  // L int32 dot products
using xvec = __m512i;  // 4 activation bytes in every lane
using fvec = __m512;
inline wvec wload(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline wvec wlow(wvec b) { return _mm512_and_si512(b, _mm512_set1_epi8(15)); }
inline wvec whigh(wvec b) { return _mm512_and_si512(_mm512_srli_epi16(b, 4), _mm512_set1_epi8(15)); }
inline xvec xbcast(const int8_t* x) { return _mm512_set1_epi32(load4(x)); }
inline avec azero() { return _mm512_setzero_si512(); }
#if defined(__AVX512VNNI__)
#define FRUGAL_DOT_SATURATES 0
inline avec dot4(avec acc, wvec w, xvec x) { return _mm512_dpbusd_epi32(acc, w, x); }
#else
#define FRUGAL_DOT_SATURATES 1
inline avec dot4(avec acc, wvec w, xvec x) {
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1)));
}
#endif
inline avec ashift4(avec a) { return _mm512_slli_epi32(a, 4); }
inline avec aadd(avec a, avec b) { return _mm512_add_epi32(a, b); }
inline fvec fzero() { return _mm512_setzero_ps(); }
inline fvec fset(float v) { return _mm512_set1_ps(v); }
inline fvec fmul(fvec a, fvec b) { return _mm512_mul_ps(a, b); }
inline fvec ffma(fvec a, fvec b, fvec c) { return _mm512_fmadd_ps(a, b, c); }
inline fvec fcvt(avec a) { return _mm512_cvtepi32_ps(a); }
inline fvec fhalf(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline void fstore(float* p, fvec v) { _mm512_storeu_ps(p, v); }
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
constexpr int L = 8;
constexpr int MR = 4;
using wvec = __m256i;
using avec = __m256i;
using xvec = __m256i;
using fvec = __m256;
inline wvec wload(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline wvec wlow(wvec b) { return _mm256_and_si256(b, _mm256_set1_epi8(15)); }
inline wvec whigh(wvec b) { return _mm256_and_si256(_mm256_srli_epi16(b, 4), _mm256_set1_epi8(15)); }
inline xvec xbcast(const int8_t* x) { return _mm256_set1_epi32(load4(x)); }
inline avec azero() { return _mm256_setzero_si256(); }
#if defined(__AVXVNNI__)
#define FRUGAL_DOT_SATURATES 0
inline avec dot4(avec acc, wvec w, xvec x) { return _mm256_dpbusd_avx_epi32(acc, w, x); }
#else
#define FRUGAL_DOT_SATURATES 1
inline avec dot4(avec acc, wvec w, xvec x) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}
#endif
inline avec ashift4(avec a) { return _mm256_slli_epi32(a, 4); }
inline avec aadd(avec a, avec b) { return _mm256_add_epi32(a, b); }
inline fvec fzero() { return _mm256_setzero_ps(); }
inline fvec fset(float v) { return _mm256_set1_ps(v); }
inline fvec fmul(fvec a, fvec b) { return _mm256_mul_ps(a, b); }
inline fvec ffma(fvec a, fvec b, fvec c) { return _mm256_fmadd_ps(a, b, c); }
inline fvec fcvt(avec a) { return _mm256_cvtepi32_ps(a); }
inline fvec fhalf(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline void fstore(float* p, fvec v) { _mm256_storeu_ps(p, v); }
#else
// Portable: the same operations on plain arrays; the compiler vectorizes what it can.
constexpr int L = 8;
constexpr int MR = 4;
struct wvec { uint8_t b[4 * L]; };
struct avec { int32_t v[L]; };
struct xvec { int8_t b[4]; };
struct fvec { float v[L]; };
#define FRUGAL_DOT_SATURATES 0
inline wvec wload(const uint8_t* p) { wvec r; std::memcpy(r.b, p, sizeof r.b); return r; }
inline wvec wlow(wvec w) { for (auto& b : w.b) b &= 15; return w; }
inline wvec whigh(wvec w) { for (auto& b : w.b) b >>= 4; return w; }
inline xvec xbcast(const int8_t* x) { xvec r; std::memcpy(r.b, x, 4); return r; }
inline avec azero() { return avec{}; }
inline avec dot4(avec acc, wvec w, xvec x) {
  for (int i = 0; i < L; ++i)
    for (int r = 0; r < 4; ++r) acc.v[i] += int32_t{w.b[4 * i + r]} * int32_t{x.b[r]};
  return acc;
}
inline fvec fzero() { return fvec{}; }
inline fvec fset(float v) { fvec r; std::fill(r.v, r.v + L, v); return r; }
inline fvec fmul(fvec a, fvec b) { for (int i = 0; i < L; ++i) a.v[i] *= b.v[i]; return a; }
inline fvec ffma(fvec a, fvec b, fvec c) { for (int i = 0; i < L; ++i) c.v[i] = std::fma(a.v[i], b.v[i], c.v[i]); return c; }
inline fvec fcvt(avec a) { fvec r; for (int i = 0; i < L; ++i) r.v[i] = static_cast<float>(a.v[i]); return r; }
inline fvec fhalf(const at::Half* p) { fvec r; for (int i = 0; i < L; ++i) r.v[i] = static_cast<float>(p[i]); return r; }
inline void fstore(float* p, fvec v) { std::copy(v.v, v.v + L, p); }
#endif

// Byte codes (0..255, int8 weights) against int8 activations. vpdpbusd and the portable loop sum into int32, but
// pmaddubsw adds each pair of products into an int16 and saturates (2 * 255 * 127 > 32767): there a code is split
// into its nibbles, code = 16 * high + low, and each half goes through dot4 exactly.
inline avec dot4_u8(avec acc, wvec w, xvec x) {
#if FRUGAL_DOT_SATURATES
  return aadd(dot4(acc, wlow(w), x), ashift4(dot4(azero(), whigh(w), x)));
#else
  return dot4(acc, w, x);
#endif
}

// One block of QK activations -> xq int8 (round half to even), d = max|x| / 127 and d * sum(xq). The reference
// (kernels/w4a8_cpu.py: quantize_activations_ref) performs the same roundings: the vector loops below only
// reorder the max and the integer sum, which are exact.
inline void quantize_block(const float* x, int8_t* xq, float* xd, float* xs) {
#if defined(__AVX512BW__)
  const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
  const float d = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1))) / 127.f;
  const __m512 id = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
  const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, id)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, id));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(xq), _mm512_cvtepi32_epi8(q0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + 16), _mm512_cvtepi32_epi8(q1));
  const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
#elif defined(__AVX2__)
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], abs_mask));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float d = _mm_cvtss_f32(m4) / 127.f;
  const __m256 id = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
  __m256i q[4];
  for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id));
  // packs interleave the 128-bit lanes: dwords come out as q0 lo, q1 lo, q2 lo, q3 lo, q0 hi, ...
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  const __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
  const int32_t sum = _mm_cvtsi128_si32(s4);
#else
  float amax = 0.f;
  for (int k = 0; k < QK; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float d = amax / 127.f;
  const float id = d > 0.f ? 1.f / d : 0.f;
  int32_t sum = 0;
  for (int k = 0; k < QK; ++k) {
    const int32_t q = static_cast<int32_t>(std::nearbyint(x[k] * id));
    xq[k] = static_cast<int8_t>(q);
    sum += q;
  }
#endif
  *xd = d;
  *xs = d * static_cast<float>(sum);
}

// NOTE: a thread's share below this many activations is not worth waking a second OpenMP thread for.
constexpr int64_t kActivationsPerThread = int64_t{1} << 15;

void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* xd, float* xs) {
  const int64_t nb = K / QK;
  at::parallel_for(0, M, std::max<int64_t>(1, kActivationsPerThread / K), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      for (int64_t b = 0; b < nb; ++b)
        quantize_block(x + m * K + b * QK, xq + m * K + b * QK, xd + m * nb + b, xs + m * nb + b);
  });
}

struct Panel {
  const uint8_t* codes;  // [K / QK, block bytes]
  const at::Half* scales;  // [K / G, L]
  const at::Half* mins;  // [K / G, L], int4 only
};

// y[0:R, panel] for R activation rows (xq at stride K, xd / xs at stride K / QK).
template <int R>
__attribute__((noinline)) void panel_rows(Panel p, int64_t K, int64_t G, bool int4, const int8_t* xq,
                                          const float* xd, const float* xs, float* y, int64_t ldy, int64_t cols) {
  const int64_t nb = K / QK;
  const int64_t block_bytes = int4 ? 4 * 4 * L : 8 * 4 * L;
  fvec acc[R];
  for (int i = 0; i < R; ++i) acc[i] = fzero();
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t g = b * QK / G;
    const fvec s = fhalf(p.scales + g * L);
    const fvec mn = int4 ? fhalf(p.mins + g * L) : fmul(s, fset(-128.f));
    const uint8_t* wb = p.codes + b * block_bytes;
    avec dot[R];
    for (int i = 0; i < R; ++i) dot[i] = azero();
    if (int4) {
      for (int c = 0; c < 4; ++c) {  // chunk c: features 4c..4c+3 in the low nibbles, 16 + 4c.. in the high
        const wvec raw = wload(wb + c * 4 * L);
        const wvec low = wlow(raw), high = whigh(raw);
        for (int i = 0; i < R; ++i) {
          const int8_t* xb = xq + i * K + b * QK;
          dot[i] = dot4(dot[i], low, xbcast(xb + 4 * c));
          dot[i] = dot4(dot[i], high, xbcast(xb + 16 + 4 * c));
        }
      }
    } else {
      for (int t = 0; t < 8; ++t) {  // chunk t: features 4t..4t+3, one byte each
        const wvec w = wload(wb + t * 4 * L);
        for (int i = 0; i < R; ++i) dot[i] = dot4_u8(dot[i], w, xbcast(xq + i * K + b * QK + 4 * t));
      }
    }
    for (int i = 0; i < R; ++i) {
      acc[i] = ffma(fcvt(dot[i]), fmul(s, fset(xd[i * nb + b])), acc[i]);
      acc[i] = ffma(mn, fset(xs[i * nb + b]), acc[i]);
    }
  }
  for (int i = 0; i < R; ++i) {
    if (cols == L) {
      fstore(y + i * ldy, acc[i]);
    } else {
      alignas(64) float tmp[L];
      fstore(tmp, acc[i]);
      std::copy(tmp, tmp + cols, y + i * ldy);
    }
  }
}

using PanelFn = void (*)(Panel, int64_t, int64_t, bool, const int8_t*, const float*, const float*, float*, int64_t,
                         int64_t);
template <int... Rs>
constexpr std::array<PanelFn, sizeof...(Rs)> panel_table(std::integer_sequence<int, Rs...>) {
  return {&panel_rows<Rs + 1>...};
}
constexpr auto kPanel = panel_table(std::make_integer_sequence<int, MR>{});  // kPanel[r - 1]: r rows

// NOTE: a thread's share below this many weights is not worth waking a second OpenMP thread for.
constexpr int64_t kWeightsPerThread = int64_t{1} << 17;
// Calls of up to MR rows read each weight once and are bound by memory: their panels go to the spin pool in
// chunks of about this many weights (a microsecond or two each), so a late helper delays the caller little.
constexpr int64_t kWeightsPerChunk = int64_t{1} << 15;

}  // namespace

int64_t lane_count() { return L; }

// x: [M, K] fp32; codes: uint8 [N_pad / L, K / 32, 16L (int4) or 32L (int8)]; scales (mins): fp16 [N_pad / L, K / G, L];
// n: the real N  ->  [M, n] fp32
at::Tensor w4a8_linear(at::Tensor x, at::Tensor codes, at::Tensor scales, at::Tensor mins, int64_t n,
                       int64_t group_size, bool int4) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be fp32 [M, K]");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), G = group_size, num_panels = codes.size(0);
  const int64_t block_bytes = int4 ? 16 * L : 32 * L;
  TORCH_CHECK(K % QK == 0 && G % QK == 0 && K % G == 0, "K and the group size must be multiples of 32, G must divide K");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  codes.sizes() == at::IntArrayRef({num_panels, K / QK, block_bytes}),
              "codes must be contiguous uint8 [N_pad / L, K / 32, ", block_bytes, "] with L = ", L);
  TORCH_CHECK(n > 0 && n <= num_panels * L && n > (num_panels - 1) * L, "n must fall in the last panel");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  scales.sizes() == at::IntArrayRef({num_panels, K / G, L}),
              "scales must be contiguous fp16 [N_pad / L, K / G, L]");
  TORCH_CHECK(!int4 || (mins.scalar_type() == at::kHalf && mins.is_contiguous() && mins.sizes() == scales.sizes()),
              "mins must be contiguous fp16 [N_pad / L, K / G, L]");
  auto y = at::empty({M, n}, x.options());
  if (M == 0) return y;
  const int64_t nb = K / QK;
  std::vector<int8_t> xq(M * K);
  std::vector<float> xd(M * nb), xs(M * nb);
  quantize_rows(x.data_ptr<float>(), M, K, xq.data(), xd.data(), xs.data());
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const at::Half* sp = scales.data_ptr<at::Half>();
  const at::Half* mp = int4 ? mins.data_ptr<at::Half>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t c_stride = nb * block_bytes, s_stride = K / G * L;
  auto panels = [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const Panel panel{cp + p * c_stride, sp + p * s_stride, int4 ? mp + p * s_stride : nullptr};
      const int64_t cols = std::min<int64_t>(L, n - p * L);
      for (int64_t m0 = 0; m0 < M; m0 += MR) {
        const int64_t rows = std::min<int64_t>(MR, M - m0);
        kPanel[rows - 1](panel, K, G, int4, xq.data() + m0 * K, xd.data() + m0 * nb, xs.data() + m0 * nb,
                         yp + m0 * n + p * L, n, cols);
      }
    }
  };
  if (M <= MR) {
    const int64_t per_chunk = std::max<int64_t>(1, kWeightsPerChunk / (K * L));
    const int64_t num_chunks = (num_panels + per_chunk - 1) / per_chunk;
    spin_pool(at::get_num_threads()).run(num_chunks, [&](int64_t c) {
      panels(c * per_chunk, std::min(num_panels, (c + 1) * per_chunk));
    });
  } else {
    at::parallel_for(0, num_panels, std::max<int64_t>(1, kWeightsPerThread / (K * L)), panels);
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lane_count", &lane_count, "output features per panel (the vector width this build uses)");
  m.def("w4a8_linear", &w4a8_linear, "quantized linear with int8 activations over the block-lane layout",
        py::call_guard<py::gil_scoped_release>());
}
