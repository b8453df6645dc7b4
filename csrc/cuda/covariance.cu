// CUDA launcher of the per-class streaming moments update (kernel bodies: covariance.cuh).
// Same algorithm as csrc/cpu/covariance_cpu.cpp: stable sort of the labels, class batch means in
// float64, class-contiguous centred rows, then per present class one cuBLAS GEMM (through ATen)
// and the Chan merge kernel. The class counts are copied to the host once per batch to size and
// skip the per-class GEMMs.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "cuda/covariance.cuh"

namespace selk {
namespace {

constexpr int kThreads = 256;

int64_t grid_for(int64_t total) {
  const int64_t cap = 65535;
  return std::max<int64_t>(1, std::min<int64_t>(cap, (total + kThreads - 1) / kThreads));
}

void class_moments_update_cuda(const at::Tensor& x_in, const at::Tensor& labels_in, at::Tensor count, at::Tensor mean,
                               at::Tensor m2) {
  TORCH_CHECK(x_in.dim() == 2 && at::isFloatingType(x_in.scalar_type()), "selkernels: z must be a float [N, D] tensor");
  TORCH_CHECK(labels_in.dim() == 1 && labels_in.size(0) == x_in.size(0) && labels_in.scalar_type() == at::kLong,
              "selkernels: labels must be int64 [N] with N = z.size(0)");
  const int64_t N = x_in.size(0), D = x_in.size(1), K = count.size(0);
  TORCH_CHECK(count.scalar_type() == at::kLong && count.is_contiguous() && mean.scalar_type() == at::kDouble &&
                  mean.is_contiguous() && mean.size(0) == K && mean.size(1) == D && m2.scalar_type() == at::kDouble &&
                  m2.is_contiguous() && m2.size(0) == K && m2.size(1) == D && m2.size(2) == D,
              "selkernels: count int64 [K], mean float64 [K, D], M2 float64 [K, D, D], contiguous, expected");
  if (N == 0) return;
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  // Out-of-range labels would index out of bounds: the Python wrapper checks; refuse here too.
  TORCH_CHECK(N == 0 || (labels.min().item<int64_t>() >= 0 && labels.max().item<int64_t>() < K),
              "selkernels: labels must lie in [0, num_classes)");
  auto [sorted_labels, order] = at::sort(labels, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor batch_counts = at::bincount(labels, {}, K);
  const at::Tensor offsets = at::cat({at::zeros({1}, batch_counts.options()), batch_counts.cumsum(0)});
  const at::Tensor host_counts = batch_counts.cpu();
  const int64_t* hc = host_counts.data_ptr<int64_t>();

  const auto f64 = x.options().dtype(at::kDouble);
  at::Tensor mean_b = at::empty({K, D}, f64);
  at::Tensor rem = at::empty({K, D}, f64);
  const at::Tensor count_before = count.clone();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "selkernels_class_moments_update_cuda",
                                  [&] {
    using gemm_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    at::Tensor shift = at::empty({K, D}, x.options().dtype(c10::CppTypeToScalarType<gemm_t>::value));
    const dim3 mean_grid((D + kThreads - 1) / kThreads, K);
    cuda::class_batch_mean_kernel<scalar_t, gemm_t><<<mean_grid, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), D,
        mean_b.data_ptr<double>(), shift.data_ptr<gemm_t>(), rem.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor xc = at::empty({N, D}, shift.options());
    cuda::class_center_rows_kernel<scalar_t, gemm_t><<<grid_for(N * D), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), order.data_ptr<int64_t>(), sorted_labels.data_ptr<int64_t>(), shift.data_ptr<gemm_t>(),
        N, D, xc.data_ptr<gemm_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor gram = at::empty({D, D}, xc.options());
    int64_t lo = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t nb = hc[k];
      if (nb == 0) continue;
      const at::Tensor xk = xc.narrow(0, lo, nb);
      lo += nb;
      at::mm_out(gram, xk.t(), xk);
      cuda::class_merge_m2_kernel<gemm_t><<<grid_for(D * D), kThreads, 0, stream>>>(
          gram.data_ptr<gemm_t>(), count_before.data_ptr<int64_t>(), mean.data_ptr<double>(),
          mean_b.data_ptr<double>(), rem.data_ptr<double>(), k, nb, D, m2.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  cuda::class_merge_mean_count_kernel<double><<<dim3((D + kThreads - 1) / kThreads, K), kThreads, 0, stream>>>(
      batch_counts.data_ptr<int64_t>(), mean_b.data_ptr<double>(), D, count.data_ptr<int64_t>(),
      mean.data_ptr<double>(), count_before.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(selkernels, CUDA, m) { m.impl("class_moments_update_", &class_moments_update_cuda); }

}  // namespace selk
