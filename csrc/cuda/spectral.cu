// CUDA launchers of the 1/n spectral penalty (kernel bodies: spectral.cuh). GEMMs go through ATen
// (cuBLAS); the column variances and the sorted loss/gradient are custom kernels. No host sync.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "cuda/spectral.cuh"

namespace selk {
namespace {

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Launches spectral_loss_kernel on lam; returns the loss, fills w when requested.
at::Tensor launch_loss(const at::Tensor& lam, int64_t tau, double slope, double grad_scale,
                       const at::Tensor* grad_loss, at::Tensor* w) {
  const int64_t D = lam.size(0);
  auto [sorted, order] = at::sort(lam, /*stable=*/true, /*dim=*/0, /*descending=*/true);
  at::Tensor loss = at::empty({}, lam.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(lam.scalar_type(), "selkernels_spectral_loss_cuda", [&] {
    cuda::spectral_loss_kernel<scalar_t><<<1, cuda::kLossThreads, 0, stream>>>(
        sorted.data_ptr<scalar_t>(), order.data_ptr<int64_t>(), D, tau, static_cast<scalar_t>(slope),
        std::numeric_limits<scalar_t>::epsilon(), static_cast<scalar_t>(grad_scale),
        grad_loss ? grad_loss->data_ptr<scalar_t>() : nullptr, loss.data_ptr<scalar_t>(),
        w ? w->data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spectral_penalty_cuda(const at::Tensor& h, const at::Tensor& V,
                                                                     double slope, int64_t tau) {
  TORCH_CHECK(h.dim() == 2 && at::isFloatingType(h.scalar_type()), "selkernels: h must be a float [N, D] tensor");
  TORCH_CHECK(V.dim() == 2 && V.size(0) == h.size(1) && V.size(1) == h.size(1) &&
                  V.scalar_type() == acc_type_of(h.scalar_type()),
              "selkernels: V must be [D, D], float64 for float64 h and float32 otherwise");
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t N = h.size(0), D = h.size(1);
  const at::Tensor x = h.to(acc_type_of(h.scalar_type()));
  const at::Tensor P = at::mm(x - x.mean(0, /*keepdim=*/true), V).contiguous();
  at::Tensor lam = at::empty({D}, P.options());
  if (D > 0) {
    AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "selkernels_column_sumsq_cuda", [&] {
      const scalar_t inv = N > 1 ? scalar_t(1) / static_cast<scalar_t>(N - 1) : scalar_t(0);
      const dim3 block(cuda::kColTile, cuda::kRowGroups);
      cuda::column_sumsq_kernel<scalar_t><<<(D + cuda::kColTile - 1) / cuda::kColTile, block, 0,
                                            at::cuda::getCurrentCUDAStream()>>>(P.data_ptr<scalar_t>(), N, D, inv,
                                                                                lam.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const at::Tensor loss = D > 0 ? launch_loss(lam, tau, slope, 0.0, nullptr, nullptr) : at::zeros({}, P.options());
  return {loss, P, lam};
}

at::Tensor grad_projections(const at::Tensor& grad_loss, const at::Tensor& P, const at::Tensor& lam, double slope,
                            int64_t tau) {
  const int64_t N = P.size(0), D = P.size(1);
  at::Tensor w = at::zeros({D}, P.options());
  if (D > 0 && N > 1) {
    const at::Tensor g = grad_loss.to(P.scalar_type()).contiguous();
    launch_loss(lam.contiguous(), tau, slope, 2.0 / static_cast<double>(N - 1), &g, &w);
  }
  return P * w;
}

at::Tensor spectral_penalty_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& P, const at::Tensor& lam,
                                          const at::Tensor& V, double slope, int64_t tau, at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(P.device());
  return at::mm(grad_projections(grad_loss, P, lam, slope, tau), V.t()).to(out_dtype);
}

at::Tensor spectral_penalty_backward_basis_cuda(const at::Tensor& grad_loss, const at::Tensor& h, const at::Tensor& P,
                                                const at::Tensor& lam, double slope, int64_t tau) {
  const c10::cuda::CUDAGuard guard(P.device());
  const at::Tensor x = h.to(P.scalar_type());
  return at::mm((x - x.mean(0, /*keepdim=*/true)).t(), grad_projections(grad_loss, P, lam, slope, tau));
}

}  // namespace

TORCH_LIBRARY_IMPL(selkernels, CUDA, m) {
  m.impl("spectral_penalty", &spectral_penalty_cuda);
  m.impl("spectral_penalty_backward", &spectral_penalty_backward_cuda);
  m.impl("spectral_penalty_backward_basis", &spectral_penalty_backward_basis_cuda);
}

}  // namespace selk
