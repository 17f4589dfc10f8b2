// A prefill's float32 expert products: runs of a few rows of x, each against its own expert's weight,
// stored input-major (w [E, K, N] contiguous, as float32 CPU storage keeps the experts).
//
// Each expert sees about T * k / E rows of a T-token prefill (8 of 128 on the small benchmark model),
// where a GEMM library runs at a fraction of the memory's speed (MKL on a 2-core x86 CPU, [8, 512] @
// [512, 1536]: 11 GB/s against 28 at one row). Here a tile of 64 outputs holds up to 4 rows' sums in
// registers while the weight's rows stream past once (prefetched ahead: rows N floats apart are too far
// apart for the hardware's stride prefetcher); a run of more rows passes over the tile again from cache.
// Every row's sums run in input order whatever its run's length, so a row's numbers do not depend on
// which other rows a call holds (past about 16 rows a run, the GEMM library is as fast or faster:
// the caller decides by the whole call's rows, `torch_backend.moe.FLOAT_RUN_ROWS`).
//
// Shapes: M rows of x, K inputs, N outputs, E experts.

#include "cpu_kernels.h"

namespace llama4_cpu {
namespace {

constexpr int64_t NT = 64;       // outputs per tile: four vectors
constexpr int XB = 4;            // rows of x per pass over a tile
constexpr int64_t KC = 16;       // inputs per pass: the tiles of a task take turns over each 16 weight rows
constexpr int64_t AHEAD_K = 24;  // weight rows prefetched ahead

// y[m0 .. m0+R) [n0, n0 + NT) (+)= x rows' inputs [k0, k1) against w [K, N] columns n0 .. n0+NT-1
// (all in range); the first chunk (k0 == 0) writes, later ones add.
template <int R>
void tile_rows(const float* x, const float* w, int64_t K, int64_t N, int64_t m0, int64_t n0, int64_t k0, int64_t k1,
               bool prefetch, float* y) {
#ifdef LLAMA4_AVX512
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v)
      acc[r][v] = k0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(y + (m0 + r) * N + n0 + v * L);
  for (int64_t k = k0; k < k1; ++k) {
    const float* row = w + k * N + n0;
    if (prefetch && k + AHEAD_K < K) {
      const char* ahead = reinterpret_cast<const char*>(row + AHEAD_K * N);
      for (int v = 0; v < 4; ++v) _mm_prefetch(ahead + 64 * v, _MM_HINT_T0);
    }
    __m512 wv[4];
    for (int v = 0; v < 4; ++v) wv[v] = _mm512_loadu_ps(row + v * L);
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(x[(m0 + r) * K + k]);
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_fmadd_ps(xb, wv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(y + (m0 + r) * N + n0 + v * L, acc[r][v]);
#else
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < NT; ++j) {
      float s = k0 == 0 ? 0.f : y[(m0 + r) * N + n0 + j];
      for (int64_t k = k0; k < k1; ++k) s += x[(m0 + r) * K + k] * w[k * N + n0 + j];
      y[(m0 + r) * N + n0 + j] = s;
    }
#endif
}

// outputs [n0, n1) of rows [m0, m1) against w, where N is not a whole number of tiles: one at a time
void columns_rows(const float* x, const float* w, int64_t K, int64_t N, int64_t m0, int64_t m1, int64_t n0,
                  int64_t n1, float* y) {
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * w[k * N + n];
      y[m * N + n] = s;
    }
}

// y [M, N]: the first counts[0] rows of x [M, K] against w[0] [K, N], the next counts[1] against w[1], ...
at::Tensor expert_mm_float(const at::Tensor& x, const at::Tensor& w, const at::Tensor& counts) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && w.dim() == 3 && w.scalar_type() == at::kFloat &&
                  w.is_contiguous() && w.size(1) == x.size(1),
              "cpu_kernels: expert_mm_float takes float32 x [M, K] and contiguous float32 w [E, K, N], got ",
              x.scalar_type(), " ", x.sizes(), " and ", w.scalar_type(), " ", w.sizes());
  const int64_t E = w.size(0), K = w.size(1), N = w.size(2), M = x.size(0);
  const std::vector<Segment> runs = runs_of(counts, E, M);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const float *xp = xc.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // A task is a run's outputs, whole where there are runs enough for the threads: the tiles then walk each
  // weight row from end to end (16 rows at a time), which the memory streams far better than column strips
  // ([8, 512] @ [512, 1536] over 16 experts, 2 threads: 27 GB/s whole, 21 in strips of 512, 16 of 64).
  const int64_t threads = at::get_num_threads(), n_runs = std::max<int64_t>(1, runs.size());
  const int64_t per_run = std::max<int64_t>(1, std::min<int64_t>(N / NT, (2 * threads + n_runs - 1) / n_runs));
  const int64_t task_n = (N / per_run + NT - 1) / NT * NT;  // outputs per task, whole tiles
  const int64_t split = (N + task_n - 1) / task_n;           // tasks per run
  auto task = [&](int64_t t) {
    const Segment& run = runs[t / split];
    const float* we = wp + run.entry * K * N;
    const int64_t n_begin = (t % split) * task_n, n_end = std::min(N, n_begin + task_n);
    const int64_t whole = n_begin + (n_end - n_begin) / NT * NT;
    for (int64_t k0 = 0; k0 < K; k0 += KC)
      for (int64_t n0 = n_begin; n0 < whole; n0 += NT)
        for (int64_t m0 = run.row; m0 < run.row + run.rows; m0 += XB) {
          const int64_t k1 = std::min(K, k0 + KC);
          const bool pf = m0 == run.row;
          switch (std::min<int64_t>(XB, run.row + run.rows - m0)) {
            case 1: tile_rows<1>(xp, we, K, N, m0, n0, k0, k1, pf, yp); break;
            case 2: tile_rows<2>(xp, we, K, N, m0, n0, k0, k1, pf, yp); break;
            case 3: tile_rows<3>(xp, we, K, N, m0, n0, k0, k1, pf, yp); break;
            default: tile_rows<4>(xp, we, K, N, m0, n0, k0, k1, pf, yp); break;
          }
        }
    if (whole < n_end) columns_rows(xp, we, K, N, run.row, run.row + run.rows, whole, n_end, yp);
  };
  for_tasks(static_cast<int64_t>(runs.size()) * split, task);  // runs differ in length
  return y;
}

}  // namespace
}  // namespace llama4_cpu

TORCH_LIBRARY_FRAGMENT(llama4_cpu, m) { m.def("expert_mm_float(Tensor x, Tensor w, Tensor counts) -> Tensor"); }

TORCH_LIBRARY_IMPL(llama4_cpu, CPU, m) { m.impl("expert_mm_float", &llama4_cpu::expert_mm_float); }
