#pragma once
// Host side of the selectivity launchers, shared by the CPU kernels (cpu/selectivity_cpu.cpp) and
// the CUDA launchers (cuda/selectivity.cu): the argument checks and the output allocation, so the
// two devices accept the same arguments and return the same tensors. ATen, host code only. The
// Python front (selkernels/ops.py) has checked the arguments already; these checks guard direct
// torch.ops calls. What differs per device (CUDA: device placement, 32-bit index limits) stays in
// the launcher.
#include <ATen/ATen.h>

#include <vector>

#include "common/acc_type.h"

namespace selk {

inline void check_segment_labels_args(const at::Tensor& labels, int64_t K) {
  TORCH_CHECK(labels.dim() == 1, "selkernels: labels must be [N]");
  TORCH_CHECK(K >= 1, "selkernels: num_classes must be >= 1");
}

// The segmentation as segment_labels returns it: five contiguous int64 tensors on one device,
// labels and order [N], counts [K] (K >= 1), offsets [K + 1], invalid a scalar.
inline void check_segmentation_args(const at::Tensor& labels, const at::Tensor& counts, const at::Tensor& offsets,
                                    const at::Tensor& order, const at::Tensor& invalid) {
  for (const at::Tensor* t : {&labels, &counts, &offsets, &order, &invalid}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->device() == labels.device(),
                "selkernels: the segmentation tensors must be contiguous int64 on one device "
                "(as segment_labels returns them)");
  }
  TORCH_CHECK(labels.dim() == 1 && order.dim() == 1 && order.size(0) == labels.size(0),
              "selkernels: labels and order must be [N]");
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) >= 1 && offsets.dim() == 1 && offsets.size(0) == counts.size(0) + 1,
              "selkernels: counts must be [K] and offsets [K + 1]");
  TORCH_CHECK(invalid.numel() == 1, "selkernels: invalid must be a scalar");
}

// xs[l] of a layer op: floating point [N, C, *spatial] on the device of the labels.
inline void check_layer_arg(const at::Tensor& x, size_t l, int64_t N, const at::Device& device) {
  TORCH_CHECK(x.dim() >= 2, "selkernels: xs[", l, "] must be [N, C, *spatial], got ", x.dim(), " dims");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "selkernels: xs[", l, "] must be floating point");
  TORCH_CHECK(x.size(0) == N, "selkernels: xs[", l, "] has ", x.size(0), " samples, the labels ", N);
  TORCH_CHECK(x.device() == device, "selkernels: xs[", l, "] must be on the device of the labels");
}

// Positions per sample and unit (the product of the spatial dims; 1 for an empty tensor).
inline int64_t positions_of(const at::Tensor& x, int64_t N) {
  const int64_t C = x.size(1);
  return N * C == 0 ? 1 : x.numel() / (N * C);
}

// Whether x's memory is [N, *positions, C] (channels_last, or unit_dim=-1 seen through movedim).
inline bool positions_major(const at::Tensor& x) {
  std::vector<int64_t> perm{0};
  for (int64_t d = 2; d < x.dim(); ++d) perm.push_back(d);
  perm.push_back(1);
  return x.permute(perm).is_contiguous();
}

// The per-sample unit means of phase 1: [N, C] in the accumulation type of x.
inline at::Tensor unit_means_buffer(const at::Tensor& x, int64_t N) {
  return at::empty({N, x.size(1)}, x.options().dtype(acc_type_of(x.scalar_type())));
}

// The outputs of the layer ops, per layer (L.C units, L.a its [N, C] unit means): means [K, C] of
// class_means_segmented; si [C], coeffs [4, C] (dSI/dmu_max, dSI/dmu_rest / (P - 1), mu_max,
// mu_rest) and argmax int64 [C] of selectivity_index_segmented. All in the accumulation type.
template <typename Layer>
std::vector<at::Tensor> class_means_outputs(const std::vector<Layer>& layers, int64_t K) {
  std::vector<at::Tensor> means;
  for (const Layer& L : layers) means.push_back(at::empty({K, L.C}, L.a.options()));
  return means;
}

template <typename Layer>
void selectivity_outputs(const std::vector<Layer>& layers, const at::Tensor& labels, std::vector<at::Tensor>& si,
                         std::vector<at::Tensor>& coeffs, std::vector<at::Tensor>& argmax) {
  for (const Layer& L : layers) {
    si.push_back(at::empty({L.C}, L.a.options()));
    coeffs.push_back(at::empty({4, L.C}, L.a.options()));
    argmax.push_back(at::empty({L.C}, labels.options()));
  }
}

// class_sums_accumulate_: one contiguous float64 [K, C_l] state per layer, on the labels' device.
template <typename Layer>
void check_class_sums_args(at::TensorList sums, const std::vector<Layer>& layers, int64_t K, const at::Device& device) {
  TORCH_CHECK(sums.size() == layers.size(), "selkernels: class_sums_accumulate_ needs one sums tensor per layer");
  for (size_t l = 0; l < layers.size(); ++l)
    TORCH_CHECK(sums[l].scalar_type() == at::kDouble && sums[l].is_contiguous() && sums[l].device() == device &&
                    sums[l].sizes() == at::IntArrayRef({K, layers[l].C}),
                "selkernels: sums[", l, "] must be a contiguous float64 [K, C] tensor on the device of the labels");
}

// segmented_unit_grad: grad_si, coeffs and argmax (or none of them) and grad_means (or none) hold
// one entry per layer.
inline void check_unit_grad_lists(at::TensorList grad_si, at::TensorList coeffs, at::TensorList argmax,
                                  at::TensorList grad_means, at::IntArrayRef channels, at::IntArrayRef spatial_sizes,
                                  at::IntArrayRef out_dtypes) {
  const size_t L = channels.size();
  const bool with_si = !grad_si.empty(), with_means = !grad_means.empty();
  TORCH_CHECK((!with_si || (grad_si.size() == L && coeffs.size() == L && argmax.size() == L)) &&
                  (!with_means || grad_means.size() == L) && spatial_sizes.size() == L && out_dtypes.size() == L,
              "selkernels: segmented_unit_grad: grad_si, coeffs, argmax (or none of them) and grad_means (or none) "
              "need one entry per layer");
}

// Layer l of segmented_unit_grad: coeffs [2, C], argmax and grad_si [C] (when given), grad_means
// [K, C] (when given). Returns the [N, C] output in out_dtype, zero when neither term is given.
inline at::Tensor unit_grad_output(size_t l, at::TensorList grad_si, at::TensorList coeffs, at::TensorList argmax,
                                   at::TensorList grad_means, int64_t C, int64_t N, int64_t K, int64_t out_dtype,
                                   const at::Tensor& labels) {
  if (!grad_si.empty()) {
    TORCH_CHECK(coeffs[l].sizes() == at::IntArrayRef({2, C}) && argmax[l].numel() == C && grad_si[l].numel() == C,
                "selkernels: coeffs[", l, "] must be [2, C], argmax and grad_si [C]");
  }
  if (!grad_means.empty()) {
    TORCH_CHECK(grad_means[l].sizes() == at::IntArrayRef({K, C}), "selkernels: grad_means[", l, "] must be [K, C]");
  }
  at::Tensor out = at::empty({N, C}, labels.options().dtype(static_cast<at::ScalarType>(out_dtype)));
  if (grad_si.empty() && grad_means.empty()) out.zero_();
  return out;
}

// selectivity_from_means(_backward): means [K, C], counts [K] on the device of means. Returns the
// counts as contiguous int64.
inline at::Tensor from_means_counts(const at::Tensor& means, const at::Tensor& counts) {
  TORCH_CHECK(means.dim() == 2, "selkernels: means must be [K, C]");
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == means.size(0), "selkernels: counts must be [K]");
  TORCH_CHECK(counts.device() == means.device(), "selkernels: counts must be on the device of means");
  return counts.to(at::kLong).contiguous();
}

// grad_si [C] of selectivity_from_means_backward, in the dtype of the means, contiguous.
inline at::Tensor from_means_grad_arg(const at::Tensor& grad_si, const at::Tensor& means) {
  TORCH_CHECK(grad_si.numel() == means.size(1), "selkernels: grad_si must be [C]");
  return grad_si.to(means.scalar_type()).contiguous();
}

}  // namespace selk
