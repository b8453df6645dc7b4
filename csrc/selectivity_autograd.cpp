// Autograd of selectivity_from_means, registered in C++ for every device.
//
// Why C++ rather than torch.library.register_autograd: the op runs on small [K, C] tensors, where
// the Python autograd path costs more than the kernel. The backward is still the registered
// backward op (CPU/CUDA kernels, fake kernel in selkernels/ops.py), so torch.compile and opcheck
// see the same graph. The layer ops (one call for all layers) have their autograd in ops.py.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace selk {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

class SelectivityFromMeansFunction : public torch::autograd::Function<SelectivityFromMeansFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& means, const at::Tensor& counts, double eps) {
    static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, double)>(
        "selkernels::selectivity_from_means");
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor si = op.call(means, counts, eps);
    ctx->save_for_backward({means, counts});
    ctx->saved_data["eps"] = eps;
    return {si};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>(
        "selkernels::selectivity_from_means_backward");
    const auto saved = ctx->get_saved_variables();
    const double eps = ctx->saved_data["eps"].toDouble();
    // create_graph=True: go through the backward op's own autograd (selkernels/ops.py), so the
    // second derivative is the op's, not silently zero. Otherwise skip that (Python) layer.
    if (at::GradMode::is_enabled()) return {op.call(grads[0].contiguous(), saved[0], saved[1], eps), at::Tensor(), at::Tensor()};
    at::AutoDispatchBelowADInplaceOrView guard;
    return {op.call(grads[0].contiguous(), saved[0], saved[1], eps), at::Tensor(), at::Tensor()};
  }
};

at::Tensor selectivity_from_means_autograd(const at::Tensor& means, const at::Tensor& counts, double eps) {
  return SelectivityFromMeansFunction::apply(means, counts, eps)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(selkernels, Autograd, m) {
  m.impl("selectivity_from_means", &selectivity_from_means_autograd);
}

}  // namespace selk
