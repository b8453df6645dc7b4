// CUDA launchers of the selectivity family: argument checks, layout choice, grid sizing and dtype
// dispatch. Kernel bodies and their bytes-moved model: selectivity.cuh. No host synchronisation
// (no .item(), no nonzero), so every op is capturable in CUDA graphs and traceable by torch.compile.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "cuda/selectivity.cuh"

namespace selk {
namespace cuda {
namespace {

// at::Half / at::BFloat16 travel to the kernels as their 16-bit storage (same size and bits).
template <typename T>
struct Storage {
  using type = T;
};
template <>
struct Storage<at::Half> {
  using type = f16_t;
};
template <>
struct Storage<at::BFloat16> {
  using type = bf16_t;
};
static_assert(sizeof(at::Half) == sizeof(f16_t) && sizeof(at::BFloat16) == sizeof(bf16_t), "16-bit storage");

template <typename T>
const typename Storage<T>::type* storage_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename Storage<T>::type*>(t.const_data_ptr<T>());
}
template <typename T>
typename Storage<T>::type* storage_ptr_mut(at::Tensor& t) {
  return reinterpret_cast<typename Storage<T>::type*>(t.mutable_data_ptr<T>());
}

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

constexpr int64_t kMaxGridY = 65535;

// Enough blocks to fill the GPU several times over; grid-stride loops cover the rest.
int64_t capped_blocks(int64_t needed) {
  const int64_t cap = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return std::max<int64_t>(1, std::min(needed, cap));
}

struct Segments {
  at::Tensor counts;   // int64 [K]
  at::Tensor offsets;  // int32 [K + 1]
  at::Tensor order;    // int32 [N], class-sorted sample indices (first offsets[K] entries used)
};

Segments segment_labels(const at::Tensor& labels_in, int64_t K, int64_t ignore_index, cudaStream_t stream) {
  const at::Tensor labels = labels_in.contiguous();
  const int64_t N = labels.size(0);
  TORCH_CHECK(N < std::numeric_limits<int32_t>::max() && K < std::numeric_limits<int32_t>::max(),
              "selkernels: the CUDA kernels need N and num_classes below 2^31");
  const auto i32 = labels.options().dtype(at::kInt);
  Segments seg;
  seg.counts = at::empty({K}, labels.options().dtype(at::kLong));
  seg.offsets = at::empty({K + 1}, i32);
  seg.order = at::empty({N}, i32);
  at::Tensor rank = at::empty({N}, i32);
  at::Tensor scratch = segment_counts_in_smem(K) ? at::Tensor() : at::empty({K}, i32);
  segment_labels_kernel<<<1, kSegmentThreads, segment_smem_bytes(K), stream>>>(
      labels.const_data_ptr<int64_t>(), N, K, ignore_index, seg.counts.mutable_data_ptr<int64_t>(),
      seg.offsets.mutable_data_ptr<int32_t>(), rank.mutable_data_ptr<int32_t>(), seg.order.mutable_data_ptr<int32_t>(),
      scratch.defined() ? scratch.mutable_data_ptr<int32_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return seg;
}

bool is_channels_last_like(const at::Tensor& x) {
  // Memory [N, *spatial, C]: channels_last and channels_last_3d, and any rank.
  std::vector<int64_t> perm{0};
  for (int64_t d = 2; d < x.dim(); ++d) perm.push_back(d);
  perm.push_back(1);
  return x.permute(perm).is_contiguous();
}

// Phase 1: a[n, c] (acc_t [N, C]) from x. Contiguous NCHW, channels_last and S == 1 (any strides)
// are read in place; any other stride pattern is copied once to contiguous.
template <typename scalar_t, typename acc_t>
void unit_means(const at::Tensor& x_in, acc_t* a, cudaStream_t stream) {
  using st = typename Storage<scalar_t>::type;
  const int64_t N = x_in.size(0), C = x_in.size(1);
  if (N * C == 0) return;
  const int64_t S = x_in.numel() / (N * C);
  if (S == 1 && x_in.numel() > 0) {
    const at::Tensor x2 = x_in.reshape({N, C});  // a view: every trailing dim is 1
    const int64_t blocks = capped_blocks((N * C + 255) / 256);
    unit_values_kernel<st, acc_t><<<blocks, 256, 0, stream>>>(storage_ptr<scalar_t>(x2), N, C, x2.stride(0),
                                                               x2.stride(1), a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if (!x_in.is_contiguous() && is_channels_last_like(x_in)) {
    const int64_t tiles = N * ((C + kWarpSize - 1) / kWarpSize);
    const dim3 block(kWarpSize, kClRows);
    unit_means_cl_kernel<st, acc_t><<<capped_blocks(tiles), block, kClRows * kWarpSize * sizeof(acc_t), stream>>>(
        storage_ptr<scalar_t>(x_in), N, C, S, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const at::Tensor x = x_in.contiguous();  // no copy when already contiguous
  const st* p = storage_ptr<scalar_t>(x);
  constexpr int kVec = Vec16<st>::kLen;
  const bool vec = kVec > 1 && (S * static_cast<int64_t>(sizeof(st))) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(p) % 16 == 0;
  const int G = row_group_size(S, vec ? kVec : 1);
  const int64_t rows = N * C;
  const int64_t warps = (rows + (kWarpSize / G) - 1) / (kWarpSize / G);
  const int64_t blocks = capped_blocks((warps + kRowThreads / kWarpSize - 1) / (kRowThreads / kWarpSize));
  if (vec) {
    unit_means_rows_kernel<st, acc_t, kVec><<<blocks, kRowThreads, 0, stream>>>(p, rows, S, G, a);
  } else {
    unit_means_rows_kernel<st, acc_t, 1><<<blocks, kRowThreads, 0, stream>>>(p, rows, S, G, a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_forward(const at::Tensor& x, const at::Tensor& labels, int64_t K) {
  TORCH_CHECK(x.dim() >= 2, "selkernels: x must be [N, C, *spatial], got ", x.dim(), " dims");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "selkernels: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0), "selkernels: labels must be [N] with N = x.size(0)");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "selkernels: labels must be int64");
  TORCH_CHECK(labels.device() == x.device(), "selkernels: labels must be on the device of x");
  TORCH_CHECK(K >= 1, "selkernels: num_classes must be >= 1");
  TORCH_CHECK((x.size(1) + kWarpSize - 1) / kWarpSize <= kMaxGridY, "selkernels: too many channels for the CUDA kernels");
}

std::tuple<at::Tensor, at::Tensor> class_means_cuda(const at::Tensor& x, const at::Tensor& labels, int64_t K,
                                                    int64_t ignore_index) {
  check_forward(x, labels, K);
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t N = x.size(0), C = x.size(1);
  const auto acc = acc_type_of(x.scalar_type());
  Segments seg = segment_labels(labels, K, ignore_index, stream);
  at::Tensor means = at::empty({K, C}, x.options().dtype(acc));
  if (C == 0) return {means, seg.counts};
  at::Tensor a = at::empty({N, C}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "selkernels_class_means_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    unit_means<scalar_t, acc_t>(x, a.mutable_data_ptr<acc_t>(), stream);
    const dim3 grid(static_cast<unsigned>(K), static_cast<unsigned>((C + kWarpSize - 1) / kWarpSize));
    const dim3 block(kWarpSize, kClassRows);
    class_sum_kernel<acc_t><<<grid, block, kClassRows * kWarpSize * sizeof(acc_t), stream>>>(
        a.const_data_ptr<acc_t>(), seg.offsets.const_data_ptr<int32_t>(), seg.order.const_data_ptr<int32_t>(), C,
        means.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {means, seg.counts};
}

at::Tensor selectivity_from_means_cuda(const at::Tensor& means_in, const at::Tensor& counts_in, double eps) {
  TORCH_CHECK(means_in.dim() == 2, "selkernels: means must be [K, C]");
  TORCH_CHECK(counts_in.dim() == 1 && counts_in.size(0) == means_in.size(0), "selkernels: counts must be [K]");
  TORCH_CHECK(counts_in.device() == means_in.device(), "selkernels: counts must be on the device of means");
  const c10::cuda::CUDAGuard guard(means_in.device());
  const at::Tensor means = means_in.to(acc_type_of(means_in.scalar_type())).contiguous();
  const at::Tensor counts = counts_in.to(at::kLong).contiguous();
  const int64_t K = means.size(0), C = means.size(1);
  at::Tensor si = at::empty({C}, means.options());
  if (C == 0) return si;
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "selkernels_selectivity_cuda", [&] {
    si_kernel<scalar_t><<<(C + kUnitThreads - 1) / kUnitThreads, kUnitThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        means.const_data_ptr<scalar_t>(), counts.const_data_ptr<int64_t>(), K, C, static_cast<scalar_t>(eps),
        si.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return si;
}

at::Tensor selectivity_from_means_backward_cuda(const at::Tensor& grad_si_in, const at::Tensor& means_in,
                                                const at::Tensor& counts_in, double eps) {
  const c10::cuda::CUDAGuard guard(means_in.device());
  const at::Tensor means = means_in.contiguous();
  const at::Tensor counts = counts_in.to(at::kLong).contiguous();
  const at::Tensor grad_si = grad_si_in.to(means.scalar_type()).contiguous();
  const int64_t K = means.size(0), C = means.size(1);
  TORCH_CHECK(grad_si.numel() == C, "selkernels: grad_si must be [C]");
  at::Tensor grad_means = at::empty({K, C}, means.options());
  if (C == 0) return grad_means;
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "selkernels_selectivity_backward_cuda", [&] {
    si_backward_kernel<scalar_t>
        <<<(C + kUnitThreads - 1) / kUnitThreads, kUnitThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            grad_si.const_data_ptr<scalar_t>(), means.const_data_ptr<scalar_t>(), counts.const_data_ptr<int64_t>(), K,
            C, static_cast<scalar_t>(eps), grad_means.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_means;
}

// grad_unit [N, C] in out_dtype; grad_means [K, C] in acc_dtype may be undefined (fused SI backward
// with nothing flowing into `means`); coeffs (g_max, g_rest, argmax) undefined for class_means.
at::Tensor unit_grad(const at::Tensor& grad_means, at::ScalarType acc_dtype, int64_t K, int64_t C,
                     const at::Tensor& counts, const at::Tensor& labels, int64_t ignore_index, int64_t spatial_size,
                     at::ScalarType out_dtype, const at::Tensor& g_max, const at::Tensor& g_rest,
                     const at::Tensor& argmax) {
  const int64_t N = labels.size(0);
  at::Tensor out = at::empty({N, C}, labels.options().dtype(out_dtype));
  if (N == 0 || C == 0) return out;
  const dim3 grid(static_cast<unsigned>((C + kUnitThreads - 1) / kUnitThreads),
                  static_cast<unsigned>(std::min<int64_t>(N, kMaxGridY)));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "selkernels_unit_grad_acc_cuda", [&] {
    using acc_t = scalar_t;
    const acc_t* gm = grad_means.defined() ? grad_means.const_data_ptr<acc_t>() : nullptr;
    const acc_t* gmax = g_max.defined() ? g_max.const_data_ptr<acc_t>() : nullptr;
    const acc_t* grest = g_rest.defined() ? g_rest.const_data_ptr<acc_t>() : nullptr;
    const int64_t* amax = argmax.defined() ? argmax.const_data_ptr<int64_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_dtype, "selkernels_unit_grad_cuda", [&] {
      unit_grad_kernel<acc_t, typename Storage<scalar_t>::type><<<grid, kUnitThreads, 0, stream>>>(
          gm, counts.const_data_ptr<int64_t>(), labels.const_data_ptr<int64_t>(), N, K, C, ignore_index, spatial_size,
          gmax, grest, amax, storage_ptr_mut<scalar_t>(out));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor class_means_backward_cuda(const at::Tensor& grad_means_in, const at::Tensor& counts_in,
                                     const at::Tensor& labels_in, int64_t ignore_index, int64_t spatial_size,
                                     at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(grad_means_in.device());
  const at::Tensor grad_means = grad_means_in.contiguous();
  const at::Tensor counts = counts_in.to(at::kLong).contiguous();
  const at::Tensor labels = labels_in.contiguous();
  TORCH_CHECK(grad_means.dim() == 2 && counts.size(0) == grad_means.size(0), "selkernels: counts must be [K]");
  return unit_grad(grad_means, grad_means.scalar_type(), grad_means.size(0), grad_means.size(1), counts, labels,
                   ignore_index, spatial_size, out_dtype, {}, {}, {});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> selectivity_index_cuda(const at::Tensor& x, const at::Tensor& labels,
                                                                      int64_t K, double eps, int64_t ignore_index) {
  auto [means, counts] = class_means_cuda(x, labels, K, ignore_index);
  return {selectivity_from_means_cuda(means, counts, eps), means, counts};
}

at::Tensor selectivity_index_backward_cuda(const at::Tensor& grad_si_in, const c10::optional<at::Tensor>& grad_means_out_in,
                                           const at::Tensor& means_in, const at::Tensor& counts_in,
                                           const at::Tensor& labels_in, double eps, int64_t ignore_index,
                                           int64_t spatial_size, at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(means_in.device());
  const at::Tensor means = means_in.contiguous();
  const at::Tensor counts = counts_in.to(at::kLong).contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor grad_si = grad_si_in.to(means.scalar_type()).contiguous();
  // Gradient flowing into the op's `means` output: undefined when only SI is used.
  at::Tensor grad_means_out;
  if (grad_means_out_in.has_value() && grad_means_out_in->defined())
    grad_means_out = grad_means_out_in->to(means.scalar_type()).contiguous();
  const int64_t K = means.size(0), C = means.size(1);
  TORCH_CHECK(grad_si.numel() == C && (!grad_means_out.defined() || grad_means_out.sizes() == means.sizes()),
              "selkernels: grad_si must be [C] and grad_means [K, C]");
  at::Tensor g_max = at::empty({C}, means.options());
  at::Tensor g_rest = at::empty({C}, means.options());
  at::Tensor argmax = at::empty({C}, means.options().dtype(at::kLong));
  if (C > 0) {
    AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "selkernels_si_grad_coeffs_cuda", [&] {
      si_grad_coeffs_kernel<scalar_t>
          <<<(C + kUnitThreads - 1) / kUnitThreads, kUnitThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              grad_si.const_data_ptr<scalar_t>(), means.const_data_ptr<scalar_t>(), counts.const_data_ptr<int64_t>(),
              K, C, static_cast<scalar_t>(eps), g_max.mutable_data_ptr<scalar_t>(),
              g_rest.mutable_data_ptr<scalar_t>(), argmax.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return unit_grad(grad_means_out, means.scalar_type(), K, C, counts, labels, ignore_index, spatial_size, out_dtype,
                   g_max, g_rest, argmax);
}

}  // namespace

TORCH_LIBRARY_IMPL(selkernels, CUDA, m) {
  m.impl("class_means", &class_means_cuda);
  m.impl("class_means_backward", &class_means_backward_cuda);
  m.impl("selectivity_from_means", &selectivity_from_means_cuda);
  m.impl("selectivity_from_means_backward", &selectivity_from_means_backward_cuda);
  m.impl("selectivity_index", &selectivity_index_cuda);
  m.impl("selectivity_index_backward", &selectivity_index_backward_cuda);
}

}  // namespace cuda
}  // namespace selk
