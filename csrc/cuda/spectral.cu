// CUDA launcher of the 1/n spectral penalty forward (kernel bodies: spectral.cuh). GEMMs go through
// ATen (cuBLAS); the column variances (split over N) and the sorted loss with its gradient dL/dlam
// are custom kernels. No host sync.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "common/acc_type.h"
#include "cuda/spectral.cuh"

namespace selk {
namespace {

// Row chunks of the column reduction: enough blocks to fill every SM about four times, but no
// chunk under kMinChunkRows rows (below that the second pass costs more than it spreads).
constexpr int64_t kMinChunkRows = 64;

int64_t row_chunks(int64_t N, int64_t col_tiles, int sm_count) {
  const int64_t want = (4 * static_cast<int64_t>(sm_count) + col_tiles - 1) / col_tiles;
  const int64_t most = std::max<int64_t>(1, N / kMinChunkRows);
  return std::max<int64_t>(1, std::min<int64_t>({want, most, 65535}));
}

// lam [D] = column variances of P [N, D] (0 for N < 2), split over N (see column_sumsq_kernel).
at::Tensor column_variances(const at::Tensor& P) {
  const int64_t N = P.size(0), D = P.size(1);
  at::Tensor lam = at::empty({D}, P.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t col_tiles = (D + cuda::kColTile - 1) / cuda::kColTile;
  const int64_t chunks = row_chunks(N, col_tiles, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  const int64_t rows_per_chunk = (N + chunks - 1) / chunks;
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "selkernels_column_sumsq_cuda", [&] {
    const scalar_t inv = N > 1 ? scalar_t(1) / static_cast<scalar_t>(N - 1) : scalar_t(0);
    const dim3 block(cuda::kColTile, cuda::kRowGroups);
    const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(chunks));
    if (chunks == 1) {
      cuda::column_sumsq_kernel<scalar_t>
          <<<grid, block, 0, stream>>>(P.data_ptr<scalar_t>(), N, D, rows_per_chunk, inv, lam.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    at::Tensor partial = at::empty({chunks, D}, P.options());
    cuda::column_sumsq_kernel<scalar_t><<<grid, block, 0, stream>>>(P.data_ptr<scalar_t>(), N, D, rows_per_chunk,
                                                                    scalar_t(1), partial.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((D + threads - 1) / threads, 65535);
    cuda::chunk_sum_kernel<scalar_t>
        <<<blocks, threads, 0, stream>>>(partial.data_ptr<scalar_t>(), chunks, D, inv, lam.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return lam;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spectral_penalty_cuda(const at::Tensor& h, const at::Tensor& V,
                                                                     double slope, int64_t tau) {
  TORCH_CHECK(h.dim() == 2 && at::isFloatingType(h.scalar_type()), "selkernels: h must be a float [N, D] tensor");
  TORCH_CHECK(V.dim() == 2 && V.size(0) == h.size(1) && V.size(1) == h.size(1) &&
                  V.scalar_type() == acc_type_of(h.scalar_type()),
              "selkernels: V must be [D, D], float64 for float64 h and float32 otherwise");
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t D = h.size(1);
  const at::Tensor x = h.to(acc_type_of(h.scalar_type()));
  const at::Tensor P = at::mm(x - x.mean(0, /*keepdim=*/true), V).contiguous();
  at::Tensor grad_lam = at::zeros({D}, P.options());
  if (D == 0) return {at::zeros({}, P.options()), P, grad_lam};
  const at::Tensor lam = column_variances(P);
  // The one sort of the op: the backward reuses grad_lam.
  auto [sorted, order] = at::sort(lam, /*stable=*/true, /*dim=*/0, /*descending=*/true);
  at::Tensor loss = at::empty({}, P.options());
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "selkernels_spectral_loss_cuda", [&] {
    cuda::spectral_loss_kernel<scalar_t><<<1, cuda::kLossThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        sorted.data_ptr<scalar_t>(), order.data_ptr<int64_t>(), D, tau, static_cast<scalar_t>(slope),
        std::numeric_limits<scalar_t>::epsilon(), loss.data_ptr<scalar_t>(), grad_lam.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, P, grad_lam};
}

}  // namespace

// The backward ops are ATen compositions registered once for every device (csrc/cpu/spectral_cpu.cpp).
TORCH_LIBRARY_IMPL(selkernels, CUDA, m) { m.impl("spectral_penalty", &spectral_penalty_cuda); }

}  // namespace selk
