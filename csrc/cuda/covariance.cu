// CUDA launcher of the streaming moments update (kernel bodies and the algorithm: covariance.cuh).
// No host sync: the batch's segmentation (segment_labels, shared with the selectivity ops) comes in
// on the device, and every grid is sized from N, K and D alone (the present classes are found on
// the device; items past them exit at once). Grids are 1-D and grid-strided, so no K limit comes
// from grid dimensions. Labels outside [0, K) (invalid > 0) leave the state unchanged: no class is
// present then; the Python front reports them.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "common/selectivity_args.h"
#include "cuda/covariance.cuh"

namespace selk {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride beyond this: plenty to fill any GPU

unsigned grid_for(int64_t items, int64_t per_block = kThreads) {
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, (items + per_block - 1) / per_block)));
}

void class_moments_update_cuda(const at::Tensor& x_in, const at::Tensor& labels, const at::Tensor& counts,
                               const at::Tensor& offsets, const at::Tensor& order, const at::Tensor& invalid,
                               at::Tensor count, at::Tensor mean, at::Tensor m2) {
  TORCH_CHECK(x_in.dim() == 2 && at::isFloatingType(x_in.scalar_type()), "selkernels: z must be a float [N, D] tensor");
  check_segmentation_args(labels, counts, offsets, order, invalid);
  const int64_t N = x_in.size(0), D = x_in.size(1), K = count.size(0);
  TORCH_CHECK(labels.size(0) == N && counts.size(0) == K && labels.device() == x_in.device(),
              "selkernels: the segmentation must be of z's N rows into the state's K classes, on z's device");
  TORCH_CHECK(count.scalar_type() == at::kLong && count.is_contiguous() && mean.scalar_type() == at::kDouble &&
                  mean.is_contiguous() && mean.size(0) == K && mean.size(1) == D && m2.scalar_type() == at::kDouble &&
                  m2.is_contiguous() && m2.size(0) == K && m2.size(1) == D && m2.size(2) == D,
              "selkernels: count int64 [K], mean float64 [K, D], M2 float64 [K, D, D], contiguous, expected");
  if (N == 0 || D == 0) return;
  const c10::cuda::CUDAGuard guard(x_in.device());
  // The Gram matrix runs in the precision chosen here, never in an autocast dtype.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor x = x_in.contiguous();
  const auto i64 = offsets.options();
  // rank[k]: inclusive count of non-empty classes; none is present when a label was invalid
  const at::Tensor rank = offsets.diff().gt(0).cumsum(0);
  const at::Tensor num_present = rank.narrow(0, K - 1, 1).mul(invalid.eq(0));
  const int64_t max_present = std::min(N, K);
  at::Tensor present = at::empty({max_present}, i64);
  cuda::class_present_kernel<int64_t><<<grid_for(K), kThreads, 0, stream>>>(
      offsets.data_ptr<int64_t>(), rank.data_ptr<int64_t>(), K, present.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const auto f64 = x.options().dtype(at::kDouble);
  at::Tensor rem = at::empty({max_present, D}, f64);
  at::Tensor delta = at::empty({max_present, D}, f64);
  at::Tensor weights = at::empty({max_present, 2}, f64);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "selkernels_class_moments_update_cuda", [&] {
        using gemm_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        at::Tensor shift = at::empty({max_present, D}, x.options().dtype(c10::CppTypeToScalarType<gemm_t>::value));
        const int64_t mean_items = max_present * ((D + cuda::kMeanCols - 1) / cuda::kMeanCols);
        cuda::class_batch_mean_kernel<scalar_t, gemm_t>
            <<<grid_for(mean_items, 1), dim3(cuda::kMeanCols, cuda::kMeanRowGroups), 0, stream>>>(
                x.data_ptr<scalar_t>(), order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                present.data_ptr<int64_t>(), num_present.data_ptr<int64_t>(), count.data_ptr<int64_t>(),
                mean.data_ptr<double>(), D, mean_items, shift.data_ptr<gemm_t>(), rem.data_ptr<double>(),
                delta.data_ptr<double>(), weights.data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        at::Tensor xc = at::empty({N, D}, shift.options());
        cuda::class_center_rows_kernel<scalar_t, gemm_t><<<grid_for(N * D), kThreads, 0, stream>>>(
            x.data_ptr<scalar_t>(), order.data_ptr<int64_t>(), labels.data_ptr<int64_t>(), rank.data_ptr<int64_t>(),
            num_present.data_ptr<int64_t>(), shift.data_ptr<gemm_t>(), N, D, K, xc.data_ptr<gemm_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (K == 1) {
          const at::Tensor gram = at::mm(xc.t(), xc);
          cuda::class_merge_gram_kernel<gemm_t><<<grid_for(D * D), kThreads, 0, stream>>>(
              gram.data_ptr<gemm_t>(), offsets.data_ptr<int64_t>(), num_present.data_ptr<int64_t>(),
              rem.data_ptr<double>(), delta.data_ptr<double>(), weights.data_ptr<double>(), D, m2.data_ptr<double>());
        } else {
          const int64_t T = (D + cuda::kGramTile - 1) / cuda::kGramTile;
          const int64_t gram_items = max_present * (T * (T + 1) / 2);
          cuda::class_gram_merge_kernel<gemm_t>
              <<<grid_for(gram_items, 1), dim3(cuda::kGramSide, cuda::kGramSide), 0, stream>>>(
                  xc.data_ptr<gemm_t>(), offsets.data_ptr<int64_t>(), present.data_ptr<int64_t>(),
                  num_present.data_ptr<int64_t>(), rem.data_ptr<double>(), delta.data_ptr<double>(),
                  weights.data_ptr<double>(), D, gram_items, m2.data_ptr<double>());
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  cuda::class_merge_mean_count_kernel<double><<<grid_for(max_present * D), kThreads, 0, stream>>>(
      offsets.data_ptr<int64_t>(), present.data_ptr<int64_t>(), num_present.data_ptr<int64_t>(),
      delta.data_ptr<double>(), weights.data_ptr<double>(), D, max_present * D, count.data_ptr<int64_t>(),
      mean.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(selkernels, CUDA, m) { m.impl("class_moments_update_", &class_moments_update_cuda); }

}  // namespace selk
