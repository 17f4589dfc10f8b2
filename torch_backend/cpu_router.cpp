// The router of a mixture-of-experts layer for a few tokens (decoding): each token's expert logits
// (x [T, D] against the router weight [E, D], float32 accumulation, rounded to x's dtype as a linear
// layer's output is) and its top-k experts, largest first, in one call.
//
// Replaces the step's router product (a GEMM library call) and its top-k (a sort operator), each a
// call with its own dispatch and allocations, where the work is E * D multiply-adds per token.

#include "cpu_kernels.h"

#include <ATen/ops/empty.h>

#include <tuple>

namespace llama4_cpu {
namespace {

// a before b in the top-k order: the larger logit first (NaN above every number, as torch.topk
// ranks it), the lower expert id on ties
inline bool ranks_before(float a, int64_t ia, float b, int64_t ib) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

template <typename T>
float dot(const T* x, const T* w, int64_t D) {
#ifdef LLAMA4_AVX512
  if (D % L == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += L) acc = _mm512_fmadd_ps(load16(x + d), load16(w + d), acc);
    return _mm512_reduce_add_ps(acc);
  }
#endif
  float acc[L] = {};
  int64_t d = 0;
  for (; d + L <= D; d += L)
    for (int j = 0; j < L; ++j) acc[j] += widen(x[d + j]) * widen(w[d + j]);
  float s = lane_sum(acc);
  for (; d < D; ++d) s += widen(x[d]) * widen(w[d]);
  return s;
}

// logits[e] = x . w[:, e] for a weight stored input-major (w^T [D, E] contiguous, as float32 CPU storage
// keeps it), one pass over it: each input adds its multiples of a row of E weights.
template <typename T>
void column_dots(const T* x, const T* wt, int64_t D, int64_t E, float* logits) {
  std::fill(logits, logits + E, 0.f);
  for (int64_t d = 0; d < D; ++d) {
    const float xd = widen(x[d]);
    const T* row = wt + d * E;
    int64_t e = 0;
#ifdef LLAMA4_AVX512
    for (; e + L <= E; e += L)
      _mm512_storeu_ps(logits + e, _mm512_fmadd_ps(_mm512_set1_ps(xd), load16(row + e), _mm512_loadu_ps(logits + e)));
#endif
    for (; e < E; ++e) logits[e] = std::fma(xd, widen(row[e]), logits[e]);
  }
}

std::tuple<at::Tensor, at::Tensor> router_topk(const at::Tensor& x, const at::Tensor& w, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "cpu_kernels: router_topk takes x [T, D] and w [E, D], got ",
              x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "cpu_kernels: router_topk: x and w must share a dtype, got ",
              x.scalar_type(), " and ", w.scalar_type());
  const int64_t T = x.size(0), D = x.size(1), E = w.size(0);
  TORCH_CHECK(k >= 1 && k <= E, "cpu_kernels: router_topk: k = ", k, " must be in [1, ", E, "]");
  const at::Tensor xc = x.contiguous();
  // the weight as stored: rows [E, D], or input-major (w^T [D, E] contiguous)
  const bool input_major = w.stride(0) == 1 && w.stride(1) == E && E > 1;
  const at::Tensor wc = input_major ? w : w.contiguous();
  at::Tensor values = at::empty({T, k}, x.options());
  at::Tensor ids = at::empty({T, k}, x.options().dtype(at::kLong));
  int64_t* idp = ids.data_ptr<int64_t>();
  std::vector<float> logits(E);
  std::vector<int64_t> order(E);
  auto run = [&](const auto* xp) {
    using T_ = std::remove_cv_t<std::remove_pointer_t<decltype(xp)>>;
    const T_* wp = static_cast<const T_*>(wc.data_ptr());
    T_* vp = static_cast<T_*>(values.data_ptr());
    for (int64_t t = 0; t < T; ++t) {
      if (input_major) {
        column_dots(xp + t * D, wp, D, E, logits.data());
      } else {
        for (int64_t e = 0; e < E; ++e) logits[e] = dot(xp + t * D, wp + e * D, D);
      }
      for (int64_t e = 0; e < E; ++e) {
        // rounded to x's dtype first, as the linear layer's output is: the order is that of those values
        logits[e] = widen(static_cast<T_>(logits[e]));
        order[e] = e;
      }
      std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
        return ranks_before(logits[a], a, logits[b], b);
      });
      for (int64_t j = 0; j < k; ++j) {
        vp[t * k + j] = static_cast<T_>(logits[order[j]]);
        idp[t * k + j] = order[j];
      }
    }
  };
  with_float_data(xc, "cpu_kernels: router_topk: x must be", run);
  return {values, ids};
}

}  // namespace
}  // namespace llama4_cpu

TORCH_LIBRARY_FRAGMENT(llama4_cpu, m) {
  m.def("router_topk(Tensor x, Tensor w, int k) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llama4_cpu, CPU, m) {
  m.impl("router_topk", &llama4_cpu::router_topk);
}
