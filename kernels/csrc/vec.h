// The vector type the CPU kernels are written in: P floats, AVX-512 (P = 16) or AVX2 (P = 8) as the build
// targets, else a portable struct of 8 the compiler vectorizes as it can. Shared by the kernels in this folder;
// each translation unit gets its own copy (everything is inline, in an anonymous namespace).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// e^x = 2^n * e^r with n = round(x / ln 2) and r = x - n ln 2 (ln 2 in two parts, so r is exact), e^r by a
// degree-6 polynomial on [-ln 2 / 2, ln 2 / 2] (Cephes' expf: within 2 ulp). Below kExpMin the result would not be
// a normal float; the callers return 0 there (softmax weights of e^-87 and less do not count). Above kExpMax the
// input is taken as kExpMax (e^88.7 is near the largest float), so no exponent overflows.
constexpr float kExpMin = -87.33f, kExpMax = 88.7f;
constexpr float kExpC1 = 0.693359375f, kExpC2 = -2.12194440e-4f;
constexpr float kExpP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f,
                            1.6666665459e-1f, 5.0000001201e-1f};

inline float vexp_poly1(float x, float n) {
  const float r = std::fma(n, -kExpC2, std::fma(n, -kExpC1, x));  // fused: -ffast-math may not merge the parts
  float p = kExpP[0];
  for (int i = 1; i < 6; ++i) p = std::fma(p, r, kExpP[i]);
  return std::fma(p * r, r, r) + 1.f;
}

#if defined(__AVX512F__)
constexpr int P = 16;
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec vbcast(const float* p) { return _mm512_set1_ps(*p); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
inline vec vhalf(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// P bytes -> low nibbles (one k) and high nibbles (the next k) as floats
inline void vnibbles(const uint8_t* q, vec& lo, vec& hi) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
  hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}
inline vec vint8(const int8_t* q) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
}
inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
inline float vmaxall(vec v) { return _mm512_reduce_max_ps(v); }
// e^r of x = n ln 2 + r, as vexp_poly1, lane by lane
inline vec vexp_poly(vec x, vec n) {
  const vec r = vfma(n, _mm512_set1_ps(-kExpC2), vfma(n, _mm512_set1_ps(-kExpC1), x));
  vec p = _mm512_set1_ps(kExpP[0]);
  for (int i = 1; i < 6; ++i) p = vfma(p, r, _mm512_set1_ps(kExpP[i]));
  return vadd(vfma(vmul(p, r), r, r), _mm512_set1_ps(1.f));
}
// e^x: the polynomial scaled by 2^n through the exponent field; 0 below kExpMin, saturated above kExpMax
inline vec vexp(vec x) {
  x = _mm512_min_ps(x, _mm512_set1_ps(kExpMax));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 p = vexp_poly(x, n);
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  const __m512 r = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpMin), _CMP_NLT_UQ), r);
}
// r[j] = the sum of a[j]'s lanes, for j < P, by one fixed tree per j: lanes of different a[j] never mix, so r[j]
// does not depend on the other vectors (garbage in a[k] leaves r[j] alone).
inline vec vsum_lanes(const vec (&a)[P]) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: a0 x0+x2, a1 x0+x2, a0 x1+x3, a1 x1+x3
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: that lane's sum of a[4i .. 4i + 3]
    const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(b[2 * i]), _mm512_castps_pd(b[2 * i + 1]));
    const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(b[2 * i]), _mm512_castps_pd(b[2 * i + 1]));
    c[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  const __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xdd));
  const __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88), _mm512_shuffle_f32x4(d0, d1, 0xdd));
}
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
constexpr int P = 8;
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec vbcast(const float* p) { return _mm256_broadcast_ss(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
inline vec vhalf(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline void vnibbles(const uint8_t* q, vec& lo, vec& hi) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
  lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
  hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}
inline vec vint8(const int8_t* q) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}
inline float vsum(vec v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}
inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
inline float vmaxall(vec v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}
inline vec vexp_poly(vec x, vec n) {
  const vec r = vfma(n, _mm256_set1_ps(-kExpC2), vfma(n, _mm256_set1_ps(-kExpC1), x));
  vec p = _mm256_set1_ps(kExpP[0]);
  for (int i = 1; i < 6; ++i) p = vfma(p, r, _mm256_set1_ps(kExpP[i]));
  return vadd(vfma(vmul(p, r), r, r), _mm256_set1_ps(1.f));
}
inline vec vexp(vec x) {
  x = _mm256_min_ps(x, _mm256_set1_ps(kExpMax));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 p = vexp_poly(x, n);
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  return _mm256_and_ps(r, _mm256_cmp_ps(x, _mm256_set1_ps(kExpMin), _CMP_NLT_UQ));
}
// r[j] = the sum of a[j]'s lanes, for j < P, by one fixed tree per j (see the AVX-512 version).
inline vec vsum_lanes(const vec (&a)[P]) {
  __m256 b[4], c[2];
  for (int i = 0; i < 4; ++i)
    b[i] = _mm256_add_ps(_mm256_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm256_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 2; ++i) {
    const __m256d lo = _mm256_unpacklo_pd(_mm256_castps_pd(b[2 * i]), _mm256_castps_pd(b[2 * i + 1]));
    const __m256d hi = _mm256_unpackhi_pd(_mm256_castps_pd(b[2 * i]), _mm256_castps_pd(b[2 * i + 1]));
    c[i] = _mm256_add_ps(_mm256_castpd_ps(lo), _mm256_castpd_ps(hi));
  }
  return _mm256_add_ps(_mm256_permute2f128_ps(c[0], c[1], 0x20), _mm256_permute2f128_ps(c[0], c[1], 0x31));
}
#else
// Portable: P floats in a struct; the compiler vectorizes what it can.
constexpr int P = 8;
struct vec {
  float v[P];
};
inline vec vzero() { return vec{}; }
inline vec vload(const float* p) {
  vec r;
  std::copy(p, p + P, r.v);
  return r;
}
inline void vstore(float* p, vec a) { std::copy(a.v, a.v + P, p); }
inline vec vbcast(const float* p) {
  vec r;
  std::fill(r.v, r.v + P, *p);
  return r;
}
#define FRUGAL_VEC_OP(name, expr)   \
  inline vec name(vec a, vec b) {   \
    vec r;                          \
    for (int i = 0; i < P; ++i) r.v[i] = expr; \
    return r;                       \
  }
FRUGAL_VEC_OP(vadd, a.v[i] + b.v[i])
FRUGAL_VEC_OP(vmul, a.v[i] * b.v[i])
#undef FRUGAL_VEC_OP
#define FRUGAL_VEC_OP2(name, expr)  \
  inline vec name(vec a, vec b) {   \
    vec r;                          \
    for (int i = 0; i < P; ++i) r.v[i] = expr; \
    return r;                       \
  }
inline vec vfma(vec a, vec b, vec c) {
  for (int i = 0; i < P; ++i) c.v[i] = std::fma(a.v[i], b.v[i], c.v[i]);
  return c;
}
inline vec vhalf(const at::Half* p) {
  vec r;
  for (int i = 0; i < P; ++i) r.v[i] = static_cast<float>(p[i]);
  return r;
}
inline void vnibbles(const uint8_t* q, vec& lo, vec& hi) {
  for (int i = 0; i < P; ++i) {
    lo.v[i] = static_cast<float>(q[i] & 0x0F);
    hi.v[i] = static_cast<float>(q[i] >> 4);
  }
}
inline vec vint8(const int8_t* q) {
  vec r;
  for (int i = 0; i < P; ++i) r.v[i] = static_cast<float>(q[i]);
  return r;
}
inline float vsum(vec v) {
  float s = 0.f;
  for (int i = 0; i < P; ++i) s += v.v[i];
  return s;
}
inline vec vsum_lanes(const vec (&a)[P]) {
  vec r;
  for (int j = 0; j < P; ++j) r.v[j] = vsum(a[j]);
  return r;
}
FRUGAL_VEC_OP2(vsub, a.v[i] - b.v[i])
FRUGAL_VEC_OP2(vdiv, a.v[i] / b.v[i])
FRUGAL_VEC_OP2(vmax, a.v[i] > b.v[i] ? a.v[i] : b.v[i])
inline float vmaxall(vec v) {
  float m = v.v[0];
  for (int i = 1; i < P; ++i) m = v.v[i] > m ? v.v[i] : m;
  return m;
}
inline vec vexp(vec x) {
  vec r;
  for (int i = 0; i < P; ++i) {
    const float xi = std::min(x.v[i], kExpMax);
    const float ni = std::nearbyint(xi * 1.44269504088896341f);
    r.v[i] = xi < kExpMin ? 0.f : vexp_poly1(xi, ni) * std::ldexp(1.f, static_cast<int>(ni));
  }
  return r;
}
#undef FRUGAL_VEC_OP2
#endif


}  // namespace
