#pragma once
// Class selectivity index (Leavitt & Morcos, ICLR 2021) of one unit and its gradient, shared by the
// CPU and CUDA kernels. Torch-free so the CUDA-semantics harness can compile it with g++.
//
// For one unit with class means mu[k] (k < K, read with a stride) and class counts n[k]:
//   present classes: n[k] > 0, P of them
//   mu_max  = max over present k of mu[k]      (first such k on ties, as torch.max)
//   mu_rest = (sum over present k of mu[k] - mu_max) / (P - 1)
//   SI      = (mu_max - mu_rest) / (mu_max + mu_rest + eps)
// P < 2 gives SI = 0 and a zero gradient (the published scripts divide by P - 1 = 0 and get NaN).
// With eps = 0 and mu_max + mu_rest = 0 (e.g. a dead ReLU unit) SI is NaN, as the formula says.
#include <cstdint>

#include "common/host_device.h"

namespace selk {

// SI from the largest present class mean and the mean of the other present class means.
template <typename acc_t>
SELK_HOST_DEVICE inline acc_t selectivity_value(acc_t mu_max, acc_t mu_rest, acc_t eps) {
  return (mu_max - mu_rest) / (mu_max + mu_rest + eps);
}

// grad_si * dSI/dmu[k] for k = argmax (*g_max) and for every other present class (*g_rest).
// SI = (a - b) / (a + b + eps): dSI/da = (2b + eps) / denom^2, dSI/db = -(2a + eps) / denom^2,
// and b averages the present - 1 non-max present classes.
template <typename acc_t>
SELK_HOST_DEVICE inline void selectivity_grad_coeffs(acc_t mu_max, acc_t mu_rest, int64_t present, acc_t eps,
                                                     acc_t grad_si, acc_t* g_max, acc_t* g_rest) {
  if (present < 2) {
    *g_max = acc_t(0);
    *g_rest = acc_t(0);
    return;
  }
  const acc_t denom = mu_max + mu_rest + eps;
  const acc_t inv_denom2 = acc_t(1) / (denom * denom);
  *g_max = grad_si * (acc_t(2) * mu_rest + eps) * inv_denom2;
  *g_rest = -grad_si * (acc_t(2) * mu_max + eps) * inv_denom2 / static_cast<acc_t>(present - 1);
}

template <typename acc_t>
struct SelectivityTerms {
  acc_t si;
  acc_t mu_max;
  acc_t mu_rest;
  int64_t argmax;   // class holding mu_max; -1 when P < 2
  int64_t present;  // P
};

// means[k * stride], counts[k] for k < K.
template <typename acc_t, typename mean_t>
SELK_HOST_DEVICE inline SelectivityTerms<acc_t> selectivity_terms(const mean_t* means, int64_t stride,
                                                                  const int64_t* counts, int64_t K, acc_t eps) {
  SelectivityTerms<acc_t> t{acc_t(0), acc_t(0), acc_t(0), -1, 0};
  acc_t sum = acc_t(0);
  for (int64_t k = 0; k < K; ++k) {
    if (counts[k] <= 0) continue;
    const acc_t m = static_cast<acc_t>(means[k * stride]);
    sum += m;
    // `!(m <= max)` so a NaN mean propagates to SI instead of being skipped.
    if (t.present == 0 || !(m <= t.mu_max)) {
      t.mu_max = m;
      t.argmax = k;
    }
    ++t.present;
  }
  if (t.present < 2) {
    t.argmax = -1;
    t.mu_max = acc_t(0);
    return t;
  }
  t.mu_rest = (sum - t.mu_max) / static_cast<acc_t>(t.present - 1);
  t.si = selectivity_value(t.mu_max, t.mu_rest, eps);
  return t;
}

// The same coefficients with the class they apply to, for kernels that never materialise the
// [K, C] gradient (the fused backwards): g_max for k == argmax, g_rest for the other present
// classes, 0 for absent ones; all zero (argmax = -1) when P < 2.
template <typename acc_t>
struct SelectivityGradCoeffs {
  acc_t g_max;
  acc_t g_rest;
  int64_t argmax;
};

template <typename acc_t>
SELK_HOST_DEVICE inline SelectivityGradCoeffs<acc_t> selectivity_grad_coeffs(const SelectivityTerms<acc_t>& t,
                                                                             acc_t grad_si, acc_t eps) {
  SelectivityGradCoeffs<acc_t> g{acc_t(0), acc_t(0), t.argmax};
  selectivity_grad_coeffs(t.mu_max, t.mu_rest, t.present, eps, grad_si, &g.g_max, &g.g_rest);
  return g;
}

// d SI / d mu[k] scaled by grad_si, written to grad_means[k * stride] for every k (0 if absent).
template <typename acc_t, typename out_t>
SELK_HOST_DEVICE inline void selectivity_grad(const SelectivityTerms<acc_t>& t, acc_t grad_si, const int64_t* counts,
                                              int64_t K, acc_t eps, out_t* grad_means, int64_t stride) {
  const SelectivityGradCoeffs<acc_t> g = selectivity_grad_coeffs(t, grad_si, eps);
  for (int64_t k = 0; k < K; ++k) {
    acc_t v = acc_t(0);
    if (counts[k] > 0) v = (k == g.argmax) ? g.g_max : g.g_rest;
    grad_means[k * stride] = static_cast<out_t>(v);
  }
}

}  // namespace selk
