// CPU kernel of the per-class streaming moments update (class_moments_update_).
//
// One call per batch, no loop over classes in Python:
//   1. counting sort of the labels (class k = rows order[offsets[k] .. offsets[k + 1]))
//   2. class batch means in float64, one task per class, rows summed in sorted order
//   3. centred rows xc = x - c_k in the GEMM precision, written class-contiguous, c_k the class
//      batch mean rounded to that precision (small values: no cancellation in the Gram matrix)
//   4. per present class: S_k = xc_k^T xc_k (ATen GEMM on a slice), then the Chan merge of
//      (n_b, mean_b, S_k - n_b d d^T) into the float64 state, one pass over the D x D block
// Deterministic: fixed summation orders, no atomics. Absent classes are not touched.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/moments.h"

namespace selk {
namespace {

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

  // 1. counting sort
  std::vector<int64_t> offsets(K + 1, 0);
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(lp[n] >= 0 && lp[n] < K, "selkernels: labels[", n, "] = ", lp[n], " is outside [0, num_classes=", K,
                ")");
    ++offsets[lp[n] + 1];
  }
  for (int64_t k = 0; k < K; ++k) offsets[k + 1] += offsets[k];
  std::vector<int64_t> order(N);
  {
    std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
    for (int64_t n = 0; n < N; ++n) order[fill[lp[n]]++] = n;
  }

  // 2. class batch means (float64), their GEMM-precision rounding c and the remainder d = mean_b - c
  std::vector<double> mean_b(K * D, 0.0), rem(K * D, 0.0);
  std::vector<gemm_t> shift(K * D, gemm_t(0));
  at::parallel_for(0, K, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const int64_t lo = offsets[k], hi = offsets[k + 1];
      if (hi == lo) continue;
      double* mb = mean_b.data() + k * D;
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* row = xp + order[r] * D;
        for (int64_t j = 0; j < D; ++j) mb[j] += static_cast<double>(row[j]);
      }
      const double inv = 1.0 / static_cast<double>(hi - lo);
      for (int64_t j = 0; j < D; ++j) {
        mb[j] *= inv;
        shift[k * D + j] = static_cast<gemm_t>(mb[j]);
        rem[k * D + j] = mb[j] - static_cast<double>(shift[k * D + j]);
      }
    }
  });

  // 3. centred, class-contiguous rows
  at::Tensor xc = at::empty({N, D}, x.options().dtype(c10::CppTypeToScalarType<gemm_t>::value));
  gemm_t* xcp = xc.data_ptr<gemm_t>();
  std::vector<int64_t> row_class(N);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t r = offsets[k]; r < offsets[k + 1]; ++r) row_class[r] = k;
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const scalar_t* row = xp + order[r] * D;
      const gemm_t* c = shift.data() + row_class[r] * D;
      gemm_t* out = xcp + r * D;
      for (int64_t j = 0; j < D; ++j) out[j] = static_cast<gemm_t>(row[j]) - c[j];
    }
  });

  // 4. per present class: Gram matrix, then the merge
  at::Tensor gram = at::empty({D, D}, xc.options());
  std::vector<double> delta(D);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t lo = offsets[k], hi = offsets[k + 1];
    const int64_t nb = hi - lo;
    if (nb == 0) continue;
    const at::Tensor xk = xc.narrow(0, lo, nb);
    at::mm_out(gram, xk.t(), xk);
    const gemm_t* s = gram.data_ptr<gemm_t>();
    const ChanWeights w = chan_weights(cnt[k], nb);
    double* mk = mp + k * D;
    const double* mbk = mean_b.data() + k * D;
    const double* dk = rem.data() + k * D;
    for (int64_t j = 0; j < D; ++j) delta[j] = mbk[j] - mk[j];
    double* m2k = m2p + k * D * D;
    const double nbd = static_cast<double>(nb);
    at::parallel_for(0, D, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        double* out = m2k + i * D;
        const gemm_t* srow = s + i * D;
        for (int64_t j = 0; j < D; ++j)
          out[j] = chan_m2_entry(out[j], static_cast<double>(srow[j]), nbd, dk[i], dk[j], w.m2_coef, delta[i], delta[j]);
      }
    });
    for (int64_t j = 0; j < D; ++j) mk[j] += delta[j] * w.mean_weight;
    cnt[k] += nb;
  }
}

void class_moments_update_cpu(const at::Tensor& x_in, const at::Tensor& labels_in, at::Tensor count, at::Tensor mean,
                              at::Tensor m2) {
  check_state(x_in, labels_in, count, mean, m2);
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
