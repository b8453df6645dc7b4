// The selectivity CUDA kernels (csrc/cuda/selectivity.cuh) run under the CUDA-semantics harness and
// compared with a plain double-precision C++ reference: every storage dtype, NCHW / positions-major
// (channels_last, unit_dim=-1) / strided [N, C] inputs, several layers of mixed shapes and layouts
// in one launch (and mixed dtypes over the launches of one step), grids with idle blocks, partial
// last blocks and grid-stride loops, label chunks larger and smaller than a block, K larger than a
// block and beyond the shared-memory counts, ignore_index, invalid labels (NaN results), absent
// classes, ties and fewer than two classes present. Grids come from cuda/launch_plan.h, as in the
// launchers.
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
    if (r == 0)
      p.labels[n] = p.ignore;
    else if (r == 1)
      p.labels[n] = (rng() % 2) ? K + 3 : -5;  // out of range: skipped, never indexed
    else
      p.labels[n] = static_cast<int64_t>(rng() % classes_used);
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
enum class Layout { kNCHW, kPositionsMajor, kStrided2d };

struct Segs {
  std::vector<int64_t> labels, counts, offsets, order;
  int64_t invalid = -1;
};

Segs run_segments(const Problem& p, unsigned threads) {
  Segs s;
  s.labels.assign(std::max<int64_t>(p.N, 1), -7);
  s.counts.assign(p.K, -1);
  s.offsets.assign(p.K + 1, -1);
  s.order.assign(std::max<int64_t>(p.N, 1), -1);
  std::vector<int32_t> rank(std::max<int64_t>(p.N, 1), -1), scratch(p.K + 1, -1);
  selk_sim::launch(dim3(1), dim3(threads), segment_smem_bytes(p.K), segment_labels_kernel, p.labels.data(), p.N, p.K,
                   p.ignore, s.labels.data(), s.counts.data(), s.offsets.data(), s.order.data(), &s.invalid,
                   rank.data(), segment_counts_in_smem(p.K) ? static_cast<int32_t*>(nullptr) : scratch.data());
  return s;
}

void check_segments(const Problem& p, const Segs& s) {
  int64_t pos = 0, bad = 0;
  for (int64_t n = 0; n < p.N; ++n) {
    SELK_CHECK(s.labels[n] == (counted(p, n) ? p.labels[n] : -1));
    if (!counted(p, n) && p.labels[n] != p.ignore) ++bad;
  }
  SELK_CHECK(s.invalid == bad);
  for (int64_t k = 0; k < p.K; ++k) {
    SELK_CHECK(s.offsets[k] == pos);
    std::vector<int64_t> members;
    for (int64_t n = 0; n < p.N; ++n)
      if (counted(p, n) && p.labels[n] == k) members.push_back(n);
    SELK_CHECK(s.counts[k] == static_cast<int64_t>(members.size()));
    // Stable: a class's samples in increasing index order.
    for (size_t i = 0; i < members.size(); ++i) SELK_CHECK(s.order[pos + i] == members[i]);
    pos += static_cast<int64_t>(members.size());
  }
  SELK_CHECK(s.offsets[p.K] == pos);
  for (int64_t n = 0; n < p.N; ++n)  // ignored and invalid samples last, in index order
    if (!counted(p, n)) SELK_CHECK(s.order[pos++] == n);
}

// One layer of a multi-layer launch: its problem (labels shared by all layers), layout and storage.
template <class T>
struct LayerData {
  using acc_t = typename AccOf<T>::type;
  Problem p;
  Layout layout;
  std::vector<T> x;
  std::vector<acc_t> a, means, si, coeffs;
  std::vector<int64_t> argmax;
};

template <class T>
LayerData<T> make_layer(const Problem& p, Layout layout) {
  LayerData<T> d{p, layout, {}, {}, {}, {}, {}, {}};
  const int64_t N = p.N, C = p.C, S = p.S;
  d.x.resize(std::max<int64_t>(N * C * S, 1));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < S; ++s) {
        const T v = encode<T>(p.x[(n * C + c) * S + s]);
        if (layout == Layout::kNCHW)
          d.x[(n * C + c) * S + s] = v;
        else if (layout == Layout::kPositionsMajor)
          d.x[(n * S + s) * C + c] = v;
        else
          d.x[c * N + n] = v;  // [N, C] with strides (1, N)
      }
  d.a.assign(std::max<int64_t>(N * C, 1), std::nan(""));
  d.means.assign(p.K * C, std::nan(""));
  d.si.assign(C, std::nan(""));
  d.coeffs.assign(4 * C, std::nan(""));
  d.argmax.assign(C, -7);
  return d;
}

// unit_means_kernel over all layers in one launch, grids as the launcher sizes them.
template <class T>
void run_unit_means(std::vector<LayerData<T>>& layers, int64_t N, int64_t sm_count) {
  using acc_t = typename AccOf<T>::type;
  MeansTable<T, acc_t> table{};
  table.N = N;
  int64_t grid = 1;
  for (size_t j = 0; j < layers.size(); ++j) {
    LayerData<T>& L = layers[j];
    MeansLayer<T, acc_t>& d = table.layer[j];
    const int64_t S = L.p.S;
    int32_t layout = kPositionsMajor;
    int group = 1;
    if (L.layout == Layout::kStrided2d) {
      SELK_CHECK(S == 1);
      layout = kValues;
    } else if (L.layout == Layout::kNCHW) {
      layout = default_layout(S, sizeof(T) == 8 ? 7 : sizeof(T) == 4 ? 6 : 5);  // vector data is 16-aligned
      if (S == 1) layout = kRows;  // exercise the row path with S == 1 as well
      group = row_group_size(S, layout == kRowsVec ? Vec16<T>::kLen : 1);
    }
    d.x = L.x.data();
    d.a = L.a.data();
    d.C = L.p.C;
    d.S = S;
    d.stride_n = L.layout == Layout::kStrided2d ? 1 : L.p.C;
    d.stride_c = L.layout == Layout::kStrided2d ? N : 1;
    d.layout = layout;
    d.group = group;
    d.blocks = means_layer_blocks(N, d.C, S, layout, group, sm_count);
    grid = std::max(grid, d.blocks);
  }
  selk_sim::launch(dim3(static_cast<unsigned>(grid), static_cast<unsigned>(layers.size())), dim3(kMeansThreads),
                   unit_means_smem_bytes<acc_t>(), unit_means_kernel<T, acc_t>, table);
}

// class_si_kernel as the launchers run it: the class means only (class_means_segmented), or SI,
// coefficients and argmax without the means (selectivity_index_segmented).
template <class acc_t, class T>
void run_class_si(std::vector<LayerData<T>>& layers, const Segs& s, int64_t K, double eps, bool with_si) {
  ClassTable<acc_t> table{};
  int64_t grid = 1;
  for (size_t j = 0; j < layers.size(); ++j) {
    ClassLayer<acc_t>& d = table.layer[j];
    d.a = layers[j].a.data();
    d.means = with_si ? nullptr : layers[j].means.data();
    d.si = with_si ? layers[j].si.data() : nullptr;
    d.coeffs = with_si ? layers[j].coeffs.data() : nullptr;
    d.argmax = with_si ? layers[j].argmax.data() : nullptr;
    d.C = layers[j].p.C;
    grid = std::max(grid, class_tiles(d.C));
  }
  selk_sim::launch(dim3(static_cast<unsigned>(grid), static_cast<unsigned>(layers.size())), dim3(kWarpSize, kClassRows),
                   class_si_smem_bytes<acc_t>(), class_si_kernel<acc_t>, table, s.counts.data(), s.offsets.data(),
                   s.order.data(), &s.invalid, K, static_cast<acc_t>(eps));
}

// class_si_kernel in accumulation mode (class_sums_accumulate_): `sums` starts at `start` and
// receives each present class's sum of unit means; means, SI and coefficients are not written.
template <class acc_t, class T>
std::vector<std::vector<double>> run_class_sums(std::vector<LayerData<T>>& layers, const Segs& s, int64_t K,
                                                double start) {
  ClassTable<acc_t> table{};
  std::vector<std::vector<double>> sums;
  for (const auto& L : layers) sums.emplace_back(K * L.p.C, start);
  int64_t grid = 1;
  for (size_t j = 0; j < layers.size(); ++j) {
    ClassLayer<acc_t>& d = table.layer[j];
    d.a = layers[j].a.data();
    d.sums = sums[j].data();
    d.C = layers[j].p.C;
    grid = std::max(grid, class_tiles(d.C));
  }
  selk_sim::launch(dim3(static_cast<unsigned>(grid), static_cast<unsigned>(layers.size())), dim3(kWarpSize, kClassRows),
                   class_si_smem_bytes<acc_t>(), class_si_kernel<acc_t>, table, s.counts.data(), s.offsets.data(),
                   s.order.data(), &s.invalid, K, acc_t(0));
  return sums;
}

// Reference coefficients: dSI/dmu_max and dSI/dmu_rest / (P - 1) read off the finite-difference
// gradient of the reference SI (grad_si = 1), and the argmax.
void ref_coeffs(const Ref& r, int64_t K, int64_t C, double eps, std::vector<double>& g_max, std::vector<double>& g_rest,
                std::vector<int64_t>& argmax) {
  const std::vector<double> fd = fd_si_grad(r.means, r.counts, std::vector<double>(C, 1.0), K, C, eps);
  g_max.assign(C, 0.0);
  g_rest.assign(C, 0.0);
  argmax.assign(C, -1);
  int64_t present = 0;
  for (int64_t k = 0; k < K; ++k) present += r.counts[k] > 0;
  if (present < 2) return;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t k = 0; k < K; ++k) {
      if (r.counts[k] == 0) continue;
      if (argmax[c] < 0 || r.means[k * C + c] > r.means[argmax[c] * C + c]) argmax[c] = k;
    }
    g_max[c] = fd[argmax[c] * C + c];
    for (int64_t k = 0; k < K; ++k)
      if (r.counts[k] > 0 && k != argmax[c]) g_rest[c] = fd[k * C + c];
  }
}

template <class T>
void check_layers(std::vector<LayerData<T>>& layers, const Segs& s, double eps) {
  constexpr bool f64 = std::is_same_v<T, double>;
  const double tol = f64 ? 1e-12 : 2e-6;  // fp32 accumulation of exact inputs
  for (LayerData<T>& L : layers) {
    const Ref r = reference(L.p, eps);
    if (L.p.N * L.p.C > 0)
      SELK_CHECK_CLOSE(std::vector<double>(L.a.begin(), L.a.begin() + L.p.N * L.p.C), r.a, tol, tol);
    SELK_CHECK_CLOSE(L.means, r.means, tol, tol);
    SELK_CHECK_CLOSE(L.si, r.si, f64 ? 1e-10 : 2e-4, f64 ? 1e-12 : 1e-5);
    std::vector<double> g_max, g_rest;
    std::vector<int64_t> argmax;
    ref_coeffs(r, L.p.K, L.p.C, eps, g_max, g_rest, argmax);
    SELK_CHECK(L.argmax == argmax);
    const int64_t C = L.p.C;
    const auto row = [&](int i) {
      return std::vector<double>(L.coeffs.begin() + i * C, L.coeffs.begin() + (i + 1) * C);
    };
    SELK_CHECK_CLOSE(row(0), g_max, 1e-5, 1e-6);  // finite differences
    SELK_CHECK_CLOSE(row(1), g_rest, 1e-5, 1e-6);
    // the terms: mu_max the argmax class's mean, mu_rest the mean of the other present classes'
    std::vector<double> mu_max(C, 0.0), mu_rest(C, 0.0);
    int64_t present = 0;
    for (int64_t k = 0; k < L.p.K; ++k) present += r.counts[k] > 0;
    for (int64_t c = 0; c < C && present >= 2; ++c) {
      mu_max[c] = r.means[argmax[c] * C + c];
      for (int64_t k = 0; k < L.p.K; ++k)
        if (r.counts[k] > 0 && k != argmax[c]) mu_rest[c] += r.means[k * C + c] / static_cast<double>(present - 1);
    }
    SELK_CHECK_CLOSE(row(2), mu_max, tol, tol);
    SELK_CHECK_CLOSE(row(3), mu_rest, f64 ? 1e-12 : 1e-5, tol);
  }
  (void)s;
}

// A forward over several layers sharing the labels: per-layer C, S and layout, one launch each.
template <class T>
void forward_layers(int64_t N, int64_t K, int64_t classes_used,
                    const std::vector<std::tuple<int64_t, int64_t, Layout>>& shapes, unsigned seg_threads,
                    int64_t sm_count, unsigned seed) {
  const double eps = 1e-7;
  Problem base = make_problem(N, 1, 1, K, classes_used, seed);
  for (auto& l : base.labels)  // invalid labels have their own test (NaN results)
    if (l != base.ignore && (l < 0 || l >= K)) l = base.ignore;
  std::vector<LayerData<T>> layers;
  unsigned sub = seed;
  for (const auto& [C, S, layout] : shapes) {
    Problem p = make_problem(N, C, S, K, classes_used, ++sub);
    p.labels = base.labels;
    layers.push_back(make_layer<T>(p, layout));
  }
  const Segs s = run_segments(base, seg_threads);
  check_segments(base, s);
  if (N > 0) run_unit_means<T>(layers, N, sm_count);
  using acc_t = typename AccOf<T>::type;
  SELK_CHECK(s.invalid == 0);
  run_class_si<acc_t, T>(layers, s, K, eps, false);
  run_class_si<acc_t, T>(layers, s, K, eps, true);
  check_layers<T>(layers, s, eps);
  // Accumulation mode on the same unit means: start + count * mean for present classes, start
  // (untouched) for absent ones.
  const std::vector<std::vector<double>> sums = run_class_sums<acc_t, T>(layers, s, K, 0.25);
  const double tol = std::is_same_v<T, double> ? 1e-12 : 2e-6;
  for (size_t j = 0; j < layers.size(); ++j) {
    const Ref r = reference(layers[j].p, eps);
    std::vector<double> expected(r.means.size());
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < layers[j].p.C; ++c)
        expected[k * layers[j].p.C + c] = 0.25 + static_cast<double>(r.counts[k]) * r.means[k * layers[j].p.C + c];
    SELK_CHECK_CLOSE(sums[j], expected, tol, tol);
  }
}

template <class T>
void forward_all_layouts() {
  // NCHW rows: S = 49 (a warp per row), 4 and 16 (vector loads for 4- and 2-byte types, several
  // rows per warp), 6 and 3 (scalar loads, sub-warp groups); positions-major with C = 40 (a
  // partial channel tile) and C = 3; S == 1 strided. All in one launch per kernel; sm_count = 1
  // caps the grids at 32 blocks, so the larger layers grid-stride while the small ones idle.
  const std::vector<std::tuple<int64_t, int64_t, Layout>> shapes = {{11, 49, Layout::kNCHW},
                                                                    {11, 4, Layout::kNCHW},
                                                                    {7, 16, Layout::kNCHW},
                                                                    {5, 6, Layout::kNCHW},
                                                                    {40, 9, Layout::kPositionsMajor},
                                                                    {3, 2, Layout::kPositionsMajor},
                                                                    {13, 1, Layout::kStrided2d},
                                                                    {2, 3, Layout::kNCHW},
                                                                    {37, 1, Layout::kNCHW}};
  forward_layers<T>(37, 7, 6, shapes, 64, 1, 3);
  forward_layers<T>(23, 5, 5, {{40, 9, Layout::kPositionsMajor}, {9, 3, Layout::kNCHW}}, 32, 132, 11);
}

// ----- backward -----------------------------------------------------------------------------------
template <class acc_t, class out_t>
void check_unit_grad(bool with_si, bool with_means) {
  // Two layers of different C and S in one launch.
  const double eps = 1e-7;
  const Problem base = make_problem(45, 1, 1, 6, 5, 21);
  const Segs s = run_segments(base, 64);
  struct One {
    Problem p;
    Ref r;
    std::vector<acc_t> gm, gsi, coeffs;
    std::vector<int64_t> argmax;
    std::vector<out_t> out;
    std::vector<double> G;
  };
  std::vector<One> layers;
  std::mt19937 rng(5);
  std::uniform_real_distribution<double> u(-1, 1);
  for (const auto& [C, S] : std::vector<std::pair<int64_t, int64_t>>{{21, 5}, {300, 2}}) {
    One o;
    o.p = make_problem(45, C, S, 6, 5, static_cast<unsigned>(C), /*positive=*/true);
    o.p.labels = base.labels;
    o.r = reference(o.p, eps);
    std::vector<double> gm_d(6 * C), gsi_d(C);
    for (auto& v : gm_d) v = u(rng);
    for (auto& v : gsi_d) v = u(rng);
    o.gm.assign(gm_d.begin(), gm_d.end());
    o.gsi.assign(gsi_d.begin(), gsi_d.end());
    // Reference: G = grad_means (+ grad_si * dSI/dmeans by central differences of the reference SI).
    o.G.assign(6 * C, 0.0);
    if (with_means) o.G = gm_d;
    if (with_si) {
      const std::vector<double> d = fd_si_grad(o.r.means, o.r.counts, gsi_d, 6, C, eps);
      for (size_t i = 0; i < o.G.size(); ++i) o.G[i] += d[i];
      std::vector<double> g_max, g_rest;
      ref_coeffs(o.r, 6, C, eps, g_max, g_rest, o.argmax);
      o.coeffs.assign(g_max.begin(), g_max.end());
      o.coeffs.insert(o.coeffs.end(), g_rest.begin(), g_rest.end());
    }
    o.out.assign(45 * C, encode<out_t>(NAN));
    layers.push_back(std::move(o));
  }
  GradTable<acc_t, out_t> table{};
  int64_t grid = 1;
  for (size_t j = 0; j < layers.size(); ++j) {
    One& o = layers[j];
    GradLayer<acc_t, out_t>& d = table.layer[j];
    d.grad_si = with_si ? o.gsi.data() : nullptr;
    d.coeffs = with_si ? o.coeffs.data() : nullptr;
    d.argmax = with_si ? o.argmax.data() : nullptr;
    d.grad_means = with_means ? o.gm.data() : nullptr;
    d.out = o.out.data();
    d.C = o.p.C;
    d.S = o.p.S;
    d.blocks = grad_layer_blocks(45, d.C, /*sm_count=*/1) % 7 + 1;  // small grids: grid-stride
    grid = std::max(grid, d.blocks);
  }
  selk_sim::launch(dim3(static_cast<unsigned>(grid), 2), dim3(kGradThreads), 0, unit_grad_kernel<acc_t, out_t>, table,
                   s.labels.data(), s.counts.data(), int64_t(45));
  for (One& o : layers) {
    std::vector<double> got(o.out.size()), want(o.out.size(), 0.0);
    for (size_t i = 0; i < o.out.size(); ++i) got[i] = decode(o.out[i]);
    for (int64_t n = 0; n < o.p.N; ++n) {
      if (!counted(o.p, n)) continue;
      const int64_t k = o.p.labels[n];
      for (int64_t c = 0; c < o.p.C; ++c) want[n * o.p.C + c] = o.G[k * o.p.C + c] / (o.r.counts[k] * o.p.S);
    }
    double tol = std::is_same_v<out_t, double> ? 1e-12 : 1e-6;
    if (std::is_same_v<out_t, f16_t>) tol = 1e-3;
    if (std::is_same_v<out_t, bf16_t>) tol = 8e-3;
    if (with_si) tol = std::max(tol, 1e-5);  // finite differences
    SELK_CHECK_CLOSE(got, want, tol, tol * 1e-2);
  }
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
    u = (u % 0x08000000u) + 0x30000000u;           // |v| from ~5e-10 to ~1.3e5
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
    if ((h.bits & 0x7fff) != 0 && (h.bits & 0x7fff) != 0x7bff &&
        (e == std::fabs(decode(up) - v) || e == std::fabs(decode(down) - v)))
      SELK_CHECK((h.bits & 1) == 0);
    const bf16_t g = from_float<bf16_t>(v);
    const double gd = decode(g);
    const double gup = decode(bf16_t{static_cast<uint16_t>(g.bits + 1)}),
                 gdn = decode(bf16_t{static_cast<uint16_t>(g.bits - 1)});
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
  forward_layers<float>(500, 300, 60, {{5, 2, Layout::kNCHW}, {33, 3, Layout::kPositionsMajor}}, 64, 132, 31);
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

SELK_TEST(invalid_labels_give_nan) {
  // make_problem puts out-of-range labels in: the count is on the device, and every SI, mean and
  // coefficient is NaN (never a silently wrong number).
  const Problem p = make_problem(40, 5, 3, 4, 4, 71);
  const Segs s = run_segments(p, 64);
  check_segments(p, s);
  SELK_CHECK(s.invalid > 0);
  std::vector<LayerData<float>> layers{make_layer<float>(p, Layout::kNCHW)};
  run_unit_means<float>(layers, p.N, 132);
  run_class_si<float, float>(layers, s, p.K, 1e-7, false);
  run_class_si<float, float>(layers, s, p.K, 1e-7, true);
  for (float v : layers[0].means) SELK_CHECK(std::isnan(v));
  for (float v : layers[0].si) SELK_CHECK(std::isnan(v));
  for (float v : layers[0].coeffs) SELK_CHECK(std::isnan(v));
  const std::vector<std::vector<double>> sums = run_class_sums<float, float>(layers, s, p.K, 1.0);
  for (double v : sums[0]) SELK_CHECK(std::isnan(v));
}

SELK_TEST(ties_go_to_the_first_class) {
  // Equal class means in classes handled by different warp rows (k = 9 in row 1, combined first,
  // and k = 2 in row 2): argmax 2, the first maximal class, as on the CPU and in torch.max.
  Problem p = make_problem(12, 3, 1, 12, 12, 81, /*positive=*/true);
  for (int64_t n = 0; n < p.N; ++n) p.labels[n] = n;
  for (int64_t c = 0; c < p.C; ++c) {
    p.x[2 * p.C + c] = 3.0;
    p.x[9 * p.C + c] = 3.0;
  }
  const Segs s = run_segments(p, 32);
  std::vector<LayerData<double>> layers{make_layer<double>(p, Layout::kNCHW)};
  run_unit_means<double>(layers, p.N, 132);
  run_class_si<double, double>(layers, s, p.K, 1e-7, true);
  for (int64_t c = 0; c < p.C; ++c) SELK_CHECK(layers[0].argmax[c] == 2);
}

SELK_TEST(fewer_than_two_classes_and_empty_batch) {
  Problem p = make_problem(20, 6, 3, 4, 1, 41);  // only class 0 (plus ignored / out of range)
  for (auto& l : p.labels)
    if (l != 0) l = p.ignore;
  const Segs s = run_segments(p, 32);
  std::vector<LayerData<float>> layers{make_layer<float>(p, Layout::kNCHW)};
  run_unit_means<float>(layers, p.N, 132);
  run_class_si<float, float>(layers, s, p.K, 1e-7, true);
  for (float v : layers[0].si) SELK_CHECK(v == 0.0f);
  for (float v : layers[0].coeffs) SELK_CHECK(v == 0.0f);
  for (int64_t a : layers[0].argmax) SELK_CHECK(a == -1);
  for (auto& l : p.labels) l = p.ignore;  // no class present at all
  const Segs t = run_segments(p, 32);
  run_class_si<float, float>(layers, t, p.K, 1e-7, false);
  run_class_si<float, float>(layers, t, p.K, 1e-7, true);
  for (float v : layers[0].means) SELK_CHECK(v == 0.0f);
  for (float v : layers[0].si) SELK_CHECK(v == 0.0f);
  for (int64_t c : t.counts) SELK_CHECK(c == 0);
  const Problem e = make_problem(0, 4, 3, 5, 5, 42);
  const Segs u = run_segments(e, 64);
  std::vector<LayerData<float>> empty{make_layer<float>(e, Layout::kNCHW)};
  run_class_si<float, float>(empty, u, e.K, 1e-7, false);
  run_class_si<float, float>(empty, u, e.K, 1e-7, true);
  for (float v : empty[0].means) SELK_CHECK(v == 0.0f);
  for (int64_t c : u.counts) SELK_CHECK(c == 0);
}

SELK_TEST(class_means_only) {
  Problem p = make_problem(30, 9, 4, 5, 5, 91);
  for (auto& l : p.labels)
    if (l != p.ignore && (l < 0 || l >= p.K)) l = p.ignore;
  const Segs s = run_segments(p, 64);
  SELK_CHECK(s.invalid == 0);
  std::vector<LayerData<float>> layers{make_layer<float>(p, Layout::kNCHW)};
  run_unit_means<float>(layers, p.N, 132);
  run_class_si<float, float>(layers, s, p.K, 1e-7, false);
  SELK_CHECK_CLOSE(layers[0].means, reference(p, 1e-7).means, 2e-6, 2e-6);
  for (float v : layers[0].si) SELK_CHECK(std::isnan(v));  // untouched
}

SELK_TEST(bitwise_identical_across_schedules) {
  const Problem p = make_problem(200, 33, 7, 9, 9, 51);
  std::vector<std::vector<float>> runs;
  for (uint64_t seed : {0, 1, 7, 12345}) {
    selk_sim::ScopedSeed guard(seed);
    Problem q = p;
    for (auto& l : q.labels)
      if (l >= q.K || (l < 0 && l != q.ignore)) l = q.ignore;
    const Segs s = run_segments(q, 64);
    std::vector<LayerData<bf16_t>> layers{make_layer<bf16_t>(q, Layout::kPositionsMajor)};
    run_unit_means<bf16_t>(layers, q.N, 1);
    run_class_si<float, bf16_t>(layers, s, q.K, 1e-7, false);
    run_class_si<float, bf16_t>(layers, s, q.K, 1e-7, true);
    std::vector<float> all = layers[0].means;
    all.insert(all.end(), layers[0].si.begin(), layers[0].si.end());
    all.insert(all.end(), layers[0].coeffs.begin(), layers[0].coeffs.end());
    runs.push_back(all);
  }
  for (auto& r : runs) SELK_CHECK(std::memcmp(r.data(), runs[0].data(), r.size() * sizeof(float)) == 0);
}

SELK_TEST(unit_grad_class_means_all_out_dtypes) {
  check_unit_grad<float, float>(false, true);
  check_unit_grad<float, f16_t>(false, true);
  check_unit_grad<float, bf16_t>(false, true);
  check_unit_grad<double, double>(false, true);
}

SELK_TEST(unit_grad_selectivity_all_out_dtypes) {
  check_unit_grad<double, double>(true, false);
  check_unit_grad<float, float>(true, false);
  check_unit_grad<float, bf16_t>(true, true);
  check_unit_grad<float, f16_t>(true, false);
}

SELK_TEST(launch_plan_matches_the_tables) {
  // 8 layers of one dtype: 4 launches per step (segment, means, class/SI, backward); a second
  // dtype adds one launch per dtype-keyed kernel; 17 layers of one dtype split at 16.
  std::vector<LayerShape> eight;
  for (int i = 0; i < 8; ++i) eight.push_back({64 << (i / 2), 3136 >> (2 * (i / 2)), 6, kRowsVec});
  SELK_CHECK(plan_step(eight, 256, 1000, 132).size() == 4);
  std::vector<LayerShape> mixed = eight;
  mixed[3].dtype = 15;
  mixed[5].dtype = 7;
  const auto plan = plan_step(mixed, 256, 1000, 132);
  SELK_CHECK(plan.size() == 1 + 3 + 2 + 3);
  std::vector<LayerShape> many(17, LayerShape{16, 4, 6, kRowsVec});
  SELK_CHECK(plan_step(many, 8, 10, 132).size() == 1 + 2 + 2 + 2);
  // The forward reads x exactly once.
  int64_t read = 0, x_bytes = 0;
  for (const Launch& l : plan_step(eight, 256, 1000, 132))
    if (l.kernel == kUnitMeansKernel) read += l.bytes_read;
  for (const LayerShape& l : eight) x_bytes += 256 * l.C * l.S * 4;
  SELK_CHECK(read == x_bytes);
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
