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
#endif


}  // namespace
