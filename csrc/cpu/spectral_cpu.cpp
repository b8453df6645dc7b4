// CPU kernels of the 1/n spectral regularizer (Nassar et al., NeurIPS 2020).
//
// Forward: P = (h - mean) V (one N x D x D GEMM), lam_j = sum_i P_ij^2 / (N - 1): the diagonal of
// V^T C_b V without forming C_b. lam is sorted once (D log D) for the loss.
// Backward (closed form, reusing P and the forward's dL/dlam, so the sort is done once):
// dL/dh = P diag(w) V^T with w_j = (2 / (N - 1)) grad dL/dlam_j, and dL/dV = (h - mean)^T P diag(w).
// The centring needs no backward term: the rows of P sum to 0.
// Deterministic: column sums are reduced by one thread per column block in row order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

#include "common/acc_type.h"
#include "common/spectral.h"

namespace selk {
namespace {

// lam[j] = sum_i P[i, j]^2 / (N - 1); zero when N < 2 (the variance is undefined).
template <typename acc_t>
void column_variances(const acc_t* p, int64_t N, int64_t D, acc_t* lam) {
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (D + kBlock - 1) / kBlock;
  const acc_t inv = N > 1 ? acc_t(1) / static_cast<acc_t>(N - 1) : acc_t(0);
  at::parallel_for(0, blocks, 1, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t j0 = blk * kBlock, j1 = std::min(D, j0 + kBlock);
      acc_t sum[kBlock] = {};
      for (int64_t i = 0; i < N; ++i) {
        const acc_t* row = p + i * D;
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) sum[j - j0] += row[j] * row[j];
      }
      for (int64_t j = j0; j < j1; ++j) lam[j] = sum[j - j0] * inv;
    }
  });
}

// Loss and dL/dlam (unsorted order). Stable descending order, like
// torch.sort(descending=True, stable=True).
template <typename acc_t>
acc_t spectral_loss(const acc_t* lam, int64_t D, int64_t tau, acc_t slope, acc_t* __restrict__ grad) {
  std::fill(grad, grad + D, acc_t(0));
  if (tau < 0 || D <= tau + 1) return acc_t(0);
  std::vector<int64_t> order(D);
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lam[a] > lam[b]; });
  const acc_t s_tau = lam[order[tau]];
  const acc_t floor = spectral_floor(lam[order[0]], D, std::numeric_limits<acc_t>::epsilon());
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(D);
  acc_t loss = acc_t(0);
  for (int64_t n = tau + 1; n < D; ++n) {
    const SpectralTerm<acc_t> t = spectral_term(lam[order[n]], spectral_target(s_tau, tau, n, slope), floor);
    loss += t.value;
    grad[order[n]] = t.grad * inv_d;
  }
  return loss * inv_d;
}

void check_inputs(const at::Tensor& h, const at::Tensor& V) {
  TORCH_CHECK(h.dim() == 2, "selkernels: h must be [N, D], got ", h.dim(), " dims");
  TORCH_CHECK(at::isFloatingType(h.scalar_type()), "selkernels: h must be floating point, got ", h.scalar_type());
  TORCH_CHECK(V.dim() == 2 && V.size(0) == h.size(1) && V.size(1) == h.size(1),
              "selkernels: V must be [D, D] with D = h.size(1)");
  TORCH_CHECK(V.scalar_type() == acc_type_of(h.scalar_type()),
              "selkernels: V must be float64 for float64 h and float32 otherwise");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spectral_penalty_cpu(const at::Tensor& h, const at::Tensor& V,
                                                                    double slope, int64_t tau) {
  check_inputs(h, V);
  const int64_t N = h.size(0), D = h.size(1);
  const at::Tensor x = h.to(acc_type_of(h.scalar_type()));
  const at::Tensor P = at::mm(x - x.mean(0, /*keepdim=*/true), V).contiguous();
  at::Tensor lam = at::empty({D}, P.options());
  at::Tensor grad_lam = at::empty({D}, P.options());
  at::Tensor loss = at::empty({}, P.options());
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "selkernels_spectral_penalty", [&] {
    column_variances<scalar_t>(P.data_ptr<scalar_t>(), N, D, lam.data_ptr<scalar_t>());
    loss.fill_(spectral_loss<scalar_t>(lam.data_ptr<scalar_t>(), D, tau, static_cast<scalar_t>(slope),
                                       grad_lam.data_ptr<scalar_t>()));
  });
  return {loss, P, grad_lam};
}

// dL/dP = P diag(w), w_j = (2 / (N - 1)) grad_loss dL/dlam_j (0 for N < 2, where lam is 0).
// The same ATen composition on every device; grad_loss stays a tensor (no host sync on CUDA).
at::Tensor grad_projections(const at::Tensor& grad_loss, const at::Tensor& P, const at::Tensor& grad_lam) {
  const int64_t N = P.size(0);
  const double scale = N > 1 ? 2.0 / static_cast<double>(N - 1) : 0.0;
  return P * (grad_lam * (grad_loss.to(P.scalar_type()) * scale));
}

at::Tensor spectral_penalty_backward_impl(const at::Tensor& grad_loss, const at::Tensor& P, const at::Tensor& grad_lam,
                                          const at::Tensor& V, at::ScalarType out_dtype) {
  return at::mm(grad_projections(grad_loss, P, grad_lam), V.t()).to(out_dtype);
}

at::Tensor spectral_penalty_backward_basis_impl(const at::Tensor& grad_loss, const at::Tensor& h, const at::Tensor& P,
                                                const at::Tensor& grad_lam) {
  const at::Tensor x = h.to(P.scalar_type());
  return at::mm((x - x.mean(0, /*keepdim=*/true)).t(), grad_projections(grad_loss, P, grad_lam));
}

}  // namespace

TORCH_LIBRARY_IMPL(selkernels, CPU, m) { m.impl("spectral_penalty", &spectral_penalty_cpu); }

// The backward ops are ATen compositions (the sort happened in the forward): one kernel for CPU and
// CUDA alike.
TORCH_LIBRARY_IMPL(selkernels, CompositeExplicitAutograd, m) {
  m.impl("spectral_penalty_backward", &spectral_penalty_backward_impl);
  m.impl("spectral_penalty_backward_basis", &spectral_penalty_backward_basis_impl);
}

}  // namespace selk
