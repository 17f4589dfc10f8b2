// Attention of one query per sequence over its KV cache, for CPU decoding (built with cpu_gemv.cpp
// into one library by torch_backend/cpu_kernels.py, which also declares the operator's schema there).

#include "cpu_kernels.h"

namespace llama4_cpu {
namespace {

// The slots from the first to the last visible one, [lo, hi); every slot where nothing is visible.
inline std::pair<int64_t, int64_t> visible_span(const bool* mask, int64_t S) {
  if (mask == nullptr) return {0, S};
  int64_t lo = 0, hi = S;
  while (lo < S && !mask[lo]) ++lo;
  while (hi > lo && !mask[hi - 1]) --hi;
  return lo < hi ? std::pair<int64_t, int64_t>{lo, hi} : std::pair<int64_t, int64_t>{0, S};
}

// One query per sequence against its cached keys, as `torch_backend.attention.decode_attention`
// computes it (float32: scores of q * scale, softmax, probabilities times values): q [B, H, d], k and v
// [B, KV, S, d] (unit stride along d), `mask` [B, S] (true: may attend) or undefined (all may) ->
// [B, H * d] in q's dtype. Query heads h read kv head h / (H / KV). One task per (sequence, kv head).
// Only the slots between the first and the last visible one are read: a decode step's caches reserve
// slots ahead (a compiled step attends over all of them, masked), and a hidden key's probability is an
// exact zero, so leaving it out changes no number.
template <typename T>
void attend_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* mask, int64_t mask_ld,
                 double scale, float* out) {
  const int64_t B = q.size(0), H = q.size(1), d = q.size(2), KV = k.size(1), S = k.size(2), G = H / KV;
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2),
                vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  constexpr float hidden = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(G * d), scores(G * S), acc(G * d), row(d);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KV, kv = task % KV;
      const bool* mb = mask == nullptr ? nullptr : mask + b * mask_ld;
      const auto [lo, hi] = visible_span(mb, S);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < d; ++i)
          qs[g * d + i] = widen(qp[b * qs0 + (kv * G + g) * qs1 + i]) * static_cast<float>(scale);
      const T* kb = kp + b * ks0 + kv * ks1;
      const T* vb = vp + b * vs0 + kv * vs1;
#ifdef LLAMA4_AVX512
      if (d % L == 0 && d <= 8 * L) {  // vectors: a key or value row in at most 8 registers
        const int64_t nv = d / L;
        // Key j always adds into lane j % 16 (the last, partial vector masked), so keys hidden by the
        // mask add exact zeros: a masked row over a longer cache sums exactly as the visible keys alone.
        // The vectors that hold [lo, hi) keep those lanes; their slots outside it score -inf.
        const int64_t first = lo / L * L, last = std::min(S, (hi + L - 1) / L * L);
        for (int64_t g = 0; g < G; ++g) {
          std::fill(scores.data() + g * S + first, scores.data() + g * S + lo, hidden);
          std::fill(scores.data() + g * S + hi, scores.data() + g * S + last, hidden);
        }
        for (int64_t j = lo; j < hi; ++j) {
          if (mb != nullptr && !mb[j]) {
            for (int64_t g = 0; g < G; ++g) scores[g * S + j] = hidden;
            continue;
          }
          __m512 kr[8];
          for (int64_t i = 0; i < nv; ++i) kr[i] = load16(kb + j * ks2 + i * L);
          for (int64_t g = 0; g < G; ++g) {
            __m512 dot = _mm512_mul_ps(_mm512_loadu_ps(qs.data() + g * d), kr[0]);
            for (int64_t i = 1; i < nv; ++i) dot = _mm512_fmadd_ps(_mm512_loadu_ps(qs.data() + g * d + i * L), kr[i], dot);
            scores[g * S + j] = _mm512_reduce_add_ps(dot);
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          float* sc = scores.data() + g * S;
          const float top = *std::max_element(sc + lo, sc + hi);
          __m512 total = _mm512_setzero_ps();
          for (int64_t j = first; j < last; j += L) {
            const __mmask16 live = last - j >= L ? __mmask16(0xFFFF) : __mmask16((1u << (last - j)) - 1);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, sc + j), _mm512_set1_ps(top)));
            _mm512_mask_storeu_ps(sc + j, live, e);
            total = _mm512_add_ps(total, _mm512_maskz_mov_ps(live, e));
          }
          const __m512 sum = _mm512_set1_ps(_mm512_reduce_add_ps(total));
          for (int64_t j = first; j < last; j += L) {
            const __mmask16 live = last - j >= L ? __mmask16(0xFFFF) : __mmask16((1u << (last - j)) - 1);
            _mm512_mask_storeu_ps(sc + j, live, _mm512_div_ps(_mm512_maskz_loadu_ps(live, sc + j), sum));
          }
        }
        for (int64_t g = 0; g < G; ++g) {  // a head's output in registers; the value rows stay in cache
          __m512 a[8];
          for (int64_t i = 0; i < nv; ++i) a[i] = _mm512_setzero_ps();
          const float* sc = scores.data() + g * S;
          for (int64_t j = lo; j < hi; ++j) {
            if (mb != nullptr && !mb[j]) continue;
            const __m512 pj = _mm512_set1_ps(sc[j]);
            for (int64_t i = 0; i < nv; ++i) a[i] = _mm512_fmadd_ps(pj, load16(vb + j * vs2 + i * L), a[i]);
          }
          for (int64_t i = 0; i < nv; ++i) _mm512_storeu_ps(out + (b * H + kv * G + g) * d + i * L, a[i]);
        }
        continue;
      }
#endif
      for (int64_t j = lo; j < hi; ++j) {
        const bool visible = mb == nullptr || mb[j];
        if (visible)
          for (int64_t i = 0; i < d; ++i) row[i] = widen(kb[j * ks2 + i]);
        for (int64_t g = 0; g < G; ++g) {
          if (!visible) {
            scores[g * S + j] = hidden;
            continue;
          }
          float lanes[L] = {};
          int64_t i = 0;
          for (; i + L <= d; i += L)
            for (int l = 0; l < L; ++l) lanes[l] += qs[g * d + i + l] * row[i + l];
          float dot = lane_sum(lanes);
          for (; i < d; ++i) dot += qs[g * d + i] * row[i];
          scores[g * S + j] = dot;
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t g = 0; g < G; ++g) {  // softmax over the keys
        float* sc = scores.data() + g * S;
        const float top = *std::max_element(sc + lo, sc + hi);
        float total = 0.f;
        for (int64_t j = lo; j < hi; ++j) total += (sc[j] = std::exp(sc[j] - top));
        for (int64_t j = lo; j < hi; ++j) sc[j] /= total;
      }
      for (int64_t j = lo; j < hi; ++j) {
        if (mb != nullptr && !mb[j]) continue;
        for (int64_t i = 0; i < d; ++i) row[i] = widen(vb[j * vs2 + i]);
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * S + j];
          for (int64_t i = 0; i < d; ++i) acc[g * d + i] += p * row[i];
        }
      }
      for (int64_t g = 0; g < G; ++g)
        std::memcpy(out + (b * H + kv * G + g) * d, acc.data() + g * d, d * 4);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.sizes() == k.sizes() && k.size(0) == q.size(0) &&
                  k.size(3) == q.size(2) && q.size(1) % k.size(1) == 0,
              "cpu_kernels: decode_attention takes q [B, H, d] and k, v [B, KV, S, d], got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.stride(2) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && q.scalar_type() == k.scalar_type() &&
                  q.scalar_type() == v.scalar_type(),
              "cpu_kernels: decode_attention needs one dtype and unit stride along d");
  const bool* m = nullptr;
  int64_t mask_ld = 0;
  at::Tensor mask_c;
  if (mask.has_value() && mask->defined()) {
    mask_c = mask->to(at::kBool).contiguous();
    TORCH_CHECK(mask_c.dim() == 2 && mask_c.size(0) == q.size(0) && mask_c.size(1) == k.size(2),
                "cpu_kernels: mask must be [B, S], got ", mask_c.sizes());
    m = mask_c.data_ptr<bool>();
    mask_ld = mask_c.size(1);
  }
  const int64_t B = q.size(0), H = q.size(1), d = q.size(2);
  Result out(B, H * d, q.options());
  with_float_data(q, "cpu_kernels: decode_attention takes", [&](const auto* p) {
    attend_rows<std::remove_cv_t<std::remove_pointer_t<decltype(p)>>>(q, k, v, m, mask_ld, scale, out.data);
  });
  return out.done();
}

}  // namespace
}  // namespace llama4_cpu

TORCH_LIBRARY_IMPL(llama4_cpu, CPU, m) { m.impl("decode_attention", &llama4_cpu::decode_attention); }
