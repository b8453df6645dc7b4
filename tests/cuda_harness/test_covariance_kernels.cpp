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

// Runs the update on (x, labels) into the state the way covariance.cu does, with small grids so
// that every grid-stride loop wraps; the K = 1 GEMM (cuBLAS in the launcher) is a plain loop here.
// The segmentation is segment_labels' (plain C++): labels outside [0, K) belong to no class and
// come last in order; they count as invalid (the update must then change nothing) when
// `invalid_labels`, else as ignored (skipped).
template <typename scalar_t, typename gemm_t>
void class_update(const std::vector<scalar_t>& x, const std::vector<int64_t>& labels, int64_t K, int64_t D,
                  std::vector<int64_t>& count, std::vector<double>& mean, std::vector<double>& m2, unsigned blocks = 3,
                  bool invalid_labels = false) {
  using namespace selk::cuda;
  const int64_t N = static_cast<int64_t>(labels.size());
  std::vector<int64_t> seg_labels(N), order(N), offsets(K + 1, 0), rank(K);
  int64_t invalid = 0;
  for (int64_t n = 0; n < N; ++n) {
    const bool in_class = labels[n] >= 0 && labels[n] < K;
    seg_labels[n] = in_class ? labels[n] : -1;
    invalid += !in_class && invalid_labels;
    if (in_class) ++offsets[labels[n] + 1];
  }
  for (int64_t k = 0; k < K; ++k) offsets[k + 1] += offsets[k];
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return static_cast<uint64_t>(seg_labels[a]) < static_cast<uint64_t>(seg_labels[b]);  // -1 last
  });
  // the launcher's ATen part: rank = cumsum(diff(offsets) > 0), num_present = rank[K - 1] * (invalid == 0)
  for (int64_t k = 0, c = 0; k < K; ++k) rank[k] = c += offsets[k + 1] > offsets[k];
  const int64_t num_present = invalid == 0 ? rank[K - 1] : 0;
  const int64_t max_present = std::min(N, K);
  std::vector<int64_t> present(max_present, -1);
  launch(blocks, 32, 0, class_present_kernel<int64_t>, offsets.data(), rank.data(), K, present.data());
  std::vector<double> rem(max_present * D, -1.0), delta(max_present * D, -1.0), weights(2 * max_present, -1.0);
  std::vector<gemm_t> shift(max_present * D, gemm_t(-1));
  const int64_t mean_items = max_present * ((D + kMeanCols - 1) / kMeanCols);
  launch(blocks, dim3(kMeanCols, kMeanRowGroups), 0, class_batch_mean_kernel<scalar_t, gemm_t>, x.data(), order.data(),
         offsets.data(), present.data(), &num_present, count.data(), mean.data(), D, mean_items, shift.data(),
         rem.data(), delta.data(), weights.data());
  std::vector<gemm_t> xc(N * D, gemm_t(-1));
  launch(blocks, kThreads, 0, class_center_rows_kernel<scalar_t, gemm_t>, x.data(), order.data(), seg_labels.data(),
         rank.data(), &num_present, shift.data(), N, D, K, xc.data());
  if (K == 1) {
    std::vector<gemm_t> gram(D * D, gemm_t(0));
    for (int64_t i = 0; i < D; ++i)
      for (int64_t j = 0; j < D; ++j)
        for (int64_t r = 0; r < N; ++r) gram[i * D + j] += xc[r * D + i] * xc[r * D + j];
    launch(blocks, kThreads, 0, class_merge_gram_kernel<gemm_t>, gram.data(), offsets.data(), &num_present, rem.data(),
           delta.data(), weights.data(), D, m2.data());
  } else {
    const int64_t T = (D + kGramTile - 1) / kGramTile;
    const int64_t gram_items = max_present * (T * (T + 1) / 2);
    launch(blocks, dim3(kGramSide, kGramSide), 0, class_gram_merge_kernel<gemm_t>, xc.data(), offsets.data(),
           present.data(), &num_present, rem.data(), delta.data(), weights.data(), D, gram_items, m2.data());
  }
  launch(blocks, kThreads, 0, class_merge_mean_count_kernel<double>, offsets.data(), present.data(), &num_present,
         delta.data(), weights.data(), D, max_present * D, count.data(), mean.data());
}

// Two-pass float64 reference of class k's count, mean and M2 over rows with labels[r] == k.
void reference_moments(const std::vector<double>& x, const std::vector<int64_t>& labels, int64_t k, int64_t D,
                       int64_t& n, std::vector<double>& want_mean, std::vector<double>& want_m2) {
  const int64_t N = static_cast<int64_t>(labels.size());
  n = 0;
  want_mean.assign(D, 0.0);
  want_m2.assign(D * D, 0.0);
  for (int64_t r = 0; r < N; ++r)
    if (labels[r] == k) {
      ++n;
      for (int64_t j = 0; j < D; ++j) want_mean[j] += x[r * D + j];
    }
  if (n == 0) return;
  for (auto& m : want_mean) m /= static_cast<double>(n);
  for (int64_t r = 0; r < N; ++r)
    if (labels[r] == k)
      for (int64_t i = 0; i < D; ++i)
        for (int64_t j = 0; j < D; ++j)
          want_m2[i * D + j] += (x[r * D + i] - want_mean[i]) * (x[r * D + j] - want_mean[j]);
}

}  // namespace

SELK_TEST(class_moments_match_two_pass_reference) {
  // D = 70: two state tiles per side, one partial (off-diagonal and diagonal tiles, edge guards)
  for (const int64_t K : {int64_t(1), int64_t(4)}) {
    const int64_t D = 70, N = 37;
    const auto x = randn(N * D, 1, 1e6);  // large offset: the centring must remove it
    std::vector<int64_t> labels(N);
    for (int64_t n = 0; n < N; ++n) labels[n] = K == 1 ? 0 : (n * 7) % 3;  // class 3 is absent
    std::vector<int64_t> batch_labels = labels;
    if (K > 1) batch_labels[5] = -1, batch_labels[11] = K;  // ignored samples: skipped
    std::vector<int64_t> count(K, 0);
    std::vector<double> mean(K * D, 0.0), m2(K * D * D, 0.0);
    // three uneven batches, the first of a single row
    const int64_t cuts[] = {0, 1, 20, N};
    for (int b = 0; b < 3; ++b) {
      std::vector<double> xb(x.begin() + cuts[b] * D, x.begin() + cuts[b + 1] * D);
      std::vector<int64_t> lb(batch_labels.begin() + cuts[b], batch_labels.begin() + cuts[b + 1]);
      class_update<double, double>(xb, lb, K, D, count, mean, m2, b == 1 ? 1u : 3u);
    }
    for (int64_t k = 0; k < K; ++k) {
      int64_t n;
      std::vector<double> want_mean, want_m2;
      reference_moments(x, batch_labels, k, D, n, want_mean, want_m2);
      SELK_CHECK(count[k] == n);
      const std::vector<double> got_m2(m2.begin() + k * D * D, m2.begin() + (k + 1) * D * D);
      for (int64_t i = 0; i < D; ++i)
        for (int64_t j = 0; j < D; ++j) SELK_CHECK(got_m2[i * D + j] == got_m2[j * D + i]);  // exactly symmetric
      if (n == 0) {
        SELK_CHECK(std::all_of(got_m2.begin(), got_m2.end(), [](double v) { return v == 0; }));
        continue;
      }
      SELK_CHECK_CLOSE(std::vector<double>(mean.begin() + k * D, mean.begin() + (k + 1) * D), want_mean, 1e-14, 0);
      SELK_CHECK_CLOSE(got_m2, want_m2, 1e-8, 1e-8);
    }
  }
}

SELK_TEST(class_moments_float32_gemm) {
  const int64_t K = 3, D = 33, N = 50;
  const auto xd = randn(N * D, 2, 100.0);
  std::vector<float> x(xd.begin(), xd.end());
  const std::vector<double> xr(x.begin(), x.end());
  std::vector<int64_t> labels(N);
  for (int64_t n = 0; n < N; ++n) labels[n] = n % K;
  std::vector<int64_t> count(K, 0);
  std::vector<double> mean(K * D, 0.0), m2(K * D * D, 0.0);
  class_update<float, float>(x, labels, K, D, count, mean, m2);
  for (int64_t k = 0; k < K; ++k) {
    int64_t n;
    std::vector<double> want_mean, want_m2;
    reference_moments(xr, labels, k, D, n, want_mean, want_m2);
    SELK_CHECK(count[k] == n);
    SELK_CHECK_CLOSE(std::vector<double>(mean.begin() + k * D, mean.begin() + (k + 1) * D), want_mean, 1e-12, 0);
    SELK_CHECK_CLOSE(std::vector<double>(m2.begin() + k * D * D, m2.begin() + (k + 1) * D * D), want_m2, 1e-5, 1e-4);
  }
}

SELK_TEST(class_moments_unchanged_by_a_batch_with_invalid_labels) {
  for (const int64_t K : {int64_t(1), int64_t(4)}) {
    const int64_t D = 9, N = 12;
    const auto x = randn(N * D, 5);
    std::vector<int64_t> labels(N);
    for (int64_t n = 0; n < N; ++n) labels[n] = n % K;
    std::vector<int64_t> count(K, 0);
    std::vector<double> mean(K * D, 0.0), m2(K * D * D, 0.0);
    class_update<double, double>(x, labels, K, D, count, mean, m2);
    const auto count0 = count;
    const auto mean0 = mean, m20 = m2;
    labels[3] = K;  // one invalid label: the whole batch is refused
    class_update<double, double>(x, labels, K, D, count, mean, m2, 3u, /*invalid_labels=*/true);
    SELK_CHECK(count == count0);
    SELK_CHECK(mean == mean0);
    SELK_CHECK(m2 == m20);
  }
}

SELK_TEST(present_classes_in_increasing_order) {
  // K larger than any label, some classes empty (offsets as segment_labels makes them)
  const int64_t K = 10;
  const std::vector<int64_t> offsets = {0, 2, 2, 5, 5, 5, 6, 6, 6, 6, 8};
  std::vector<int64_t> rank(K), present(K, -1);
  for (int64_t k = 0, c = 0; k < K; ++k) rank[k] = c += offsets[k + 1] > offsets[k];
  launch(1, 4, 0, selk::cuda::class_present_kernel<int64_t>, offsets.data(), rank.data(), K, present.data());
  SELK_CHECK(rank[K - 1] == 4);
  SELK_CHECK_CLOSE(std::vector<int64_t>(present.begin(), present.begin() + 4), std::vector<int64_t>({0, 2, 5, 9}), 0,
                   0);
}

SELK_TEST(column_sumsq_split_over_rows) {
  using namespace selk::cuda;
  for (int64_t N : {1, 7, 45, 300}) {
    for (int64_t D : {1, 31, 70}) {
      for (int64_t chunks : {int64_t(1), int64_t(3), int64_t(8)}) {
        const auto P = randn(N * D, static_cast<unsigned>(N * 100 + D));
        const double inv = N > 1 ? 1.0 / (N - 1) : 0.0;
        const int64_t rows_per_chunk = (N + chunks - 1) / chunks;
        const dim3 grid(static_cast<unsigned>((D + kColTile - 1) / kColTile), static_cast<unsigned>(chunks));
        std::vector<double> lam(D, -1.0), want(D, 0.0);
        if (chunks == 1) {
          launch(grid, dim3(kColTile, kRowGroups), 0, column_sumsq_kernel<double>, P.data(), N, D, rows_per_chunk, inv,
                 lam.data());
        } else {
          std::vector<double> partial(chunks * D, -1.0);
          launch(grid, dim3(kColTile, kRowGroups), 0, column_sumsq_kernel<double>, P.data(), N, D, rows_per_chunk, 1.0,
                 partial.data());
          launch(1, 32, 0, chunk_sum_kernel<double>, partial.data(), chunks, D, inv, lam.data());  // grid-stride
        }
        for (int64_t i = 0; i < N; ++i)
          for (int64_t j = 0; j < D; ++j) want[j] += P[i * D + j] * P[i * D + j] * inv;
        SELK_CHECK_CLOSE(lam, want, 1e-13, 0);
      }
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
      std::vector<double> loss(1, -1.0), w(D, -1.0);
      launch(1, selk::cuda::kLossThreads, 0, selk::cuda::spectral_loss_kernel<double>, sorted.data(), order.data(), D,
             tau, 1.3, std::numeric_limits<double>::epsilon(), loss.data(), w.data());
      double want_loss;
      std::vector<double> want_grad;
      spectral_reference(lam, tau, 1.3, want_loss, want_grad);
      SELK_CHECK_CLOSE(loss, std::vector<double>{want_loss}, 1e-12, 0);
      SELK_CHECK_CLOSE(w, want_grad, 1e-12, 0);
      SELK_CHECK(D <= tau + 3 || want_loss > 0);  // the last two ranks may be the zeroed ones
    }
  }
}
