// Paged attention for the CPU, keys and values read in place from the paged cache (no gather copy): decodes (one
// query token per sequence) and one sequence's prefill chunk. Work goes to ATen's thread pool as (token, kv head)
// tasks for decodes and (tile of 16 tokens, kv head) tasks for a prefill chunk; the query heads that share a kv
// head are handled together, and a tile reads each key and value block once for all of its tokens. A token's
// arithmetic depends only on its own query and context, never on the other tokens of its tile or call, so
// outputs are batch invariant and a prefilled token rounds exactly as a decoded one does.
// Head sizes of 1-6, 8, 10, 12, 16 or 32 vectors (vec.h's width) take a loop written in vectors
// with the head size fixed at compile time; other head sizes take the portable loop, one token at a time.
// The vector loop scores P keys at once (each key's products in a vector of their own, the P vectors' lanes
// added by one tree per key: vec.h's vsum_lanes), takes its softmax weights from a vector exp (vec.h's vexp,
// within 2 ulp) and prefetches each head's next block of keys and values, which the pool scatters.
//
// paged_decode_attention:
// q:            [B, H, D]          float32, any row stride, each token's heads end to end (a view of fused qkv)
// k_cache:      [NB, BS, KV, D]    float32, contiguous (v_cache alike)
// block_tables: [B, MAXB]          int64
// context_lens: [B]                int64, tokens each sequence attends to (its new token included)
// out:          [B, H, D]          float32, optional, laid out as q may be; written and returned
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

// NOTE: every score row starts on a 64-byte boundary and is as long as its own context (padded): the vectorized
// softmax sum may peel for alignment, and its grouping (so its rounding) must depend on the token's own context
// length only, never on the rest of its tile or call.
constexpr int64_t kAlign = 16;  // floats per 64 bytes
inline int64_t padded(int64_t L) { return (L + kAlign - 1) / kAlign * kAlign; }

// Scores -> unnormalized softmax weights in place; returns 1 / their sum. The row is read to its padded length
// (the padding is set to -inf here, whose weight is 0), so every sum adds P lanes at a time in one order that
// depends on L alone.
float softmax_weights(float* s, int64_t L) {
  const int64_t Lp = padded(L);
  std::fill(s + L, s + Lp, -std::numeric_limits<float>::infinity());
  vec vm = vload(s);
  for (int64_t t = P; t < Lp; t += P) vm = vmax(vm, vload(s + t));
  const float m = vmaxall(vm);
  const vec mv = vbcast(&m);
  vec sum = vzero();
  for (int64_t t = 0; t < Lp; t += P) {
    const vec w = vexp(vsub(vload(s + t), mv));
    vstore(s + t, w);
    sum = vadd(sum, w);
  }
  return 1.f / vsum(sum);
}

// The next block of a head's keys or values: blocks are scattered through the pool, so the hardware prefetcher,
// which follows the rows within a block, cannot see where the next one starts.
inline void prefetch_rows(const float* p, int64_t n, int64_t row, int64_t D) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; d += 16) __builtin_prefetch(p + j * row + d);
}

constexpr int kHeadBlock = 3;  // query heads weighed together
constexpr int kColumnVectors = P == 16 ? 4 : 2;  // GB x CB accumulators: 12 of 32 registers, 6 of 16
constexpr int64_t kTileTokens = 16;  // prefill tokens per task: each key and value block is read once for them

// acc[GB heads][D] += sum over the n tokens of one block of w_t * v_t, for GB query heads at once (their weights
// at stride Lp), CB vectors of columns at a time, so each value vector is loaded once for GB heads. The sums
// live in memory between blocks; each element still adds w_t * v_t over t in order, from zero, exactly as one
// head alone over the whole context would.
template <int NC, int GB>
inline void weigh_block(const float* w_rows, int64_t Lp, const float* vb, int64_t n, int64_t row, float* acc) {
  constexpr int CB = NC % kColumnVectors == 0 ? kColumnVectors : (NC % 2 == 0 ? 2 : 1);
  constexpr int64_t D = NC * P;
  for (int c0 = 0; c0 < NC; c0 += CB) {
    vec a[GB][CB];
    for (int g = 0; g < GB; ++g)
      for (int c = 0; c < CB; ++c) a[g][c] = vload(acc + g * D + (c0 + c) * P);
    for (int64_t j = 0; j < n; ++j) {
      vec w[GB];
      for (int g = 0; g < GB; ++g) w[g] = vbcast(w_rows + g * Lp + j);
      for (int c = 0; c < CB; ++c) {
        const vec v = vload(vb + j * row + (c0 + c) * P);
        for (int g = 0; g < GB; ++g) a[g][c] = vfma(w[g], v, a[g][c]);
      }
    }
    for (int g = 0; g < GB; ++g)
      for (int c = 0; c < CB; ++c) vstore(acc + g * D + (c0 + c) * P, a[g][c]);
  }
}

// Scratch of one task: score rows, value sums and 1 / sum(w) per (token, query head); scores 64-byte aligned.
struct Scratch {
  std::vector<float> buf;
  std::vector<int64_t> offsets;  // start of each (token, head) score row in `scores`
  float *scores, *acc, *inv;
  void reserve(int64_t NQ, int64_t G, int64_t D, const int64_t* lens) {
    offsets.resize(NQ * G);
    int64_t total = 0;
    for (int64_t i = 0; i < NQ; ++i)
      for (int64_t g = 0; g < G; ++g) {
        offsets[i * G + g] = total;
        total += padded(lens[i]);
      }
    buf.resize(total + kAlign + NQ * G * (D + 1));
    scores = buf.data();
    scores += (kAlign - reinterpret_cast<uintptr_t>(scores) / sizeof(float) % kAlign) % kAlign;
    acc = scores + total;
    inv = acc + NQ * G * D;
    std::fill(acc, acc + NQ * G * D, 0.f);
  }
};

// A tile of NQ tokens of one sequence and one kv head, D = NC * P: token i's G query heads (q + i * qs, written to
// out + i * os) attend to
// its first lens[i] cached tokens, lens ascending. Each key and value block is loaded once for the whole tile, and
// each token's arithmetic is what it would be alone (NQ = 1: a decode).
template <int NC>
void attend_vec(const float* q, int64_t qs, int64_t NQ, int64_t G, const float* k_head, const float* v_head,
                const int64_t* table, const int64_t* lens, int64_t BS, int64_t row, float scale, Scratch& sc,
                float* out, int64_t os) {
  constexpr int64_t D = NC * P;
  const int64_t Lmax = lens[NQ - 1];
  const vec vscale = vbcast(&scale);
  // Scores P keys at a time: each key's products go into a vector of its own, and vsum_lanes adds each vector's
  // lanes by a tree of its own, so a score depends on its query and key alone, never on its neighbours.
  for (int64_t t0 = 0; t0 < Lmax; t0 += BS) {
    const float* kb = k_head + table[t0 / BS] * BS * row;
    const int64_t n = std::min(BS, Lmax - t0);
    if (t0 + BS < Lmax) prefetch_rows(k_head + table[t0 / BS + 1] * BS * row, std::min(BS, Lmax - t0 - BS), row, D);
    for (int64_t j0 = 0; j0 < n; j0 += P) {
      const int64_t pos0 = t0 + j0, cnt = std::min<int64_t>(P, n - j0);
      for (int64_t i = NQ - 1; i >= 0 && lens[i] > pos0; --i) {
        const int64_t valid = std::min(cnt, lens[i] - pos0);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = q + i * qs + g * D;
          vec a[P];
#pragma GCC unroll 16
          for (int j = 0; j < P; ++j) {
            // past the block's last key: reread it (in bounds); that lane's score is dropped
            const float* kr = kb + std::min<int64_t>(j0 + j, n - 1) * row;
            a[j] = vmul(vload(qg), vload(kr));
#pragma GCC unroll 16
            for (int c = 1; c < NC; ++c) a[j] = vfma(vload(qg + c * P), vload(kr + c * P), a[j]);
          }
          const vec s = vmul(vsum_lanes(a), vscale);
          float* dst = sc.scores + sc.offsets[i * G + g] + pos0;
          if (valid == P) {
            vstore(dst, s);
          } else {
            alignas(64) float tmp[P];
            vstore(tmp, s);
            std::copy(tmp, tmp + valid, dst);
          }
        }
      }
    }
  }
  for (int64_t r = 0; r < NQ * G; ++r) sc.inv[r] = softmax_weights(sc.scores + sc.offsets[r], lens[r / G]);
  // Heads of one token sit at consecutive offsets Lp = padded(lens[i]) apart.
  for (int64_t t0 = 0; t0 < Lmax; t0 += BS) {
    const float* vb = v_head + table[t0 / BS] * BS * row;
    if (t0 + BS < Lmax) prefetch_rows(v_head + table[t0 / BS + 1] * BS * row, std::min(BS, Lmax - t0 - BS), row, D);
    for (int64_t i = 0; i < NQ; ++i) {
      const int64_t n = std::min(BS, lens[i] - t0);
      if (n <= 0) continue;
      const int64_t Lp = padded(lens[i]);
      for (int64_t g0 = 0; g0 < G; g0 += kHeadBlock) {
        const float* w = sc.scores + sc.offsets[i * G + g0] + t0;
        float* acc = sc.acc + (i * G + g0) * D;
        const int64_t num = std::min<int64_t>(kHeadBlock, G - g0);
        if (num == 3) weigh_block<NC, 3>(w, Lp, vb, n, row, acc);
        else if (num == 2) weigh_block<NC, 2>(w, Lp, vb, n, row, acc);
        else weigh_block<NC, 1>(w, Lp, vb, n, row, acc);
      }
    }
  }
  for (int64_t i = 0; i < NQ; ++i)
    for (int64_t g = 0; g < G; ++g) {
      const vec vinv = vbcast(sc.inv + i * G + g);
      for (int c = 0; c < NC; ++c)
        vstore(out + i * os + g * D + c * P, vmul(vload(sc.acc + (i * G + g) * D + c * P), vinv));
    }
}

using AttendFn = void (*)(const float*, int64_t, int64_t, int64_t, const float*, const float*, const int64_t*,
                          const int64_t*, int64_t, int64_t, float, Scratch&, float*, int64_t);

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
    case 10: return &attend_vec<10>;  // head size 80 with AVX2
    case 12: return &attend_vec<12>;  // 96 with AVX2
    case 16: return &attend_vec<16>;
    case 32: return &attend_vec<32>;  // 256 (Gemma 3) with AVX2
    default: return nullptr;
  }
}

// Portable loop for other head sizes: one token, its G query heads (qh) over its first L cached tokens.
void attend_portable(const float* qh, int64_t G, int64_t D, const float* k_head, const float* v_head,
                     const int64_t* table, int64_t L, int64_t BS, int64_t row, float scale, Scratch& sc, float* out) {
  float* scores = sc.scores;
  const int64_t Lp = padded(L);
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
  for (int64_t g = 0; g < G; ++g) {
    const float inv = softmax_weights(scores + g * Lp, L);
    float* ag = sc.acc + g * D;
    for (int64_t t0 = 0; t0 < L; t0 += BS) {
      const float* vb = v_head + table[t0 / BS] * BS * row;
      const int64_t n = std::min(BS, L - t0);
      for (int64_t j = 0; j < n; ++j) {
        const float* vr = vb + j * row;
        const float w = scores[g * Lp + t0 + j];
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) ag[i] += w * vr[i];
      }
    }
    for (int64_t i = 0; i < D; ++i) out[g * D + i] = ag[i] * inv;
  }
}

// NQ tokens of one sequence (token i at q + i * qs, its context lens[i], ascending; its output at out + i * os)
// and kv head h.
void attend_tokens(const float* q, int64_t qs, int64_t NQ, int64_t G, int64_t D, const float* k_head,
                   const float* v_head, const int64_t* table, const int64_t* lens, int64_t BS, int64_t row,
                   float scale, AttendFn attend, Scratch& sc, float* out, int64_t os) {
  if (attend != nullptr) {
    sc.reserve(NQ, G, D, lens);
    attend(q, qs, NQ, G, k_head, v_head, table, lens, BS, row, scale, sc, out, os);
    return;
  }
  for (int64_t i = 0; i < NQ; ++i) {
    sc.reserve(1, G, D, lens + i);
    attend_portable(q + i * qs, G, D, k_head, v_head, table, lens[i], BS, row, scale, sc, out + i * os);
  }
}

void check_caches(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad ranks");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
              v_cache.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(k_cache.size(3) == q.size(2) && q.size(1) % k_cache.size(2) == 0, "head shapes do not match");
}

// q (and out) may be views with a row stride of their own (a slice of the fused qkv projection), but each token's
// heads must lie end to end. Returns `out` when given (checked), else a new tensor.
at::Tensor rows_of_heads(at::Tensor& q, const c10::optional<at::Tensor>& out) {
  if (q.stride(2) != 1 || q.stride(1) != q.size(2)) q = q.contiguous();
  if (!out.has_value()) return at::empty(q.sizes(), q.options());
  TORCH_CHECK(out->sizes() == q.sizes() && out->scalar_type() == at::kFloat && out->stride(2) == 1 &&
                  out->stride(1) == q.size(2), "out must be fp32 like q, each token's heads end to end");
  return *out;
}

}  // namespace

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                  at::Tensor block_tables, at::Tensor context_lens, double scale,
                                  c10::optional<at::Tensor> out_arg) {
  check_caches(q, k_cache, v_cache);
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "int64 block tables and lengths");
  auto out = rows_of_heads(q, out_arg);
  block_tables = block_tables.contiguous();
  context_lens = context_lens.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), KV = k_cache.size(2);
  TORCH_CHECK(block_tables.size(0) == B && context_lens.size(0) == B, "batch sizes do not match");
  const int64_t G = H / KV, MAXB = block_tables.size(1);
  const int64_t qs = q.stride(0), os = out.stride(0);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* btp = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const int64_t row = KV * D;  // floats between consecutive tokens of one block
  const AttendFn attend = attend_for(D);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lens[b] >= 1 && (lens[b] + BS - 1) / BS <= MAXB, "context length does not fit the block table");
  at::parallel_for(0, B * KV, KV, [&](int64_t begin, int64_t end) {
    Scratch sc;
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / KV, h = idx % KV;
      attend_tokens(qp + b * qs + h * G * D, qs, 1, G, D, kp + h * D, vp + h * D, btp + b * MAXB, lens + b, BS,
                    row, fscale, attend, sc, op + b * os + h * G * D, os);
    }
  });
  return out;
}

// A prefill chunk of one sequence: token i sits at position start_pos + i and attends to the cached tokens
// 0..start_pos + i (this step's keys are already written). Tokens go in tiles of kTileTokens per task, and each
// token's arithmetic is the decode's, so a token rounds the same whether it was prefilled whole, in chunks,
// behind a cached prefix or decoded. q: [N, H, D]; block_table: [NB] int64 covering start_pos + N tokens.
at::Tensor paged_prefill_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_table,
                                   int64_t start_pos, double scale, c10::optional<at::Tensor> out_arg) {
  check_caches(q, k_cache, v_cache);
  TORCH_CHECK(block_table.dim() == 1 && block_table.scalar_type() == at::kLong, "int64 block table [NB]");
  auto out = rows_of_heads(q, out_arg);
  block_table = block_table.contiguous();
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), KV = k_cache.size(2);
  TORCH_CHECK(start_pos >= 0 && (start_pos + N + BS - 1) / BS <= block_table.size(0),
              "the chunk does not fit the block table");
  const int64_t G = H / KV, qs = q.stride(0), os = out.stride(0);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* table = block_table.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const int64_t row = KV * D;
  const AttendFn attend = attend_for(D);
  std::vector<int64_t> lens(N);
  for (int64_t i = 0; i < N; ++i) lens[i] = start_pos + i + 1;
  const int64_t num_tiles = (N + kTileTokens - 1) / kTileTokens;
  // NOTE: a later tile attends to more keys; taking tiles from both ends in turn gives every thread's
  // contiguous share of the range about the same work.
  at::parallel_for(0, num_tiles * KV, 1, [&](int64_t begin, int64_t end) {
    Scratch sc;
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t turn = idx / KV, h = idx % KV;
      const int64_t tile = turn % 2 == 0 ? turn / 2 : num_tiles - 1 - turn / 2;
      const int64_t i0 = tile * kTileTokens, num = std::min(kTileTokens, N - i0);
      attend_tokens(qp + i0 * qs + h * G * D, qs, num, G, D, kp + h * D, vp + h * D, table, lens.data() + i0,
                    BS, row, fscale, attend, sc, op + i0 * os + h * G * D, os);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU)", py::arg("q"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"),
        py::arg("out") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("paged_prefill_attention", &paged_prefill_attention, "one sequence's prefill chunk over the paged cache (CPU)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_table"), py::arg("start_pos"),
        py::arg("scale"), py::arg("out") = py::none(), py::call_guard<py::gil_scoped_release>());
}
