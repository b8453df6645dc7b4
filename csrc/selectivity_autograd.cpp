// Autograd of the selectivity ops, in C++ for every device (registered for the Autograd key; the
// kernels below it are the CPU and CUDA ones, or the fake kernels while torch.compile traces).
//
// Why C++: these ops run on every training step, and Python's autograd wrapper
// (torch.library.register_autograd) cost ~90 us forward and ~200 us backward per call, most of an
// op-level forward+backward (see the README's "Architecture" section). Every backward is built from
// registered ops and ATen ops, and the backward ops have their own autograd here, so double
// backward is exact.
//
// Layer metadata that the backward needs (each activation's shape, for the stride-0 broadcast of
// the [N, C] unit gradient, and its dtype) is kept as SymInts, so dynamic shapes stay dynamic.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <limits>
#include <vector>

namespace selk {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using TensorVec = std::vector<at::Tensor>;

// ------------------------------------------------------------------------------------------------
// The registered ops, called through the dispatcher (below autograd in the forwards, with autograd
// in the backwards so that create_graph=True records them).
// ------------------------------------------------------------------------------------------------
std::tuple<TensorVec, TensorVec, TensorVec> selectivity_index_op(at::TensorList xs, const at::Tensor& labels,
                                                                 const at::Tensor& counts, const at::Tensor& offsets,
                                                                 const at::Tensor& order, const at::Tensor& invalid,
                                                                 double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("selkernels::selectivity_index_segmented", "")
                             .typed<std::tuple<TensorVec, TensorVec, TensorVec>(
                                 at::TensorList, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, double)>();
  return op.call(xs, labels, counts, offsets, order, invalid, eps);
}

TensorVec class_means_op(at::TensorList xs, const at::Tensor& labels, const at::Tensor& counts,
                         const at::Tensor& offsets, const at::Tensor& order, const at::Tensor& invalid) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("selkernels::class_means_segmented", "")
                             .typed<TensorVec(at::TensorList, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, const at::Tensor&)>();
  return op.call(xs, labels, counts, offsets, order, invalid);
}

TensorVec unit_grad_op(at::TensorList grad_si, at::TensorList coeffs, at::TensorList argmax, at::TensorList grad_means,
                       const at::Tensor& labels, const at::Tensor& counts, c10::SymIntArrayRef channels,
                       c10::SymIntArrayRef spatial_sizes, at::IntArrayRef out_dtypes) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("selkernels::segmented_unit_grad", "")
          .typed<TensorVec(at::TensorList, at::TensorList, at::TensorList, at::TensorList, const at::Tensor&,
                           const at::Tensor&, c10::SymIntArrayRef, c10::SymIntArrayRef, at::IntArrayRef)>();
  return op.call(grad_si, coeffs, argmax, grad_means, labels, counts, channels, spatial_sizes, out_dtypes);
}

at::Tensor selectivity_from_means_op(const at::Tensor& means, const at::Tensor& counts, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("selkernels::selectivity_from_means", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  return op.call(means, counts, eps);
}

at::Tensor selectivity_from_means_backward_op(const at::Tensor& grad_si, const at::Tensor& means,
                                              const at::Tensor& counts, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("selkernels::selectivity_from_means_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(grad_si, means, counts, eps);
}

// ------------------------------------------------------------------------------------------------
// Layer metadata: shapes (flattened SymInts with their ranks) and dtypes of the activations.
// ------------------------------------------------------------------------------------------------
void save_layers(AutogradContext* ctx, at::TensorList xs) {
  std::vector<c10::SymInt> dims;
  std::vector<int64_t> ranks, dtypes;
  for (const at::Tensor& x : xs) {
    for (const c10::SymInt& d : x.sym_sizes()) dims.push_back(d);
    ranks.push_back(x.dim());
    dtypes.push_back(static_cast<int64_t>(x.scalar_type()));
  }
  ctx->saved_data["dims"] = std::move(dims);
  ctx->saved_data["ranks"] = std::move(ranks);
  ctx->saved_data["dtypes"] = std::move(dtypes);
}

struct LayerMeta {
  std::vector<std::vector<c10::SymInt>> shapes;
  std::vector<c10::SymInt> channels, spatial;
  std::vector<int64_t> dtypes;
};

LayerMeta saved_layers(AutogradContext* ctx) {
  const std::vector<c10::SymInt> dims = ctx->saved_data["dims"].toSymIntVector();
  const std::vector<int64_t> ranks = ctx->saved_data["ranks"].toIntVector();
  LayerMeta meta;
  meta.dtypes = ctx->saved_data["dtypes"].toIntVector();
  size_t at = 0;
  for (int64_t rank : ranks) {
    std::vector<c10::SymInt> shape(dims.begin() + at, dims.begin() + at + rank);
    at += rank;
    c10::SymInt spatial = 1;
    for (int64_t d = 2; d < rank; ++d) spatial = spatial * shape[d];
    meta.channels.push_back(shape[1]);
    meta.spatial.push_back(spatial);
    meta.shapes.push_back(std::move(shape));
  }
  return meta;
}

// [N, C] unit gradients -> each activation's shape, as stride-0 views over the spatial dims.
void append_broadcast(const TensorVec& grad_units, const LayerMeta& meta, variable_list& out) {
  for (size_t l = 0; l < grad_units.size(); ++l) {
    const std::vector<c10::SymInt>& shape = meta.shapes[l];
    std::vector<c10::SymInt> kept(shape.begin(), shape.begin() + 2);
    kept.resize(shape.size(), c10::SymInt(1));
    out.push_back(grad_units[l].view_symint(kept).expand_symint(shape));
  }
}

void append_undefined(variable_list& out, size_t count) { out.resize(out.size() + count); }

// ------------------------------------------------------------------------------------------------
// The SI's derivatives as ATen ops (differentiable, for double backward). Per unit, a = mu_max,
// b = mu_rest, d = a + b + eps: A = dSI/da = (2b + eps) / d^2, B = dSI/db = -(2a + eps) / d^2.
// ------------------------------------------------------------------------------------------------

// d/da and d/db of g_a * A + g_b * B.
std::pair<at::Tensor, at::Tensor> coeff_vjp_terms(const at::Tensor& a, const at::Tensor& b, double eps,
                                                  const at::Tensor& g_a, const at::Tensor& g_b) {
  const at::Tensor d = a + b + eps;
  const at::Tensor d2 = d * d, d3 = d2 * d;
  // (2b + eps) / d^3 and (2a + eps) / d^3: A = (2b + eps) / d^2 and -B = (2a + eps) / d^2 over d.
  const at::Tensor A_over_d = (2 * b + eps) / d3, minus_B_over_d = (2 * a + eps) / d3;
  const at::Tensor dA_da = -2 * A_over_d, dA_db = 2 / d2 - 2 * A_over_d;
  const at::Tensor dB_da = -2 / d2 + 2 * minus_B_over_d, dB_db = 2 * minus_B_over_d;
  return {g_a * dA_da + g_b * dB_da, g_a * dA_db + g_b * dB_db};
}

// Per unit of class means [K, C]: the present mask [K, 1], argmax [C] (the first maximum), P [C],
// mu_max, mu_rest, and whether P >= 2.
struct SiTerms {
  at::Tensor present, argmax, num_present, mu_max, mu_rest, enough;
};

SiTerms si_terms(const at::Tensor& means, const at::Tensor& counts) {
  SiTerms t;
  t.present = (counts > 0).unsqueeze(1);
  t.num_present = t.present.sum(0).to(means.scalar_type()).expand_symint({means.sym_size(1)});
  const at::Tensor masked = at::where(t.present, means, -std::numeric_limits<double>::infinity());
  t.argmax = std::get<1>(masked.max(0)).clamp_min(0);  // P = 0: any class; every term is masked by `enough`
  t.mu_max = means.gather(0, t.argmax.unsqueeze(0)).squeeze(0);
  const at::Tensor total = at::where(t.present, means, 0).sum(0);
  t.enough = t.num_present >= 2;
  t.mu_rest = (total - t.mu_max) / (t.num_present - 1).clamp_min(1);
  return t;
}

// Gradient w.r.t. means [K, C] of sum_c g_a[c] * A[c] + g_b[c] * B[c].
at::Tensor si_coeff_vjp(const at::Tensor& means, const SiTerms& t, double eps, const at::Tensor& g_a,
                        const at::Tensor& g_b) {
  auto [d_a, d_b] = coeff_vjp_terms(t.mu_max, t.mu_rest, eps, g_a, g_b);
  const at::Tensor grad_a = at::where(t.enough, d_a, 0);
  const at::Tensor grad_b = at::where(t.enough, d_b, 0);
  const at::Tensor is_max =
      at::arange(c10::Scalar(means.sym_size(0)), t.argmax.options()).unsqueeze(1) == t.argmax.unsqueeze(0);
  const at::Tensor rest = grad_b / (t.num_present - 1).clamp_min(1);
  return at::where(t.present, at::where(is_max, grad_a, rest), 0);
}

// Gradient w.r.t. the class means of sum(grad_coeffs * coeffs), coeffs [4, C] = (A, B / (P - 1),
// mu_max, mu_rest), as the two values it takes per unit: at the maximal class (d mu_max / d mu_k =
// 1) and at each other present class (d mu_rest / d mu_k = 1 / (P - 1)). Zero where P < 2.
std::pair<at::Tensor, at::Tensor> coeffs_vjp(const at::Tensor& coeffs, const at::Tensor& num_present, double eps,
                                             const at::Tensor& grad_coeffs) {
  const at::Tensor a = coeffs[2], b = coeffs[3];
  const at::Tensor p_minus_1 = (num_present - 1).clamp_min(1).to(a.scalar_type());
  auto [d_a, d_b] = coeff_vjp_terms(a, b, eps, grad_coeffs[0], grad_coeffs[1] / p_minus_1);
  const at::Tensor enough = num_present >= 2;
  return {at::where(enough, d_a + grad_coeffs[2], 0), at::where(enough, (d_b + grad_coeffs[3]) / p_minus_1, 0)};
}

// Differentiable class means [K, C] of [N, C] values (ignored samples skipped, absent classes 0).
at::Tensor segment_class_means(const at::Tensor& values, const at::Tensor& labels, const at::Tensor& counts) {
  const at::Tensor keep = (labels >= 0).unsqueeze(1);
  const at::Tensor sums = values.new_zeros_symint({counts.sym_size(0), values.sym_size(1)})
                              .index_add(0, labels.clamp_min(0), at::where(keep, values, 0));
  return sums / counts.clamp_min(1).unsqueeze(1).to(values.scalar_type());
}

// ------------------------------------------------------------------------------------------------
// segmented_unit_grad: linear in grad_si and grad_means; its adjoint is a class mean of the
// incoming [N, C] gradient, G[k, c] = mean over class k of gg[n, c] / S.
// ------------------------------------------------------------------------------------------------
struct UnitGradFunction : torch::autograd::Function<UnitGradFunction> {
  static variable_list forward(AutogradContext* ctx, at::TensorList grad_si, at::TensorList coeffs,
                               at::TensorList argmax, at::TensorList grad_means, const at::Tensor& labels,
                               const at::Tensor& counts, c10::SymIntArrayRef channels,
                               c10::SymIntArrayRef spatial_sizes, at::IntArrayRef out_dtypes) {
    TensorVec saved{labels, counts};
    saved.insert(saved.end(), grad_si.begin(), grad_si.end());
    saved.insert(saved.end(), coeffs.begin(), coeffs.end());
    saved.insert(saved.end(), argmax.begin(), argmax.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["spatial"] = spatial_sizes.vec();
    ctx->saved_data["layers"] = static_cast<int64_t>(channels.size());
    ctx->saved_data["with_si"] = !grad_si.empty();
    ctx->saved_data["with_means"] = !grad_means.empty();
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView guard;
    return unit_grad_op(grad_si, coeffs, argmax, grad_means, labels, counts, channels, spatial_sizes, out_dtypes);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_units) {
    const auto layers = static_cast<size_t>(ctx->saved_data["layers"].toInt());
    const bool with_si = ctx->saved_data["with_si"].toBool(), with_means = ctx->saved_data["with_means"].toBool();
    const std::vector<c10::SymInt> spatial = ctx->saved_data["spatial"].toSymIntVector();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &labels = saved[0], &counts = saved[1];
    variable_list g_si, g_coeffs, g_means;
    for (size_t i = 0; i < layers; ++i) {
      const at::Tensor& gg = grad_units[i];
      const at::ScalarType acc = with_si                                           ? saved[2 + layers + i].scalar_type()
                                 : gg.defined() && gg.scalar_type() == at::kDouble ? at::kDouble
                                                                                   : at::kFloat;
      at::Tensor G;
      if (gg.defined()) G = segment_class_means(gg.to(acc), labels, counts) / c10::Scalar(spatial[i]);
      if (with_means) g_means.push_back(G);
      if (!with_si) continue;
      if (!G.defined()) {
        g_si.emplace_back();
        g_coeffs.emplace_back();
        continue;
      }
      const at::Tensor &gsi = saved[2 + i], &cf = saved[2 + layers + i], &am = saved[2 + 2 * layers + i];
      const at::Tensor at_max = G.gather(0, am.clamp_min(0).unsqueeze(0)).squeeze(0);
      const at::Tensor rest = G.sum(0) - at_max;
      g_si.push_back(at_max * cf[0] + rest * cf[1]);
      g_coeffs.push_back(at::stack({gsi * at_max, gsi * rest}));
    }
    variable_list out = g_si;
    out.insert(out.end(), g_coeffs.begin(), g_coeffs.end());
    append_undefined(out, with_si ? layers : 0);  // argmax
    out.insert(out.end(), g_means.begin(), g_means.end());
    append_undefined(out, 5);  // labels, counts, channels, spatial_sizes, out_dtypes
    return out;
  }
};

TensorVec unit_grad_autograd(at::TensorList grad_si, at::TensorList coeffs, at::TensorList argmax,
                             at::TensorList grad_means, const at::Tensor& labels, const at::Tensor& counts,
                             c10::SymIntArrayRef channels, c10::SymIntArrayRef spatial_sizes,
                             at::IntArrayRef out_dtypes) {
  return UnitGradFunction::apply(grad_si, coeffs, argmax, grad_means, labels, counts, channels, spatial_sizes,
                                 out_dtypes);
}

// ------------------------------------------------------------------------------------------------
// selectivity_index_segmented: the backward is one segmented_unit_grad for every layer.
// ------------------------------------------------------------------------------------------------
struct SelectivityIndexFunction : torch::autograd::Function<SelectivityIndexFunction> {
  static variable_list forward(AutogradContext* ctx, at::TensorList xs, const at::Tensor& labels,
                               const at::Tensor& counts, const at::Tensor& offsets, const at::Tensor& order,
                               const at::Tensor& invalid, double eps) {
    save_layers(ctx, xs);
    ctx->saved_data["eps"] = eps;
    ctx->set_materialize_grads(false);
    TensorVec si, coeffs, argmax;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(si, coeffs, argmax) = selectivity_index_op(xs, labels, counts, offsets, order, invalid, eps);
    }
    TensorVec saved{labels, counts};
    saved.insert(saved.end(), coeffs.begin(), coeffs.end());
    saved.insert(saved.end(), argmax.begin(), argmax.end());
    ctx->save_for_backward(saved);
    ctx->mark_non_differentiable(argmax);
    variable_list out = si;
    out.insert(out.end(), coeffs.begin(), coeffs.end());
    out.insert(out.end(), argmax.begin(), argmax.end());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const LayerMeta meta = saved_layers(ctx);
    const size_t layers = meta.shapes.size();
    const double eps = ctx->saved_data["eps"].toDouble();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &labels = saved[0], &counts = saved[1];
    const TensorVec coeffs(saved.begin() + 2, saved.begin() + 2 + layers);
    const TensorVec argmax(saved.begin() + 2 + layers, saved.end());
    TensorVec grad_si(layers), unit_coeffs(layers);
    for (size_t i = 0; i < layers; ++i) {
      grad_si[i] = grads[i].defined() ? grads[i] : coeffs[i].new_zeros_symint({coeffs[i].sym_size(1)});
      unit_coeffs[i] = coeffs[i].narrow(0, 0, 2);  // dSI/dmu_max, dSI/dmu_rest / (P - 1)
    }
    at::Tensor num_present;
    for (size_t i = 0; i < layers; ++i) {
      const at::Tensor& grad_coeffs = grads[layers + i];
      if (!grad_coeffs.defined()) continue;
      // Only under double backward: the coefficients and the terms mu_max, mu_rest are functions
      // of the class means, and their gradient w.r.t. the means takes one value at the maximal
      // class and one at the other present classes, as the SI's does: it folds into the per-unit
      // coefficients of the same elementwise pass.
      if (!num_present.defined()) num_present = (counts > 0).sum();
      auto [at_max, at_rest] = coeffs_vjp(coeffs[i], num_present, eps, grad_coeffs);
      unit_coeffs[i] = at::stack({grad_si[i] * coeffs[i][0] + at_max, grad_si[i] * coeffs[i][1] + at_rest});
      grad_si[i] = at::ones_like(grad_si[i]);
    }
    const TensorVec grad_units =
        unit_grad_op(grad_si, unit_coeffs, argmax, {}, labels, counts, meta.channels, meta.spatial, meta.dtypes);
    variable_list out;
    append_broadcast(grad_units, meta, out);
    append_undefined(out, 6);  // labels, counts, offsets, order, invalid, eps
    return out;
  }
};

std::tuple<TensorVec, TensorVec, TensorVec> selectivity_index_autograd(at::TensorList xs, const at::Tensor& labels,
                                                                       const at::Tensor& counts,
                                                                       const at::Tensor& offsets,
                                                                       const at::Tensor& order,
                                                                       const at::Tensor& invalid, double eps) {
  const variable_list out = SelectivityIndexFunction::apply(xs, labels, counts, offsets, order, invalid, eps);
  const auto layers = static_cast<std::ptrdiff_t>(xs.size());
  return {TensorVec(out.begin(), out.begin() + layers), TensorVec(out.begin() + layers, out.begin() + 2 * layers),
          TensorVec(out.begin() + 2 * layers, out.end())};
}

// ------------------------------------------------------------------------------------------------
// class_means_segmented: the backward is one segmented_unit_grad for every layer.
// ------------------------------------------------------------------------------------------------
struct ClassMeansFunction : torch::autograd::Function<ClassMeansFunction> {
  static variable_list forward(AutogradContext* ctx, at::TensorList xs, const at::Tensor& labels,
                               const at::Tensor& counts, const at::Tensor& offsets, const at::Tensor& order,
                               const at::Tensor& invalid) {
    save_layers(ctx, xs);
    ctx->save_for_backward({labels, counts});
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView guard;
    return class_means_op(xs, labels, counts, offsets, order, invalid);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_means) {
    const LayerMeta meta = saved_layers(ctx);
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &labels = saved[0], &counts = saved[1];
    TensorVec terms;  // empty when no layer has a gradient, else one per layer (zeros where absent)
    for (const at::Tensor& g : grad_means) {
      if (!g.defined()) continue;
      for (size_t l = 0; l < grad_means.size(); ++l) {
        const auto acc = static_cast<at::ScalarType>(meta.dtypes[l]) == at::kDouble ? at::kDouble : at::kFloat;
        terms.push_back(grad_means[l].defined() ? grad_means[l]
                                                : counts.new_zeros_symint({counts.sym_size(0), meta.channels[l]},
                                                                          counts.options().dtype(acc)));
      }
      break;
    }
    const TensorVec grad_units =
        unit_grad_op({}, {}, {}, terms, labels, counts, meta.channels, meta.spatial, meta.dtypes);
    variable_list out;
    append_broadcast(grad_units, meta, out);
    append_undefined(out, 5);  // labels, counts, offsets, order, invalid
    return out;
  }
};

TensorVec class_means_autograd(at::TensorList xs, const at::Tensor& labels, const at::Tensor& counts,
                               const at::Tensor& offsets, const at::Tensor& order, const at::Tensor& invalid) {
  return ClassMeansFunction::apply(xs, labels, counts, offsets, order, invalid);
}

// ------------------------------------------------------------------------------------------------
// selectivity_from_means and its backward op (whose own backward is the SI Hessian).
// ------------------------------------------------------------------------------------------------
struct SelectivityFromMeansBackwardFunction : torch::autograd::Function<SelectivityFromMeansBackwardFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_si, const at::Tensor& means,
                            const at::Tensor& counts, double eps) {
    ctx->save_for_backward({grad_si, means, counts});
    ctx->saved_data["eps"] = eps;
    at::AutoDispatchBelowADInplaceOrView guard;
    return selectivity_from_means_backward_op(grad_si, means, counts, eps);
  }

  // The op is grad_si * (A at the argmax, B / (P - 1) at the other present classes): linear in
  // grad_si; its derivative w.r.t. means is the SI Hessian.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &grad_si = saved[0], &means = saved[1], &counts = saved[2];
    const double eps = ctx->saved_data["eps"].toDouble();
    const SiTerms t = si_terms(means, counts);
    const at::Tensor gg = at::where(t.present, grads[0], 0);
    const at::Tensor at_max = gg.gather(0, t.argmax.unsqueeze(0)).squeeze(0);
    const at::Tensor rest = (gg.sum(0) - at_max) / (t.num_present - 1).clamp_min(1);
    const at::Tensor d = t.mu_max + t.mu_rest + eps;
    const at::Tensor coeff_a = (2 * t.mu_rest + eps) / (d * d), coeff_b = -(2 * t.mu_max + eps) / (d * d);
    const at::Tensor g_grad_si = at::where(t.enough, at_max * coeff_a + rest * coeff_b, 0);
    const at::Tensor g_means = si_coeff_vjp(means, t, eps, grad_si * at_max, grad_si * rest);
    return {g_grad_si, g_means, at::Tensor(), at::Tensor()};
  }
};

at::Tensor selectivity_from_means_backward_autograd(const at::Tensor& grad_si, const at::Tensor& means,
                                                    const at::Tensor& counts, double eps) {
  return SelectivityFromMeansBackwardFunction::apply(grad_si, means, counts, eps);
}

struct SelectivityFromMeansFunction : torch::autograd::Function<SelectivityFromMeansFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& means, const at::Tensor& counts, double eps) {
    ctx->save_for_backward({means, counts});
    ctx->saved_data["eps"] = eps;
    at::AutoDispatchBelowADInplaceOrView guard;
    return selectivity_from_means_op(means, counts, eps);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const double eps = ctx->saved_data["eps"].toDouble();
    return {selectivity_from_means_backward_op(grads[0].contiguous(), saved[0], saved[1], eps), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor selectivity_from_means_autograd(const at::Tensor& means, const at::Tensor& counts, double eps) {
  return SelectivityFromMeansFunction::apply(means, counts, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(selkernels, Autograd, m) {
  m.impl("selectivity_index_segmented", &selectivity_index_autograd);
  m.impl("class_means_segmented", &class_means_autograd);
  m.impl("segmented_unit_grad", &unit_grad_autograd);
  m.impl("selectivity_from_means", &selectivity_from_means_autograd);
  m.impl("selectivity_from_means_backward", &selectivity_from_means_backward_autograd);
}

}  // namespace selk
