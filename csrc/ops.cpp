// The one place that declares every selkernels op schema. Kernels register per dispatch key in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; fake kernels and autograd live in selkernels/ops.py.
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
  // Selectivity family (x: [N, C, *spatial], labels: int64 [N]).
  m.def("class_means(Tensor x, Tensor labels, int num_classes, int ignore_index) -> (Tensor means, Tensor counts)");
  m.def(
      "class_means_backward(Tensor grad_means, Tensor counts, Tensor labels, int ignore_index, "
      "SymInt spatial_size, ScalarType out_dtype) -> Tensor");
  m.def("selectivity_from_means(Tensor means, Tensor counts, float eps) -> Tensor");
  m.def("selectivity_from_means_backward(Tensor grad_si, Tensor means, Tensor counts, float eps) -> Tensor");
  m.def(
      "selectivity_index(Tensor x, Tensor labels, int num_classes, float eps, int ignore_index) "
      "-> (Tensor si, Tensor means, Tensor counts)");
  m.def(
      "selectivity_index_backward(Tensor grad_si, Tensor? grad_means, Tensor means, Tensor counts, Tensor labels, float eps, "
      "int ignore_index, SymInt spatial_size, ScalarType out_dtype) -> Tensor");

  // Streaming moments family. Per-class update, in place on the float64 state: z [N, D],
  // labels int64 [N] in [0, K), count int64 [K], mean [K, D], M2 [K, D, D].
  m.def("class_moments_update_(Tensor z, Tensor labels, Tensor(a!) count, Tensor(b!) mean, Tensor(c!) M2) -> ()");
  // 1/n spectral regularizer (Nassar et al. 2020): h [N, D], V [D, D]. Returns the loss, the
  // projections P = (h - mean) V and dL/dlam (lam the column variances of P, unsorted order), both
  // saved for the backward, which is then elementwise + one GEMM: the variances are sorted once.
  m.def("spectral_penalty(Tensor h, Tensor V, float slope, int tau) -> (Tensor loss, Tensor P, Tensor grad_lam)");
  m.def("spectral_penalty_backward(Tensor grad_loss, Tensor P, Tensor grad_lam, Tensor V, ScalarType out_dtype) "
        "-> Tensor");
  m.def("spectral_penalty_backward_basis(Tensor grad_loss, Tensor h, Tensor P, Tensor grad_lam) -> Tensor");
}
