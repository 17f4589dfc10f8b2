// Matrix-vector products for CPU decoding: a few rows of x [M, K] against a weight [N, K] stored in
// bfloat16, float16, or MLX's affine 8-bit / 4-bit groups (w = q * scale + bias per group of G inputs).
//
// Each weight is read once from memory for all M rows, four output rows at a time (so every loaded
// input value serves four weights), accumulating in float32 in 16-lane arrays the compiler maps onto
// the machine's vectors. Quantized groups follow MLX's own arithmetic: y = sum_g(s_g * sum(q x) +
// b_g * sum(x)), the inputs' group sums taken once per call.
//
// Shapes: M rows of x, N outputs, K inputs, G group size. Layouts (made by torch_backend/cpu_kernels.py):
// - bfloat16 / float16: w [N, K], rows `ldw` elements apart, inputs contiguous;
// - 8 bits: codes [N, K] uint8;
// - 4 bits: codes [N, K/2] uint8, each block of 32 inputs in 16 bytes: byte j holds input j in its
//   low nibble and input j + 16 in its high one (so a block unpacks into two runs of 16 inputs);
// - scales and biases interleaved [N, K/G, 2] in float32, bfloat16 or float16.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define LLAMA4_AVX512 1
#endif

namespace {

constexpr int L = 16;  // lanes of one accumulator
constexpr int RB = 4;  // output rows per block
constexpr int MB = 4;  // rows of x per pass over a block
// Rows ahead that a block prefetches: a thread streams its rows four at a time, each only K inputs
// long, too short a run for the hardware prefetcher (bfloat16 on a 2-core x86 CPU: 14.8 GB/s without,
// 20.7 with 4 rows ahead, 20.2 with 8, 17.2 with 2).
constexpr int AHEAD = 4;

inline float widen(float v) { return v; }
inline float widen(c10::BFloat16 v) { return static_cast<float>(v); }
inline float widen(c10::Half v) { return static_cast<float>(v); }

// Weight decoders: write inputs [k, k + L) of one output row as float32 into `out`.
struct BF16Rows {
  const uint16_t* w;
  int64_t ldw;
  inline const void* at(int64_t n, int64_t k) const { return w + n * ldw + k; }
  inline void decode(int64_t n, int64_t k, float* out) const {
    const uint16_t* p = w + n * ldw + k;
    for (int j = 0; j < L; ++j) {
      uint32_t bits = static_cast<uint32_t>(p[j]) << 16;  // bfloat16 is the top half of a float32
      std::memcpy(out + j, &bits, 4);
    }
  }
};

struct HalfRows {
  const c10::Half* w;
  int64_t ldw;
  inline const void* at(int64_t n, int64_t k) const { return w + n * ldw + k; }
  inline void decode(int64_t n, int64_t k, float* out) const {
    const c10::Half* p = w + n * ldw + k;
    for (int j = 0; j < L; ++j) out[j] = static_cast<float>(p[j]);
  }
};

struct Q8Rows {
  const uint8_t* q;
  int64_t ldq;
  inline const void* at(int64_t n, int64_t k) const { return q + n * ldq + k; }
  inline void decode(int64_t n, int64_t k, float* out) const {
    const uint8_t* p = q + n * ldq + k;
    for (int j = 0; j < L; ++j) out[j] = static_cast<float>(p[j]);
  }
};

// 4 bits: decode() is called for k at the start of a 32-input block and fills 2L values.
struct Q4Rows {
  const uint8_t* q;
  int64_t ldq;
  inline const void* at(int64_t n, int64_t k) const { return q + n * ldq + k / 2; }
  inline void decode(int64_t n, int64_t k, float* out) const {
    const uint8_t* p = q + n * ldq + k / 2;
    for (int j = 0; j < L; ++j) out[j] = static_cast<float>(p[j] & 15);
    for (int j = 0; j < L; ++j) out[L + j] = static_cast<float>(p[j] >> 4);
  }
};

#ifdef LLAMA4_AVX512
// The same decoders on AVX-512 vectors: `decode_v` fills Step / 16 vectors of 16 float32 inputs.
inline void decode_v(const BF16Rows& w, int64_t n, int64_t k, __m512* out) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.w + n * w.ldw + k));
  out[0] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void decode_v(const HalfRows& w, int64_t n, int64_t k, __m512* out) {
  out[0] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.w + n * w.ldw + k)));
}
inline void decode_v(const Q8Rows& w, int64_t n, int64_t k, __m512* out) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.q + n * w.ldq + k));
  out[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
}
inline void decode_v(const Q4Rows& w, int64_t n, int64_t k, __m512* out) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.q + n * w.ldq + k / 2));
  const __m512i v = _mm512_cvtepu8_epi32(b);
  out[0] = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
  out[1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
}
#endif

inline float lane_sum(const float* a) {
  float s = 0.f;
  for (int j = 0; j < L; ++j) s += a[j];
  return s;
}

// Float weights: rows [n0, n0 + R) of y for rows [m0, m0 + Mb) of x.
template <int R, int Mb, typename Rows>
void float_block(const Rows& w, const float* x, int64_t K, int64_t n0, int64_t m0, float* y, int64_t N) {
#ifdef LLAMA4_AVX512
  __m512 acc[R][Mb];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < Mb; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += L) {
    __m512 xv[Mb];
    for (int m = 0; m < Mb; ++m) xv[m] = _mm512_loadu_ps(x + (m0 + m) * K + k);
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(static_cast<const char*>(w.at(n0 + r + AHEAD, k)), _MM_HINT_T0);
      __m512 wv;
      decode_v(w, n0 + r, k, &wv);
      for (int m = 0; m < Mb; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < Mb; ++m) y[(m0 + m) * N + n0 + r] = _mm512_reduce_add_ps(acc[r][m]);
#else
  float acc[R][Mb][L] = {};
  float wv[L];
  for (int64_t k = 0; k < K; k += L) {
    for (int r = 0; r < R; ++r) {
      w.decode(n0 + r, k, wv);
      for (int m = 0; m < Mb; ++m) {
        const float* xm = x + (m0 + m) * K + k;
        for (int j = 0; j < L; ++j) acc[r][m][j] += wv[j] * xm[j];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < Mb; ++m) y[(m0 + m) * N + n0 + r] = lane_sum(acc[r][m]);
#endif
}

// Quantized weights: per group the partial sum of q * x, scaled into the row's total; the biases meet
// the inputs' group sums `xs` [M, K/G].
template <int R, int Mb, int Step, typename Rows, typename S>
void quant_block(const Rows& w, const S* sb, const float* x, const float* xs, int64_t K, int64_t G,
                 int64_t n0, int64_t m0, float* y, int64_t N) {
  const int64_t groups = K / G;
#ifdef LLAMA4_AVX512
  constexpr int V = Step / L;  // vectors per decode
  __m512 total[R][Mb];
  float bias[R][Mb] = {};
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < Mb; ++m) total[r][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    for (int r = 0; r < R; ++r) {
      __m512 part[Mb];
      for (int m = 0; m < Mb; ++m) part[m] = _mm512_setzero_ps();
      for (int64_t k = g * G; k < (g + 1) * G; k += Step) {
        _mm_prefetch(static_cast<const char*>(w.at(n0 + r + AHEAD, k)), _MM_HINT_T0);
        __m512 wv[V];
        decode_v(w, n0 + r, k, wv);
        for (int m = 0; m < Mb; ++m)
          for (int v = 0; v < V; ++v)
            part[m] = _mm512_fmadd_ps(wv[v], _mm512_loadu_ps(x + (m0 + m) * K + k + v * L), part[m]);
      }
      const S* p = sb + ((n0 + r) * groups + g) * 2;
      const __m512 s = _mm512_set1_ps(widen(p[0]));
      const float b = widen(p[1]);
      for (int m = 0; m < Mb; ++m) {
        total[r][m] = _mm512_fmadd_ps(s, part[m], total[r][m]);
        bias[r][m] += b * xs[(m0 + m) * groups + g];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < Mb; ++m) y[(m0 + m) * N + n0 + r] = _mm512_reduce_add_ps(total[r][m]) + bias[r][m];
#else
  float total[R][Mb][L] = {};
  float bias[R][Mb] = {};
  float wv[Step];
  for (int64_t g = 0; g < groups; ++g) {
    for (int r = 0; r < R; ++r) {
      float part[Mb][L] = {};
      for (int64_t k = g * G; k < (g + 1) * G; k += Step) {
        w.decode(n0 + r, k, wv);
        for (int m = 0; m < Mb; ++m) {
          const float* xm = x + (m0 + m) * K + k;
          for (int j = 0; j < Step; ++j) part[m][j % L] += wv[j] * xm[j];
        }
      }
      const S* p = sb + ((n0 + r) * groups + g) * 2;
      const float s = widen(p[0]), b = widen(p[1]);
      for (int m = 0; m < Mb; ++m) {
        for (int j = 0; j < L; ++j) total[r][m][j] += s * part[m][j];
        bias[r][m] += b * xs[(m0 + m) * groups + g];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < Mb; ++m) y[(m0 + m) * N + n0 + r] = lane_sum(total[r][m]) + bias[r][m];
#endif
}

// Runs `block<R, Mb>(n0, m0)` over all output rows (split over threads) and all rows of x.
template <typename Block>
void over_rows(int64_t M, int64_t N, int64_t bytes_per_row, const Block& block) {
  const int64_t blocks = (N + RB - 1) / RB;
  // about 64 KB of weights per task at least: smaller products run on one thread
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, bytes_per_row * RB));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * RB;
      for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int64_t mb = std::min<int64_t>(MB, M - m0);
        if (n0 + RB <= N) {
          block(RB, mb, n0, m0);
        } else {  // the last, partial block: row by row
          for (int64_t n = n0; n < N; ++n) block(1, mb, n, m0);
        }
      }
    }
  });
}

// x [M, K] in float32, contiguous (a copy unless it already is).
std::vector<float> float_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "cpu_kernels: x must be [M, ", K, "], got ", x.sizes());
  TORCH_CHECK(x.stride(1) == 1, "cpu_kernels: x must have contiguous rows");
  std::vector<float> out(x.size(0) * K);
  for (int64_t m = 0; m < x.size(0); ++m) {
    float* o = out.data() + m * K;
    switch (x.scalar_type()) {
      case at::kFloat: std::memcpy(o, x.data_ptr<float>() + m * x.stride(0), K * 4); break;
      case at::kBFloat16: {
        const c10::BFloat16* p = x.data_ptr<c10::BFloat16>() + m * x.stride(0);
        for (int64_t k = 0; k < K; ++k) o[k] = static_cast<float>(p[k]);
        break;
      }
      case at::kHalf: {
        const c10::Half* p = x.data_ptr<c10::Half>() + m * x.stride(0);
        for (int64_t k = 0; k < K; ++k) o[k] = static_cast<float>(p[k]);
        break;
      }
      default: TORCH_CHECK(false, "cpu_kernels: x must be float32, bfloat16 or float16, got ", x.scalar_type());
    }
  }
  return out;
}

// The float32 results [M, N] as a tensor in x's dtype.
at::Tensor finish(const std::vector<float>& y, const at::Tensor& x, int64_t N) {
  at::Tensor out = at::empty({x.size(0), N}, x.options());
  const int64_t n = static_cast<int64_t>(y.size());
  switch (x.scalar_type()) {
    case at::kFloat: std::memcpy(out.data_ptr<float>(), y.data(), n * 4); break;
    case at::kBFloat16: {
      c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
      for (int64_t i = 0; i < n; ++i) o[i] = c10::BFloat16(y[i]);  // rounded to nearest even
      break;
    }
    default: {
      c10::Half* o = out.data_ptr<c10::Half>();
      for (int64_t i = 0; i < n; ++i) o[i] = c10::Half(y[i]);
    }
  }
  return out;
}

#define LLAMA4_ROWS(R_, MB_, CALL)                 \
  do {                                             \
    if ((R_) == RB) {                              \
      switch (MB_) {                               \
        case 1: CALL(RB, 1); break;                \
        case 2: CALL(RB, 2); break;                \
        case 3: CALL(RB, 3); break;                \
        default: CALL(RB, 4); break;               \
      }                                            \
    } else {                                       \
      switch (MB_) {                               \
        case 1: CALL(1, 1); break;                 \
        case 2: CALL(1, 2); break;                 \
        case 3: CALL(1, 3); break;                 \
        default: CALL(1, 4); break;                \
      }                                            \
    }                                              \
  } while (0)

// y [M, N] = x [M, K] @ w.T for a bfloat16 / float16 w [N, K] (unit stride along K, K % 16 == 0).
at::Tensor reduced_gemv(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1, "cpu_kernels: w must be [N, K] with contiguous rows");
  const int64_t N = w.size(0), K = w.size(1), M = x.size(0);
  TORCH_CHECK(K % L == 0, "cpu_kernels: K must be a multiple of ", L, ", got ", K);
  const std::vector<float> xf = float_x(x, K);
  std::vector<float> y(M * N);
  const float* xp = xf.data();
  float* yp = y.data();
  auto run = [&](const auto& rows) {
    over_rows(M, N, K * 2, [&](int r, int64_t mb, int64_t n0, int64_t m0) {
#define LLAMA4_FLOAT(R, Mb) float_block<R, Mb>(rows, xp, K, n0, m0, yp, N)
      LLAMA4_ROWS(r, mb, LLAMA4_FLOAT);
#undef LLAMA4_FLOAT
    });
  };
  if (w.scalar_type() == at::kBFloat16) {
    run(BF16Rows{reinterpret_cast<const uint16_t*>(w.data_ptr()), w.stride(0)});
  } else {
    TORCH_CHECK(w.scalar_type() == at::kHalf, "cpu_kernels: w must be bfloat16 or float16, got ", w.scalar_type());
    run(HalfRows{w.data_ptr<c10::Half>(), w.stride(0)});
  }
  return finish(y, x, N);
}

// y [M, N] = x [M, K] @ w.T for MLX's affine w, from codes (layout above) and scales|biases [N, K/G, 2].
at::Tensor quant_gemv(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& sb, int64_t bits, int64_t G) {
  TORCH_CHECK(bits == 4 || bits == 8, "cpu_kernels: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(codes.dim() == 2 && codes.stride(1) == 1 && codes.scalar_type() == at::kByte,
              "cpu_kernels: codes must be uint8 [N, K * bits / 8] with contiguous rows");
  const int64_t N = codes.size(0), K = codes.size(1) * 8 / bits, M = x.size(0);
  TORCH_CHECK(G % (2 * L) == 0 && K % G == 0, "cpu_kernels: group size ", G, " must divide K = ", K,
              " and be a multiple of ", 2 * L);
  TORCH_CHECK(sb.is_contiguous() && sb.dim() == 3 && sb.size(0) == N && sb.size(1) == K / G && sb.size(2) == 2,
              "cpu_kernels: scales|biases must be contiguous [", N, ", ", K / G, ", 2], got ", sb.sizes());
  const std::vector<float> xf = float_x(x, K);
  std::vector<float> xs(M * (K / G), 0.f);  // the inputs' group sums [M, K/G]
  for (int64_t i = 0; i < M * K; ++i) xs[i / G] += xf[i];
  std::vector<float> y(M * N);
  const float *xp = xf.data(), *xsp = xs.data();
  float* yp = y.data();
  auto run = [&](const auto* s) {
    using S = std::remove_cv_t<std::remove_pointer_t<decltype(s)>>;
    if (bits == 8) {
      const Q8Rows rows{codes.data_ptr<uint8_t>(), codes.stride(0)};
      over_rows(M, N, K, [&](int r, int64_t mb, int64_t n0, int64_t m0) {
#define LLAMA4_Q8(R, Mb) quant_block<R, Mb, L, Q8Rows, S>(rows, s, xp, xsp, K, G, n0, m0, yp, N)
        LLAMA4_ROWS(r, mb, LLAMA4_Q8);
#undef LLAMA4_Q8
      });
    } else {
      const Q4Rows rows{codes.data_ptr<uint8_t>(), codes.stride(0)};
      over_rows(M, N, K / 2, [&](int r, int64_t mb, int64_t n0, int64_t m0) {
#define LLAMA4_Q4(R, Mb) quant_block<R, Mb, 2 * L, Q4Rows, S>(rows, s, xp, xsp, K, G, n0, m0, yp, N)
        LLAMA4_ROWS(r, mb, LLAMA4_Q4);
#undef LLAMA4_Q4
      });
    }
  };
  switch (sb.scalar_type()) {
    case at::kFloat: run(sb.data_ptr<float>()); break;
    case at::kBFloat16: run(sb.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: run(sb.data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, "cpu_kernels: scales must be float32, bfloat16 or float16, got ", sb.scalar_type());
  }
  return finish(y, x, N);
}

// MLX's affine weight in float32 [N, K] (q * scale + bias, as MLX computes it), for products of many rows.
at::Tensor dequantize(const at::Tensor& codes, const at::Tensor& sb, int64_t bits, int64_t G) {
  TORCH_CHECK(bits == 4 || bits == 8, "cpu_kernels: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && codes.scalar_type() == at::kByte,
              "cpu_kernels: codes must be contiguous uint8 [N, K * bits / 8]");
  const int64_t N = codes.size(0), K = codes.size(1) * 8 / bits, groups = K / G;
  TORCH_CHECK(G % (2 * L) == 0 && K % G == 0 && sb.is_contiguous() && sb.numel() == N * groups * 2,
              "cpu_kernels: scales|biases must be contiguous [", N, ", ", K / G, ", 2]");
  at::Tensor out = at::empty({N, K}, codes.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const uint8_t* q = codes.data_ptr<uint8_t>();
  const at::Tensor sbf = sb.to(at::kFloat);
  const float* p = sbf.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t g = 0; g < groups; ++g) {
        const float s = p[(n * groups + g) * 2], b = p[(n * groups + g) * 2 + 1];
        float* row = o + n * K + g * G;
        if (bits == 8) {
          const uint8_t* c = q + n * K + g * G;
          for (int64_t k = 0; k < G; ++k) row[k] = static_cast<float>(c[k]) * s + b;
        } else {
          for (int64_t blk = 0; blk < G; blk += 2 * L) {
            const uint8_t* c = q + (n * K + g * G + blk) / 2;
            for (int j = 0; j < L; ++j) row[blk + j] = static_cast<float>(c[j] & 15) * s + b;
            for (int j = 0; j < L; ++j) row[blk + L + j] = static_cast<float>(c[j] >> 4) * s + b;
          }
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(llama4_cpu, m) {
  m.def("reduced_gemv(Tensor x, Tensor w) -> Tensor");
  m.def("quant_gemv(Tensor x, Tensor codes, Tensor sb, int bits, int group_size) -> Tensor");
  m.def("dequantize(Tensor codes, Tensor sb, int bits, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama4_cpu, CPU, m) {
  m.impl("reduced_gemv", &reduced_gemv);
  m.impl("quant_gemv", &quant_gemv);
  m.impl("dequantize", &dequantize);
}
