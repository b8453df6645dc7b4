// CPU kernel of the streaming moments update (class_moments_update_; the single-set update is the
// same op with one class).
//
// One call per batch, no loop over classes in Python:
//   1. counting sort of the labels (class k = rows order[offsets[k] .. offsets[k + 1]))
//   2. class batch means in float64, one task per (class, block of columns), rows summed in order
//   3. centred rows xc = x - c_k in the GEMM precision, written class-contiguous, c_k the class
//      batch mean rounded to that precision (small values: no cancellation in the Gram matrix)
//   4. Gram matrix S_k = xc_k^T xc_k of each present class and the Chan merge of
//      (n_b, mean_b, S_k - n_b d d^T) into the float64 state, in ONE read-write pass over each
//      class's D x D block (the pass is the floor of the whole update).
//      * Small classes (n_b < kGemmRows, the usual per-class case): one task per (class, block of
//        kRowBlock state rows) computes that block's rows of S_k with a register-blocked product
//        straight from xc and merges them at once, streaming whole state rows; no Gram matrix in
//        memory. The product is cheap next to the state pass here, so it is not halved.
//      * Large classes (the one-set update): ATen GEMMs (BLAS) on the upper block trapezoid of S_k
//        only (~(T + 1) / 2T of a full product for T blocks per side) into a buffer, then one merge
//        pass over kTile x kTile state tiles (I, J), I <= J, each writing (I, J) and its mirror
//        (J, I) from the same product values.
// Deterministic: fixed summation orders, no atomics, results independent of the thread count.
// Absent classes are not touched. M2 stays exactly symmetric: both mirror entries are computed
// from the same product value with the same operations.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/moments.h"
#include "cpu/target_clones.h"

namespace selk {
namespace {

constexpr int64_t kTile = 64;      // side of a state tile (and of a GEMM block row)
constexpr int64_t kGemmRows = 64;  // classes with at least this many rows in the batch use BLAS
constexpr int64_t kMeanCols = 64;  // columns per class-mean task

// Register-blocked product S[a, b] = sum_r A[r * lda + a] B[r * ldb + b] for a < ta (a multiple
// of MR), b < tb (a multiple of NR); S row-major [ta, tb]. The MR x NR accumulator block stays in
// registers over the n rows, so every B load feeds MR FMAs. Entry (a, b) is the same sequence of
// FMAs as the entry with A and B swapped, so the product of a matrix with itself is exactly symmetric.
template <typename T, int MR, int NR>
inline __attribute__((always_inline)) void panel_product_body(const T* __restrict__ A, int64_t lda,
                                                              const T* __restrict__ B, int64_t ldb, int64_t n,
                                                              int64_t ta, int64_t tb, T* __restrict__ S) {
  for (int64_t a0 = 0; a0 < ta; a0 += MR) {
    for (int64_t b0 = 0; b0 < tb; b0 += NR) {
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
                                      int64_t tb, float* S) {
  panel_product_body<float, kMR, kNRFloat>(A, lda, B, ldb, n, ta, tb, S);
}
SELK_TARGET_CLONES void panel_product(const double* A, int64_t lda, const double* B, int64_t ldb, int64_t n, int64_t ta,
                                      int64_t tb, double* S) {
  panel_product_body<double, kMR, kNRDouble>(A, lda, B, ldb, n, ta, tb, S);
}

template <typename T>
constexpr int nr_of() {
  return std::is_same_v<T, double> ? kNRDouble : kNRFloat;
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

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

// Chan merge of the product tile s (rows i0 .. i0 + ti, columns j0 .. j0 + tj of S_k, row stride
// lds) into the state block m2 [D, D]: entries (i, j) and, for i0 != j0, the mirror (j, i), both
// row by row (the tile is transposed into scratch for the mirror). On a diagonal tile only the
// upper triangle of s is read, so mirror entries get identical values.
template <typename gemm_t>
void merge_tile(double* __restrict__ m2, int64_t D, int64_t i0, int64_t ti, int64_t j0, int64_t tj,
                const gemm_t* __restrict__ s, int64_t lds, const ClassMerge& c, std::vector<gemm_t>& scratch) {
  scratch.resize(ti * tj);
  gemm_t* t = scratch.data();
  if (i0 == j0) {
    for (int64_t a = 0; a < ti; ++a)
      for (int64_t b = 0; b < tj; ++b) t[a * tj + b] = a <= b ? s[a * lds + b] : s[b * lds + a];
    s = t;
    lds = tj;
  }
  for (int64_t a = 0; a < ti; ++a)
    merge_row(m2 + (i0 + a) * D + j0, s + a * lds, tj, c.n_b, c.d[i0 + a], c.d + j0, c.m2_coef, c.delta[i0 + a],
              c.delta + j0);
  if (i0 == j0) return;
  for (int64_t a = 0; a < ti; ++a)
    for (int64_t b = 0; b < tj; ++b) t[b * ti + a] = s[a * lds + b];
  for (int64_t b = 0; b < tj; ++b)
    merge_row(m2 + (j0 + b) * D + i0, t + b * ti, ti, c.n_b, c.d[j0 + b], c.d + i0, c.m2_coef, c.delta[j0 + b],
              c.delta + i0);
}

// The tile pairs (I, J), I <= J, of a D x D block.
std::vector<std::pair<int64_t, int64_t>> upper_tiles(int64_t D) {
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t i0 = 0; i0 < D; i0 += kTile)
    for (int64_t j0 = i0; j0 < D; j0 += kTile) tiles.emplace_back(i0, j0);
  return tiles;
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
      panel_product(xk + i0, ld, xk, ld, offsets[k + 1] - offsets[k], round_up(rows, kMR), tb, s.data());
      const ClassMerge& m = merges[c];
      for (int64_t a = 0; a < rows; ++a)
        merge_row(m2p + (k * D + i0 + a) * D, s.data() + a * tb, D, m.n_b, m.d[i0 + a], m.d, m.m2_coef, m.delta[i0 + a],
                  m.delta);
    }
  });
}

// A large class: S's upper block trapezoid by ATen GEMMs (block row g: xc[:, g]^T xc[:, g0:], at
// most 8 calls), then the tile merges in parallel.
template <typename gemm_t>
void large_class_update(const at::Tensor& xc_k, int64_t D, const ClassMerge& merge, double* m2k, at::Tensor& buffer) {
  const int64_t rows_per_call = round_up((D + 7) / 8, kTile);
  std::vector<int64_t> piece_offset;  // where block row g's product [rows, D - g0] starts in buffer
  int64_t used = 0;
  for (int64_t g0 = 0; g0 < D; g0 += rows_per_call) {
    piece_offset.push_back(used);
    used += std::min(rows_per_call, D - g0) * (D - g0);
  }
  if (buffer.numel() < used) buffer = at::empty({used}, xc_k.options());
  for (int64_t g = 0, g0 = 0; g0 < D; ++g, g0 += rows_per_call) {
    const int64_t rows = std::min(rows_per_call, D - g0);
    at::Tensor out = buffer.narrow(0, piece_offset[g], rows * (D - g0)).view({rows, D - g0});
    at::mm_out(out, xc_k.narrow(1, g0, rows).t(), xc_k.narrow(1, g0, D - g0));
  }
  const gemm_t* bp = buffer.data_ptr<gemm_t>();
  const auto tiles = upper_tiles(D);
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<gemm_t> scratch;
    for (int64_t t = begin; t < end; ++t) {
      const auto [i0, j0] = tiles[t];
      const int64_t g = i0 / rows_per_call, g0 = g * rows_per_call;
      const int64_t lds = D - g0;
      const gemm_t* s = bp + piece_offset[g] + (i0 - g0) * lds + (j0 - g0);
      merge_tile(m2k, D, i0, std::min(kTile, D - i0), j0, std::min(kTile, D - j0), s, lds, merge, scratch);
    }
  });
}

void check_state(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& count, const at::Tensor& mean,
                 const at::Tensor& m2) {
  TORCH_CHECK(x.dim() == 2, "selkernels: z must be [N, D], got ", x.dim(), " dims");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "selkernels: z must be floating point, got ", x.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0), "selkernels: labels must be [N] with N = z.size(0)");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "selkernels: labels must be int64");
  const int64_t K = count.size(0), D = x.size(1);
  TORCH_CHECK(count.dim() == 1 && count.scalar_type() == at::kLong && count.is_contiguous(),
              "selkernels: count must be a contiguous int64 [K] tensor");
  TORCH_CHECK(mean.dim() == 2 && mean.size(0) == K && mean.size(1) == D && mean.scalar_type() == at::kDouble &&
                  mean.is_contiguous(),
              "selkernels: mean must be a contiguous float64 [K, D] tensor with D = z.size(1)");
  TORCH_CHECK(m2.dim() == 3 && m2.size(0) == K && m2.size(1) == D && m2.size(2) == D &&
                  m2.scalar_type() == at::kDouble && m2.is_contiguous(),
              "selkernels: M2 must be a contiguous float64 [K, D, D] tensor");
}

template <typename scalar_t, typename gemm_t>
void class_moments_update_typed(const at::Tensor& x, const at::Tensor& labels, at::Tensor& count, at::Tensor& mean,
                                at::Tensor& m2) {
  const int64_t N = x.size(0), D = x.size(1), K = count.size(0);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t* lp = labels.data_ptr<int64_t>();
  int64_t* cnt = count.data_ptr<int64_t>();
  double* mp = mean.data_ptr<double>();
  double* m2p = m2.data_ptr<double>();

  // 1. counting sort; the present classes in increasing order
  std::vector<int64_t> offsets(K + 1, 0);
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(lp[n] >= 0 && lp[n] < K, "selkernels: labels[", n, "] = ", lp[n], " is outside [0, num_classes=", K,
                ")");
    ++offsets[lp[n] + 1];
  }
  std::vector<int64_t> present;
  for (int64_t k = 0; k < K; ++k) {
    if (offsets[k + 1] > 0) present.push_back(k);
    offsets[k + 1] += offsets[k];
  }
  std::vector<int64_t> order(N);
  {
    std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
    for (int64_t n = 0; n < N; ++n) order[fill[lp[n]]++] = n;
  }
  const int64_t P = static_cast<int64_t>(present.size());

  // 2. class batch means (float64), their GEMM-precision rounding c and the remainder d = mean_b - c;
  // delta = mean_b - mean_a for the merge
  std::vector<double> mean_b(K * D, 0.0), rem(K * D, 0.0), delta(K * D, 0.0);
  std::vector<gemm_t> shift(K * D, gemm_t(0));
  const int64_t col_blocks = (D + kMeanCols - 1) / kMeanCols;
  at::parallel_for(0, P * col_blocks, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t k = present[t / col_blocks];
      const int64_t j0 = (t % col_blocks) * kMeanCols, j1 = std::min(D, j0 + kMeanCols);
      const int64_t lo = offsets[k], hi = offsets[k + 1];
      double* mb = mean_b.data() + k * D;
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* row = xp + order[r] * D;
        for (int64_t j = j0; j < j1; ++j) mb[j] += static_cast<double>(row[j]);
      }
      const double inv = 1.0 / static_cast<double>(hi - lo);
      for (int64_t j = j0; j < j1; ++j) {
        mb[j] *= inv;
        shift[k * D + j] = static_cast<gemm_t>(mb[j]);
        rem[k * D + j] = mb[j] - static_cast<double>(shift[k * D + j]);
        delta[k * D + j] = mb[j] - mp[k * D + j];
      }
    }
  });

  // 3. centred, class-contiguous rows, row stride ld (D rounded up to the product's vector width;
  // the padding and kMR spare elements are zero, see small_classes_update)
  const int64_t ld = round_up(D, nr_of<gemm_t>());
  at::Tensor xc_buf = at::zeros({N * ld + kMR}, x.options().dtype(c10::CppTypeToScalarType<gemm_t>::value));
  const at::Tensor xc = xc_buf.narrow(0, 0, N * ld).view({N, ld}).narrow(1, 0, D);
  gemm_t* xcp = xc_buf.data_ptr<gemm_t>();
  at::parallel_for(0, P, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const int64_t k = present[p];
      const gemm_t* c = shift.data() + k * D;
      for (int64_t r = offsets[k]; r < offsets[k + 1]; ++r) {
        const scalar_t* row = xp + order[r] * D;
        gemm_t* out = xcp + r * ld;
        for (int64_t j = 0; j < D; ++j) out[j] = static_cast<gemm_t>(row[j]) - c[j];
      }
    }
  });

  // 4. products and merges
  std::vector<ClassMerge> merges(K);
  std::vector<int64_t> small;
  for (const int64_t k : present) {
    const int64_t nb = offsets[k + 1] - offsets[k];
    merges[k] = {static_cast<double>(nb), chan_weights(cnt[k], nb).m2_coef, rem.data() + k * D, delta.data() + k * D};
    if (nb < kGemmRows) small.push_back(k);
  }
  if (!small.empty()) {
    std::vector<ClassMerge> small_merges;
    for (const int64_t k : small) small_merges.push_back(merges[k]);
    small_classes_update<gemm_t>(xcp, ld, D, small, offsets, small_merges, m2p);
  }
  std::vector<int64_t> large;
  for (const int64_t k : present)
    if (offsets[k + 1] - offsets[k] >= kGemmRows) large.push_back(k);
  const auto run_large = [&](int64_t begin, int64_t end) {
    at::Tensor buffer = at::empty({0}, xc.options());
    for (int64_t c = begin; c < end; ++c) {
      const int64_t k = large[c];
      large_class_update<gemm_t>(xc.narrow(0, offsets[k], offsets[k + 1] - offsets[k]), D, merges[k], m2p + k * D * D,
                                 buffer);
    }
  };
  const int64_t num_large = static_cast<int64_t>(large.size());
  // Enough large classes for every thread: one parallel region over classes (each GEMM and merge
  // then runs on one thread), instead of a parallel GEMM and a parallel merge per class: fork-joins
  // cost a time slice each on a loaded machine. Fewer: each class gets all threads.
  if (num_large >= at::get_num_threads()) {
    at::parallel_for(0, num_large, 1, run_large);
  } else {
    run_large(0, num_large);
  }
  for (const int64_t k : present) {
    const int64_t nb = offsets[k + 1] - offsets[k];
    const double w = chan_weights(cnt[k], nb).mean_weight;
    for (int64_t j = 0; j < D; ++j) mp[k * D + j] += delta[k * D + j] * w;
    cnt[k] += nb;
  }
}

void class_moments_update_cpu(const at::Tensor& x_in, const at::Tensor& labels_in, at::Tensor count, at::Tensor mean,
                              at::Tensor m2) {
  check_state(x_in, labels_in, count, mean, m2);
  // The GEMMs run in the precision chosen here (float32, or float64 for float64 z), never in an
  // autocast dtype.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "selkernels_class_moments_update", [&] {
    using gemm_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    class_moments_update_typed<scalar_t, gemm_t>(x, labels, count, mean, m2);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(selkernels, CPU, m) { m.impl("class_moments_update_", &class_moments_update_cpu); }

}  // namespace selk
