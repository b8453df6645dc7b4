#pragma once
// Torch-free scalar math of the 1/n spectral regularizer (Nassar et al., NeurIPS 2020), shared by
// the CPU kernels, the CUDA kernel bodies and the CUDA-semantics test harness.
//
// With s the projected variances sorted descending (0-based rank n), the anchor
// b = s_tau (tau + 1)^slope (treated as a constant), the target gamma_n = b / (n + 1)^slope and
// r_n = s_n / gamma_n, every rank n > tau with s_n > 0 contributes
//   (r_n - 1)^2 + relu(r_n - 1)          (the sum is divided by D by the caller)
// and its derivative w.r.t. s_n is (2 (r_n - 1) + [r_n > 1]) / gamma_n (relu'(0) = 0, as torch).
// "s_n > 0" is read as s_n above the rounding floor D * eps * s_0: a variance that is zero in
// exact arithmetic (a rank-deficient batch, N - 1 < D) comes out as rounding noise of either
// sign, and counting it would add an arbitrary k / D to the loss.
#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace selk {

template <typename T>
struct SpectralTerm {
  T value;
  T grad;  // d value / d s_n
};

// gamma_n for rank n given the anchor variance s_tau; the same operation order as the reference.
template <typename T>
SELK_HOST_DEVICE inline T spectral_target(T s_tau, int64_t tau, int64_t n, T slope) {
  const T anchor = s_tau * static_cast<T>(pow(static_cast<double>(tau + 1), static_cast<double>(slope)));
  return anchor / static_cast<T>(pow(static_cast<double>(n + 1), static_cast<double>(slope)));
}

// D * eps * s_0, s_0 the largest projected variance.
template <typename T>
SELK_HOST_DEVICE inline T spectral_floor(T s_max, int64_t dim, T eps) {
  return static_cast<T>(dim) * eps * s_max;
}

// Term of rank n (already known to satisfy n > tau); zero with zero gradient where s_n <= floor.
template <typename T>
SELK_HOST_DEVICE inline SpectralTerm<T> spectral_term(T s_n, T gamma_n, T floor) {
  if (!(s_n > floor) || !(s_n > T(0))) return {T(0), T(0)};
  const T r = s_n / gamma_n;
  const T e = r - T(1);
  const T hinge = e > T(0) ? e : T(0);
  return {e * e + hinge, (T(2) * e + (e > T(0) ? T(1) : T(0))) / gamma_n};
}

}  // namespace selk
