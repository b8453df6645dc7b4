// The one place that declares every selkernels op schema. Kernels register per dispatch key in
// csrc/cpu/*.cpp and csrc/cuda/*.cu, the selectivity ops' autograd in csrc/selectivity_autograd.cpp;
// fake kernels (and the spectral penalty's autograd) live in selkernels/ops.py and spectral_ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import selkernels._C` loads this library, which runs the registrations below. No Python
// bindings: everything is reached through torch.ops.selkernels.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(selkernels, m) {
  // Selectivity family. Labels are segmented once per batch (segment_labels); the layer ops take
  // the segmentation (labels, counts, offsets, order, invalid) and a list of activations
  // xs[l]: [N, C_l, *spatial_l], so one call covers every hooked layer. K = counts.size(0).
  m.def(
      "segment_labels(Tensor labels, SymInt num_classes, int ignore_index) "
      "-> (Tensor labels, Tensor counts, Tensor offsets, Tensor order, Tensor invalid)");
  m.def(
      "class_means_segmented(Tensor[] xs, Tensor labels, Tensor counts, Tensor offsets, Tensor order, "
      "Tensor invalid) -> Tensor[]");
  // Also returns per unit the gradient coefficients and the terms they come from (coeffs[l]
  // [4, C_l]: dSI/dmu_max, dSI/dmu_rest / (P - 1), mu_max, mu_rest; argmax[l] int64 [C_l], -1 when
  // P < 2), so the backward is one elementwise pass and the double backward needs no [K, C] means.
  m.def(
      "selectivity_index_segmented(Tensor[] xs, Tensor labels, Tensor counts, Tensor offsets, Tensor order, "
      "Tensor invalid, float eps) -> (Tensor[] si, Tensor[] coeffs, Tensor[] argmax)");
  // grad_unit[l][n, c] = G_l[labels[n], c] / (counts[labels[n]] * spatial_sizes[l]) with
  // G_l[k, c] = grad_si[l][c] * (k == argmax[l][c] ? coeffs[l][0, c] : coeffs[l][1, c]) + grad_means[l][k, c],
  // in dtype out_dtypes[l] (a ScalarType code); 0 for ignored samples. Each of the lists is empty
  // (that term is absent for every layer) or holds one tensor per layer.
  m.def(
      "segmented_unit_grad(Tensor[] grad_si, Tensor[] coeffs, Tensor[] argmax, Tensor[] grad_means, "
      "Tensor labels, Tensor counts, SymInt[] channels, SymInt[] spatial_sizes, int[] out_dtypes) -> Tensor[]");
  // Dataset-level accumulation (ClassSelectivity): sums[l][k, c] += the sum over the class-k samples
  // of their unit means, added in float64 into the caller's [K, C_l] state in the same pass that
  // reduces the classes (no [K, C] means, no second pass); every entry NaN on invalid labels.
  m.def(
      "class_sums_accumulate_(Tensor[] xs, Tensor labels, Tensor counts, Tensor offsets, Tensor order, "
      "Tensor invalid, Tensor(a!)[] sums) -> ()");
  m.def("selectivity_from_means(Tensor means, Tensor counts, float eps) -> Tensor");
  // The launches of one CUDA training step (cuda/launch_plan.h plan_step), on every build: one row
  // per launch of (kernel id, grid x y z, block x y z, smem bytes, bytes read, bytes written).
  m.def(
      "cuda_launch_plan(int[] channels, int[] spatial_sizes, int[] dtypes, int[] layouts, int batch, int num_classes, "
      "int sm_count) -> Tensor");
  m.def("selectivity_from_means_backward(Tensor grad_si, Tensor means, Tensor counts, float eps) -> Tensor");

  // Streaming moments family. Per-class update, in place on the float64 state: z [N, D], the
  // segmentation of its rows (segment_labels; samples outside [offsets[0], offsets[K]) of order
  // belong to no class), count int64 [K], mean [K, D], M2 [K, D, D]. invalid > 0: CPU raises,
  // CUDA leaves the state unchanged (no sync; the caller reports it).
  m.def(
      "class_moments_update_(Tensor z, Tensor labels, Tensor counts, Tensor offsets, Tensor order, Tensor invalid, "
      "Tensor(a!) count, Tensor(b!) mean, Tensor(c!) M2) -> ()");
  // 1/n spectral regularizer (Nassar et al. 2020): h [N, D], V [D, D]. Returns the loss, the
  // projections P = (h - mean) V and dL/dlam (lam the column variances of P, unsorted order), both
  // saved for the backward, which is then elementwise + one GEMM: the variances are sorted once.
  m.def("spectral_penalty(Tensor h, Tensor V, float slope, int tau) -> (Tensor loss, Tensor P, Tensor grad_lam)");
  m.def(
      "spectral_penalty_backward(Tensor grad_loss, Tensor P, Tensor grad_lam, Tensor V, ScalarType out_dtype) "
      "-> Tensor");
  m.def("spectral_penalty_backward_basis(Tensor grad_loss, Tensor h, Tensor P, Tensor grad_lam) -> Tensor");
}
