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


#include "cpu_kernels.h"

#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

namespace llama4_cpu {
namespace {

constexpr int RB = 4;  // output rows per block
constexpr int MB = 4;  // rows of x per pass over a block
// The same for quantized weights: 8-bit blocks hold 4 rows of x; 4-bit ones (two accumulators per row and
// x row) only 2, past which they spill registers (measured on a 2-core x86 CPU, [1536, 512] at 8 rows of
// x: 8-bit 93 -> 83 us with 4, 4-bit 119 -> 160 us).
constexpr int Q8MB = 4;
constexpr int Q4MB = 2;
// Bytes ahead that a block prefetches (as whole rows): a thread streams its rows four at a time, each
// only one row long, too short a run for the hardware prefetcher (bfloat16 [*, 512] weights on a
// 2-core x86 CPU: 14.8 GB/s without, 20.7 with 4 KB ahead, 20.2 with 8 KB, 17.2 with 2 KB).
constexpr int64_t AHEAD_BYTES = 4096;
inline int64_t rows_ahead(int64_t row_bytes) {
  return std::max<int64_t>(RB, (AHEAD_BYTES + row_bytes - 1) / row_bytes);
}
// Blocks of RB output rows in a tile of about 64 KB of weights (the unit of work split over threads).
inline int64_t tile_blocks(int64_t bytes_per_row) {
  return std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, bytes_per_row * RB));
}

// Weight decoders: write inputs [k, k + L) of one output row as float32 into `out`.
// One element per input: bfloat16 / float16 weights, 8-bit codes.
template <typename T>
struct ElementRows {
  const T* w;
  int64_t ld;
  inline const void* at(int64_t n, int64_t k) const { return w + n * ld + k; }
  inline void decode(int64_t n, int64_t k, float* out) const {
    const T* p = w + n * ld + k;
    for (int j = 0; j < L; ++j) out[j] = static_cast<float>(p[j]);
  }
};
using BF16Rows = ElementRows<c10::BFloat16>;
using HalfRows = ElementRows<c10::Half>;
using Q8Rows = ElementRows<uint8_t>;

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
template <typename T>  // bfloat16 / float16
inline void decode_v(const ElementRows<T>& w, int64_t n, int64_t k, __m512* out) {
  out[0] = load16(w.w + n * w.ld + k);
}
inline void decode_v(const Q8Rows& w, int64_t n, int64_t k, __m512* out) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.w + n * w.ld + k));
  out[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
}
inline void decode_v(const Q4Rows& w, int64_t n, int64_t k, __m512* out) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.q + n * w.ldq + k / 2));
  // Each nibble's float value from a table: VPERMPS reads only the low 4 bits of an index, so the low
  // nibble needs no mask, and the lookup replaces the integer conversion (small model's 4-bit products
  // replayed on a 2-core x86 CPU: 1.07-1.23 ms a step against 1.24-1.45 converting).
  const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i v = _mm512_cvtepu8_epi32(b);
  out[0] = _mm512_permutexvar_ps(v, table);
  out[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
}
#endif

// Float weights: rows [n0, n0 + R) of y for rows [m0, m0 + Mb) of x.
template <int R, int Mb, typename Rows>
void float_block(const Rows& w, const float* x, int64_t K, int64_t n_begin, int64_t n_end, int64_t m0, float* y,
                 int64_t N, int64_t ahead) {
  for (int64_t n0 = n_begin; n0 < n_end; n0 += R) {
#ifdef LLAMA4_AVX512
  __m512 acc[R][Mb];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < Mb; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += L) {
    __m512 xv[Mb];
    for (int m = 0; m < Mb; ++m) xv[m] = _mm512_loadu_ps(x + (m0 + m) * K + k);
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(static_cast<const char*>(w.at(n0 + r + ahead, k)), _MM_HINT_T0);
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
}

#if defined(__AVX512BF16__)
// bfloat16 weights and bfloat16 inputs: VDPBF16PS multiplies pairs exactly and adds them into float32,
// 32 weights an instruction (the float32 route decodes and multiplies 16 at a time, in three).
template <int R, int Mb>
void bf16_dot_block(const uint16_t* w, int64_t ldw, const uint16_t* x, int64_t ldx, int64_t K, int64_t n_begin,
                    int64_t n_end, int64_t m0, float* y, int64_t N, int64_t ahead) {
  for (int64_t n0 = n_begin; n0 < n_end; n0 += R) {
  __m512 acc[R][Mb];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < Mb; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 2 * L) {
    __m512bh xv[Mb];
    for (int m = 0; m < Mb; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x + (m0 + m) * ldx + k);
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + r + ahead) * ldw + k), _MM_HINT_T0);
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (n0 + r) * ldw + k);
      for (int m = 0; m < Mb; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xv[m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < Mb; ++m) y[(m0 + m) * N + n0 + r] = _mm512_reduce_add_ps(acc[r][m]);
  }
}
#endif

#if defined(__AVX512BF16__)
// 4 bits with bfloat16 inputs: 64 codes (two 32-input blocks) widened to 16-bit lanes, each nibble
// looked up as its exact bfloat16 value (VPERMW on a 16-entry table), two VDPBF16PS against the inputs
// `xp` [M, K] reordered to match (per 64 inputs: 0-15, 32-47 | 16-31, 48-63; `permute_q4`).
template <int R, int Mb, typename S>
void q4_dot_block(const Q4Rows& w, const S* sb, const uint16_t* xp, const float* xs, int64_t K, int64_t G,
                  int64_t n_begin, int64_t n_end, int64_t m0, float* y, int64_t N, int64_t ahead) {
  const int64_t groups = K / G;
  alignas(64) uint16_t table[32] = {};
  for (int i = 0; i < 16; ++i) table[i] = c10::BFloat16(static_cast<float>(i)).x;
  const __m512i lut = _mm512_load_si512(table);
  const __m512i low = _mm512_set1_epi16(15);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += R) {
  __m512 total[R][Mb];
  float bias[R][Mb] = {};
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < Mb; ++m) total[r][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 part[R][Mb][2];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < Mb; ++m) part[r][m][0] = part[r][m][1] = _mm512_setzero_ps();
    for (int64_t k = g * G; k < (g + 1) * G; k += 4 * L) {
      __m512bh xlo[Mb], xhi[Mb];
      for (int m = 0; m < Mb; ++m) {
        xlo[m] = (__m512bh)_mm512_loadu_si512(xp + (m0 + m) * K + k);
        xhi[m] = (__m512bh)_mm512_loadu_si512(xp + (m0 + m) * K + k + 2 * L);
      }
      for (int r = 0; r < R; ++r) {
        const uint8_t* c = static_cast<const uint8_t*>(w.at(n0 + r, k));
        _mm_prefetch(static_cast<const char*>(w.at(n0 + r + ahead, k)), _MM_HINT_T0);
        const __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c)));
        const __m512bh wlo = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(words, low), lut);
        const __m512bh whi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(words, 4), lut);
        for (int m = 0; m < Mb; ++m) {
          part[r][m][0] = _mm512_dpbf16_ps(part[r][m][0], wlo, xlo[m]);
          part[r][m][1] = _mm512_dpbf16_ps(part[r][m][1], whi, xhi[m]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const S* p = sb + ((n0 + r) * groups + g) * 2;
      const __m512 s = _mm512_set1_ps(widen(p[0]));
      const float b = widen(p[1]);
      for (int m = 0; m < Mb; ++m) {
        total[r][m] = _mm512_fmadd_ps(s, _mm512_add_ps(part[r][m][0], part[r][m][1]), total[r][m]);
        bias[r][m] += b * xs[(m0 + m) * groups + g];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < Mb; ++m) y[(m0 + m) * N + n0 + r] = _mm512_reduce_add_ps(total[r][m]) + bias[r][m];
  }
}

// bfloat16 inputs [M, K] (rows `ldx` apart) in q4_dot_block's order: per 64 inputs 0-15, 32-47, 16-31, 48-63.
std::vector<uint16_t> permute_q4(const uint16_t* x, int64_t ldx, int64_t M, int64_t K) {
  std::vector<uint16_t> out(M * K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; k += 4 * L) {
      const uint16_t* src = x + m * ldx + k;
      uint16_t* dst = out.data() + m * K + k;
      std::memcpy(dst, src, L * 2);
      std::memcpy(dst + L, src + 2 * L, L * 2);
      std::memcpy(dst + 2 * L, src + L, L * 2);
      std::memcpy(dst + 3 * L, src + 3 * L, L * 2);
    }
  return out;
}
#endif

// Quantized weights: per group the partial sum of q * x, scaled into the row's total; the biases meet
// the inputs' group sums `xs` [M, K/G].
template <int R, int Mb, int Step, typename Rows, typename S>
void quant_block(const Rows& w, const S* sb, const float* x, const float* xs, int64_t K, int64_t G,
                 int64_t n_begin, int64_t n_end, int64_t m0, float* y, int64_t N, int64_t ahead) {
  const int64_t groups = K / G;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += R) {
#ifdef LLAMA4_AVX512
  constexpr int V = Step / L;  // vectors per decode
  __m512 total[R][Mb];
  float bias[R][Mb] = {};
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < Mb; ++m) total[r][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    // one accumulator per row, x row and decoded vector: R * Mb * V independent chains per step
    __m512 part[R][Mb][V];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < Mb; ++m)
        for (int v = 0; v < V; ++v) part[r][m][v] = _mm512_setzero_ps();
    for (int64_t k = g * G; k < (g + 1) * G; k += Step) {
      __m512 xv[Mb][V];
      for (int m = 0; m < Mb; ++m)
        for (int v = 0; v < V; ++v) xv[m][v] = _mm512_loadu_ps(x + (m0 + m) * K + k + v * L);
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(static_cast<const char*>(w.at(n0 + r + ahead, k)), _MM_HINT_T0);
        __m512 wv[V];
        decode_v(w, n0 + r, k, wv);
        for (int m = 0; m < Mb; ++m)
          for (int v = 0; v < V; ++v) part[r][m][v] = _mm512_fmadd_ps(wv[v], xv[m][v], part[r][m][v]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const S* p = sb + ((n0 + r) * groups + g) * 2;
      const __m512 s = _mm512_set1_ps(widen(p[0]));
      const float b = widen(p[1]);
      for (int m = 0; m < Mb; ++m) {
        __m512 sum = part[r][m][0];
        for (int v = 1; v < V; ++v) sum = _mm512_add_ps(sum, part[r][m][v]);
        total[r][m] = _mm512_fmadd_ps(s, sum, total[r][m]);
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
}

// Runs `block(R, Mb, n_begin, n_end, m0)` over output rows [n0, n1) and rows [row, row + rows) of x,
// `chunk` rows of x at a time. Rows in a call: a multiple of R (RB, and 1 for the rows past the last
// whole block).
template <typename Block>
void over_tile(int64_t row, int64_t rows, int64_t n0, int64_t n1, int64_t chunk, const Block& block) {
  const int64_t whole = n0 + (n1 - n0) / RB * RB;
  for (int64_t m0 = row; m0 < row + rows; m0 += chunk) {
    const int64_t mb = std::min<int64_t>(chunk, row + rows - m0);
    if (whole > n0) block(RB, mb, n0, whole, m0);
    if (n1 > whole) block(1, mb, whole, n1, m0);
  }
}

// `over_tile` over all output rows (split over threads, in tiles of about 64 KB of weights that stay
// in cache while every chunk of x's rows passes over them) and all M rows of x.
template <typename Block>
void over_rows(int64_t M, int64_t N, int64_t bytes_per_row, int64_t chunk, const Block& block) {
  const int64_t blocks = (N + RB - 1) / RB;
  const int64_t tile = tile_blocks(bytes_per_row);
  // a tile per task at least: smaller products run on one thread
  at::parallel_for(0, blocks, tile, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b += tile)
      over_tile(0, M, b * RB, std::min(N, std::min(end, b + tile) * RB), chunk, block);
  });
}

// x [M, K] as float32 rows K apart: x's own data where it already is that, else a widened copy in `copy`.
const float* float_rows(const at::Tensor& x, int64_t K, std::vector<float>& copy) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "cpu_kernels: x must be [M, ", K, "], got ", x.sizes());
  TORCH_CHECK(x.stride(1) == 1, "cpu_kernels: x must have contiguous rows");
  const int64_t M = x.size(0), ldx = x.stride(0);
  if (x.scalar_type() == at::kFloat && (M == 1 || ldx == K)) return x.data_ptr<float>();
  copy.resize(M * K);
  auto widen_rows = [&](const auto* p) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) copy[m * K + k] = widen(p[m * ldx + k]);
  };
  with_float_data(x, "cpu_kernels: x must be", widen_rows);
  return copy.data();
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
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.stride(1) == 1, "cpu_kernels: x must be [M, ", K,
              "] with contiguous rows, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "cpu_kernels: reduced_gemv takes bfloat16 or float16 x, got ", x.scalar_type());
  Result y(M, N, x.options());
  float* yp = y.data;
  const int64_t ahead = rows_ahead(w.stride(0) * 2);
#if defined(__AVX512BF16__)
  if (w.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16 && K % (2 * L) == 0) {
    const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
    const int64_t ldw = w.stride(0), ldx = x.stride(0);
    over_rows(M, N, K * 2, MB, [&](int r, int64_t mb, int64_t n_begin, int64_t n_end, int64_t m0) {
#define LLAMA4_DOT(R, Mb) bf16_dot_block<R, Mb>(wp, ldw, xp, ldx, K, n_begin, n_end, m0, yp, N, ahead)
      LLAMA4_ROWS(r, mb, LLAMA4_DOT);
#undef LLAMA4_DOT
    });
    return y.done();
  }
#endif
  std::vector<float> copy;
  const float* xp = float_rows(x, K, copy);
  auto run = [&](const auto& rows) {
    over_rows(M, N, K * 2, MB, [&](int r, int64_t mb, int64_t n_begin, int64_t n_end, int64_t m0) {
#define LLAMA4_FLOAT(R, Mb) float_block<R, Mb>(rows, xp, K, n_begin, n_end, m0, yp, N, ahead)
      LLAMA4_ROWS(r, mb, LLAMA4_FLOAT);
#undef LLAMA4_FLOAT
    });
  };
  if (w.scalar_type() == at::kBFloat16) {
    run(BF16Rows{w.data_ptr<c10::BFloat16>(), w.stride(0)});
  } else {
    TORCH_CHECK(w.scalar_type() == at::kHalf, "cpu_kernels: w must be bfloat16 or float16, got ", w.scalar_type());
    run(HalfRows{w.data_ptr<c10::Half>(), w.stride(0)});
  }
  return y.done();
}

// One row of MLX's affine weight in float32 (q * s + b per group, as MLX computes it, one fused
// operation) into `row`: `q` the row's codes, `p` its scales|biases [K/G, 2].
template <typename S>
inline void dequantize_row(const uint8_t* q, const S* p, int64_t bits, int64_t K, int64_t G, float* row) {
  for (int64_t g = 0; g < K / G; ++g) {
    const float s = widen(p[g * 2]), b = widen(p[g * 2 + 1]);
    float* out = row + g * G;
#ifdef LLAMA4_AVX512
    // the same fused q * s + b as the scalar loops (#else) compile to, 16 at a time
    const __m512 vs = _mm512_set1_ps(s), vb = _mm512_set1_ps(b);
    if (bits == 8) {
      const uint8_t* c = q + g * G;
      for (int64_t k = 0; k < G; k += L) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + k)));
        _mm512_storeu_ps(out + k, _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), vs, vb));
      }
    } else {
      // the 16 values a code can take, q * s + b for q = 0..15, then one lookup (VPERMPS, which reads
      // only an index's low 4 bits) per 16 weights in place of a conversion and a multiply-add
      const __m512 table =
          _mm512_fmadd_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), vs, vb);
      for (int64_t blk = 0; blk < G; blk += 2 * L) {
        const uint8_t* c = q + (g * G + blk) / 2;
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
        _mm512_storeu_ps(out + blk, _mm512_permutexvar_ps(v, table));
        _mm512_storeu_ps(out + blk + L, _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table));
      }
    }
#else
    if (bits == 8) {
      const uint8_t* c = q + g * G;
      for (int64_t k = 0; k < G; ++k) out[k] = static_cast<float>(c[k]) * s + b;
    } else {
      for (int64_t blk = 0; blk < G; blk += 2 * L) {
        const uint8_t* c = q + (g * G + blk) / 2;
        for (int j = 0; j < L; ++j) out[blk + j] = static_cast<float>(c[j] & 15) * s + b;
        for (int j = 0; j < L; ++j) out[blk + L + j] = static_cast<float>(c[j] >> 4) * s + b;
      }
    }
#endif
  }
}

#define LLAMA4_TILE_ROWS(MB_, CALL, R_) \
  do {                                    \
    switch (MB_) {                        \
      case 1: CALL(R_, 1); break;         \
      case 2: CALL(R_, 2); break;         \
      case 3: CALL(R_, 3); break;         \
      case 4: CALL(R_, 4); break;         \
      case 5: CALL(R_, 5); break;         \
      default: CALL(R_, 6); break;        \
    }                                     \
  } while (0)
constexpr int TR = 4;   // output rows dequantized per block
constexpr int TMB = 6;  // rows of x per pass over a block: TR * TMB accumulators
// Rows of x from which quantized products dequantize per block (below: the quantized blocks, which decode
// every weight once per Q4MB / Q8MB rows of x). Measured on a 2-core x86 CPU, 16 weights [1536, 512] in turn,
// per product: 4 bits at 2 rows 44 us quantized / 50 dequantized, 3 rows 69 / 61, 8 rows 147 / 87, 16 rows
// 289 / 141; 8 bits at 4 rows 61 / 68, 8 rows 101 / 93, 16 rows 193 / 142.
constexpr int64_t TILE_ROWS_Q4 = 3;
constexpr int64_t TILE_ROWS_Q8 = 6;

// Products of a few rows of x against MLX's affine weight (prefill's experts): each block of R output
// rows dequantized once into `w` [R, K] (float32, as `dequantize_row` makes it, so the product is the
// dequantized weight's), then every chunk of Mb rows of x against it from cache. Decoding once for all
// rows of x lets a block hold more of them than the quantized blocks (whose registers hold the decoded
// weights and two accumulators per pair).
template <int R, int Mb>
void tile_block(const float* w, const float* x, int64_t K, int64_t n0, int64_t m0, float* y, int64_t N) {
#ifdef LLAMA4_AVX512
  __m512 acc[R][Mb];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < Mb; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += L) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_ps(w + r * K + k);
    for (int m = 0; m < Mb; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + (m0 + m) * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < Mb; ++m) y[(m0 + m) * N + n0 + r] = _mm512_reduce_add_ps(acc[r][m]);
#else
  float acc[R][Mb][L] = {};
  for (int64_t k = 0; k < K; k += L)
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < Mb; ++m)
        for (int j = 0; j < L; ++j) acc[r][m][j] += w[r * K + k + j] * x[(m0 + m) * K + k + j];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < Mb; ++m) y[(m0 + m) * N + n0 + r] = lane_sum(acc[r][m]);
#endif
}

// MLX's affine weights as the quantized blocks read them: codes (layout above) and scales|biases
// [N, K/G, 2], one weight, or a stack of them [E, ...].
struct QuantWeights {
  const uint8_t* codes;
  const at::Tensor& sb;
  int64_t ldq, codes_entry, sb_entry;  // between output rows; between entries (elements)
};

// Rows [row, row + rows) of x, which meet entry `entry` of the weights.
// Outputs [n_begin, n_end) of a segment's rows against its weight (`codes`, `sb`), each block of TR
// output rows dequantized once for all the rows (`tile_block`).
template <typename S>
void dequantized_tile(const float* xp, const uint8_t* codes, int64_t ldq, const S* sb, int64_t bits, int64_t G,
                      int64_t K, const Segment& seg, int64_t n_begin, int64_t n_end, float* yp, int64_t N) {
  static thread_local std::vector<float> dq;
  dq.resize(TR * K);  // [TR, K]
  const int64_t groups = K / G;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += TR) {
    const int64_t rows = std::min<int64_t>(TR, n_end - n0);
    for (int64_t i = 0; i < rows; ++i)
      dequantize_row(codes + (n0 + i) * ldq, sb + (n0 + i) * groups * 2, bits, K, G, dq.data() + i * K);
    for (int64_t m0 = seg.row; m0 < seg.row + seg.rows; m0 += TMB) {
      const int64_t mb = std::min<int64_t>(TMB, seg.row + seg.rows - m0);
      if (rows == TR) {
#define LLAMA4_TILE(R, Mb) tile_block<R, Mb>(dq.data(), xp, K, n0, m0, yp, N)
        LLAMA4_TILE_ROWS(mb, LLAMA4_TILE, TR);
#undef LLAMA4_TILE
      } else {  // the last rows past whole blocks: one at a time
        for (int64_t i = 0; i < rows; ++i) {
#define LLAMA4_TILE(R, Mb) tile_block<R, Mb>(dq.data() + i * K, xp, K, n0 + i, m0, yp, N)
          LLAMA4_TILE_ROWS(mb, LLAMA4_TILE, 1);
#undef LLAMA4_TILE
        }
      }
    }
  }
}

// y [M, N] = x [M, K] against `w` in x's dtype, each segment's rows against its entry: segments of fewer
// than TILE_ROWS_Q4 / TILE_ROWS_Q8 rows through the quantized blocks (Q4MB / Q8MB rows of x per pass),
// longer ones through `dequantized_tile`. The work is (segment, tile of about 64 KB of weights) pairs,
// which the threads take in turn; a segment's numbers depend only on its own rows and entry.
at::Tensor quant_product(const at::Tensor& x, const QuantWeights& w, const std::vector<Segment>& segments,
                         int64_t bits, int64_t G, int64_t N, int64_t K) {
  const int64_t M = x.size(0), groups = K / G;
  std::vector<float> copy;
  const float* xp = float_rows(x, K, copy);
  const int64_t tile_rows = bits == 4 ? TILE_ROWS_Q4 : TILE_ROWS_Q8;
  const bool quantized = std::any_of(segments.begin(), segments.end(), [&](const Segment& g) {
    return g.rows < tile_rows;
  });
  std::vector<float> xs(quantized ? M * groups : 0, 0.f);  // the inputs' group sums [M, K/G]
  for (const Segment& g : segments) {
    if (g.rows >= tile_rows) continue;
    for (int64_t m = g.row; m < g.row + g.rows; ++m)
      for (int64_t j = 0; j < groups; ++j)
        for (int64_t k = 0; k < G; ++k) xs[m * groups + j] += xp[m * K + j * G + k];
  }
#if defined(__AVX512BF16__)
  // 4 bits with bfloat16 x: VDPBF16PS on x reordered (exact: bfloat16 products are)
  const bool dot = quantized && bits == 4 && x.scalar_type() == at::kBFloat16 && G % (4 * L) == 0;
  const std::vector<uint16_t> xq =
      dot ? permute_q4(reinterpret_cast<const uint16_t*>(x.data_ptr()), x.stride(0), M, K) : std::vector<uint16_t>();
#endif
  Result y(M, N, x.options());
  const float* xsp = xs.data();
  float* yp = y.data;
  const int64_t ahead = rows_ahead(w.ldq), bytes_per_row = K * bits / 8;
  const int64_t blocks = (N + RB - 1) / RB;
  int64_t tile = tile_blocks(bytes_per_row), tiles = (blocks + tile - 1) / tile;
  // As many tiles as a multiple of the threads, of equal size, so each thread gets the same share: a 4-bit
  // [768, 512] weight made 3 tiles of 64 KB, two of them on one of 2 threads (small model's 4-bit decode
  // step over a greedy decode, both ways timed alternately in one process: 1.72 -> 1.68 ms).
  if (tiles > 1) {
    const int64_t threads = at::get_num_threads();
    tiles = (tiles + threads - 1) / threads * threads;
    tile = (blocks + tiles - 1) / tiles;
    tiles = (blocks + tile - 1) / tile;
  }
  const int64_t tasks = static_cast<int64_t>(segments.size()) * tiles;
  auto run = [&](const auto* s) {
    using S = std::remove_cv_t<std::remove_pointer_t<decltype(s)>>;
    auto task = [&](int64_t t) {
      const Segment& seg = segments[t / tiles];
      const int64_t b = (t % tiles) * tile, n0 = b * RB, n1 = std::min(N, (b + tile) * RB);
      const uint8_t* codes = w.codes + seg.entry * w.codes_entry;
      const S* p = s + seg.entry * w.sb_entry;
      if (seg.rows >= tile_rows) {
        dequantized_tile(xp, codes, w.ldq, p, bits, G, K, seg, n0, n1, yp, N);
      } else if (bits == 8) {
        const Q8Rows rows{codes, w.ldq};
        over_tile(seg.row, seg.rows, n0, n1, Q8MB, [&](int r, int64_t mb, int64_t n_begin, int64_t n_end, int64_t m0) {
#define LLAMA4_Q8(R, Mb) quant_block<R, Mb, L, Q8Rows, S>(rows, p, xp, xsp, K, G, n_begin, n_end, m0, yp, N, ahead)
          LLAMA4_ROWS(r, mb, LLAMA4_Q8);
#undef LLAMA4_Q8
        });
#if defined(__AVX512BF16__)
      } else if (dot) {
        const Q4Rows rows{codes, w.ldq};
        const uint16_t* xqp = xq.data();
        over_tile(seg.row, seg.rows, n0, n1, Q4MB, [&](int r, int64_t mb, int64_t n_begin, int64_t n_end, int64_t m0) {
#define LLAMA4_Q4DOT(R, Mb) q4_dot_block<R, Mb, S>(rows, p, xqp, xsp, K, G, n_begin, n_end, m0, yp, N, ahead)
          LLAMA4_ROWS(r, mb, LLAMA4_Q4DOT);
#undef LLAMA4_Q4DOT
        });
#endif
      } else {
        const Q4Rows rows{codes, w.ldq};
        over_tile(seg.row, seg.rows, n0, n1, Q4MB, [&](int r, int64_t mb, int64_t n_begin, int64_t n_end, int64_t m0) {
#define LLAMA4_Q4(R, Mb) quant_block<R, Mb, 2 * L, Q4Rows, S>(rows, p, xp, xsp, K, G, n_begin, n_end, m0, yp, N, ahead)
          LLAMA4_ROWS(r, mb, LLAMA4_Q4);
#undef LLAMA4_Q4
        });
      }
    };
    for_tasks(tasks, task);  // segments of different lengths cost differently
  };
  with_float_data(w.sb, "cpu_kernels: scales must be", run);
  return y.done();
}

void check_group(int64_t bits, int64_t G, int64_t K) {
  TORCH_CHECK(bits == 4 || bits == 8, "cpu_kernels: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(G % (2 * L) == 0 && K % G == 0, "cpu_kernels: group size ", G, " must divide K = ", K,
              " and be a multiple of ", 2 * L);
}

// y [M, N] = x [M, K] @ w.T for MLX's affine w, from codes (layout above) and scales|biases [N, K/G, 2].
at::Tensor quant_gemv(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& sb, int64_t bits, int64_t G) {
  TORCH_CHECK(codes.dim() == 2 && codes.stride(1) == 1 && codes.scalar_type() == at::kByte,
              "cpu_kernels: codes must be uint8 [N, K * bits / 8] with contiguous rows");
  const int64_t N = codes.size(0), K = codes.size(1) * 8 / std::max<int64_t>(bits, 1);
  check_group(bits, G, K);
  TORCH_CHECK(sb.is_contiguous() && sb.dim() == 3 && sb.size(0) == N && sb.size(1) == K / G && sb.size(2) == 2,
              "cpu_kernels: scales|biases must be contiguous [", N, ", ", K / G, ", 2], got ", sb.sizes());
  return quant_product(x, {codes.data_ptr<uint8_t>(), sb, codes.stride(0), 0, 0}, {{0, x.size(0), 0}}, bits, G, N, K);
}

// A stack of MLX affine weights, codes [E, N, K * bits / 8] and scales|biases [E, N, K/G, 2], as the
// quantized products read it; N and K out.
QuantWeights quant_stack(const at::Tensor& codes, const at::Tensor& sb, int64_t bits, int64_t G, int64_t& N,
                         int64_t& K) {
  TORCH_CHECK(codes.dim() == 3 && codes.is_contiguous() && codes.scalar_type() == at::kByte,
              "cpu_kernels: codes must be contiguous uint8 [E, N, K * bits / 8]");
  const int64_t E = codes.size(0);
  N = codes.size(1), K = codes.size(2) * 8 / std::max<int64_t>(bits, 1);
  check_group(bits, G, K);
  TORCH_CHECK(sb.is_contiguous() && sb.dim() == 4 && sb.size(0) == E && sb.size(1) == N && sb.size(2) == K / G &&
                  sb.size(3) == 2,
              "cpu_kernels: scales|biases must be contiguous [", E, ", ", N, ", ", K / G, ", 2], got ", sb.sizes());
  return {codes.data_ptr<uint8_t>(), sb, codes.stride(1), codes.stride(0), sb.stride(0)};
}

// y [M, N]: row m of x [M, K] against entry ids[m] of a stack of MLX affine weights (`quant_stack`): a
// decode step's expert slots and its shared expert (the stack's last entry) in one call and one parallel
// region, each row computed exactly as `quant_gemv` computes it alone. Measured on a 2-core x86 CPU,
// 4 bits: two [512, 768] products 30 us as two calls, 20 as one.
at::Tensor expert_gemv(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& sb, const at::Tensor& ids,
                       int64_t bits, int64_t G) {
  int64_t N, K;
  const QuantWeights w = quant_stack(codes, sb, bits, G, N, K);
  const int64_t E = codes.size(0);
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == x.size(0) && ids.scalar_type() == at::kLong && ids.is_contiguous(),
              "cpu_kernels: ids must be contiguous int64 [", x.size(0), "] (one per row of x), got ", ids.sizes());
  const int64_t* idp = ids.data_ptr<int64_t>();
  std::vector<Segment> rows;
  for (int64_t m = 0; m < ids.size(0); ++m) {
    TORCH_CHECK(idp[m] >= 0 && idp[m] < E, "cpu_kernels: ids[", m, "] = ", idp[m], " is not an entry of ", E);
    rows.push_back({m, 1, idp[m]});
  }
  return quant_product(x, w, rows, bits, G, N, K);
}

// y [M, N]: the rows of x [M, K] in runs, the first counts[0] against entry 0 of a stack of MLX affine
// weights (`quant_stack`), the next counts[1] against entry 1, and so on (entries past counts' end: none):
// a prefill's expert products, its rows sorted by expert, in one call and one parallel region, each run
// computed exactly as `quant_gemv` computes its rows alone.
at::Tensor expert_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& sb, const at::Tensor& counts,
                     int64_t bits, int64_t G) {
  int64_t N, K;
  const QuantWeights w = quant_stack(codes, sb, bits, G, N, K);
  return quant_product(x, w, runs_of(counts, codes.size(0), x.size(0)), bits, G, N, K);
}

// Rows [n0, n1) of MLX's affine weight in float32 into `o` (rows K apart).
void dequantize_rows(const uint8_t* q, const float* p, int64_t bits, int64_t K, int64_t G, int64_t n0, int64_t n1,
                     float* o) {
  const int64_t row_bytes = K * bits / 8, groups = K / G;
  at::parallel_for(n0, n1, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      dequantize_row(q + n * row_bytes, p + n * groups * 2, bits, K, G, o + (n - n0) * K);
  });
}

void check_quantized(const at::Tensor& codes, const at::Tensor& sb, int64_t bits, int64_t G) {
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && codes.scalar_type() == at::kByte,
              "cpu_kernels: codes must be contiguous uint8 [N, K * bits / 8]");
  const int64_t N = codes.size(0), K = codes.size(1) * 8 / std::max<int64_t>(bits, 1);
  check_group(bits, G, K);
  TORCH_CHECK(sb.is_contiguous() && sb.numel() == N * (K / G) * 2,
              "cpu_kernels: scales|biases must be contiguous [", N, ", ", K / G, ", 2]");
}

// MLX's affine weight in float32 [N, K].
at::Tensor dequantize(const at::Tensor& codes, const at::Tensor& sb, int64_t bits, int64_t G) {
  check_quantized(codes, sb, bits, G);
  const int64_t N = codes.size(0), K = codes.size(1) * 8 / bits;
  at::Tensor out = at::empty({N, K}, codes.options().dtype(at::kFloat));
  const at::Tensor sbf = sb.to(at::kFloat);
  dequantize_rows(codes.data_ptr<uint8_t>(), sbf.data_ptr<float>(), bits, K, G, 0, N, out.data_ptr<float>());
  return out;
}

// y [M, N] = x [M, K] @ w.T in float32 for MLX's affine w, for products of many rows (prefill): the
// float32 GEMM on MLX's float32 weight, dequantized a tile of about 1 MB at a time into a buffer that
// stays allocated (and in cache for the GEMM) rather than as a whole float32 copy of the weight (8 times
// the 4-bit bytes: hundreds of MB for a large model's expert). Measured on a 2-core x86 CPU, the small
// model's 4-bit 128-token prefill: dequantizing took 6.2 of 48 ms with scalar loops, 2.7 vectorized.
at::Tensor quant_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& sb, int64_t bits, int64_t G) {
  check_quantized(codes, sb, bits, G);
  const int64_t N = codes.size(0), K = codes.size(1) * 8 / bits;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.scalar_type() == at::kFloat,
              "cpu_kernels: quant_mm takes float32 x [M, ", K, "], got ", x.scalar_type(), " ", x.sizes());
  at::Tensor out = at::empty({x.size(0), N}, x.options());
  const at::Tensor sbf = sb.to(at::kFloat);
  const int64_t tile = std::max<int64_t>(16, ((1 << 20) / (K * 4)) / 16 * 16);  // output rows per tile
  static thread_local std::vector<float> buffer;
  buffer.resize(std::max<size_t>(buffer.size(), std::min(tile, N) * K));
  for (int64_t n0 = 0; n0 < N; n0 += tile) {
    const int64_t n1 = std::min(N, n0 + tile);
    dequantize_rows(codes.data_ptr<uint8_t>(), sbf.data_ptr<float>(), bits, K, G, n0, n1, buffer.data());
    const at::Tensor w = at::from_blob(buffer.data(), {n1 - n0, K}, x.options());
    at::Tensor y = out.narrow(1, n0, n1 - n0);  // [M, n1 - n0], rows N apart
    at::mm_out(y, x, w.t());
  }
  return out;
}

}  // namespace
}  // namespace llama4_cpu

TORCH_LIBRARY(llama4_cpu, m) {
  m.def("reduced_gemv(Tensor x, Tensor w) -> Tensor");
  m.def("quant_gemv(Tensor x, Tensor codes, Tensor sb, int bits, int group_size) -> Tensor");
  m.def("expert_gemv(Tensor x, Tensor codes, Tensor sb, Tensor ids, int bits, int group_size) -> Tensor");
  m.def("expert_mm(Tensor x, Tensor codes, Tensor sb, Tensor counts, int bits, int group_size) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
  m.def("dequantize(Tensor codes, Tensor sb, int bits, int group_size) -> Tensor");
  m.def("quant_mm(Tensor x, Tensor codes, Tensor sb, int bits, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama4_cpu, CPU, m) {
  m.impl("reduced_gemv", &llama4_cpu::reduced_gemv);
  m.impl("quant_gemv", &llama4_cpu::quant_gemv);
  m.impl("expert_gemv", &llama4_cpu::expert_gemv);
  m.impl("expert_mm", &llama4_cpu::expert_mm);
  m.impl("dequantize", &llama4_cpu::dequantize);
  m.impl("quant_mm", &llama4_cpu::quant_mm);
}
