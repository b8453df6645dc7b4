// The selectivity CUDA kernels (csrc/cuda/selectivity.cuh) run under the CUDA-semantics harness and
// compared with a plain double-precision C++ reference: every storage dtype, NCHW / channels_last /
// strided [N, C] inputs, multi-block grids with partial last blocks and grid-stride loops, label
// chunks larger and smaller than a block, K larger than a block and beyond the shared-memory counts,
// ignore_index, out-of-range labels, absent classes and fewer than two classes present.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/selectivity.cuh"
#include "harness_test.h"

using namespace selk::cuda;

namespace {

// ----- independent storage decoding (not the kernels' to_float) ------------------------------------
double decode(double v) { return v; }
double decode(float v) { return v; }
double decode(bf16_t h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
double decode(f16_t h) {
  const int exp = (h.bits >> 10) & 0x1f, mant = h.bits & 0x3ff;
  const double sign = (h.bits & 0x8000) ? -1.0 : 1.0;
  if (exp == 31) return mant ? NAN : sign * INFINITY;
  if (exp == 0) return sign * std::ldexp(mant, -24);
  return sign * std::ldexp(1024 + mant, exp - 25);
}

template <class T>
T encode(double v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else if constexpr (std::is_same_v<T, float>) {
    return static_cast<float>(v);
  } else {
    return from_float<T>(static_cast<float>(v));
  }
}

template <class T>
constexpr const char* type_name() {
  if constexpr (std::is_same_v<T, double>) return "f64";
  if constexpr (std::is_same_v<T, float>) return "f32";
  if constexpr (std::is_same_v<T, f16_t>) return "f16";
  return "bf16";
}

// ----- problem and reference ----------------------------------------------------------------------
struct Problem {
  int64_t N, C, S, K, ignore;
  std::vector<int64_t> labels;
  std::vector<double> x;  // logical [N][C][S]; multiples of 1/64 in (-4, 4): exact in every dtype
};

Problem make_problem(int64_t N, int64_t C, int64_t S, int64_t K, int64_t classes_used, unsigned seed,
                     bool positive = false) {
  std::mt19937 rng(seed);
  Problem p{N, C, S, K, -100, {}, {}};
  p.labels.resize(N);
  for (int64_t n = 0; n < N; ++n) {
    const unsigned r = rng() % 20;
    if (r == 0) p.labels[n] = p.ignore;
    else if (r == 1) p.labels[n] = (rng() % 2) ? K + 3 : -5;  // out of range: skipped, never indexed
    else p.labels[n] = static_cast<int64_t>(rng() % classes_used);
  }
  p.x.resize(N * C * S);
  for (auto& v : p.x) {
    const int q = static_cast<int>(rng() % 255) - 127;
    v = positive ? (std::abs(q) + 1) / 64.0 : q / 64.0;
  }
  return p;
}

bool counted(const Problem& p, int64_t n) {
  const int64_t l = p.labels[n];
  return l != p.ignore && l >= 0 && l < p.K;
}

struct Ref {
  std::vector<double> a, means, si;
  std::vector<int64_t> counts;
};

std::vector<double> ref_si(const std::vector<double>& means, const std::vector<int64_t>& counts, int64_t K, int64_t C,
                           double eps) {
  std::vector<double> si(C, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    std::vector<double> mus;
    for (int64_t k = 0; k < K; ++k)
      if (counts[k] > 0) mus.push_back(means[k * C + c]);
    if (mus.size() < 2) continue;
    const double top = *std::max_element(mus.begin(), mus.end());
    double sum = 0;
    for (double m : mus) sum += m;
    const double rest = (sum - top) / (mus.size() - 1);
    si[c] = (top - rest) / (top + rest + eps);
  }
  return si;
}

// grad_si[c] * dSI_c/dmeans[k, c] by central differences of the reference SI, [K, C].
std::vector<double> fd_si_grad(const std::vector<double>& means, const std::vector<int64_t>& counts,
                               const std::vector<double>& grad_si, int64_t K, int64_t C, double eps) {
  const double h = 1e-6;
  std::vector<double> out(K * C);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < C; ++c) {
      std::vector<double> hi = means, lo = means;
      hi[k * C + c] += h;
      lo[k * C + c] -= h;
      out[k * C + c] = grad_si[c] * (ref_si(hi, counts, K, C, eps)[c] - ref_si(lo, counts, K, C, eps)[c]) / (2 * h);
    }
  return out;
}

Ref reference(const Problem& p, double eps) {
  Ref r;
  r.a.assign(p.N * p.C, 0.0);
  for (int64_t i = 0; i < p.N * p.C; ++i) {
    double s = 0;
    for (int64_t j = 0; j < p.S; ++j) s += p.x[i * p.S + j];
    r.a[i] = s / p.S;
  }
  r.counts.assign(p.K, 0);
  r.means.assign(p.K * p.C, 0.0);
  for (int64_t n = 0; n < p.N; ++n) {
    if (!counted(p, n)) continue;
    ++r.counts[p.labels[n]];
    for (int64_t c = 0; c < p.C; ++c) r.means[p.labels[n] * p.C + c] += r.a[n * p.C + c];
  }
  for (int64_t k = 0; k < p.K; ++k)
    if (r.counts[k])
      for (int64_t c = 0; c < p.C; ++c) r.means[k * p.C + c] /= r.counts[k];
  r.si = ref_si(r.means, r.counts, p.K, p.C, eps);
  return r;
}

// ----- launching the kernels ----------------------------------------------------------------------
enum class Layout { kNCHW, kChannelsLast, kStrided2d };

struct Segs {
  std::vector<int64_t> counts;
  std::vector<int32_t> offsets, order;
};

Segs run_segments(const Problem& p, unsigned threads) {
  Segs s;
  s.counts.assign(p.K, -1);
  s.offsets.assign(p.K + 1, -1);
  s.order.assign(std::max<int64_t>(p.N, 1), -1);
  std::vector<int32_t> rank(std::max<int64_t>(p.N, 1), -1), scratch(p.K, -1);
  selk_sim::launch(dim3(1), dim3(threads), segment_smem_bytes(p.K), segment_labels_kernel, p.labels.data(), p.N, p.K,
                   p.ignore, s.counts.data(), s.offsets.data(), rank.data(), s.order.data(),
                   segment_counts_in_smem(p.K) ? static_cast<int32_t*>(nullptr) : scratch.data());
  return s;
}

void check_segments(const Problem& p, const Segs& s) {
  int32_t pos = 0;
  for (int64_t k = 0; k < p.K; ++k) {
    SELK_CHECK(s.offsets[k] == pos);
    std::vector<int32_t> members;
    for (int64_t n = 0; n < p.N; ++n)
      if (counted(p, n) && p.labels[n] == k) members.push_back(static_cast<int32_t>(n));
    SELK_CHECK(s.counts[k] == static_cast<int64_t>(members.size()));
    // Stable: a class's samples in increasing index order.
    for (size_t i = 0; i < members.size(); ++i) SELK_CHECK(s.order[pos + i] == members[i]);
    pos += static_cast<int32_t>(members.size());
  }
  SELK_CHECK(s.offsets[p.K] == pos);
}

template <class T>
struct Fwd {
  using acc_t = typename AccOf<T>::type;
  std::vector<acc_t> a, means, si;
  Segs segs;
};

template <class T>
Fwd<T> run_forward(const Problem& p, Layout layout, unsigned seg_threads, unsigned row_blocks, double eps) {
  using acc_t = typename AccOf<T>::type;
  Fwd<T> f;
  f.segs = run_segments(p, seg_threads);
  const int64_t N = p.N, C = p.C, S = p.S;
  std::vector<T> xs(N * C * S);
  f.a.assign(N * C, std::nan(""));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < S; ++s) {
        const T v = encode<T>(p.x[(n * C + c) * S + s]);
        if (layout == Layout::kNCHW) xs[(n * C + c) * S + s] = v;
        else if (layout == Layout::kChannelsLast) xs[(n * S + s) * C + c] = v;
        else xs[c * N + n] = v;  // [N, C] with strides (1, N)
      }
  if (N * C > 0) {
    if (layout == Layout::kStrided2d) {
      SELK_CHECK(S == 1);
      selk_sim::launch(dim3(row_blocks), dim3(64), 0, unit_values_kernel<T, acc_t>, xs.data(), N, C, int64_t(1), N,
                       f.a.data());
    } else if (layout == Layout::kChannelsLast) {
      selk_sim::launch(dim3(row_blocks), dim3(kWarpSize, kClRows), kClRows * kWarpSize * sizeof(acc_t),
                       unit_means_cl_kernel<T, acc_t>, xs.data(), N, C, S, f.a.data());
    } else {
      constexpr int kVec = Vec16<T>::kLen;
      const bool vec = kVec > 1 && (S * static_cast<int64_t>(sizeof(T))) % 16 == 0;  // vector data is 16-aligned
      const int G = row_group_size(S, vec ? kVec : 1);
      if (vec) {
        if constexpr (kVec > 1)
          selk_sim::launch(dim3(row_blocks), dim3(kRowThreads), 0, unit_means_rows_kernel<T, acc_t, kVec>,
                           xs.data(), N * C, S, G, f.a.data());
      } else {
        selk_sim::launch(dim3(row_blocks), dim3(kRowThreads), 0, unit_means_rows_kernel<T, acc_t, 1>, xs.data(),
                         N * C, S, G, f.a.data());
      }
    }
  }
  f.means.assign(p.K * C, std::nan(""));
  if (C > 0)
    selk_sim::launch(dim3(p.K, (C + kWarpSize - 1) / kWarpSize), dim3(kWarpSize, kClassRows),
                     kClassRows * kWarpSize * sizeof(acc_t), class_sum_kernel<acc_t>, f.a.data(),
                     f.segs.offsets.data(), f.segs.order.data(), C, f.means.data());
  f.si.assign(C, std::nan(""));
  if (C > 0)
    selk_sim::launch(dim3((C + 31) / 32), dim3(32), 0, si_kernel<acc_t>, f.means.data(), f.segs.counts.data(), p.K, C,
                     static_cast<acc_t>(eps), f.si.data());
  return f;
}

template <class T>
void check_forward(const Problem& p, Layout layout, unsigned seg_threads, unsigned row_blocks) {
  const double eps = 1e-7;
  const Ref r = reference(p, eps);
  const Fwd<T> f = run_forward<T>(p, layout, seg_threads, row_blocks, eps);
  check_segments(p, f.segs);
  const double tol = std::is_same_v<T, double> ? 1e-12 : 2e-6;  // fp32 accumulation of exact inputs
  SELK_CHECK_CLOSE(f.a, r.a, tol, tol);
  SELK_CHECK_CLOSE(f.means, r.means, tol, tol);
  constexpr bool f64 = std::is_same_v<T, double>;
  SELK_CHECK_CLOSE(f.si, r.si, f64 ? 1e-10 : 2e-4, f64 ? 1e-12 : 1e-5);
}

template <class T>
void forward_all_layouts() {
  // NCHW rows: S = 49 (a warp per row), 4 and 16 (vector loads for 4- and 2-byte types, several
  // rows per warp), 6 and 3 (scalar loads, sub-warp groups); 2 blocks so rows wrap the grid.
  for (int64_t S : {49, 4, 16, 6, 3}) {
    check_forward<T>(make_problem(37, 11, S, 7, 6, static_cast<unsigned>(S)), Layout::kNCHW, 64, 2);
  }
  // channels_last: C = 40 leaves a partial channel tile; 5 blocks for 23 * 2 tiles (grid-stride).
  check_forward<T>(make_problem(23, 40, 9, 5, 5, 11), Layout::kChannelsLast, 64, 5);
  check_forward<T>(make_problem(9, 3, 2, 4, 4, 12), Layout::kChannelsLast, 32, 1);
  // S == 1, strided [N, C].
  check_forward<T>(make_problem(70, 13, 1, 6, 6, 13), Layout::kStrided2d, 96, 3);
}

// ----- backward -----------------------------------------------------------------------------------
template <class acc_t, class out_t>
void check_unit_grad(bool with_si) {
  const Problem p = make_problem(45, 21, 5, 6, 5, 21, /*positive=*/true);
  const double eps = 1e-7;
  const Ref r = reference(p, eps);
  std::mt19937 rng(5);
  std::uniform_real_distribution<double> u(-1, 1);
  std::vector<acc_t> means(r.means.begin(), r.means.end()), gm(p.K * p.C), grad_si(p.C);
  std::vector<double> gm_d(p.K * p.C), gsi_d(p.C);
  for (size_t i = 0; i < gm.size(); ++i) gm[i] = static_cast<acc_t>(gm_d[i] = u(rng));
  for (size_t i = 0; i < grad_si.size(); ++i) grad_si[i] = static_cast<acc_t>(gsi_d[i] = u(rng));
  // Reference: G = grad_means (+ grad_si * dSI/dmeans by central differences of the reference SI).
  std::vector<double> G = gm_d;
  if (with_si) {
    const std::vector<double> d = fd_si_grad(r.means, r.counts, gsi_d, p.K, p.C, eps);
    for (size_t i = 0; i < G.size(); ++i) G[i] += d[i];
  }
  std::vector<acc_t> g_max(p.C), g_rest(p.C);
  std::vector<int64_t> argmax(p.C);
  if (with_si)
    selk_sim::launch(dim3(1), dim3(32), 0, si_grad_coeffs_kernel<acc_t>, grad_si.data(), means.data(),
                     r.counts.data(), p.K, p.C, static_cast<acc_t>(eps), g_max.data(), g_rest.data(), argmax.data());
  std::vector<out_t> out(p.N * p.C, encode<out_t>(NAN));
  // 4 grid rows for 45 samples: grid-stride over n; 128-thread blocks over 21 units: partial block.
  selk_sim::launch(dim3(1, 4), dim3(kUnitThreads), 0, unit_grad_kernel<acc_t, out_t>, gm.data(), r.counts.data(),
                   p.labels.data(), p.N, p.K, p.C, p.ignore, p.S, with_si ? g_max.data() : nullptr,
                   with_si ? g_rest.data() : nullptr, with_si ? argmax.data() : nullptr, out.data());
  std::vector<double> got(out.size()), want(out.size(), 0.0);
  for (size_t i = 0; i < out.size(); ++i) got[i] = decode(out[i]);
  for (int64_t n = 0; n < p.N; ++n) {
    if (!counted(p, n)) continue;
    const int64_t k = p.labels[n];
    for (int64_t c = 0; c < p.C; ++c) want[n * p.C + c] = G[k * p.C + c] / (r.counts[k] * p.S);
  }
  double tol = std::is_same_v<out_t, double> ? 1e-12 : 1e-6;
  if (std::is_same_v<out_t, f16_t>) tol = 1e-3;
  if (std::is_same_v<out_t, bf16_t>) tol = 8e-3;
  if (with_si) tol = std::max(tol, 1e-6);  // finite differences
  SELK_CHECK_CLOSE(got, want, tol, tol * 1e-2);
}

}  // namespace

SELK_TEST(half_and_bfloat16_conversions) {
  // Every half decodes as the IEEE value and re-encodes to itself; same for bfloat16.
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const f16_t h{static_cast<uint16_t>(b)};
    const double v = decode(h);
    if (std::isnan(v)) {
      SELK_CHECK(std::isnan(to_float(h)));
      continue;
    }
    SELK_CHECK(static_cast<double>(to_float(h)) == v);
    SELK_CHECK(from_float<f16_t>(to_float(h)).bits == h.bits);
    const bf16_t g{static_cast<uint16_t>(b)};
    if (!std::isnan(decode(g))) SELK_CHECK(from_float<bf16_t>(to_float(g)).bits == g.bits);
  }
  // Rounding: nearest representable value, ties to even, over normal, subnormal and overflow ranges.
  std::mt19937 rng(3);
  for (int i = 0; i < 200000; ++i) {
    uint32_t u = rng() & 0x7fffffffu;
    u = (u % 0x08000000u) + 0x30000000u;  // |v| from ~5e-10 to ~1.3e5
    if (i % 3 == 0) u = (u & ~0x1fffu) | 0x1000u;  // exact half-way cases
    float v;
    std::memcpy(&v, &u, 4);
    if (i % 2) v = -v;
    const f16_t h = from_float<f16_t>(v);
    const double got = decode(h);
    if (std::fabs(v) >= 65520.0) {
      SELK_CHECK(std::isinf(got) && (got > 0) == (v > 0));
      continue;
    }
    const f16_t up{static_cast<uint16_t>(h.bits + 1)}, down{static_cast<uint16_t>(h.bits - 1)};
    const double e = std::fabs(got - v);
    if ((h.bits & 0x7fff) != 0x7bff) SELK_CHECK(e <= std::fabs(decode(up) - v));
    if ((h.bits & 0x7fff) != 0) SELK_CHECK(e <= std::fabs(decode(down) - v));
    if ((h.bits & 0x7fff) != 0 && (h.bits & 0x7fff) != 0x7bff && (e == std::fabs(decode(up) - v) || e == std::fabs(decode(down) - v)))
      SELK_CHECK((h.bits & 1) == 0);
    const bf16_t g = from_float<bf16_t>(v);
    const double gd = decode(g);
    const double gup = decode(bf16_t{static_cast<uint16_t>(g.bits + 1)}), gdn = decode(bf16_t{static_cast<uint16_t>(g.bits - 1)});
    const double ge = std::fabs(gd - v);
    SELK_CHECK(ge <= std::fabs(gup - v) && ge <= std::fabs(gdn - v));
    if (ge == std::fabs(gup - v) || ge == std::fabs(gdn - v)) SELK_CHECK((g.bits & 1) == 0);
  }
}

SELK_TEST(forward_f64) { forward_all_layouts<double>(); }
SELK_TEST(forward_f32) { forward_all_layouts<float>(); }
SELK_TEST(forward_f16) { forward_all_layouts<f16_t>(); }
SELK_TEST(forward_bf16) { forward_all_layouts<bf16_t>(); }

SELK_TEST(k_larger_than_a_block_and_label_chunks) {
  // 300 classes (scan over several 64-thread chunks, 60 of them present), 500 samples (8 chunks).
  check_forward<float>(make_problem(500, 5, 2, 300, 60, 31), Layout::kNCHW, 64, 3);
  // A full 1024-thread segment block over 2100 samples (3 chunks, the last partial).
  const Problem p = make_problem(2100, 1, 1, 37, 37, 32);
  check_segments(p, run_segments(p, kSegmentThreads));
}

SELK_TEST(counts_beyond_shared_memory) {
  // K too large for the shared-memory counts: the global scratch path.
  Problem p = make_problem(150, 1, 1, 13000, 13000, 33);
  SELK_CHECK(!segment_counts_in_smem(p.K));
  p.labels[0] = 12999;
  p.labels[1] = 12999;
  check_segments(p, run_segments(p, 64));
}

SELK_TEST(fewer_than_two_classes_and_empty_batch) {
  Problem p = make_problem(20, 6, 3, 4, 1, 41);  // only class 0 (plus ignored / out of range)
  const Fwd<float> f = run_forward<float>(p, Layout::kNCHW, 32, 1, 1e-7);
  for (float v : f.si) SELK_CHECK(v == 0.0f);
  for (auto& l : p.labels) l = p.ignore;  // no class present at all
  const Fwd<float> g = run_forward<float>(p, Layout::kNCHW, 32, 1, 1e-7);
  for (float v : g.means) SELK_CHECK(v == 0.0f);
  for (float v : g.si) SELK_CHECK(v == 0.0f);
  for (int64_t c : g.segs.counts) SELK_CHECK(c == 0);
  std::vector<float> gs(6, 1.0f), gmax(6), grest(6);
  std::vector<int64_t> am(6);
  selk_sim::launch(dim3(1), dim3(32), 0, si_grad_coeffs_kernel<float>, gs.data(), f.means.data(), f.segs.counts.data(),
                   p.K, p.C, 1e-7f, gmax.data(), grest.data(), am.data());
  for (int c = 0; c < 6; ++c) SELK_CHECK(gmax[c] == 0.0f && grest[c] == 0.0f && am[c] == -1);
  const Problem e = make_problem(0, 4, 3, 5, 5, 42);
  const Fwd<float> h = run_forward<float>(e, Layout::kNCHW, 64, 1, 1e-7);
  for (float v : h.means) SELK_CHECK(v == 0.0f);
  for (int64_t c : h.segs.counts) SELK_CHECK(c == 0);
}

SELK_TEST(bitwise_identical_across_schedules) {
  const Problem p = make_problem(200, 33, 7, 9, 9, 51);
  std::vector<std::vector<float>> runs;
  for (uint64_t seed : {0, 1, 7, 12345}) {
    selk_sim::ScopedSeed s(seed);
    Fwd<bf16_t> f = run_forward<bf16_t>(p, Layout::kChannelsLast, 64, 3, 1e-7);
    f.means.insert(f.means.end(), f.si.begin(), f.si.end());
    runs.push_back(f.means);
  }
  for (auto& r : runs) SELK_CHECK(std::memcmp(r.data(), runs[0].data(), r.size() * sizeof(float)) == 0);
}

SELK_TEST(class_means_backward_all_out_dtypes) {
  check_unit_grad<float, float>(false);
  check_unit_grad<float, f16_t>(false);
  check_unit_grad<float, bf16_t>(false);
  check_unit_grad<double, double>(false);
}

SELK_TEST(selectivity_index_backward_all_out_dtypes) {
  check_unit_grad<double, double>(true);
  check_unit_grad<float, float>(true);
  check_unit_grad<float, bf16_t>(true);
  check_unit_grad<float, f16_t>(true);
}

SELK_TEST(selectivity_from_means_backward) {
  const Problem p = make_problem(60, 45, 2, 8, 7, 61, /*positive=*/true);
  const double eps = 1e-7;
  const Ref r = reference(p, eps);
  std::vector<double> gsi(p.C), gm(p.K * p.C, NAN);
  std::mt19937 rng(6);
  for (auto& v : gsi) v = (rng() % 1000) / 500.0 - 1.0;
  // 32-thread blocks over 45 units: a partial second block.
  selk_sim::launch(dim3(2), dim3(32), 0, si_backward_kernel<double>, gsi.data(), r.means.data(), r.counts.data(), p.K,
                   p.C, eps, gm.data());
  SELK_CHECK_CLOSE(gm, fd_si_grad(r.means, r.counts, gsi, p.K, p.C, eps), 1e-6, 1e-8);
}
