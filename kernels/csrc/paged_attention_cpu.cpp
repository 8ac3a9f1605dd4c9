// Paged attention for the CPU, keys and values read in place from the paged cache (no gather copy): decodes (one
// query token per sequence) and one sequence's prefill chunk. Work is split over (token, kv head) pairs with
// ATen's thread pool; the query heads that share a kv head are handled together so each key and value row is
// loaded once, and one token's kv heads run back to back in one task so every cache line of a block is used
// while it is hot. A token's arithmetic depends only on its own query and context, never on the other tokens of
// the call, so outputs are batch invariant and a prefilled token rounds as a decoded one does.
// Head sizes that are a multiple of the vector width (vec.h) up to 16 vectors take a loop written in vectors
// with the head size fixed at compile time: a key row and each query head's accumulators stay in registers.
// Other head sizes take the portable loop.
//
// paged_decode_attention:
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
#include <array>
#include <cmath>
#include <cstdint>
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

// The weighted values of GB query heads at once (their score rows at stride Lp), CB vectors of columns at a time,
// so each value vector is loaded once for GB heads. Every output element is still the sum of w_t * v_t over t in
// order, from zero, then times 1 / sum(w): the same arithmetic as one head on its own.
constexpr int kHeadBlock = 3;
constexpr int kColumnVectors = P == 16 ? 4 : 2;  // GB x CB accumulators: 12 of 32 registers, 6 of 16
template <int NC, int GB>
inline void weigh_values(const float* scores, int64_t Lp, const float* v_head, const int64_t* table, int64_t L,
                         int64_t BS, int64_t row, const float* inv, float* out) {
  constexpr int CB = NC % kColumnVectors == 0 ? kColumnVectors : (NC % 2 == 0 ? 2 : 1);
  constexpr int64_t D = NC * P;
  for (int c0 = 0; c0 < NC; c0 += CB) {
    vec acc[GB][CB];
    for (int g = 0; g < GB; ++g)
      for (int c = 0; c < CB; ++c) acc[g][c] = vzero();
    for (int64_t t0 = 0; t0 < L; t0 += BS) {
      const float* vb = v_head + table[t0 / BS] * BS * row + c0 * P;
      const int64_t n = std::min(BS, L - t0);
      for (int64_t j = 0; j < n; ++j) {
        vec w[GB];
        for (int g = 0; g < GB; ++g) w[g] = vbcast(scores + g * Lp + t0 + j);
        for (int c = 0; c < CB; ++c) {
          const vec v = vload(vb + j * row + c * P);
          for (int g = 0; g < GB; ++g) acc[g][c] = vfma(w[g], v, acc[g][c]);
        }
      }
    }
    for (int g = 0; g < GB; ++g) {
      const vec vinv = vbcast(inv + g);
      for (int c = 0; c < CB; ++c) vstore(out + g * D + (c0 + c) * P, vmul(acc[g][c], vinv));
    }
  }
}

// One (token, kv head) task with D = NC * P: scores for the G query heads, softmax, weighted values.
// q: [G, D]; out: [G, D]; scores: G rows of Lp >= L floats.
template <int NC>
void attend_vec(const float* q, int64_t G, const float* k_head, const float* v_head, const int64_t* table, int64_t L,
                int64_t BS, int64_t row, int64_t Lp, float scale, float* scores, float* out) {
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
        scores[g * Lp + t0 + j] = vsum(a) * scale;
      }
    }
  }
  std::array<float, kHeadBlock> inv;
  for (int64_t g0 = 0; g0 < G; g0 += kHeadBlock) {
    const int64_t num = std::min<int64_t>(kHeadBlock, G - g0);
    for (int64_t g = 0; g < num; ++g) inv[g] = softmax_weights(scores + (g0 + g) * Lp, L);
    const float* sg = scores + g0 * Lp;
    float* og = out + g0 * D;
    if (num == 3) weigh_values<NC, 3>(sg, Lp, v_head, table, L, BS, row, inv.data(), og);
    else if (num == 2) weigh_values<NC, 2>(sg, Lp, v_head, table, L, BS, row, inv.data(), og);
    else weigh_values<NC, 1>(sg, Lp, v_head, table, L, BS, row, inv.data(), og);
  }
}

using AttendFn = void (*)(const float*, int64_t, const float*, const float*, const int64_t*, int64_t, int64_t,
                          int64_t, int64_t, float, float*, float*);

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

// NOTE: a query's score row starts on a 64-byte boundary and has the same layout whatever else the call holds:
// the vectorized softmax sum may peel for alignment, and its grouping (so its rounding) must depend on the
// query's own context length only.
constexpr int64_t kAlign = 16;  // floats per 64 bytes
inline int64_t padded(int64_t L) { return (L + kAlign - 1) / kAlign * kAlign; }

// One task: the G query heads `qh` of one token that share kv head h, over its first L cached tokens.
// `work` must hold G * padded(L) + kAlign floats for the scores and G * D for the portable loop's sums.
void attend_task(const float* qh, int64_t G, int64_t D, const float* k_head, const float* v_head,
                 const int64_t* table, int64_t L, int64_t BS, int64_t row, float scale, AttendFn attend,
                 std::vector<float>& work, float* out) {
  const int64_t Lp = padded(L);
  work.resize(G * Lp + kAlign + G * D);
  float* scores = work.data();
  scores += (kAlign - reinterpret_cast<uintptr_t>(scores) / sizeof(float) % kAlign) % kAlign;
  float* acc = scores + G * Lp;
  if (attend != nullptr) {
    attend(qh, G, k_head, v_head, table, L, BS, row, Lp, scale, scores, out);
    return;
  }
  // Pass 1: scaled scores for every token, all G query heads at once.
  for (int64_t t0 = 0; t0 < L; t0 += BS) {
    const float* kb = k_head + table[t0 / BS] * BS * row;
    const int64_t n = std::min(BS, L - t0);
    for (int64_t j = 0; j < n; ++j) {
      const float* kr = kb + j * row;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qh + g * D;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < D; ++i) s += qg[i] * kr[i];
        scores[g * Lp + t0 + j] = s * scale;
      }
    }
  }
  // Pass 2: softmax weights per query head; pass 3: weighted sum of values.
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t g = 0; g < G; ++g) {
    const float inv = softmax_weights(scores + g * Lp, L);
    for (int64_t t0 = 0; t0 < L; t0 += BS) {
      const float* vb = v_head + table[t0 / BS] * BS * row;
      const int64_t n = std::min(BS, L - t0);
      for (int64_t j = 0; j < n; ++j) {
        const float* vr = vb + j * row;
        const float w = scores[g * Lp + t0 + j];
        float* ag = acc + g * D;
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) ag[i] += w * vr[i];
      }
    }
    for (int64_t i = 0; i < D; ++i) out[g * D + i] = acc[g * D + i] * inv;
  }
}

void check_caches(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad ranks");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
              v_cache.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(k_cache.size(3) == q.size(2) && q.size(1) % k_cache.size(2) == 0, "head shapes do not match");
}

}  // namespace

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                     at::Tensor block_tables, at::Tensor context_lens, double scale) {
  check_caches(q, k_cache, v_cache);
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "int64 block tables and lengths");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  context_lens = context_lens.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), KV = k_cache.size(2);
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
    std::vector<float> work;
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / KV, h = idx % KV;
      const int64_t L = lens[b];
      TORCH_CHECK(L >= 1 && (L + BS - 1) / BS <= MAXB, "context length does not fit the block table");
      attend_task(qp + (b * H + h * G) * D, G, D, kp + h * D, vp + h * D, btp + b * MAXB, L, BS, row, fscale,
                  attend, work, op + (b * H + h * G) * D);
    }
  });
  return out;
}

// A prefill chunk of one sequence: query i sits at position start_pos + i and attends to the cached tokens
// 0..start_pos + i (this step's keys are already written). Each query runs exactly the decode task above, so a
// token's attention rounds the same whether it was prefilled whole, in chunks, behind a cached prefix or decoded.
// q: [N, H, D]; block_table: [NB] int64 covering start_pos + N tokens.
at::Tensor paged_prefill_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_table,
                                      int64_t start_pos, double scale) {
  check_caches(q, k_cache, v_cache);
  TORCH_CHECK(block_table.dim() == 1 && block_table.scalar_type() == at::kLong, "int64 block table [NB]");
  q = q.contiguous();
  block_table = block_table.contiguous();
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), KV = k_cache.size(2);
  TORCH_CHECK(start_pos >= 0 && (start_pos + N + BS - 1) / BS <= block_table.size(0),
              "the chunk does not fit the block table");
  const int64_t G = H / KV;
  auto out = at::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* table = block_table.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const int64_t row = KV * D;
  const AttendFn attend = attend_for(D);
  at::parallel_for(0, N * KV, KV, [&](int64_t begin, int64_t end) {
    std::vector<float> work;
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t i = idx / KV, h = idx % KV;
      attend_task(qp + (i * H + h * G) * D, G, D, kp + h * D, vp + h * D, table, start_pos + i + 1, BS, row,
                  fscale, attend, work, op + (i * H + h * G) * D);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU)");
  m.def("paged_prefill_attention", &paged_prefill_attention, "one sequence's prefill chunk over the paged cache (CPU)");
}
