// Small fused CPU ops of the decoder layer: one pass over memory and one parallel region each, where the torch
// versions take several of both (waking OpenMP threads costs more than the arithmetic at decode sizes).
//
// Rounding matches the torch expressions they replace (serving/models/llama.py, serving/models/rope.py): the
// extension builds without -ffast-math and without FMA contraction, every product and sum rounds as torch's
// does; only RMSNorm's sum of squares adds in another order.
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "vec.h"

namespace {

// NOTE: rows per task are sized so a task holds at least this many elements: below it a second thread costs
// more to wake than it saves.
constexpr int64_t kElementsPerTask = int64_t{1} << 16;

int64_t grain_for(int64_t row_elements) { return std::max<int64_t>(1, kElementsPerTask / row_elements); }

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.stride(1) == 1, name,
              " must be fp32 [T, D] with contiguous rows");
}

}  // namespace

// out = weight * (h * rsqrt(mean(h^2) + eps)) with h = x, or, with `residual`, h = residual += x (in place):
// the residual stream's add fused into the next norm. Returns out [T, D].
at::Tensor rms_norm(at::Tensor x, c10::optional<at::Tensor> residual, at::Tensor weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == x.size(1),
              "weight must be fp32 [D]");
  const int64_t T = x.size(0), D = x.size(1);
  float* rp = nullptr;
  int64_t r_stride = 0;
  if (residual.has_value()) {
    check_rows(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual must match x");
    rp = residual->data_ptr<float>();
    r_stride = residual->stride(0);
  }
  auto out = at::empty({T, D}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t x_stride = x.stride(0);
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, T, grain_for(D), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* h = xp + t * x_stride;
      if (rp != nullptr) {
        float* r = rp + t * r_stride;
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) r[i] += h[i];
        h = r;
      }
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < D; ++i) sum += h[i] * h[i];
      const float inv = 1.0f / std::sqrt(sum / static_cast<float>(D) + feps);
      float* o = op + t * D;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) o[i] = wp[i] * (h[i] * inv);
    }
  });
  return out;
}

// Neox-style rotary embedding in place on the query and key heads of a fused qkv row: for each head,
// (x1, x2) -> (x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2) with cos/sin rows [max_pos, head_dim] taken at
// each token's position (halves duplicated, as serving/models/rope.py stores them).
// qkv: [T, (H + 2 * KV) * head_dim] rows; positions: [T] int64.
void rotary_(at::Tensor qkv, at::Tensor positions, at::Tensor cos, at::Tensor sin, int64_t num_heads,
             int64_t num_kv_heads, int64_t head_dim) {
  check_rows(qkv, "qkv");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == qkv.size(0),
              "positions must be int64 [T]");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && cos.dim() == 2 && cos.size(1) == head_dim &&
                  sin.sizes() == cos.sizes() && sin.is_contiguous() && sin.scalar_type() == at::kFloat,
              "cos and sin must be fp32 [max_positions, head_dim]");
  TORCH_CHECK(head_dim % 2 == 0 && qkv.size(1) >= (num_heads + num_kv_heads) * head_dim, "bad head shapes");
  const int64_t T = qkv.size(0), half = head_dim / 2, rotated = (num_heads + num_kv_heads) * head_dim;
  const int64_t stride = qkv.stride(0), max_pos = cos.size(0);
  float* qp = qkv.data_ptr<float>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, T, grain_for(rotated), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos, "position ", pos[t], " is outside the rotary table");
      const float* c = cp + pos[t] * head_dim;
      const float* s = sp + pos[t] * head_dim;
      for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
        float* x1 = qp + t * stride + h * head_dim;
        float* x2 = x1 + half;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = x1[i], b = x2[i];
          x1[i] = a * c[i] + (-b) * s[i];
          x2[i] = b * c[half + i] + a * s[half + i];
        }
      }
    }
  });
}

// out[t, i] = silu(g) * u with g = gate_up[t, i], u = gate_up[t, I + i]: the SwiGLU of the fused gate+up projection
// (gate columns first), in one pass and one allocation instead of torch's three. silu(g) = g / (1 + e^-g) as
// torch's kernel computes it, the exponential from vec.h (within 2 ulp of torch's). gate_up: [T, 2I] -> [T, I].
at::Tensor silu_mul(at::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even number of columns");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2, stride = gate_up.stride(0);
  auto out = at::empty({T, I}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float one = 1.f;
  const vec vone = vbcast(&one), vzero_ = vzero();
  at::parallel_for(0, T, grain_for(2 * I), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* g = gp + t * stride;
      const float* u = g + I;
      float* o = op + t * I;
      int64_t i = 0;
      for (; i + P <= I; i += P) {
        const vec gv = vload(g + i);
        const vec e = vexp(vsub(vzero_, gv));
        vstore(o + i, vmul(vdiv(gv, vadd(vone, e)), vload(u + i)));
      }
      for (; i < I; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
  return out;
}

// k, v: [T, KV * D] rows (views into qkv); caches: [num_blocks * block_size, KV * D] flat; slots: [T] int64.
void write_kv(at::Tensor k, at::Tensor v, at::Tensor k_cache, at::Tensor v_cache,
              at::Tensor slot_mapping) {
  check_rows(k, "k");
  check_rows(v, "v");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes(), "caches must be contiguous fp32 and alike");
  const int64_t T = k.size(0), W = k.size(1), num_slots = k_cache.numel() / W;
  TORCH_CHECK(v.sizes() == k.sizes() && k_cache.numel() % W == 0, "k, v and the cache rows do not match");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() && slot_mapping.numel() == T,
              "slot_mapping must be int64 [T]");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  at::parallel_for(0, T, grain_for(2 * W), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "slot ", slots[t], " is outside the cache");
      std::copy(kp + t * k.stride(0), kp + t * k.stride(0) + W, kc + slots[t] * W);
      std::copy(vp + t * v.stride(0), vp + t * v.stride(0) + W, vc + slots[t] * W);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm, optionally fused with the residual add (in place)", py::arg("x"),
        py::arg("residual"), py::arg("weight"), py::arg("eps"));
  m.def("rotary_", &rotary_, "neox rotary embedding in place on a fused qkv tensor");
  m.def("write_kv", &write_kv, "scatter this step's keys and values into their cache slots");
  m.def("silu_mul", &silu_mul, "silu(gate) * up over the fused gate+up projection's rows");
}
