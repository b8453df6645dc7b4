// Autograd of the selectivity ops, registered in C++ for every device.
//
// Why C++ rather than torch.library.register_autograd: these ops run once per hooked layer per
// training step on activations that are often small (4x4 maps), and the Python autograd path cost
// ~0.15 ms per forward+backward, more than the kernels themselves. The backward is still the
// registered backward op (CPU/CUDA kernels, fake kernel in selkernels/ops.py), so torch.compile and
// opcheck see the same graph.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace selk {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

c10::SymInt spatial_size(c10::SymIntArrayRef sizes) {
  c10::SymInt s = 1;
  for (size_t d = 2; d < sizes.size(); ++d) s = s * sizes[d];
  return s;
}

// [N, C] -> x's shape as a stride-0 view over the spatial dims: no N*C*S buffer.
at::Tensor broadcast_unit_grad(const at::Tensor& grad_unit, const std::vector<c10::SymInt>& x_sizes) {
  std::vector<c10::SymInt> view(x_sizes.size(), c10::SymInt(1));
  view[0] = grad_unit.sym_size(0);
  view[1] = grad_unit.sym_size(1);
  return grad_unit.view_symint(view).expand_symint(x_sizes);
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

void save_x_meta(AutogradContext* ctx, const at::Tensor& x) {
  ctx->saved_data["x_sizes"] = c10::IValue(x.sym_sizes());
  ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
}

class ClassMeansFunction : public torch::autograd::Function<ClassMeansFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& labels, int64_t K,
                               int64_t ignore_index) {
    static auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t,
                                                                  int64_t)>("selkernels::class_means");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [means, counts] = op.call(x, labels, K, ignore_index);
    ctx->save_for_backward({labels, counts});
    save_x_meta(ctx, x);
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->mark_non_differentiable({counts});
    return {means, counts};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                          c10::SymInt, at::ScalarType)>("selkernels::class_means_backward");
    const auto saved = ctx->get_saved_variables();
    const auto x_sizes = ctx->saved_data["x_sizes"].toSymIntVector();
    const auto x_dtype = static_cast<at::ScalarType>(ctx->saved_data["x_dtype"].toInt());
    const at::Tensor grad_unit = op.call(grads[0].contiguous(), saved[1], saved[0],
                                         ctx->saved_data["ignore_index"].toInt(), spatial_size(x_sizes), x_dtype);
    return {broadcast_unit_grad(grad_unit, x_sizes), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

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
    return {op.call(grads[0].contiguous(), saved[0], saved[1], ctx->saved_data["eps"].toDouble()), at::Tensor(),
            at::Tensor()};
  }
};

class SelectivityIndexFunction : public torch::autograd::Function<SelectivityIndexFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& labels, int64_t K,
                               double eps, int64_t ignore_index) {
    static auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, int64_t, double, int64_t)>("selkernels::selectivity_index");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [si, means, counts] = op.call(x, labels, K, eps, ignore_index);
    ctx->save_for_backward({labels, means, counts});
    save_x_meta(ctx, x);
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->mark_non_differentiable({counts});
    // An unused `means` output keeps an undefined gradient, so the backward skips its [K, C] term.
    ctx->set_materialize_grads(false);
    return {si, means, counts};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&, double, int64_t, c10::SymInt,
                                          at::ScalarType)>("selkernels::selectivity_index_backward");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& means = saved[1];
    const auto x_sizes = ctx->saved_data["x_sizes"].toSymIntVector();
    const auto x_dtype = static_cast<at::ScalarType>(ctx->saved_data["x_dtype"].toInt());
    const at::Tensor grad_si = grads[0].defined() ? grads[0].contiguous() : at::zeros_symint({means.sym_size(1)}, means.options());
    std::optional<at::Tensor> grad_means;
    if (grads[1].defined()) grad_means = grads[1].contiguous();
    const at::Tensor grad_unit =
        op.call(grad_si, grad_means, means, saved[2], saved[0], ctx->saved_data["eps"].toDouble(),
                ctx->saved_data["ignore_index"].toInt(), spatial_size(x_sizes), x_dtype);
    return {broadcast_unit_grad(grad_unit, x_sizes), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> class_means_autograd(const at::Tensor& x, const at::Tensor& labels, int64_t K,
                                                        int64_t ignore_index) {
  auto out = ClassMeansFunction::apply(x, labels, K, ignore_index);
  return {out[0], out[1]};
}

at::Tensor selectivity_from_means_autograd(const at::Tensor& means, const at::Tensor& counts, double eps) {
  return SelectivityFromMeansFunction::apply(means, counts, eps)[0];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> selectivity_index_autograd(const at::Tensor& x, const at::Tensor& labels,
                                                                          int64_t K, double eps, int64_t ignore_index) {
  auto out = SelectivityIndexFunction::apply(x, labels, K, eps, ignore_index);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(selkernels, Autograd, m) {
  m.impl("class_means", &class_means_autograd);
  m.impl("selectivity_from_means", &selectivity_from_means_autograd);
  m.impl("selectivity_index", &selectivity_index_autograd);
}

}  // namespace selk
