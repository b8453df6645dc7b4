// Harness tests of the covariance / spectral-penalty CUDA kernel bodies (csrc/cuda/covariance.cuh,
// csrc/cuda/spectral.cuh) against plain C++ float64 references, with the launch shapes of the
// launchers (covariance.cu, spectral.cu).
#include "cuda/covariance.cuh"
#include "cuda/spectral.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "harness_test.h"

using selk_sim::launch;

namespace {

constexpr int kThreads = 256;

std::vector<double> randn(size_t n, unsigned seed, double offset = 0.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, 1.0);
  std::vector<double> v(n);
  for (auto& x : v) x = offset + dist(gen);
  return v;
}

// Runs the per-class update on (x, labels) into the state the way covariance.cu does; the GEMM
// is a plain loop here (cuBLAS in the launcher).
template <typename scalar_t, typename gemm_t>
void class_update(const std::vector<scalar_t>& x, const std::vector<int64_t>& labels, int64_t K, int64_t D,
                  std::vector<int64_t>& count, std::vector<double>& mean, std::vector<double>& m2) {
  const int64_t N = static_cast<int64_t>(labels.size());
  std::vector<int64_t> order(N);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return labels[a] < labels[b]; });
  std::vector<int64_t> sorted(N), batch(K, 0), offsets(K + 1, 0);
  for (int64_t r = 0; r < N; ++r) sorted[r] = labels[order[r]];
  for (int64_t n = 0; n < N; ++n) ++batch[labels[n]];
  for (int64_t k = 0; k < K; ++k) offsets[k + 1] = offsets[k] + batch[k];
  std::vector<double> mean_b(K * D, -1.0), rem(K * D, -1.0);
  std::vector<gemm_t> shift(K * D, gemm_t(-1));
  launch(dim3((D + kThreads - 1) / kThreads, K), kThreads, 0, selk::cuda::class_batch_mean_kernel<scalar_t, gemm_t>,
         x.data(), order.data(), offsets.data(), D, mean_b.data(), shift.data(), rem.data());
  std::vector<gemm_t> xc(N * D);
  launch(std::min<int64_t>(3, (N * D + kThreads - 1) / kThreads), kThreads, 0,  // grid-stride: few blocks
         selk::cuda::class_center_rows_kernel<scalar_t, gemm_t>, x.data(), order.data(), sorted.data(),
         shift.data(), N, D, xc.data());
  const std::vector<int64_t> count_before = count;
  std::vector<gemm_t> gram(D * D);
  for (int64_t k = 0; k < K; ++k) {
    if (batch[k] == 0) continue;
    for (int64_t i = 0; i < D; ++i)
      for (int64_t j = 0; j < D; ++j) {
        gemm_t s = 0;
        for (int64_t r = offsets[k]; r < offsets[k + 1]; ++r) s += xc[r * D + i] * xc[r * D + j];
        gram[i * D + j] = s;
      }
    launch(2, kThreads, 0, selk::cuda::class_merge_m2_kernel<gemm_t>, gram.data(), count_before.data(), mean.data(),
           mean_b.data(), rem.data(), k, batch[k], D, m2.data());
  }
  launch(dim3((D + kThreads - 1) / kThreads, K), kThreads, 0, selk::cuda::class_merge_mean_count_kernel<double>,
         batch.data(), mean_b.data(), D, count.data(), mean.data(), count_before.data());
}

}  // namespace

SELK_TEST(class_moments_match_two_pass_reference) {
  const int64_t K = 4, D = 5, N = 37;
  const auto x = randn(N * D, 1, 1e6);  // large offset: the centring must remove it
  std::vector<int64_t> labels(N);
  for (int64_t n = 0; n < N; ++n) labels[n] = (n * 7) % 3;  // class 3 is absent
  std::vector<int64_t> count(K, 0);
  std::vector<double> mean(K * D, 0.0), m2(K * D * D, 0.0);
  // three uneven batches, the first of a single row
  const int64_t cuts[] = {0, 1, 20, N};
  for (int b = 0; b < 3; ++b) {
    std::vector<double> xb(x.begin() + cuts[b] * D, x.begin() + cuts[b + 1] * D);
    std::vector<int64_t> lb(labels.begin() + cuts[b], labels.begin() + cuts[b + 1]);
    class_update<double, double>(xb, lb, K, D, count, mean, m2);
  }
  for (int64_t k = 0; k < K; ++k) {
    std::vector<double> want_mean(D, 0.0), want_m2(D * D, 0.0);
    int64_t n = 0;
    for (int64_t r = 0; r < N; ++r)
      if (labels[r] == k) {
        ++n;
        for (int64_t j = 0; j < D; ++j) want_mean[j] += x[r * D + j];
      }
    SELK_CHECK(count[k] == n);
    if (n == 0) {
      SELK_CHECK(std::all_of(m2.begin() + k * D * D, m2.begin() + (k + 1) * D * D, [](double v) { return v == 0; }));
      continue;
    }
    for (auto& m : want_mean) m /= static_cast<double>(n);
    for (int64_t r = 0; r < N; ++r)
      if (labels[r] == k)
        for (int64_t i = 0; i < D; ++i)
          for (int64_t j = 0; j < D; ++j)
            want_m2[i * D + j] += (x[r * D + i] - want_mean[i]) * (x[r * D + j] - want_mean[j]);
    SELK_CHECK_CLOSE(std::vector<double>(mean.begin() + k * D, mean.begin() + (k + 1) * D), want_mean, 1e-14, 0);
    SELK_CHECK_CLOSE(std::vector<double>(m2.begin() + k * D * D, m2.begin() + (k + 1) * D * D), want_m2, 1e-8,
                     1e-8);
  }
}

SELK_TEST(class_moments_float32_gemm) {
  const int64_t K = 3, D = 33, N = 50;
  const auto xd = randn(N * D, 2, 100.0);
  std::vector<float> x(xd.begin(), xd.end());
  std::vector<int64_t> labels(N);
  for (int64_t n = 0; n < N; ++n) labels[n] = n % K;
  std::vector<int64_t> count(K, 0);
  std::vector<double> mean(K * D, 0.0), m2(K * D * D, 0.0);
  class_update<float, float>(x, labels, K, D, count, mean, m2);
  for (int64_t k = 0; k < K; ++k) {
    std::vector<double> want_mean(D, 0.0), want_m2(D * D, 0.0);
    for (int64_t r = k; r < N; r += K)
      for (int64_t j = 0; j < D; ++j) want_mean[j] += x[r * D + j];
    for (auto& m : want_mean) m /= static_cast<double>(count[k]);
    for (int64_t r = k; r < N; r += K)
      for (int64_t i = 0; i < D; ++i)
        for (int64_t j = 0; j < D; ++j) want_m2[i * D + j] += (x[r * D + i] - want_mean[i]) * (x[r * D + j] - want_mean[j]);
    SELK_CHECK_CLOSE(std::vector<double>(mean.begin() + k * D, mean.begin() + (k + 1) * D), want_mean, 1e-12, 0);
    SELK_CHECK_CLOSE(std::vector<double>(m2.begin() + k * D * D, m2.begin() + (k + 1) * D * D), want_m2, 1e-5,
                     1e-4);
  }
}

SELK_TEST(column_sumsq_partial_tiles) {
  for (int64_t N : {1, 7, 45}) {
    for (int64_t D : {1, 31, 70}) {
      const auto P = randn(N * D, static_cast<unsigned>(N * 100 + D));
      const double inv = N > 1 ? 1.0 / (N - 1) : 0.0;
      std::vector<double> lam(D, -1.0), want(D, 0.0);
      launch((D + selk::cuda::kColTile - 1) / selk::cuda::kColTile, dim3(selk::cuda::kColTile, selk::cuda::kRowGroups),
             0, selk::cuda::column_sumsq_kernel<double>, P.data(), N, D, inv, lam.data());
      for (int64_t i = 0; i < N; ++i)
        for (int64_t j = 0; j < D; ++j) want[j] += P[i * D + j] * P[i * D + j] * inv;
      SELK_CHECK_CLOSE(lam, want, 1e-13, 0);
    }
  }
}

// Plain reference of the loss and dL/dlam (unsorted) from the definition.
void spectral_reference(const std::vector<double>& lam, int64_t tau, double slope, double& loss,
                        std::vector<double>& grad) {
  const int64_t D = static_cast<int64_t>(lam.size());
  std::vector<int64_t> order(D);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lam[a] > lam[b]; });
  loss = 0;
  grad.assign(D, 0.0);
  if (D <= tau + 1) return;
  const double anchor = lam[order[tau]] * std::pow(tau + 1.0, slope);
  const double floor = D * std::numeric_limits<double>::epsilon() * lam[order[0]];
  for (int64_t n = tau + 1; n < D; ++n) {
    const double s = lam[order[n]];
    if (!(s > floor)) continue;
    const double gamma = anchor / std::pow(n + 1.0, slope);
    const double r = s / gamma;
    loss += (r - 1) * (r - 1) + std::max(r - 1, 0.0);
    grad[order[n]] = (2 * (r - 1) + (r > 1 ? 1 : 0)) / gamma / D;
  }
  loss /= D;
}

SELK_TEST(spectral_loss_matches_definition) {
  for (int64_t D : {5, 12, 300, 600}) {  // D > kLossThreads: several ranks per thread
    for (int64_t tau : {0, 3, 10}) {
      auto lam = randn(D, static_cast<unsigned>(D + tau));
      for (int64_t j = 0; j < D; ++j) lam[j] = std::fabs(lam[j]) / (1.0 + j % 17);
      if (D > 8) lam[D - 1] = lam[D - 2] = 0.0;  // zero variances are skipped
      std::vector<int64_t> order(D);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lam[a] > lam[b]; });
      std::vector<double> sorted(D);
      for (int64_t n = 0; n < D; ++n) sorted[n] = lam[order[n]];
      const double grad_loss = 0.5, grad_scale = 3.0;
      std::vector<double> loss(1, -1.0), w(D, -1.0);
      launch(1, selk::cuda::kLossThreads, 0, selk::cuda::spectral_loss_kernel<double>, sorted.data(), order.data(), D,
             tau, 1.3, std::numeric_limits<double>::epsilon(), grad_scale, &grad_loss, loss.data(), w.data());
      double want_loss;
      std::vector<double> want_grad;
      spectral_reference(lam, tau, 1.3, want_loss, want_grad);
      for (auto& g : want_grad) g *= grad_scale * grad_loss;
      SELK_CHECK_CLOSE(loss, std::vector<double>{want_loss}, 1e-12, 0);
      SELK_CHECK_CLOSE(w, want_grad, 1e-12, 0);
      SELK_CHECK(D <= tau + 3 || want_loss > 0);  // the last two ranks may be the zeroed ones
    }
  }
}
