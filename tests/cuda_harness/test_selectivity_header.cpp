// csrc/common/selectivity.h called from a kernel under the harness == called on the host.
#include "selectivity_kernels.cuh"

#include <random>
#include <vector>

#include "harness_test.h"

SELK_TEST(selectivity_header_device_equals_host) {
  const int64_t K = 7, U = 300;
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> dist(0.0f, 2.0f);
  std::vector<float> means(K * U);
  for (float& m : means) m = dist(rng);
  const std::vector<int64_t> counts = {3, 0, 5, 1, 0, 9, 2};  // two absent classes
  std::vector<double> si(U, -1.0), grad(K * U, -1.0);
  selk_sim::launch((U + 127) / 128, 128, 0, selk_harness_check::selectivity_per_unit<double, float>, means.data(),
                   counts.data(), K, U, 1e-7, si.data(), grad.data());
  std::vector<double> si_ref(U), grad_ref(K * U);
  for (int64_t u = 0; u < U; ++u) {
    const auto t = selk::selectivity_terms<double>(means.data() + u, U, counts.data(), K, 1e-7);
    si_ref[u] = t.si;
    selk::selectivity_grad<double>(t, 1.0, counts.data(), K, 1e-7, grad_ref.data() + u, U);
  }
  SELK_CHECK_CLOSE(si, si_ref, 0.0, 0.0);
  SELK_CHECK_CLOSE(grad, grad_ref, 0.0, 0.0);
}
