// CPU kernel of the streaming moments update (class_moments_update_; the single-set update is the
// same op with one class).
//
// One call per batch, no loop over classes in Python, three parallel regions at most:
//   1. the batch's segmentation (segment_labels: class k = rows order[offsets[k] .. offsets[k + 1]),
//      shared with the selectivity ops of the step) is taken as given; where order is the identity
//      (always so for one set) the rows are read in place: class k is rows offsets[k] .. of x
//   2. one task per (class, block of columns): the class batch mean in float64 (rows summed in
//      order), the running mean's step, then the centred rows xc = x - c_k of those columns in the
//      GEMM precision, written class-contiguous, c_k the class batch mean rounded to that
//      precision (small values: no cancellation in the Gram matrix)
//   3. Gram matrix S_k = xc_k^T xc_k of each present class and the Chan merge of
//      (n_b, mean_b, S_k - n_b d d^T) into the float64 state, in ONE read-write pass over each
//      class's D x D block (the pass is the floor of the whole update).
//      * Small classes (n_b < kGemmRows, the usual per-class case): one task per (class, block of
//        kRowBlock state rows) computes that block's rows of S_k with a register-blocked product
//        straight from xc, prefetching the state rows meanwhile, and merges them at once; no Gram
//        matrix in memory. The product is cheap next to the state pass here, so it is not halved.
//      * Large classes (the one-set update): single-threaded BLAS GEMMs on the upper block
//        trapezoid of S_k only (~(T + 1) / 2T of a full product for T block rows of kTile), one
//        parallel region over (class, pair of block rows g and T - 1 - g) items, each block row
//        merged by the thread that made it, right after its GEMM: state rows of the block row
//        and, from the transposed product, their mirror columns.
// Deterministic: fixed summation orders, no atomics, the same decomposition (and BLAS calls) for
// every thread count, so results are independent of it. Absent classes are not touched. M2 stays
// exactly symmetric: both mirror entries are computed from the same product value with the same
// operations.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <memory>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif
#include <vector>

#include "common/moments.h"
#include "common/selectivity_args.h"
#include "cpu/target_clones.h"
#include "cpu/vector_types.h"

namespace selk {
namespace {

constexpr int64_t kTile = 64;           // side of a state tile (and of a GEMM block row)
constexpr int64_t kGemmRows = 64;       // classes with at least this many rows in the batch use BLAS
constexpr int64_t kMeanCols = 64;       // columns per class-mean task (small classes)
constexpr int64_t kPilotRows = 32;      // rows whose mean is a large class's shift
constexpr int64_t kStatRows = 128;      // rows per statistics task of a large class at least
constexpr int64_t kMaxStatChunks = 64;  // and at most this many tasks per class
constexpr double kShiftSlack = 1.0;     // |mean_b - c| accepted per column, in standard deviations

// Register-blocked product S[a, b] = sum_r A[r * lda + a] B[r * ldb + b] for a < ta (a multiple
// of MR), b < tb (a multiple of NR); S row-major [ta, tb]. The MR x NR accumulator block stays in
// registers over the n rows, so every B load feeds MR FMAs. Entry (a, b) is the same sequence of
// FMAs as the entry with A and B swapped, so the product of a matrix with itself is exactly symmetric.
// Meanwhile the pf_len doubles at pf (the state rows the product is merged into next) are
// prefetched, a few cache lines per accumulator block, so that memory traffic overlaps the FMAs.
template <typename T, int MR, int NR>
inline __attribute__((always_inline)) void panel_product_body(const T* __restrict__ A, int64_t lda,
                                                              const T* __restrict__ B, int64_t ldb, int64_t n,
                                                              int64_t ta, int64_t tb, T* __restrict__ S,
                                                              const double* pf, int64_t pf_len) {
  constexpr int64_t kLine = 64 / sizeof(double);
  const int64_t lines = (pf_len + kLine - 1) / kLine, blocks = (ta / MR) * (tb / NR);
  const int64_t per_block = (lines + blocks - 1) / blocks;
  int64_t next = 0;
  for (int64_t a0 = 0; a0 < ta; a0 += MR) {
    for (int64_t b0 = 0; b0 < tb; b0 += NR) {
      for (int64_t p = 0; p < per_block && next < lines; ++p, ++next) __builtin_prefetch(pf + next * kLine, 1, 2);
      T acc[MR][NR] = {};
      for (int64_t r = 0; r < n; ++r) {
        const T* arow = A + r * lda + a0;
        const T* brow = B + r * ldb + b0;
#pragma GCC unroll 8
        for (int a = 0; a < MR; ++a) {
          const T xa = arow[a];
#pragma omp simd
          for (int b = 0; b < NR; ++b) acc[a][b] += xa * brow[b];
        }
      }
      for (int a = 0; a < MR; ++a)
        for (int b = 0; b < NR; ++b) S[(a0 + a) * tb + b0 + b] = acc[a][b];
    }
  }
}

constexpr int kMR = 6;
constexpr int kNRFloat = 16;
constexpr int kNRDouble = 8;
constexpr int64_t kRowBlock = 2 * kMR;

SELK_TARGET_CLONES void panel_product(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t n, int64_t ta,
                                      int64_t tb, float* S, const double* pf, int64_t pf_len) {
  panel_product_body<float, kMR, kNRFloat>(A, lda, B, ldb, n, ta, tb, S, pf, pf_len);
}
SELK_TARGET_CLONES void panel_product(const double* A, int64_t lda, const double* B, int64_t ldb, int64_t n, int64_t ta,
                                      int64_t tb, double* S, const double* pf, int64_t pf_len) {
  panel_product_body<double, kMR, kNRDouble>(A, lda, B, ldb, n, ta, tb, S, pf, pf_len);
}

template <typename T>
constexpr int nr_of() {
  return std::is_same_v<T, double> ? kNRDouble : kNRFloat;
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// The batch statistics pass, per (class, block of w columns from j0), rows r = lo .. hi of the
// class (x row row_of[r], or r where the labels were sorted):
// sum[j] = sum over the rows, in order, of x[row, j0 + j] in float64
template <typename scalar_t>
inline __attribute__((always_inline)) void column_sums_body(const scalar_t* __restrict__ x, int64_t D,
                                                            const int64_t* __restrict__ row_of, int64_t lo, int64_t hi,
                                                            int64_t j0, int64_t w, double* __restrict__ sum) {
  for (int64_t j = 0; j < w; ++j) sum[j] = 0.0;
  for (int64_t r = lo; r < hi; ++r) {
    const scalar_t* row = x + (row_of ? row_of[r] : r) * D + j0;
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) sum[j] += static_cast<double>(row[j]);
  }
}
// xc[r, j0 + j] = x[row, j0 + j] - c[j] in the GEMM precision, then `pad` zeros (the row padding).
template <typename scalar_t, typename gemm_t>
inline __attribute__((always_inline)) void centre_rows_body(const scalar_t* __restrict__ x, int64_t D,
                                                            const int64_t* __restrict__ row_of, int64_t lo, int64_t hi,
                                                            int64_t j0, int64_t w, int64_t pad,
                                                            const gemm_t* __restrict__ c, gemm_t* __restrict__ xc,
                                                            int64_t ld) {
  for (int64_t r = lo; r < hi; ++r) {
    const scalar_t* row = x + (row_of ? row_of[r] : r) * D + j0;
    gemm_t* out = xc + r * ld + j0;
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) out[j] = static_cast<gemm_t>(row[j]) - c[j];
    for (int64_t j = w; j < w + pad; ++j) out[j] = gemm_t(0);
  }
}
// Large classes, one pass per chunk of rows, about a shift c known beforehand: xc[r] = x[row] - c in
// the GEMM precision (then `pad` zeros), sum_x[j] = sum of x[row, j] in float64 (rows in order) and
// sum_sq[j] ~ sum of xc[r, j]^2 (only compared against a threshold: accumulated in the GEMM
// precision), for rows r = lo .. hi.
template <typename scalar_t, typename gemm_t>
inline __attribute__((always_inline)) void centre_and_sum_columns(const scalar_t* __restrict__ x, int64_t D,
                                                                  const int64_t* __restrict__ row_of, int64_t lo,
                                                                  int64_t hi, int64_t j0, int64_t j1,
                                                                  const gemm_t* __restrict__ c, gemm_t* __restrict__ xc,
                                                                  int64_t ld, double* __restrict__ sum_x,
                                                                  double* __restrict__ sum_sq) {
  for (int64_t j = j0; j < j1; ++j) sum_x[j] = sum_sq[j] = 0.0;
  for (int64_t r = lo; r < hi; ++r) {
    const scalar_t* row = x + (row_of ? row_of[r] : r) * D;
    gemm_t* out = xc + r * ld;
#pragma omp simd
    for (int64_t j = j0; j < j1; ++j) {
      const gemm_t v = static_cast<gemm_t>(row[j]) - c[j];
      out[j] = v;
      sum_x[j] += static_cast<double>(row[j]);
      sum_sq[j] += static_cast<double>(v * v);
    }
  }
}
// float x: blocks of 64 columns whose sums stay in registers (8 float64 and 4 float32 vectors:
// independent chains, not one store-to-load chain per row), then the generic loop for the rest.
inline __attribute__((always_inline)) void centre_and_sum_body(const float* __restrict__ x, int64_t D,
                                                               const int64_t* __restrict__ row_of, int64_t lo,
                                                               int64_t hi, int64_t pad, const float* __restrict__ c,
                                                               float* __restrict__ xc, int64_t ld,
                                                               double* __restrict__ sum_x,
                                                               double* __restrict__ sum_sq) {
  constexpr int64_t W = 64;
  const int64_t blocked = D / W * W;
  for (int64_t j0 = 0; j0 < blocked; j0 += W) {
    selk_v16f cv[4], q[4] = {};
    selk_v8d sx[8] = {};
    __builtin_memcpy(cv, c + j0, sizeof(cv));
    for (int64_t r = lo; r < hi; ++r) {
      const float* row = x + (row_of ? row_of[r] : r) * D + j0;
      float* out = xc + r * ld + j0;
#pragma GCC unroll 4
      for (int b = 0; b < 4; ++b) {
        selk_v16f xv;
        selk_v8f x0, x1;
        __builtin_memcpy(&xv, row + 16 * b, sizeof(xv));
        __builtin_memcpy(&x0, row + 16 * b, sizeof(x0));
        __builtin_memcpy(&x1, row + 16 * b + 8, sizeof(x1));
        const selk_v16f v = xv - cv[b];
        __builtin_memcpy(out + 16 * b, &v, sizeof(v));
        sx[2 * b] += __builtin_convertvector(x0, selk_v8d);
        sx[2 * b + 1] += __builtin_convertvector(x1, selk_v8d);
        q[b] += v * v;
      }
    }
    __builtin_memcpy(sum_x + j0, sx, sizeof(sx));
    for (int b = 0; b < 4; ++b)
      for (int e = 0; e < 16; ++e) sum_sq[j0 + 16 * b + e] = static_cast<double>(q[b][e]);
  }
  centre_and_sum_columns(x, D, row_of, lo, hi, blocked, D, c, xc, ld, sum_x, sum_sq);
  for (int64_t r = lo; r < hi; ++r)
    for (int64_t j = D; j < D + pad; ++j) xc[r * ld + j] = 0.0f;
}
template <typename scalar_t, typename gemm_t>
inline __attribute__((always_inline)) void centre_and_sum_body(const scalar_t* __restrict__ x, int64_t D,
                                                               const int64_t* __restrict__ row_of, int64_t lo,
                                                               int64_t hi, int64_t pad, const gemm_t* __restrict__ c,
                                                               gemm_t* __restrict__ xc, int64_t ld,
                                                               double* __restrict__ sum_x,
                                                               double* __restrict__ sum_sq) {
  centre_and_sum_columns(x, D, row_of, lo, hi, 0, D, c, xc, ld, sum_x, sum_sq);
  for (int64_t r = lo; r < hi; ++r)
    for (int64_t j = D; j < D + pad; ++j) xc[r * ld + j] = gemm_t(0);
}
#define SELK_BATCH_STATS(scalar_t, gemm_t)                                                                            \
  SELK_TARGET_CLONES void column_sums(const scalar_t* x, int64_t D, const int64_t* row_of, int64_t lo, int64_t hi,    \
                                      int64_t j0, int64_t w, double* sum) {                                           \
    column_sums_body(x, D, row_of, lo, hi, j0, w, sum);                                                               \
  }                                                                                                                   \
  SELK_TARGET_CLONES void centre_rows(const scalar_t* x, int64_t D, const int64_t* row_of, int64_t lo, int64_t hi,    \
                                      int64_t j0, int64_t w, int64_t pad, const gemm_t* c, gemm_t* xc, int64_t ld) {  \
    centre_rows_body(x, D, row_of, lo, hi, j0, w, pad, c, xc, ld);                                                    \
  }                                                                                                                   \
  SELK_TARGET_CLONES void centre_and_sum(const scalar_t* x, int64_t D, const int64_t* row_of, int64_t lo, int64_t hi, \
                                         int64_t pad, const gemm_t* c, gemm_t* xc, int64_t ld, double* sum_x,         \
                                         double* sum_sq) {                                                            \
    centre_and_sum_body(x, D, row_of, lo, hi, pad, c, xc, ld, sum_x, sum_sq);                                         \
  }
SELK_BATCH_STATS(float, float)
SELK_BATCH_STATS(double, double)
SELK_BATCH_STATS(c10::Half, float)
SELK_BATCH_STATS(c10::BFloat16, float)
#undef SELK_BATCH_STATS

// What the merge of one class needs, besides its product: n_b, the rounding remainders
// d = mean_b - c, delta = mean_b - mean_a and the Chan weight n_a n_b / n.
struct ClassMerge {
  double n_b;
  double m2_coef;
  const double* d;
  const double* delta;
};

// No FMA contraction in the merge: a vectorized loop body and its remainder may contract
// differently, and entries (i, j) and (j, i) land in different ones; uncontracted, both are the same
// operations on the same values (moments.h), so M2 stays exactly symmetric.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
// out[b] = Chan merge of row i of the product (s[b] = S_ij, j = j0 + b) into row i of the state,
// for b < len; d_row / delta_row point at d[j0], delta[j0].
template <typename gemm_t>
inline __attribute__((always_inline)) void merge_row_body(double* __restrict__ out, const gemm_t* __restrict__ s,
                                                          int64_t len, double n_b, double d_i,
                                                          const double* __restrict__ d_row, double m2_coef,
                                                          double delta_i, const double* __restrict__ delta_row) {
#pragma omp simd
  for (int64_t b = 0; b < len; ++b)
    out[b] = chan_m2_entry(out[b], static_cast<double>(s[b]), n_b, d_i, d_row[b], m2_coef, delta_i, delta_row[b]);
}
SELK_TARGET_CLONES void merge_row(double* out, const float* s, int64_t len, double n_b, double d_i, const double* d_row,
                                  double m2_coef, double delta_i, const double* delta_row) {
  merge_row_body(out, s, len, n_b, d_i, d_row, m2_coef, delta_i, delta_row);
}
SELK_TARGET_CLONES void merge_row(double* out, const double* s, int64_t len, double n_b, double d_i,
                                  const double* d_row, double m2_coef, double delta_i, const double* delta_row) {
  merge_row_body(out, s, len, n_b, d_i, d_row, m2_coef, delta_i, delta_row);
}
#pragma GCC pop_options

// t[b * ldt + a] = s[a * lds + b] (or += where add) for a < rows, b < cols, in cache-sized blocks.
template <typename T>
inline __attribute__((always_inline)) void transpose_into_body(const T* __restrict__ s, int64_t lds, int64_t rows,
                                                               int64_t cols, T* __restrict__ t, int64_t ldt, bool add) {
  constexpr int64_t B = 16;
  for (int64_t a0 = 0; a0 < rows; a0 += B)
    for (int64_t b0 = 0; b0 < cols; b0 += B) {
      const int64_t a1 = std::min(rows, a0 + B), b1 = std::min(cols, b0 + B);
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t a = a0; a < a1; ++a) t[b * ldt + a] = add ? t[b * ldt + a] + s[a * lds + b] : s[a * lds + b];
    }
}
#if defined(__x86_64__) && defined(__GNUC__)
// float: 8 x 8 blocks transposed in AVX2 registers, the rest by the generic loop.
__attribute__((target("avx2"))) void transpose_into_avx2(const float* __restrict__ s, int64_t lds, int64_t rows,
                                                         int64_t cols, float* __restrict__ t, int64_t ldt, bool add) {
  const int64_t rows8 = rows / 8 * 8, cols8 = cols / 8 * 8;
  for (int64_t a0 = 0; a0 < rows8; a0 += 8)
    for (int64_t b0 = 0; b0 < cols8; b0 += 8) {
      __m256 r[8], u[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s + (a0 + i) * lds + b0);
      for (int i = 0; i < 8; i += 2) {
        u[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        u[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(u[i], u[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 1] = _mm256_shuffle_ps(u[i], u[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[i + 2] = _mm256_shuffle_ps(u[i + 1], u[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 3] = _mm256_shuffle_ps(u[i + 1], u[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
      for (int i = 0; i < 4; ++i) {
        u[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
        u[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
      }
      for (int i = 0; i < 8; ++i) {  // u[i]: column b0 + i of the block
        float* out = t + (b0 + i) * ldt + a0;
        _mm256_storeu_ps(out, add ? _mm256_add_ps(_mm256_loadu_ps(out), u[i]) : u[i]);
      }
    }
  transpose_into_body(s + rows8 * lds, lds, rows - rows8, cols, t + rows8, ldt, add);
  transpose_into_body(s + cols8, lds, rows8, cols - cols8, t + cols8 * ldt, ldt, add);
}
#endif
void transpose_into(const float* s, int64_t lds, int64_t rows, int64_t cols, float* t, int64_t ldt, bool add) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return transpose_into_avx2(s, lds, rows, cols, t, ldt, add);
#endif
  transpose_into_body(s, lds, rows, cols, t, ldt, add);
}
SELK_TARGET_CLONES void transpose_into(const double* s, int64_t lds, int64_t rows, int64_t cols, double* t, int64_t ldt,
                                       bool add) {
  transpose_into_body(s, lds, rows, cols, t, ldt, add);
}

// Small classes: for every (class, block of kRowBlock state rows) task, those rows of S_k from
// xc (row stride ld >= D rounded up to NR, plus kMR spare elements at the end, so the padded
// blocks read inside the buffer), merged at once, row by row.
template <typename gemm_t>
void small_classes_update(const gemm_t* xc, int64_t ld, int64_t D, const std::vector<int64_t>& classes,
                          const std::vector<int64_t>& offsets, const std::vector<ClassMerge>& merges, double* m2p) {
  constexpr int NR = nr_of<gemm_t>();
  const int64_t blocks = (D + kRowBlock - 1) / kRowBlock;
  const int64_t tasks = static_cast<int64_t>(classes.size()) * blocks;
  const int64_t tb = round_up(D, NR);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<gemm_t> s(kRowBlock * tb);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c = t / blocks, k = classes[c];
      const int64_t i0 = (t % blocks) * kRowBlock, rows = std::min(kRowBlock, D - i0);
      const gemm_t* xk = xc + offsets[k] * ld;
      double* out = m2p + (k * D + i0) * D;
      // The state rows stream in while the product is formed (they are read-modify-written below).
      panel_product(xk + i0, ld, xk, ld, offsets[k + 1] - offsets[k], round_up(rows, kMR), tb, s.data(), out, rows * D);
      const ClassMerge& m = merges[c];
      for (int64_t a = 0; a < rows; ++a)
        merge_row(out + a * D, s.data() + a * tb, D, m.n_b, m.d[i0 + a], m.d, m.m2_coef, m.delta[i0 + a], m.delta);
    }
  });
}

// The BLAS that torch links, reached through weak symbols where torch's library exports them
// (null where it does not):
//  * MKL_Set_Num_Threads_Local, the C entry point that mkl_service.h names
//    mkl_set_num_threads_local (the exported lowercase symbol is the Fortran one, which takes a
//    pointer): SequentialBlas below;
//  * the Fortran GEMMs of MKL or OpenBLAS, called directly by exported_gemm_tn: at::mm_out and its
//    operand views spend ~5 us per call in dispatch, and the one-set update of [512, 256] makes 8
//    block-row products (~15% of its time). torch's own call passes the same arguments (32-bit
//    sizes, alpha 1, beta 0), so both routes give the same bits (checked with the fallback forced).
#if defined(__GNUC__) && defined(__linux__)
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                       const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
extern "C" void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
                       const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
#endif

// BLAS runs single-threaded inside the update's own parallel regions (MKL does so by itself in a
// nested region; this also covers a region that ran inline on one thread): a multi-threaded GEMM
// may split the reduction over the rows, so its bits would depend on the thread count. Where the
// BLAS is not MKL (no such symbol) the guard does nothing.
struct SequentialBlas {
#if defined(__GNUC__) && defined(__linux__)
  int previous = 0;
  SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
  }
#endif
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;
};

// The upper block trapezoid of a large class's S_k, by block rows g of kTile rows (block row g:
// xc[:, g0:g0 + kTile]^T xc[:, g0:], one GEMM), stored one after the other.
struct Trapezoid {
  int64_t D, T;                       // T block rows
  std::vector<int64_t> piece_offset;  // where block row g's product [rows, D - g0] starts
  int64_t size = 0;
  explicit Trapezoid(int64_t D_) : D(D_), T((D_ + kTile - 1) / kTile) {
    for (int64_t g0 = 0; g0 < D; g0 += kTile) {
      piece_offset.push_back(size);
      size += std::min(kTile, D - g0) * (D - g0);
    }
  }
  // Work items pair block rows g and T - 1 - g (T + 1 tiles together), so items cost alike.
  int64_t pairs() const { return (T + 1) / 2; }
  int64_t rows(int64_t g) const { return std::min(kTile, D - g * kTile); }
  int64_t cols(int64_t g) const { return D - g * kTile; }
};

// out [n, m] row-major = P[:, 0:n]^T P[:, 0:m] for the row-major [k, ld] matrix P at p, by the
// exported BLAS: column-major, out^T = P^T[0:m, :] (P^T[0:n, :])^T, one "N", "T" GEMM. False
// where there is no exported GEMM or a size does not fit the BLAS's int (then at::mm_out).
template <typename T>
bool exported_gemm_tn(int64_t m, int64_t n, int64_t k, const T* p, int64_t ld, T* out) {
#if defined(__GNUC__) && defined(__linux__)
  const bool exported = std::is_same_v<T, float> ? sgemm_ != nullptr : dgemm_ != nullptr;
  if (!exported || std::max({m, n, k, ld}) > std::numeric_limits<int>::max()) return false;
  const int m_ = static_cast<int>(m), n_ = static_cast<int>(n), k_ = static_cast<int>(k), ld_ = static_cast<int>(ld);
  const T one = 1, zero = 0;
  if constexpr (std::is_same_v<T, float>) {
    sgemm_("N", "T", &m_, &n_, &k_, &one, p, &ld_, p, &ld_, &zero, out, &m_);
  } else {
    dgemm_("N", "T", &m_, &n_, &k_, &one, p, &ld_, p, &ld_, &zero, out, &m_);
  }
  return true;
#else
  return false;
#endif
}

// Block row g of S from n rows of xc (any row range of the class, row stride ld) into
// out [rows, D - g0]. No tensor is made unless the products fall back to at::mm_out.
template <typename gemm_t>
void block_row_product(const gemm_t* xc_rows, int64_t n, int64_t ld, const Trapezoid& tz, int64_t g, gemm_t* out) {
  const int64_t g0 = g * kTile;
  if (exported_gemm_tn(tz.cols(g), tz.rows(g), n, xc_rows + g0, ld, out)) return;
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<gemm_t>::value);
  const at::Tensor rows = at::from_blob(const_cast<gemm_t*>(xc_rows), {n, tz.D}, {ld, 1}, options);
  at::Tensor dst = at::from_blob(out, {tz.rows(g), tz.cols(g)}, options);
  at::mm_out(dst, rows.narrow(1, g0, tz.rows(g)).t(), rows.narrow(1, g0, tz.cols(g)));
}

// Chan merge of block row g of S (s: [rows, cols], rows = tz.rows(g), cols = D - g0: columns
// g0 .. g0 + rows of S against columns g0 .. D) into the state block m2k: state rows g0 .. g0 + rows
// from column g0 on, one merge_row each, then the mirror, columns g0 .. g0 + rows of the state rows
// below, from the transposed rest of s. The diagonal block's lower triangle is first overwritten by
// its upper one (s is scratch), so entries (i, j) and (j, i) are merged from the same value.
constexpr int64_t kPrefetchRows = 16;  // state rows prefetched ahead of a block row's merge
inline void prefetch_for_write(const double* p, int64_t len) {
  for (int64_t o = 0; o < len; o += 64 / static_cast<int64_t>(sizeof(double))) __builtin_prefetch(p + o, 1, 3);
}

template <typename gemm_t>
void merge_block_row(const Trapezoid& tz, int64_t g, gemm_t* s, const ClassMerge& m, double* m2k,
                     std::vector<gemm_t>& scratch) {
  const int64_t D = tz.D, g0 = g * kTile, rows = tz.rows(g), cols = tz.cols(g);
  const int64_t rest = cols - rows;
  // The state rows are prefetched kPrefetchRows ahead: row t of the block row's rows + rest rows,
  // the direct ones, then the mirror ones (whose short segments the hardware prefetcher would
  // not fetch early).
  const auto prefetch_row = [&](int64_t t) {
    if (t < rows) {
      prefetch_for_write(m2k + (g0 + t) * D + g0, cols);
    } else if (t < rows + rest) {
      prefetch_for_write(m2k + (g0 + t) * D + g0, rows);
    }
  };
  for (int64_t t = 0; t < kPrefetchRows; ++t) prefetch_row(t);
  for (int64_t a = 1; a < rows; ++a)
    for (int64_t b = 0; b < a; ++b) s[a * cols + b] = s[b * cols + a];
  for (int64_t a = 0; a < rows; ++a) {
    prefetch_row(a + kPrefetchRows);
    merge_row(m2k + (g0 + a) * D + g0, s + a * cols, cols, m.n_b, m.d[g0 + a], m.d + g0, m.m2_coef, m.delta[g0 + a],
              m.delta + g0);
  }
  if (rest == 0) return;
  scratch.resize(rest * rows);
  transpose_into(s + rows, cols, rows, rest, scratch.data(), rows, false);
  for (int64_t b = 0; b < rest; ++b) {
    const int64_t j = g0 + rows + b;
    prefetch_row(rows + b + kPrefetchRows);
    merge_row(m2k + j * D + g0, scratch.data() + b * rows, rows, m.n_b, m.d[j], m.d + g0, m.m2_coef, m.delta[j],
              m.delta + g0);
  }
}

// Large classes: BLAS products of the upper trapezoid and their merges, one parallel region over
// (class, pair of block rows) items, each product merged at once by the thread that made it. With
// fewer than kSplitItems such items (one large class of D up to ~1000, the usual one-set update),
// a class's rows are also cut into R chunks of kMinChunkRows rows or more, each chunk's products
// made on their own (for float32 GEMMs right after the chunk is centred, by the same task: see
// class_moments_update_typed) and summed in chunk order by the merging item. The items and R
// depend only on D and the class sizes, never on the thread count.
constexpr int64_t kSplitItems = 8;      // cut rows while there are fewer (class, pair) items
constexpr int64_t kMinChunkRows = 256;  // rows per chunk at least

template <typename gemm_t>
struct LargeClasses {
  const gemm_t* xc;  // the centred rows, row stride ld
  int64_t ld;
  const std::vector<int64_t>& classes;  // the large classes, in increasing order
  const std::vector<int64_t>& offsets;
  Trapezoid tz;
  std::vector<int64_t> chunks;                     // R of each class (1: not cut)
  std::vector<std::unique_ptr<gemm_t[]>> partial;  // [R, tz.size] chunk products of the classes cut

  LargeClasses(const gemm_t* xc_, int64_t ld_, int64_t D, const std::vector<int64_t>& classes_,
               const std::vector<int64_t>& offsets_)
      : xc(xc_),
        ld(ld_),
        classes(classes_),
        offsets(offsets_),
        tz(D),
        chunks(classes_.size()),
        partial(classes_.size()) {
    const int64_t L = static_cast<int64_t>(classes.size()), Q = tz.pairs();
    const int64_t max_chunks = L == 0 ? 1 : std::max<int64_t>(1, (kSplitItems + L * Q - 1) / (L * Q));
    for (int64_t c = 0; c < L; ++c) {
      chunks[c] = std::clamp<int64_t>(size(c) / kMinChunkRows, 1, max_chunks);
      if (chunks[c] > 1) partial[c].reset(new gemm_t[chunks[c] * tz.size]);  // uninitialized: all written
    }
  }
  int64_t size(int64_t c) const { return offsets[classes[c] + 1] - offsets[classes[c]]; }
  // rows [first, second) of chunk r of class c, out of `count` chunks
  std::pair<int64_t, int64_t> rows(int64_t c, int64_t r, int64_t count) const {
    const int64_t lo = offsets[classes[c]], n = size(c);
    return {lo + n * r / count, lo + n * (r + 1) / count};
  }
  // every block row's product of chunk r of a class cut in chunks (call with BLAS sequential)
  void chunk_products(int64_t c, int64_t r) const {
    const auto [b, e] = rows(c, r, chunks[c]);
    gemm_t* out = partial[c].get() + r * tz.size;
    for (int64_t g = 0; g < tz.T; ++g) block_row_product(xc + b * ld, e - b, ld, tz, g, out + tz.piece_offset[g]);
  }
  // chunk products of the classes cut in chunks, where not made yet, in one parallel region
  void chunk_products() const {
    std::vector<std::pair<int64_t, int64_t>> items;
    for (int64_t c = 0; c < static_cast<int64_t>(classes.size()); ++c)
      for (int64_t r = 0; chunks[c] > 1 && r < chunks[c]; ++r) items.emplace_back(c, r);
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
      const SequentialBlas sequential;
      for (int64_t t = begin; t < end; ++t) chunk_products(items[t].first, items[t].second);
    });
  }
  // State rows g0 .. g0 + rows of a class cut in chunks, whole rows: S's rows assembled in buf
  // [rows, D] from the chunks' trapezoids, summed in chunk order (columns left of g0 from the
  // transposed column block g of the earlier block rows' products), then one merge_row per row.
  // Entries (i, j) and (j, i) are the same sums of the same products, so M2 stays symmetric, and
  // the threads write disjoint runs of whole rows (interleaved segments of one block would bounce
  // cache lines between the cores).
  void merge_rows(int64_t c, int64_t g, const ClassMerge& m, double* m2k, std::vector<gemm_t>& buf) const {
    const int64_t D = tz.D, g0 = g * kTile, rows = tz.rows(g), cols = tz.cols(g);
    const gemm_t* base = partial[c].get();
    buf.resize(rows * D);
    gemm_t* out = buf.data();
    for (int64_t r = 0; r < chunks[c]; ++r) {
      const gemm_t* part = base + r * tz.size;
      for (int64_t h = 0; h < g; ++h)  // S[g0 + a, h0 + b] = piece h [b, g0 - h0 + a]
        transpose_into(part + tz.piece_offset[h] + (g0 - h * kTile), tz.cols(h), tz.rows(h), rows, out + h * kTile, D,
                       r > 0);
      for (int64_t a = 0; a < rows; ++a) {
        const gemm_t* src = part + tz.piece_offset[g] + a * cols;
        gemm_t* dst = out + a * D + g0;
        if (r == 0) {
          std::copy(src, src + cols, dst);
        } else {
#pragma omp simd
          for (int64_t e = 0; e < cols; ++e) dst[e] += src[e];
        }
      }
    }
    for (int64_t a = 1; a < rows; ++a)  // the diagonal block from its upper triangle
      for (int64_t b = 0; b < a; ++b) out[a * D + g0 + b] = out[b * D + g0 + a];
    for (int64_t a = 0; a < rows; ++a) {
      if (a + kPrefetchRows < rows) prefetch_for_write(m2k + (g0 + a + kPrefetchRows) * D, D);
      merge_row(m2k + (g0 + a) * D, out + a * D, D, m.n_b, m.d[g0 + a], m.d, m.m2_coef, m.delta[g0 + a], m.delta);
    }
  }

  // The merges, in one parallel region: classes cut in chunks by (class, block row of state rows)
  // items (merge_rows); the others by (class, pair of block rows) items, each block row's GEMM then
  // merged at once (merge_block_row: the class's rows and their mirror columns; one thread per
  // class where there are enough classes).
  void merge(const std::vector<ClassMerge>& merges, double* m2p) const {
    const int64_t D = tz.D;
    std::vector<std::pair<int64_t, int64_t>> items;  // (class, block row or pair)
    for (int64_t c = 0; c < static_cast<int64_t>(classes.size()); ++c) {
      if (chunks[c] > 1) {
        // block rows 0, T - 1, 1, T - 2, ...: the threads' shares hold as many transposed columns
        for (int64_t i = 0; i < tz.T; ++i) items.emplace_back(c, i % 2 == 0 ? i / 2 : tz.T - 1 - i / 2);
      } else {
        for (int64_t q = 0; q < tz.pairs(); ++q) items.emplace_back(c, q);
      }
    }
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
      const SequentialBlas sequential;
      std::vector<gemm_t> product, scratch;
      for (int64_t t = begin; t < end; ++t) {
        const auto [c, i] = items[t];
        double* m2k = m2p + classes[c] * D * D;
        if (chunks[c] > 1) {
          merge_rows(c, i, merges[c], m2k, product);
          continue;
        }
        const int64_t pair[2] = {i, tz.T - 1 - i};  // the middle block row of an odd T alone
        for (int h = 0; h < (pair[1] == i ? 1 : 2); ++h) {
          const int64_t g = pair[h];
          product.resize(tz.rows(g) * tz.cols(g));
          block_row_product(xc + offsets[classes[c]] * ld, size(c), ld, tz, g, product.data());
          merge_block_row(tz, g, product.data(), merges[c], m2k, scratch);
        }
      }
    });
  }
};

// What the Python front cannot guarantee for a direct torch.ops call: shapes, dtypes, and a
// segmentation that indexes inside z (checked in O(N + K) before anything is read or written).
void check_args(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& counts, const at::Tensor& offsets,
                const at::Tensor& order, const at::Tensor& invalid, const at::Tensor& count, const at::Tensor& mean,
                const at::Tensor& m2) {
  TORCH_CHECK(x.dim() == 2, "selkernels: z must be [N, D], got ", x.dim(), " dims");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "selkernels: z must be floating point, got ", x.scalar_type());
  check_segmentation_args(labels, counts, offsets, order, invalid);
  const int64_t N = x.size(0), K = count.size(0), D = x.size(1);
  TORCH_CHECK(labels.size(0) == N, "selkernels: the segmentation has ", labels.size(0), " samples, z has ", N);
  TORCH_CHECK(counts.size(0) == K, "selkernels: the segmentation has ", counts.size(0), " classes, the state ", K);
  TORCH_CHECK(count.dim() == 1 && count.scalar_type() == at::kLong && count.is_contiguous(),
              "selkernels: count must be a contiguous int64 [K] tensor");
  TORCH_CHECK(mean.dim() == 2 && mean.size(0) == K && mean.size(1) == D && mean.scalar_type() == at::kDouble &&
                  mean.is_contiguous(),
              "selkernels: mean must be a contiguous float64 [K, D] tensor with D = z.size(1)");
  TORCH_CHECK(m2.dim() == 3 && m2.size(0) == K && m2.size(1) == D && m2.size(2) == D &&
                  m2.scalar_type() == at::kDouble && m2.is_contiguous(),
              "selkernels: M2 must be a contiguous float64 [K, D, D] tensor");
  TORCH_CHECK_VALUE(invalid.item<int64_t>() == 0, "selkernels: ", invalid.item<int64_t>(),
                    " labels lie outside [0, num_classes=", K, ") and are not ignore_index");
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  const int64_t* ord = order.const_data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[K] <= N, "selkernels: offsets must run from 0 to at most N");
  for (int64_t k = 0; k < K; ++k) TORCH_CHECK(off[k] <= off[k + 1], "selkernels: offsets must be non-decreasing");
  for (int64_t r = 0; r < off[K]; ++r)
    TORCH_CHECK(ord[r] >= 0 && ord[r] < N, "selkernels: order[", r, "] = ", ord[r], " is not a row of z");
}

template <typename scalar_t, typename gemm_t>
void class_moments_update_typed(const at::Tensor& x, const at::Tensor& offsets_in, const at::Tensor& order_in,
                                at::Tensor& count, at::Tensor& mean, at::Tensor& m2) {
  const int64_t D = x.size(1), K = count.size(0);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  int64_t* cnt = count.data_ptr<int64_t>();
  double* mp = mean.data_ptr<double>();
  double* m2p = m2.data_ptr<double>();

  // 1. the segmentation; the present classes in increasing order. Rows already in class order
  // (one class, always) need no permutation: class k is rows offsets[k] .. offsets[k + 1] of x.
  const int64_t* op = offsets_in.const_data_ptr<int64_t>();
  const std::vector<int64_t> offsets(op, op + K + 1);
  const int64_t N = offsets[K];  // the rows in a class; the rest are ignored
  const int64_t* order = order_in.const_data_ptr<int64_t>();
  bool in_place = true;
  for (int64_t r = 0; r < N && in_place; ++r) in_place = order[r] == r;
  const int64_t* row_of = in_place ? nullptr : order;
  std::vector<int64_t> present;
  for (int64_t k = 0; k < K; ++k)
    if (offsets[k + 1] > offsets[k]) present.push_back(k);
  const int64_t P = static_cast<int64_t>(present.size());

  // Per present class p (class present[p]): the shift c of its rows (GEMM precision), the
  // remainder d = mean_b - c and delta = mean_b - mean_a, and what the merge needs.
  // (uninitialized: every entry of a present class is written in the statistics pass)
  const std::unique_ptr<double[]> rem(new double[P * D]), delta(new double[P * D]);
  const std::unique_ptr<gemm_t[]> shift(new gemm_t[P * D]);
  std::vector<ClassMerge> merges(P);
  std::vector<int64_t> small_at, large_at;  // present classes of fewer / at least kGemmRows rows
  for (int64_t p = 0; p < P; ++p) {
    const int64_t k = present[p], nb = offsets[k + 1] - offsets[k];
    merges[p] = {static_cast<double>(nb), chan_weights(cnt[k], nb).m2_coef, rem.get() + p * D, delta.get() + p * D};
    (nb < kGemmRows ? small_at : large_at).push_back(p);
  }
  // Statistics by column blocks (exact_at) or by chunks of rows about a pilot shift (pilot_at, the
  // large classes; not for float64 z, whose float64 GEMMs would show the pilot shift's larger Gram
  // sums in their last digits).
  const bool pilot = !std::is_same_v<gemm_t, double>;
  std::vector<int64_t> exact_at = pilot ? small_at : std::vector<int64_t>(P), pilot_at;
  if (pilot) {
    pilot_at = large_at;
  } else {
    for (int64_t p = 0; p < P; ++p) exact_at[p] = p;
  }
  const auto finish_column = [&](int64_t p, int64_t j, double mb) {  // given c: d, delta, the mean's step
    const int64_t k = present[p], nb = offsets[k + 1] - offsets[k];
    rem[p * D + j] = mb - static_cast<double>(shift[p * D + j]);
    const double dl = mb - mp[k * D + j];
    delta[p * D + j] = dl;
    mp[k * D + j] += dl * chan_weights(cnt[k], nb).mean_weight;
  };

  // 2. the batch statistics and the centred rows xc = x - c in the GEMM precision, class-contiguous,
  // row stride ld (D rounded up to the product's vector width; the padding and kMR spare elements
  // at the end are zero, see small_classes_update), in one parallel region:
  //  * exact_at: one task per (class, block of columns; all of them for a small class): the batch
  //    mean of those columns in float64 (rows summed in order), c its rounding, then the centred
  //    columns (a second read of the rows, from cache for a small class);
  //  * pilot_at: one read of x. c is the mean of the class's first kPilotRows rows (rounded), near
  //    the batch mean, so xc stays small (no cancellation in the Gram matrix); one task per chunk
  //    of rows writes xc and sums x and xc^2 per column (float64, rows in order, chunks combined
  //    in order). A column whose batch mean turns out farther from c than kShiftSlack standard
  //    deviations (skewed first rows; about 1e-8 of the columns for normal data) is centred again
  //    on its batch mean: the Gram matrix's error bound, ~ n sqrt((var_i + d_i^2)(var_j + d_j^2))
  //    ulps for d = mean_b - c, stays within (1 + kShiftSlack^2) of the batch-mean shift's.
  const int64_t ld = round_up(D, nr_of<gemm_t>());
  const at::DataPtr xc_buf = c10::GetCPUAllocator()->allocate((N * ld + kMR) * sizeof(gemm_t));  // 64-byte aligned
  gemm_t* xcp = static_cast<gemm_t*>(xc_buf.get());
  std::fill(xcp + N * ld, xcp + N * ld + kMR, gemm_t(0));
  std::vector<int64_t> small, large;  // the classes of small_at, large_at
  for (const int64_t p : small_at) small.push_back(present[p]);
  for (const int64_t p : large_at) large.push_back(present[p]);
  const LargeClasses<gemm_t> large_classes(xcp, ld, D, large, offsets);
  // exact_at class e: tasks first_exact[e] .. first_exact[e + 1], blocks of kMeanCols columns (one
  // task of all columns for a small class: its few rows are read whole)
  std::vector<int64_t> first_exact(exact_at.size() + 1, 0);
  for (size_t e = 0; e < exact_at.size(); ++e) {
    const int64_t k = present[exact_at[e]];
    first_exact[e + 1] =
        first_exact[e] + (offsets[k + 1] - offsets[k] < kGemmRows ? 1 : (D + kMeanCols - 1) / kMeanCols);
  }
  const int64_t exact_tasks = first_exact.back();
  // Chunks of pilot class i (large class i): first_chunk[i] .. first_chunk[i + 1], a fixed count for
  // the class size; the large classes' own chunks where they are cut, whose products the chunk's
  // task then makes at once (the rows it has just centred are in its cache).
  std::vector<int64_t> first_chunk(pilot_at.size() + 1, 0);
  for (size_t i = 0; i < pilot_at.size(); ++i) {
    const int64_t chunks = large_classes.chunks[i] > 1
                               ? large_classes.chunks[i]
                               : std::clamp<int64_t>(large_classes.size(i) / kStatRows, 1, kMaxStatChunks);
    first_chunk[i + 1] = first_chunk[i] + chunks;
  }
  const auto chunk_rows = [&](size_t i, int64_t q) {  // rows [lo, hi) of chunk q of pilot class i
    return large_classes.rows(i, q, first_chunk[i + 1] - first_chunk[i]);
  };
  for (const int64_t p : pilot_at) {  // the pilot shifts
    const int64_t lo = offsets[present[p]], n = std::min(kPilotRows, offsets[present[p] + 1] - lo);
    double sum[kMeanCols];
    for (int64_t j0 = 0; j0 < D; j0 += kMeanCols) {
      const int64_t w = std::min(kMeanCols, D - j0);
      column_sums(xp, D, row_of, lo, lo + n, j0, w, sum);
      for (int64_t j = 0; j < w; ++j) shift[p * D + j0 + j] = static_cast<gemm_t>(sum[j] / static_cast<double>(n));
    }
  }
  std::vector<double> chunk_sums(first_chunk.back() * 2 * D);  // per chunk: sum of x, sum of xc^2
  at::parallel_for(0, exact_tasks + first_chunk.back(), 1, [&](int64_t begin, int64_t end) {
    const SequentialBlas sequential;
    std::vector<double> sum;
    for (int64_t t = begin; t < end; ++t) {
      if (t >= exact_tasks) {
        const int64_t q = t - exact_tasks;
        const size_t i = std::upper_bound(first_chunk.begin(), first_chunk.end(), q) - first_chunk.begin() - 1;
        const auto [lo, hi] = chunk_rows(i, q - first_chunk[i]);
        double* sums = chunk_sums.data() + q * 2 * D;
        centre_and_sum(xp, D, row_of, lo, hi, ld - D, shift.get() + pilot_at[i] * D, xcp, ld, sums, sums + D);
        if (large_classes.chunks[i] > 1) large_classes.chunk_products(i, q - first_chunk[i]);
        continue;
      }
      const size_t e = std::upper_bound(first_exact.begin(), first_exact.end(), t) - first_exact.begin() - 1;
      const int64_t p = exact_at[e], k = present[p];
      const int64_t blocks = first_exact[e + 1] - first_exact[e];
      const int64_t j0 = (t - first_exact[e]) * kMeanCols, w = blocks == 1 ? D : std::min(kMeanCols, D - j0);
      const int64_t lo = offsets[k], hi = offsets[k + 1];
      sum.resize(w);
      column_sums(xp, D, row_of, lo, hi, j0, w, sum.data());
      gemm_t* c = shift.get() + p * D + j0;
      for (int64_t j = 0; j < w; ++j) {
        const double mb = sum[j] / static_cast<double>(hi - lo);
        c[j] = static_cast<gemm_t>(mb);
        finish_column(p, j0 + j, mb);
      }
      const int64_t pad = j0 + w == D ? ld - D : 0;  // the last column block zeroes the padding
      centre_rows(xp, D, row_of, lo, hi, j0, w, pad, c, xcp, ld);
    }
  });
  std::vector<size_t> recentre;  // pilot classes with a column centred again
  for (size_t i = 0; i < pilot_at.size(); ++i) {
    const int64_t p = pilot_at[i], nb = offsets[present[p] + 1] - offsets[present[p]];
    bool moved = false;
    for (int64_t j = 0; j < D; ++j) {
      double sx = 0.0, sq = 0.0;
      for (int64_t q = first_chunk[i]; q < first_chunk[i + 1]; ++q) {
        sx += chunk_sums[q * 2 * D + j];
        sq += chunk_sums[q * 2 * D + D + j];
      }
      const double mb = sx / static_cast<double>(nb), d = mb - static_cast<double>(shift[p * D + j]);
      const double offset_sq = static_cast<double>(nb) * d * d;  // = sq - nb * variance
      if (!(offset_sq <= kShiftSlack * kShiftSlack * (sq - offset_sq))) {
        shift[p * D + j] = static_cast<gemm_t>(mb);
        moved = true;
      }
      finish_column(p, j, mb);
    }
    if (moved) recentre.push_back(i);
  }
  if (!recentre.empty()) {                          // centred again, and the chunk products made again
    std::vector<std::pair<size_t, int64_t>> tasks;  // (pilot class, chunk)
    for (const size_t i : recentre)
      for (int64_t q = 0; q < first_chunk[i + 1] - first_chunk[i]; ++q) tasks.emplace_back(i, q);
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
      const SequentialBlas sequential;
      for (int64_t t = begin; t < end; ++t) {
        const auto [i, q] = tasks[t];
        const auto [lo, hi] = chunk_rows(i, q);
        centre_rows(xp, D, row_of, lo, hi, 0, D, ld - D, shift.get() + pilot_at[i] * D, xcp, ld);
        if (large_classes.chunks[i] > 1) large_classes.chunk_products(i, q);
      }
    });
  }

  // 3. products and merges
  const auto merges_of = [&](const std::vector<int64_t>& at_p) {
    std::vector<ClassMerge> out;
    for (const int64_t p : at_p) out.push_back(merges[p]);
    return out;
  };
  if (!small.empty()) small_classes_update<gemm_t>(xcp, ld, D, small, offsets, merges_of(small_at), m2p);
  if (!large.empty()) {
    if (!pilot) large_classes.chunk_products();  // not made with the statistics
    large_classes.merge(merges_of(large_at), m2p);
  }
  for (const int64_t k : present) cnt[k] += offsets[k + 1] - offsets[k];
}

void class_moments_update_cpu(const at::Tensor& x_in, const at::Tensor& labels, const at::Tensor& counts,
                              const at::Tensor& offsets, const at::Tensor& order, const at::Tensor& invalid,
                              at::Tensor count, at::Tensor mean, at::Tensor m2) {
  check_args(x_in, labels, counts, offsets, order, invalid, count, mean, m2);
  if (x_in.size(0) == 0 || x_in.size(1) == 0) return;
  // The GEMMs run in the precision chosen here (float32, or float64 for float64 z), never in an
  // autocast dtype.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::Tensor x = x_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "selkernels_class_moments_update", [&] {
    using gemm_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    class_moments_update_typed<scalar_t, gemm_t>(x, offsets, order, count, mean, m2);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(selkernels, CPU, m) { m.impl("class_moments_update_", &class_moments_update_cpu); }

}  // namespace selk
