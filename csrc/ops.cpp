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
}
