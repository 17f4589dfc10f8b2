// Shared by the project's CPU kernels (cpu_gemv.cpp, cpu_attention.cpp; built and loaded by
// torch_backend/cpu_kernels.py): includes, float conversions, AVX-512 helpers, the output tensor.

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define LLAMA4_AVX512 1
#endif

namespace llama4_cpu {

constexpr int L = 16;  // lanes of one accumulator

inline float widen(float v) { return v; }
inline float widen(c10::BFloat16 v) { return static_cast<float>(v); }
inline float widen(c10::Half v) { return static_cast<float>(v); }

#ifdef LLAMA4_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// e^x for 16 floats: x = n ln2 + r (ln2 in two parts, |r| <= ln2 / 2), e^r by its degree-7 Taylor
// polynomial (error below 2^-24 relative on that range), scaled by 2^n (VSCALEFPS: 0 for -inf, inf
// past the range). Within 2 ulp of expf.
inline __m512 exp16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  // -inf - (-inf) style NaNs pass through; x = -inf gives n = -inf and scalef(., -inf) = 0
  const __m512 out = _mm512_scalef_ps(p, n);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ), out,
                              _mm512_setzero_ps());
}
#endif

inline float lane_sum(const float* a) {
  float s = 0.f;
  for (int j = 0; j < L; ++j) s += a[j];
  return s;
}

// f(p) with p t's data as `const float*`, `const c10::BFloat16*` or `const c10::Half*`; any other dtype is an
// error whose message starts with `what` ("cpu_kernels: x must be").
template <typename F>
void with_float_data(const at::Tensor& t, const char* what, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: f(t.data_ptr<float>()); break;
    case at::kBFloat16: f(t.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: f(t.data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, what, " float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

// A kernel's result [M, N] in the input's dtype: the kernel writes float32 to `data`, the result's own
// storage for float32 (no copy), else a staging buffer that `done()` rounds into the result.
struct Result {
  at::Tensor out;
  std::vector<float> staging;
  float* data;
  Result(int64_t M, int64_t N, const at::TensorOptions& options) : out(at::empty({M, N}, options)) {
    if (out.scalar_type() == at::kFloat) {
      data = out.data_ptr<float>();
    } else {
      staging.resize(M * N);
      data = staging.data();
    }
  }
  at::Tensor done() {
    auto narrow = [&](auto* o) {  // bfloat16 / float16: rounded to nearest even
      using T = std::remove_pointer_t<decltype(o)>;
      for (size_t i = 0; i < staging.size(); ++i) o[i] = static_cast<T>(staging[i]);
    };
    if (out.scalar_type() == at::kBFloat16) narrow(out.data_ptr<c10::BFloat16>());
    if (out.scalar_type() == at::kHalf) narrow(out.data_ptr<c10::Half>());
    return out;
  }
};

// task(t) for t in [0, tasks), each thread taking the next task until none is left (for tasks of
// different costs, such as runs of rows of different lengths).
template <typename F>
void for_tasks(int64_t tasks, const F& task) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(tasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t t = next++; t < tasks; t = next++) task(t);
  });
}

// A run of rows [row, row + rows) of x against entry `entry` of a stack of weights.
struct Segment {
  int64_t row, rows, entry;
};

// The non-empty runs of `counts` (int64 [<= E]: rows per entry, in entry order), checked to add up to M rows.
inline std::vector<Segment> runs_of(const at::Tensor& counts, int64_t E, int64_t M) {
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) <= E && counts.scalar_type() == at::kLong && counts.is_contiguous(),
              "cpu_kernels: counts must be contiguous int64 with at most ", E, " entries (rows per entry), got ",
              counts.scalar_type(), " ", counts.sizes());
  const int64_t* cp = counts.data_ptr<int64_t>();
  std::vector<Segment> runs;
  int64_t row = 0;
  for (int64_t e = 0; e < counts.size(0); ++e) {
    TORCH_CHECK(cp[e] >= 0, "cpu_kernels: counts[", e, "] = ", cp[e], " is negative");
    if (cp[e] > 0) runs.push_back({row, cp[e], e});
    row += cp[e];
  }
  TORCH_CHECK(row == M, "cpu_kernels: counts add up to ", row, " rows, x has ", M);
  return runs;
}

}  // namespace llama4_cpu
