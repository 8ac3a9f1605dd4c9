// Paged decode attention for the CPU: one query token per sequence, keys and values read in place from the
// paged cache (no gather copy). Work is split over (sequence, kv head) pairs with ATen's thread pool; the query
// heads that share a kv head are handled together so each key and value row is loaded once, and one sequence's
// kv heads run back to back in one task so every cache line of a block is used while it is hot.
// Head sizes that are a multiple of the vector width (vec.h) up to 16 vectors take a loop written in vectors
// with the head size fixed at compile time: a key row and each query head's accumulators stay in registers.
// Other head sizes take the portable loop.
//
// q:            [B, H, D]          float32, contiguous
// k_cache:      [NB, BS, KV, D]    float32, contiguous (v_cache alike)
// block_tables: [B, MAXB]          int64
// context_lens: [B]                int64, tokens each sequence attends to (its new token included)
// returns       [B, H, D]          float32
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>
#include <ATen/Parallel.h>

#include "vec.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// Scores -> unnormalized softmax weights in place; returns 1 / their sum.
float softmax_weights(float* s, int64_t L) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < L; ++t) m = std::max(m, s[t]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < L; ++t) {
    s[t] = std::exp(s[t] - m);
    sum += s[t];
  }
  return 1.f / sum;
}

// One (sequence, kv head) task with D = NC * P: scores for the G query heads, softmax, weighted values.
// q: [G, D]; out: [G, D]; scores: room for G * L floats.
template <int NC>
void attend_vec(const float* q, int64_t G, const float* k_head, const float* v_head, const int64_t* table, int64_t L,
                int64_t BS, int64_t row, float scale, float* scores, float* out) {
  constexpr int64_t D = NC * P;
  for (int64_t t0 = 0; t0 < L; t0 += BS) {
    const float* kb = k_head + table[t0 / BS] * BS * row;
    const int64_t n = std::min(BS, L - t0);
    for (int64_t j = 0; j < n; ++j) {
      vec k[NC];
      for (int c = 0; c < NC; ++c) k[c] = vload(kb + j * row + c * P);
      for (int64_t g = 0; g < G; ++g) {
        vec a = vmul(vload(q + g * D), k[0]);
        for (int c = 1; c < NC; ++c) a = vfma(vload(q + g * D + c * P), k[c], a);
        scores[g * L + t0 + j] = vsum(a) * scale;
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * L;
    const float inv = softmax_weights(sg, L);
    vec acc[NC];
    for (int c = 0; c < NC; ++c) acc[c] = vzero();
    for (int64_t t0 = 0; t0 < L; t0 += BS) {
      const float* vb = v_head + table[t0 / BS] * BS * row;
      const int64_t n = std::min(BS, L - t0);
      for (int64_t j = 0; j < n; ++j) {
        const vec w = vbcast(sg + t0 + j);
        for (int c = 0; c < NC; ++c) acc[c] = vfma(w, vload(vb + j * row + c * P), acc[c]);
      }
    }
    const vec vinv = vbcast(&inv);
    for (int c = 0; c < NC; ++c) vstore(out + g * D + c * P, vmul(acc[c], vinv));
  }
}

using AttendFn = void (*)(const float*, int64_t, const float*, const float*, const int64_t*, int64_t, int64_t,
                          int64_t, float, float*, float*);

AttendFn attend_for(int64_t D) {
  if (D % P) return nullptr;
  switch (D / P) {
    case 1: return &attend_vec<1>;
    case 2: return &attend_vec<2>;
    case 3: return &attend_vec<3>;
    case 4: return &attend_vec<4>;
    case 5: return &attend_vec<5>;
    case 6: return &attend_vec<6>;
    case 8: return &attend_vec<8>;
    case 16: return &attend_vec<16>;
    default: return nullptr;
  }
}

}  // namespace

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                     at::Tensor block_tables, at::Tensor context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad ranks");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
              v_cache.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "int64 block tables and lengths");
  q = q.contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  block_tables = block_tables.contiguous();
  context_lens = context_lens.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), KV = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && H % KV == 0, "head shapes do not match");
  TORCH_CHECK(block_tables.size(0) == B && context_lens.size(0) == B, "batch sizes do not match");
  const int64_t G = H / KV, MAXB = block_tables.size(1);
  auto out = at::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* btp = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const int64_t row = KV * D;  // floats between consecutive tokens of one block

  const AttendFn attend = attend_for(D);
  at::parallel_for(0, B * KV, KV, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(G * D);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / KV, h = idx % KV;
      const int64_t L = lens[b];
      TORCH_CHECK(L >= 1 && (L + BS - 1) / BS <= MAXB, "context length does not fit the block table");
      scores.resize(G * L);
      const int64_t* table = btp + b * MAXB;
      const float* qh = qp + (b * H + h * G) * D;
      if (attend != nullptr) {
        attend(qh, G, kp + h * D, vp + h * D, table, L, BS, row, fscale, scores.data(), op + (b * H + h * G) * D);
        continue;
      }
      // Pass 1: scaled scores for every token, all G query heads at once.
      for (int64_t t0 = 0; t0 < L; t0 += BS) {
        const float* kb = kp + table[t0 / BS] * BS * row + h * D;
        const int64_t n = std::min(BS, L - t0);
        for (int64_t j = 0; j < n; ++j) {
          const float* kr = kb + j * row;
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qh + g * D;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t i = 0; i < D; ++i) s += qg[i] * kr[i];
            scores[g * L + t0 + j] = s * fscale;
          }
        }
      }
      // Pass 2: softmax weights per query head.
      std::vector<float> inv_sum(G);
      for (int64_t g = 0; g < G; ++g) inv_sum[g] = softmax_weights(scores.data() + g * L, L);
      // Pass 3: weighted sum of values.
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t0 = 0; t0 < L; t0 += BS) {
        const float* vb = vp + table[t0 / BS] * BS * row + h * D;
        const int64_t n = std::min(BS, L - t0);
        for (int64_t j = 0; j < n; ++j) {
          const float* vr = vb + j * row;
          for (int64_t g = 0; g < G; ++g) {
            const float w = scores[g * L + t0 + j];
            float* ag = acc.data() + g * D;
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) ag[i] += w * vr[i];
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* o = op + (b * H + h * G + g) * D;
        for (int64_t i = 0; i < D; ++i) o[i] = acc[g * D + i] * inv_sum[g];
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU)");
}
