// CUDA launchers of the selectivity family: argument checks, layout choice, layer tables and dtype
// dispatch. Kernel bodies: selectivity.cuh; grid sizes and the launch plan: launch_plan.h (the
// same functions size the grids here). No host synchronisation (no .item(), no nonzero; invalid
// labels are counted on the device), so a whole step is capturable in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/acc_type.h"
#include "common/selectivity_args.h"
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

int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

int32_t dtype_code(at::ScalarType t) { return static_cast<int32_t>(t); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> segment_labels_cuda(const at::Tensor& labels_in,
                                                                                           int64_t K,
                                                                                           int64_t ignore_index) {
  check_segment_labels_args(labels_in, K);
  const c10::cuda::CUDAGuard guard(labels_in.device());
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t N = labels.size(0);
  TORCH_CHECK(N < std::numeric_limits<int32_t>::max() && K < std::numeric_limits<int32_t>::max(),
              "selkernels: the CUDA kernels need N and num_classes below 2^31");
  const auto opts = labels.options();
  at::Tensor seg_labels = at::empty({N}, opts), counts = at::empty({K}, opts), offsets = at::empty({K + 1}, opts);
  at::Tensor order = at::empty({N}, opts), invalid = at::empty({}, opts);
  at::Tensor rank = at::empty({N}, opts.dtype(at::kInt));
  at::Tensor scratch = segment_counts_in_smem(K) ? at::Tensor() : at::empty({K + 1}, opts.dtype(at::kInt));
  segment_labels_kernel<<<1, kSegmentThreads, segment_smem_bytes(K), at::cuda::getCurrentCUDAStream()>>>(
      labels.const_data_ptr<int64_t>(), N, K, ignore_index, seg_labels.mutable_data_ptr<int64_t>(),
      counts.mutable_data_ptr<int64_t>(), offsets.mutable_data_ptr<int64_t>(), order.mutable_data_ptr<int64_t>(),
      invalid.mutable_data_ptr<int64_t>(), rank.mutable_data_ptr<int32_t>(),
      scratch.defined() ? scratch.mutable_data_ptr<int32_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {seg_labels, counts, offsets, order, invalid};
}

struct Seg {
  int64_t N, K;
  const at::Tensor &labels, &counts, &offsets, &order, &invalid;
};

Seg check_segmentation(const at::Tensor& labels, const at::Tensor& counts, const at::Tensor& offsets,
                       const at::Tensor& order, const at::Tensor& invalid) {
  TORCH_CHECK(labels.is_cuda(), "selkernels: the segmentation tensors must be on the CUDA device of x");
  check_segmentation_args(labels, counts, offsets, order, invalid);
  return {labels.size(0), counts.size(0), labels, counts, offsets, order, invalid};
}

struct Layer {
  at::Tensor x;  // as read
  int32_t layout;
  int group;
  int64_t C, S;
  at::Tensor a;  // acc [N, C]
};

std::vector<Layer> prepare_layers(at::TensorList xs, const Seg& seg) {
  std::vector<Layer> layers;
  for (size_t l = 0; l < xs.size(); ++l) {
    const at::Tensor& x = xs[l];
    check_layer_arg(x, l, seg.N, seg.labels.device());
    const int64_t N = seg.N, C = x.size(1);
    const int64_t S = positions_of(x, N);
    Layer L{x, kRows, 1, C, S, unit_means_buffer(x, N)};
    if (S == 1) {
      L.x = x.reshape({N, C});  // a view: every trailing dim is 1
      L.layout = kValues;
    } else if (!x.is_contiguous() && positions_major(x)) {
      L.layout = kPositionsMajor;
    } else {
      L.x = x.contiguous();  // no copy when already contiguous
      const int64_t bytes = static_cast<int64_t>(x.element_size());
      const bool vec = (S * bytes) % 16 == 0 && reinterpret_cast<uintptr_t>(L.x.const_data_ptr()) % 16 == 0;
      L.layout = vec ? kRowsVec : kRows;
      L.group = row_group_size(S, vec ? vec_len(bytes) : 1);
    }
    layers.push_back(std::move(L));
  }
  return layers;
}

std::vector<int64_t> channels_of(const std::vector<Layer>& layers) {
  std::vector<int64_t> c;
  for (const Layer& L : layers) c.push_back(L.C);
  return c;
}

// Phase 1 of every layer: one launch per storage dtype (per 16 layers).
void launch_unit_means(std::vector<Layer>& layers, int64_t N, cudaStream_t stream) {
  if (N == 0) return;
  std::vector<int32_t> keys;
  for (const Layer& L : layers) keys.push_back(dtype_code(L.x.scalar_type()));
  for (const auto& group : launch_groups(keys, channels_of(layers))) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, layers[group[0]].x.scalar_type(), "selkernels_unit_means_cuda", [&] {
          using st = typename Storage<scalar_t>::type;
          using acc_t = typename AccOf<st>::type;
          MeansTable<st, acc_t> table{};
          table.N = N;
          int64_t grid = 1;
          for (size_t j = 0; j < group.size(); ++j) {
            Layer& L = layers[group[j]];
            MeansLayer<st, acc_t>& d = table.layer[j];
            d.x = storage_ptr<scalar_t>(L.x);
            d.a = L.a.mutable_data_ptr<acc_t>();
            d.C = L.C;
            d.S = L.S;
            d.stride_n = L.x.stride(0);
            d.stride_c = L.x.stride(1);
            d.layout = L.layout;
            d.group = L.group;
            d.blocks = means_layer_blocks(N, L.C, L.S, L.layout, L.group, sm_count());
            grid = std::max(grid, d.blocks);
          }
          const dim3 g(static_cast<unsigned>(grid), static_cast<unsigned>(group.size()));
          unit_means_kernel<st, acc_t><<<g, kMeansThreads, unit_means_smem_bytes<acc_t>(), stream>>>(table);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
}

// Phase 2 (+ SI epilogue when si is non-empty): one launch per acc type (per 16 layers).
// With `sums`, the class sums are added to those float64 tensors and `means` is not written.
void launch_class_si(const std::vector<Layer>& layers, const Seg& seg, double eps, std::vector<at::Tensor>* means,
                     std::vector<at::Tensor>* sums, std::vector<at::Tensor>* si, std::vector<at::Tensor>* coeffs,
                     std::vector<at::Tensor>* argmax, cudaStream_t stream) {
  std::vector<int32_t> keys;
  for (const Layer& L : layers) keys.push_back(dtype_code(L.a.scalar_type()));
  for (const auto& group : launch_groups(keys, channels_of(layers))) {
    AT_DISPATCH_FLOATING_TYPES(layers[group[0]].a.scalar_type(), "selkernels_class_si_cuda", [&] {
      using acc_t = scalar_t;
      ClassTable<acc_t> table{};
      int64_t grid = 1;
      for (size_t j = 0; j < group.size(); ++j) {
        const int64_t l = group[j];
        ClassLayer<acc_t>& d = table.layer[j];
        d.a = layers[l].a.const_data_ptr<acc_t>();
        d.means = means ? (*means)[l].mutable_data_ptr<acc_t>() : nullptr;
        d.sums = sums ? (*sums)[l].mutable_data_ptr<double>() : nullptr;
        d.si = si ? (*si)[l].mutable_data_ptr<acc_t>() : nullptr;
        d.coeffs = coeffs ? (*coeffs)[l].mutable_data_ptr<acc_t>() : nullptr;
        d.argmax = argmax ? (*argmax)[l].mutable_data_ptr<int64_t>() : nullptr;
        d.C = layers[l].C;
        grid = std::max(grid, class_tiles(d.C));
      }
      const dim3 g(static_cast<unsigned>(grid), static_cast<unsigned>(group.size()));
      const dim3 block(kWarpSize, kClassRows);
      class_si_kernel<acc_t><<<g, block, class_si_smem_bytes<acc_t>(), stream>>>(
          table, seg.counts.const_data_ptr<int64_t>(), seg.offsets.const_data_ptr<int64_t>(),
          seg.order.const_data_ptr<int64_t>(), seg.invalid.const_data_ptr<int64_t>(), seg.K, static_cast<acc_t>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

std::vector<at::Tensor> class_means_segmented_cuda(at::TensorList xs, const at::Tensor& labels,
                                                   const at::Tensor& counts, const at::Tensor& offsets,
                                                   const at::Tensor& order, const at::Tensor& invalid) {
  const c10::cuda::CUDAGuard guard(labels.device());
  const Seg seg = check_segmentation(labels, counts, offsets, order, invalid);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  std::vector<Layer> layers = prepare_layers(xs, seg);
  launch_unit_means(layers, seg.N, stream);
  std::vector<at::Tensor> means = class_means_outputs(layers, seg.K);
  launch_class_si(layers, seg, 0.0, &means, nullptr, nullptr, nullptr, nullptr, stream);
  return means;
}

void class_sums_accumulate_cuda(at::TensorList xs, const at::Tensor& labels, const at::Tensor& counts,
                                const at::Tensor& offsets, const at::Tensor& order, const at::Tensor& invalid,
                                at::TensorList sums) {
  const c10::cuda::CUDAGuard guard(labels.device());
  const Seg seg = check_segmentation(labels, counts, offsets, order, invalid);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  std::vector<Layer> layers = prepare_layers(xs, seg);
  check_class_sums_args(sums, layers, seg.K, labels.device());
  std::vector<at::Tensor> state(sums.begin(), sums.end());
  launch_unit_means(layers, seg.N, stream);
  launch_class_si(layers, seg, 0.0, nullptr, &state, nullptr, nullptr, nullptr, stream);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> selectivity_index_segmented_cuda(
    at::TensorList xs, const at::Tensor& labels, const at::Tensor& counts, const at::Tensor& offsets,
    const at::Tensor& order, const at::Tensor& invalid, double eps) {
  const c10::cuda::CUDAGuard guard(labels.device());
  const Seg seg = check_segmentation(labels, counts, offsets, order, invalid);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  std::vector<Layer> layers = prepare_layers(xs, seg);
  launch_unit_means(layers, seg.N, stream);
  std::vector<at::Tensor> si, coeffs, argmax;
  selectivity_outputs(layers, labels, si, coeffs, argmax);
  launch_class_si(layers, seg, eps, nullptr, nullptr, &si, &coeffs, &argmax, stream);
  return {si, coeffs, argmax};
}

// The backward of every layer: one launch per output dtype (per 16 layers).
std::vector<at::Tensor> segmented_unit_grad_cuda(at::TensorList grad_si, at::TensorList coeffs, at::TensorList argmax,
                                                 at::TensorList grad_means, const at::Tensor& labels_in,
                                                 const at::Tensor& counts_in, at::IntArrayRef channels,
                                                 at::IntArrayRef spatial_sizes, at::IntArrayRef out_dtypes) {
  const c10::cuda::CUDAGuard guard(labels_in.device());
  const size_t L = channels.size();
  const bool with_si = !grad_si.empty(), with_means = !grad_means.empty();
  check_unit_grad_lists(grad_si, coeffs, argmax, grad_means, channels, spatial_sizes, out_dtypes);
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor counts = counts_in.contiguous();
  const int64_t N = labels.size(0), K = counts.size(0);
  std::vector<at::Tensor> out, g_si(L), cf(L), am(L), g_means(L);
  std::vector<int32_t> keys;
  std::vector<int64_t> launched_channels;
  for (size_t l = 0; l < L; ++l) {
    const auto out_dtype = static_cast<at::ScalarType>(out_dtypes[l]);
    const at::ScalarType acc = acc_type_of(out_dtype);
    out.push_back(unit_grad_output(l, grad_si, coeffs, argmax, grad_means, channels[l], N, K, out_dtypes[l], labels));
    if (with_si) {
      TORCH_CHECK(coeffs[l].scalar_type() == acc, "selkernels: coeffs[", l, "] must be in the accumulation type");
      cf[l] = coeffs[l].contiguous();
      am[l] = argmax[l].to(at::kLong).contiguous();
      g_si[l] = grad_si[l].to(acc).contiguous();
    }
    if (with_means) g_means[l] = grad_means[l].to(acc).contiguous();
    keys.push_back(out_dtypes[l]);
    launched_channels.push_back(with_si || with_means ? channels[l] * (N > 0) : 0);
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (const auto& group : launch_groups(keys, launched_channels)) {
    const auto out_dtype = static_cast<at::ScalarType>(out_dtypes[group[0]]);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_dtype, "selkernels_unit_grad_cuda", [&] {
      using ot = typename Storage<scalar_t>::type;
      using acc_t = typename AccOf<ot>::type;
      GradTable<acc_t, ot> table{};
      int64_t grid = 1;
      for (size_t j = 0; j < group.size(); ++j) {
        const int64_t l = group[j];
        GradLayer<acc_t, ot>& d = table.layer[j];
        d.grad_si = with_si ? g_si[l].const_data_ptr<acc_t>() : nullptr;
        d.coeffs = with_si ? cf[l].const_data_ptr<acc_t>() : nullptr;
        d.argmax = with_si ? am[l].const_data_ptr<int64_t>() : nullptr;
        d.grad_means = with_means ? g_means[l].const_data_ptr<acc_t>() : nullptr;
        d.out = storage_ptr_mut<scalar_t>(out[l]);
        d.C = channels[l];
        d.S = spatial_sizes[l];
        d.blocks = grad_layer_blocks(N, d.C, sm_count());
        grid = std::max(grid, d.blocks);
      }
      const dim3 g(static_cast<unsigned>(grid), static_cast<unsigned>(group.size()));
      unit_grad_kernel<acc_t, ot><<<g, kGradThreads, 0, stream>>>(table, labels.const_data_ptr<int64_t>(),
                                                                  counts.const_data_ptr<int64_t>(), N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return out;
}

at::Tensor selectivity_from_means_cuda(const at::Tensor& means_in, const at::Tensor& counts_in, double eps) {
  const c10::cuda::CUDAGuard guard(means_in.device());
  const at::Tensor counts = from_means_counts(means_in, counts_in);
  const at::Tensor means = means_in.to(acc_type_of(means_in.scalar_type())).contiguous();
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
  const at::Tensor counts = from_means_counts(means_in, counts_in);
  const at::Tensor means = means_in.contiguous();
  const at::Tensor grad_si = from_means_grad_arg(grad_si_in, means);
  const int64_t K = means.size(0), C = means.size(1);
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

}  // namespace

TORCH_LIBRARY_IMPL(selkernels, CUDA, m) {
  m.impl("segment_labels", &segment_labels_cuda);
  m.impl("class_means_segmented", &class_means_segmented_cuda);
  m.impl("class_sums_accumulate_", &class_sums_accumulate_cuda);
  m.impl("selectivity_index_segmented", &selectivity_index_segmented_cuda);
  m.impl("segmented_unit_grad", &segmented_unit_grad_cuda);
  m.impl("selectivity_from_means", &selectivity_from_means_cuda);
  m.impl("selectivity_from_means_backward", &selectivity_from_means_backward_cuda);
}

}  // namespace cuda
}  // namespace selk
