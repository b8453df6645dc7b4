// CPU kernels of the selectivity family. Deterministic: labels are counting-sorted once and every
// output element is reduced by one thread in a fixed order (no atomics), so results do not depend
// on the thread count.
//
// Every layer op takes a list of layers and the label segmentation of segment_labels (computed once
// per batch), and runs each phase as one parallel region over all layers:
//   1. unit means a[n, c] = mean over s of x[n, c, s]   one read of x, vectorized over s (NCHW)
//                                                        or over c ([N, *positions, C] memory)
//   2. means[k, c] = mean over {n : label n = k} of a   O(N*C), segments in label-sorted order,
//      then (selectivity_index) SI and its gradient coefficients per unit, on the same channel block
// Backward: grad_unit[n, c] = G[label n, c] / (count * S), an [N, C] tensor per layer that Python
// broadcasts over the spatial positions without copying.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <vector>

#include "common/selectivity.h"
#include "common/selectivity_args.h"
#include "cpu/pairwise_sum.h"
#include "cpu/row_means_avx2.h"
#include "cpu/target_clones.h"
#include "cpu/vector_types.h"

namespace selk {
namespace {

// Each vectorized loop is compiled once per instruction set and called once per chunk of rows, so
// the dispatch costs one indirect call per chunk, not per row.

// out[r] = scale * sum(p[r * S .. r * S + S)) for r < rows (NCHW: rows are (n, c) pairs). Rows
// longer than kRowSumBlock: blocks combined pairwise (error ~ log S).
template <typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) void row_means_body(const scalar_t* __restrict__ p, int64_t rows, int64_t S,
                                                          acc_t scale, acc_t* __restrict__ out) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = p + r * S;
    PairwiseScalar<acc_t> total;
    for (int64_t b = 0; b < S; b += kRowSumBlock) {
      const int64_t e = std::min(S, b + kRowSumBlock);
      acc_t sum = acc_t(0);
#pragma omp simd reduction(+ : sum)
      for (int64_t i = b; i < e; ++i) sum += static_cast<acc_t>(row[i]);
      total.push(sum);
    }
    out[r] = total.total() * scale;
  }
}

// out[c] = scale * sum over s of p[s * C + c] (channels_last: one sample's [S, C] block). Blocks of
// kColumnSumBlock positions combined pairwise in `acc` (error ~ log S).
template <typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) void column_means_body(const scalar_t* __restrict__ p, int64_t S, int64_t C,
                                                             acc_t scale, PairwiseRows<acc_t>& acc,
                                                             acc_t* __restrict__ out) {
  acc.reset();
  for (int64_t s0 = 0; s0 < S; s0 += kColumnSumBlock) {
    const int64_t s1 = std::min(S, s0 + kColumnSumBlock);
    acc_t* __restrict__ block = S <= kColumnSumBlock ? out : acc.current();
    const scalar_t* first = p + s0 * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) block[c] = static_cast<acc_t>(first[c]);
    for (int64_t s = s0 + 1; s < s1; ++s) {
      const scalar_t* row = p + s * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) block[c] += static_cast<acc_t>(row[c]);
    }
    if (S > kColumnSumBlock) acc.push();
  }
  if (S > kColumnSumBlock) acc.total(out);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) out[c] *= scale;
}

#define SELK_MEANS_FOR(scalar_t, acc_t)                                                                                \
  SELK_TARGET_CLONES void row_means(const scalar_t* p, int64_t rows, int64_t S, acc_t scale, acc_t* out) {             \
    row_means_body(p, rows, S, scale, out);                                                                            \
  }                                                                                                                    \
  SELK_TARGET_CLONES void column_means(const scalar_t* p, int64_t S, int64_t C, acc_t scale, PairwiseRows<acc_t>& acc, \
                                       acc_t* out) {                                                                   \
    column_means_body(p, S, C, scale, acc, out);                                                                       \
  }
SELK_MEANS_FOR(double, double)
SELK_MEANS_FOR(float, float)
SELK_MEANS_FOR(c10::BFloat16, float)
SELK_MEANS_FOR(c10::Half, float)
#undef SELK_MEANS_FOR

// out[0, len) = sum over i < count of a[order[i] * C + (0, len)]: the rows of one class segment, in
// segment order, in blocks of kColumnSumBlock rows combined pairwise (error ~ log count).
template <typename acc_t>
inline __attribute__((always_inline)) void segment_sum_body(const acc_t* __restrict__ a, int64_t C,
                                                            const int64_t* __restrict__ order, int64_t count,
                                                            int64_t len, PairwiseRows<acc_t>& acc,
                                                            acc_t* __restrict__ out) {
  if (count == 0) {
    std::fill(out, out + len, acc_t(0));
    return;
  }
  acc.reset();
  for (int64_t i0 = 0; i0 < count; i0 += kColumnSumBlock) {
    const int64_t i1 = std::min(count, i0 + kColumnSumBlock);
    acc_t* __restrict__ block = count <= kColumnSumBlock ? out : acc.current();
    const acc_t* __restrict__ first = a + order[i0] * C;
#pragma omp simd
    for (int64_t c = 0; c < len; ++c) block[c] = first[c];
    for (int64_t i = i0 + 1; i < i1; ++i) {
      const acc_t* __restrict__ row = a + order[i] * C;
#pragma omp simd
      for (int64_t c = 0; c < len; ++c) block[c] += row[c];
    }
    if (count > kColumnSumBlock) acc.push();
  }
  if (count > kColumnSumBlock) acc.total(out);
}
SELK_TARGET_CLONES void segment_sum(const float* a, int64_t C, const int64_t* order, int64_t count, int64_t len,
                                    PairwiseRows<float>& acc, float* out) {
  segment_sum_body(a, C, order, count, len, acc, out);
}
SELK_TARGET_CLONES void segment_sum(const double* a, int64_t C, const int64_t* order, int64_t count, int64_t len,
                                    PairwiseRows<double>& acc, double* out) {
  segment_sum_body(a, C, order, count, len, acc, out);
}

// Smallest number of items worth a parallel chunk: below ~32K elements of work the cost of waking
// a second thread exceeds the work (and on a loaded machine it can cost a whole time slice).
int64_t grain_for(int64_t work_per_item) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item)); }

// Per-unit SI terms over the class-mean rows of the P >= 2 classes present (rows given as pointers,
// in class order), for one tile of units (a 64-byte vector) starting at unit c: mu_max (first
// maximum on ties, NaN propagates), its class, and mu_rest from the sum of the class means, summed
// in blocks of kColumnSumBlock classes combined pairwise (error ~ log P). The tile's maximum,
// argmax and class sums stay in registers across all P rows (vector_types.h); the rows are read
// unit-stride (the per-unit strided loop of common/selectivity.h suits the GPU's coalescing
// instead).
template <typename acc_t>
constexpr int64_t kFoldTile = 64 / sizeof(acc_t);
template <typename acc_t>
inline __attribute__((always_inline)) void fold_class_tile_body(const acc_t* const* rows, const int32_t* classes,
                                                                int64_t P, int64_t c, acc_t* mu_max, acc_t* mu_rest,
                                                                int32_t* argmax) {
  using Vec = typename Vector64<acc_t>::type;
  using Mask = decltype(Vec{} < Vec{});  // lanes of the same width as acc_t's
  constexpr int64_t W = kFoldTile<acc_t>;
  const auto load = [](const acc_t* p) {
    Vec v;
    std::memcpy(&v, p, sizeof(Vec));
    return v;
  };
  Vec mx = load(rows[0] + c), block = mx, levels[64];
  Mask am = Mask{} + classes[0];
  int64_t blocks = 0;
  const auto push_block = [&](Vec carry) {  // PairwiseRows::push
    int64_t j = 0;
    for (int64_t b = blocks++; b & 1; b >>= 1, ++j) carry = levels[j] + carry;
    levels[j] = carry;
  };
  for (int64_t p = 1; p < P; ++p) {
    const Vec row = load(rows[p] + c);
    if (p % kColumnSumBlock == 0) {
      push_block(block);
      block = row;
    } else {
      block += row;
    }
    const Mask take = !(row <= mx);  // strictly greater, or NaN: the first maximum wins ties
    mx = take ? row : mx;
    am = take ? Mask{} + classes[p] : am;
  }
  push_block(block);
  Vec sum{};
  bool first = true;  // as PairwiseRows::total: levels in ascending order
  for (int64_t j = 0; j < 64 && (blocks >> j) != 0; ++j) {
    if (!((blocks >> j) & 1)) continue;
    sum = first ? levels[j] : levels[j] + sum;
    first = false;
  }
  const Vec rest = (sum - mx) * (acc_t(1) / static_cast<acc_t>(P - 1));
  for (int64_t i = 0; i < W; ++i) {
    mu_rest[c + i] = rest[i];
    mu_max[c + i] = mx[i];
    argmax[c + i] = static_cast<int32_t>(am[i]);
  }
}
SELK_TARGET_CLONES void fold_class_tile(const float* const* rows, const int32_t* classes, int64_t P, int64_t c,
                                        float* mu_max, float* mu_rest, int32_t* argmax) {
  fold_class_tile_body(rows, classes, P, c, mu_max, mu_rest, argmax);
}
SELK_TARGET_CLONES void fold_class_tile(const double* const* rows, const int32_t* classes, int64_t P, int64_t c,
                                        double* mu_max, double* mu_rest, int32_t* argmax) {
  fold_class_tile_body(rows, classes, P, c, mu_max, mu_rest, argmax);
}

// The SI terms of `len` units from the mean rows of the P classes present (rows[p] points at the
// first unit; classes[p] in ascending order): register tiles of units, the last partial tile folded
// from a zero-padded copy of its units (same values, same operations: the block split never
// changes a bit). P < 2: mu_max = mu_rest = 0 and argmax = -1.
template <typename acc_t>
void fold_classes(const std::vector<const acc_t*>& rows, const std::vector<int32_t>& classes, int64_t len,
                  acc_t* mu_max, acc_t* mu_rest, int32_t* argmax) {
  constexpr int64_t W = kFoldTile<acc_t>;
  const int64_t P = static_cast<int64_t>(rows.size());
  if (P < 2) {
    std::fill(mu_max, mu_max + len, acc_t(0));
    std::fill(mu_rest, mu_rest + len, acc_t(0));
    std::fill(argmax, argmax + len, -1);
    return;
  }
  const int64_t tiled = len / W * W, rest = len - tiled;
  for (int64_t c = 0; c < tiled; c += W) fold_class_tile(rows.data(), classes.data(), P, c, mu_max, mu_rest, argmax);
  if (rest == 0) return;
  std::vector<acc_t> padded(P * W, acc_t(0));
  std::vector<const acc_t*> padded_rows(P);
  for (int64_t p = 0; p < P; ++p) {
    std::memcpy(padded.data() + p * W, rows[p] + tiled, rest * sizeof(acc_t));
    padded_rows[p] = padded.data() + p * W;
  }
  acc_t tile_max[W], tile_rest[W];
  int32_t tile_argmax[W];
  fold_class_tile(padded_rows.data(), classes.data(), P, 0, tile_max, tile_rest, tile_argmax);
  std::copy(tile_max, tile_max + rest, mu_max + tiled);
  std::copy(tile_rest, tile_rest + rest, mu_rest + tiled);
  std::copy(tile_argmax, tile_argmax + rest, argmax + tiled);
}

// The SI terms of units [c0, c1) from [K, C] class means and counts (present: count > 0).
template <typename acc_t>
struct UnitTerms {
  std::vector<acc_t> mu_max, mu_rest;
  std::vector<int32_t> argmax;
  int64_t present = 0;
};

template <typename acc_t>
void unit_terms(const acc_t* means, const int64_t* counts, int64_t K, int64_t C, int64_t c0, int64_t c1,
                UnitTerms<acc_t>& t) {
  const int64_t len = c1 - c0;
  std::vector<const acc_t*> rows;
  std::vector<int32_t> classes;
  for (int64_t k = 0; k < K; ++k)
    if (counts[k] > 0) {
      rows.push_back(means + k * C + c0);
      classes.push_back(static_cast<int32_t>(k));
    }
  t.mu_max.resize(len);
  t.mu_rest.resize(len);
  t.argmax.resize(len);
  t.present = static_cast<int64_t>(rows.size());
  fold_classes(rows, classes, len, t.mu_max.data(), t.mu_rest.data(), t.argmax.data());
}

constexpr int64_t kUnitBlock = 256;

// Per unit: grad_si * dSI/dmeans[k, c] is g_max[c] for k = argmax[c] and g_rest[c] for the other
// present classes (0 for absent ones), so no backward needs the [K, C] gradient itself.
template <typename acc_t>
struct UnitGradCoeffs {
  std::vector<acc_t> g_max, g_rest;
  std::vector<int32_t> argmax;
};

template <typename acc_t>
UnitGradCoeffs<acc_t> unit_grad_coeffs(const acc_t* means, const int64_t* counts, const acc_t* grad_si, int64_t K,
                                       int64_t C, acc_t eps) {
  UnitGradCoeffs<acc_t> out{std::vector<acc_t>(C), std::vector<acc_t>(C), std::vector<int32_t>(C)};
  at::parallel_for(0, C, std::max(kUnitBlock, grain_for(K)), [&](int64_t c0, int64_t c1) {
    UnitTerms<acc_t> t;
    unit_terms(means, counts, K, C, c0, c1, t);
    for (int64_t c = c0; c < c1; ++c) {
      selectivity_grad_coeffs(t.mu_max[c - c0], t.mu_rest[c - c0], t.present, eps, grad_si[c], &out.g_max[c],
                              &out.g_rest[c]);
      out.argmax[c] = t.argmax[c - c0];
    }
  });
  return out;
}

at::Tensor selectivity_from_means_cpu(const at::Tensor& means_in, const at::Tensor& counts_in, double eps) {
  const at::Tensor counts = from_means_counts(means_in, counts_in);
  const at::Tensor means = means_in.to(acc_type_of(means_in.scalar_type())).contiguous();
  const int64_t K = means.size(0), C = means.size(1);
  at::Tensor si = at::empty({C}, means.options());
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "selkernels_selectivity", [&] {
    const scalar_t* m = means.data_ptr<scalar_t>();
    const int64_t* cnt = counts.data_ptr<int64_t>();
    scalar_t* out = si.data_ptr<scalar_t>();
    const auto e = static_cast<scalar_t>(eps);
    at::parallel_for(0, C, std::max(kUnitBlock, grain_for(K)), [&](int64_t c0, int64_t c1) {
      UnitTerms<scalar_t> t;
      unit_terms(m, cnt, K, C, c0, c1, t);
      for (int64_t c = c0; c < c1; ++c)
        out[c] = t.present < 2 ? scalar_t(0) : selectivity_value(t.mu_max[c - c0], t.mu_rest[c - c0], e);
    });
  });
  return si;
}

at::Tensor selectivity_from_means_backward_cpu(const at::Tensor& grad_si_in, const at::Tensor& means_in,
                                               const at::Tensor& counts_in, double eps) {
  const at::Tensor counts = from_means_counts(means_in, counts_in);
  const at::Tensor means = means_in.contiguous();
  const at::Tensor grad_si = from_means_grad_arg(grad_si_in, means);
  const int64_t K = means.size(0), C = means.size(1);
  at::Tensor grad_means = at::empty({K, C}, means.options());
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "selkernels_selectivity_backward", [&] {
    const scalar_t* m = means.data_ptr<scalar_t>();
    const scalar_t* g = grad_si.data_ptr<scalar_t>();
    const int64_t* cnt = counts.data_ptr<int64_t>();
    scalar_t* gm = grad_means.data_ptr<scalar_t>();
    const auto coeffs = unit_grad_coeffs<scalar_t>(m, cnt, g, K, C, static_cast<scalar_t>(eps));
    at::parallel_for(0, K, grain_for(C), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        scalar_t* row = gm + k * C;
        for (int64_t c = 0; c < C; ++c)
          row[c] = cnt[k] <= 0 ? scalar_t(0) : (coeffs.argmax[c] == k ? coeffs.g_max[c] : coeffs.g_rest[c]);
      }
    });
  });
  return grad_means;
}

// ------------------------------------------------------------------------------------------------
// Label segmentation: a stable counting sort, checked before any layer is read.
// ------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> segment_labels_cpu(const at::Tensor& labels_in,
                                                                                          int64_t K,
                                                                                          int64_t ignore_index) {
  check_segment_labels_args(labels_in, K);
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t N = labels.size(0);
  const int64_t* l = labels.data_ptr<int64_t>();
  const auto opts = labels.options();
  at::Tensor seg_labels = at::empty({N}, opts);
  at::Tensor counts = at::zeros({K}, opts);
  at::Tensor offsets = at::empty({K + 1}, opts);
  at::Tensor order = at::empty({N}, opts);
  int64_t* sl = seg_labels.data_ptr<int64_t>();
  int64_t* cnt = counts.data_ptr<int64_t>();
  int64_t* off = offsets.data_ptr<int64_t>();
  int64_t* ord = order.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    if (l[n] == ignore_index) {
      sl[n] = -1;
      continue;
    }
    // The one check Python cannot make without a second pass over the labels: a ValueError.
    TORCH_CHECK_VALUE(l[n] >= 0 && l[n] < K, "labels must lie in [0, num_classes=", K,
                      ") or equal ignore_index=", ignore_index, "; found labels[", n, "] = ", l[n]);
    sl[n] = l[n];
    ++cnt[l[n]];
  }
  off[0] = 0;
  for (int64_t k = 0; k < K; ++k) off[k + 1] = off[k] + cnt[k];
  std::vector<int64_t> fill(off, off + K);
  int64_t ignored = off[K];  // ignored samples go last, in order
  for (int64_t n = 0; n < N; ++n) ord[sl[n] >= 0 ? fill[sl[n]]++ : ignored++] = n;
  return {seg_labels, counts, offsets, order, at::zeros({}, opts)};
}

// ------------------------------------------------------------------------------------------------
// The layers of one call, and how phase 1 reads each.
// ------------------------------------------------------------------------------------------------
enum class Layout { kValues, kRows, kPositionsMajor };

struct Layer {
  at::Tensor x;  // as read: contiguous NCHW, [N, *positions, C] memory, or S == 1 with any strides
  Layout layout;
  int64_t C, S;
  at::Tensor a;  // acc [N, C] unit means (for S == 1, x itself when it already is that tensor)
};

struct Segmentation {
  int64_t N, K;
  const int64_t* labels;
  const int64_t* counts;
  const int64_t* offsets;
  const int64_t* order;
  bool invalid;  // labels outside [0, K) were seen: every result is NaN
};

Segmentation check_segmentation(const at::Tensor& labels, const at::Tensor& counts, const at::Tensor& offsets,
                                const at::Tensor& order, const at::Tensor& invalid) {
  check_segmentation_args(labels, counts, offsets, order, invalid);
  return {labels.size(0),
          counts.size(0),
          labels.data_ptr<int64_t>(),
          counts.data_ptr<int64_t>(),
          offsets.data_ptr<int64_t>(),
          order.data_ptr<int64_t>(),
          invalid.item<int64_t>() > 0};
}

// x without its broadcast spatial dims (stride 0, size > 1), which do not change a spatial mean: an
// expanded tensor is then read as stored, never materialised (ones expanded to S = 2^31 positions
// cost one read per sample and unit).
at::Tensor without_broadcast_positions(const at::Tensor& x) {
  at::Tensor out = x;
  for (int64_t d = 2; d < x.dim(); ++d)
    if (x.stride(d) == 0 && x.size(d) > 1) out = out.narrow(d, 0, 1);
  return out;
}

std::vector<Layer> prepare_layers(at::TensorList xs, const at::Tensor& labels) {
  const int64_t N = labels.size(0);
  std::vector<Layer> layers;
  layers.reserve(xs.size());
  for (size_t l = 0; l < xs.size(); ++l) {
    check_layer_arg(xs[l], l, N, labels.device());
    const at::Tensor x = without_broadcast_positions(xs[l]);
    const int64_t C = x.size(1);
    const int64_t S = positions_of(x, N);
    Layer layer{x, Layout::kRows, C, S, at::Tensor()};
    if (S == 1) {
      // Values are their own unit means: read in place when stored as a contiguous [N, C] of the
      // accumulation type, else converted in one vectorized copy; phase 1 has nothing to do.
      layer.x = x.reshape({N, C});  // a view: every trailing dim is 1
      layer.layout = Layout::kValues;
      const at::ScalarType acc = acc_type_of(x.scalar_type());
      if (layer.x.is_contiguous() && x.scalar_type() == acc) {
        layer.a = layer.x;
      } else {
        layer.a = at::empty({N, C}, x.options().dtype(acc));
        layer.a.copy_(layer.x);
      }
      layers.push_back(std::move(layer));
      continue;
    }
    layer.a = unit_means_buffer(x, N);
    if (!x.is_contiguous() && positions_major(x)) {
      layer.layout = Layout::kPositionsMajor;  // channels_last, or unit_dim=-1 seen through movedim
    } else {
      layer.x = x.contiguous();  // other stride patterns: one copy (documented in ops.py)
    }
    layers.push_back(std::move(layer));
  }
  return layers;
}

// Phase 1 of items [begin, end) of one layer (rows for NCHW, samples otherwise).
template <typename scalar_t, typename acc_t>
void layer_means_chunk(Layer& L, int64_t begin, int64_t end) {
  const scalar_t* p = L.x.data_ptr<scalar_t>();
  acc_t* a = L.a.data_ptr<acc_t>();
  const int64_t C = L.C, S = L.S;
  const acc_t inv_S = acc_t(1) / static_cast<acc_t>(S);
  switch (L.layout) {
    case Layout::kValues:  // read in place by prepare_layers
      return;
    case Layout::kPositionsMajor: {
      PairwiseRows<acc_t> acc(C, (S + kColumnSumBlock - 1) / kColumnSumBlock);
      for (int64_t n = begin; n < end; ++n) column_means(p + n * S * C, S, C, inv_S, acc, a + n * C);
      return;
    }
    case Layout::kRows:
#ifdef SELK_HAVE_AVX2_ROW_MEANS
      if constexpr (!std::is_same_v<scalar_t, double>) {
        if (avx2::supported()) return avx2::row_means(p + begin * S, end - begin, S, inv_S, a + begin);
      }
#endif
      row_means(p + begin * S, end - begin, S, inv_S, a + begin);
      return;
  }
}

// Phase 1 of every layer in one parallel region: tasks of roughly equal work, a layer's rows
// (NCHW) or samples (other layouts) split into chunks.
struct MeansTask {
  int64_t layer, begin, end;
};

void unit_means_all(std::vector<Layer>& layers, int64_t N) {
  int64_t total = 0;
  for (const Layer& L : layers) total += N * L.C * L.S;
  const int64_t target = std::max<int64_t>(32768, total / (4 * std::max(1, at::get_num_threads())));
  std::vector<MeansTask> tasks;
  for (int64_t l = 0; l < static_cast<int64_t>(layers.size()); ++l) {
    const Layer& L = layers[l];
    if (L.layout == Layout::kValues) continue;
    const int64_t items = L.layout == Layout::kRows ? N * L.C : N;
    const int64_t work_per_item = L.layout == Layout::kRows ? L.S : L.S * L.C;
    const int64_t chunk = std::max<int64_t>(1, target / std::max<int64_t>(1, work_per_item));
    for (int64_t b = 0; b < items; b += chunk) tasks.push_back({l, b, std::min(items, b + chunk)});
  }
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const MeansTask& task = tasks[t];
      Layer& L = layers[task.layer];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, L.x.scalar_type(), "selkernels_unit_means", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        layer_means_chunk<scalar_t, acc_t>(L, task.begin, task.end);
      });
    }
  });
}

constexpr int64_t kChannelBlock = 256;

struct ChannelTask {
  int64_t layer, c0, c1;
};

std::vector<ChannelTask> channel_tasks(const std::vector<Layer>& layers) {
  std::vector<ChannelTask> tasks;
  for (int64_t l = 0; l < static_cast<int64_t>(layers.size()); ++l)
    for (int64_t c0 = 0; c0 < layers[l].C; c0 += kChannelBlock)
      tasks.push_back({l, c0, std::min(layers[l].C, c0 + kChannelBlock)});
  return tasks;
}

// Phase 2 for channels [c0, c1) of one layer: means[k, c] over the class-k segment of the sorted
// samples, in that order (deterministic), summed pairwise (segment_sum).
template <typename acc_t>
void segment_means(const acc_t* a, int64_t C, int64_t c0, int64_t c1, const Segmentation& seg, acc_t* means) {
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  PairwiseRows<acc_t> acc(c1 - c0, (seg.N + kColumnSumBlock - 1) / kColumnSumBlock);
  for (int64_t k = 0; k < seg.K; ++k) {
    acc_t* out = means + k * C;
    const int64_t begin = seg.offsets[k], end = seg.offsets[k + 1];
    if (seg.invalid || end == begin) {
      std::fill(out + c0, out + c1, seg.invalid ? nan : acc_t(0));
      continue;
    }
    segment_sum(a + c0, C, seg.order + begin, end - begin, c1 - c0, acc, out + c0);
    const acc_t inv = acc_t(1) / static_cast<acc_t>(end - begin);
    for (int64_t c = c0; c < c1; ++c) out[c] *= inv;
  }
}

std::vector<at::Tensor> class_means_segmented_cpu(at::TensorList xs, const at::Tensor& labels, const at::Tensor& counts,
                                                  const at::Tensor& offsets, const at::Tensor& order,
                                                  const at::Tensor& invalid) {
  const Segmentation seg = check_segmentation(labels, counts, offsets, order, invalid);
  std::vector<Layer> layers = prepare_layers(xs, labels);
  unit_means_all(layers, seg.N);
  std::vector<at::Tensor> means = class_means_outputs(layers, seg.K);
  const auto tasks = channel_tasks(layers);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const ChannelTask& task = tasks[t];
      AT_DISPATCH_FLOATING_TYPES(means[task.layer].scalar_type(), "selkernels_class_means", [&] {
        segment_means<scalar_t>(layers[task.layer].a.data_ptr<scalar_t>(), layers[task.layer].C, task.c0, task.c1, seg,
                                means[task.layer].data_ptr<scalar_t>());
      });
    }
  });
  return means;
}

// Phase 2 of class_sums_accumulate_ for channels [c0, c1) of one layer: each present class's segment
// sum (pairwise in acc_t, as segment_means) added in float64 into sums[k, c0..c1).
template <typename acc_t>
void accumulate_segment_sums(const acc_t* a, int64_t C, int64_t c0, int64_t c1, const Segmentation& seg, double* sums) {
  const int64_t len = c1 - c0;
  if (seg.invalid) {
    for (int64_t k = 0; k < seg.K; ++k)
      std::fill(sums + k * C + c0, sums + k * C + c1, std::numeric_limits<double>::quiet_NaN());
    return;
  }
  PairwiseRows<acc_t> acc(len, (seg.N + kColumnSumBlock - 1) / kColumnSumBlock);
  std::vector<acc_t> part(len);
  for (int64_t k = 0; k < seg.K; ++k) {
    const int64_t begin = seg.offsets[k], end = seg.offsets[k + 1];
    if (end == begin) continue;
    segment_sum(a + c0, C, seg.order + begin, end - begin, len, acc, part.data());
    double* row = sums + k * C + c0;
    for (int64_t c = 0; c < len; ++c) row[c] += static_cast<double>(part[c]);
  }
}

void class_sums_accumulate_cpu(at::TensorList xs, const at::Tensor& labels, const at::Tensor& counts,
                               const at::Tensor& offsets, const at::Tensor& order, const at::Tensor& invalid,
                               at::TensorList sums) {
  const Segmentation seg = check_segmentation(labels, counts, offsets, order, invalid);
  std::vector<Layer> layers = prepare_layers(xs, labels);
  check_class_sums_args(sums, layers, seg.K, labels.device());
  unit_means_all(layers, seg.N);
  const auto tasks = channel_tasks(layers);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const ChannelTask& task = tasks[t];
      const Layer& L = layers[task.layer];
      AT_DISPATCH_FLOATING_TYPES(L.a.scalar_type(), "selkernels_class_sums", [&] {
        accumulate_segment_sums<scalar_t>(L.a.const_data_ptr<scalar_t>(), L.C, task.c0, task.c1, seg,
                                          sums[task.layer].mutable_data_ptr<double>());
      });
    }
  });
}

// Per unit c < len: SI and its gradient coefficients from the terms (NaN everywhere on invalid
// labels). Outputs are offset to the task's first unit.
template <typename acc_t>
void selectivity_epilogue(const UnitTerms<acc_t>& t, int64_t len, acc_t eps, bool invalid, acc_t* si, acc_t* g_max,
                          acc_t* g_rest, acc_t* mu_max, acc_t* mu_rest, int64_t* argmax) {
  for (int64_t c = 0; c < len; ++c) {
    mu_max[c] = t.mu_max[c];
    mu_rest[c] = t.mu_rest[c];
    si[c] = t.present < 2 ? acc_t(0) : selectivity_value(mu_max[c], mu_rest[c], eps);
    selectivity_grad_coeffs(mu_max[c], mu_rest[c], t.present, eps, acc_t(1), &g_max[c], &g_rest[c]);
    argmax[c] = t.argmax[c];
    if (invalid) si[c] = g_max[c] = g_rest[c] = mu_max[c] = mu_rest[c] = std::numeric_limits<acc_t>::quiet_NaN();
  }
}

// Phase 2 of selectivity_index_segmented for channels [c0, c1) of one layer, over the classes
// present only (O(P * C) whatever K is; no [K, C] means): each class's mean row, a row of the unit
// means itself when the class has one sample, else its segment mean (as in segment_means, kept in a
// scratch block of at most N / 2 rows of c1 - c0 values), is folded into the SI terms.
template <typename acc_t>
void selectivity_channel_block(const acc_t* a, int64_t C, int64_t c0, int64_t c1, const Segmentation& seg,
                               const std::vector<int64_t>& present, acc_t eps, acc_t* si, acc_t* coeffs,
                               int64_t* argmax) {
  const int64_t len = c1 - c0, P = static_cast<int64_t>(present.size());
  std::vector<const acc_t*> rows(P);
  std::vector<int32_t> classes(P);
  int64_t averaged = 0;
  for (int64_t k : present) averaged += seg.offsets[k + 1] - seg.offsets[k] > 1;
  std::vector<acc_t> segment_rows(averaged * len);
  PairwiseRows<acc_t> segment(len, (seg.N + kColumnSumBlock - 1) / kColumnSumBlock);
  for (int64_t p = 0, next = 0; p < P; ++p) {
    const int64_t k = present[p], begin = seg.offsets[k], count = seg.offsets[k + 1] - begin;
    classes[p] = static_cast<int32_t>(k);
    if (count == 1) {
      rows[p] = a + seg.order[begin] * C + c0;
      continue;
    }
    acc_t* mean_row = segment_rows.data() + next++ * len;
    segment_sum(a + c0, C, seg.order + begin, count, len, segment, mean_row);
    const acc_t inv = acc_t(1) / static_cast<acc_t>(count);
    for (int64_t c = 0; c < len; ++c) mean_row[c] *= inv;
    rows[p] = mean_row;
  }
  UnitTerms<acc_t> t{std::vector<acc_t>(len), std::vector<acc_t>(len), std::vector<int32_t>(len), P};
  fold_classes(rows, classes, len, t.mu_max.data(), t.mu_rest.data(), t.argmax.data());
  selectivity_epilogue(t, len, eps, seg.invalid, si + c0, coeffs + c0, coeffs + C + c0, coeffs + 2 * C + c0,
                       coeffs + 3 * C + c0, argmax + c0);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> selectivity_index_segmented_cpu(
    at::TensorList xs, const at::Tensor& labels, const at::Tensor& counts, const at::Tensor& offsets,
    const at::Tensor& order, const at::Tensor& invalid, double eps) {
  const Segmentation seg = check_segmentation(labels, counts, offsets, order, invalid);
  std::vector<Layer> layers = prepare_layers(xs, labels);
  unit_means_all(layers, seg.N);
  std::vector<at::Tensor> si, coeffs, argmax;
  selectivity_outputs(layers, labels, si, coeffs, argmax);
  std::vector<int64_t> present;  // the classes of the batch, in class order
  for (int64_t k = 0; k < seg.K; ++k)
    if (seg.offsets[k + 1] > seg.offsets[k]) present.push_back(k);
  const auto tasks = channel_tasks(layers);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const ChannelTask& task = tasks[t];
      const int64_t l = task.layer;
      AT_DISPATCH_FLOATING_TYPES(coeffs[l].scalar_type(), "selectivity_index", [&] {
        selectivity_channel_block<scalar_t>(layers[l].a.data_ptr<scalar_t>(), layers[l].C, task.c0, task.c1, seg,
                                            present, static_cast<scalar_t>(eps), si[l].data_ptr<scalar_t>(),
                                            coeffs[l].data_ptr<scalar_t>(), argmax[l].data_ptr<int64_t>());
      });
    }
  });
  return {si, coeffs, argmax};
}

// row[c] = ((am[c] == k ? at_max[c] : at_rest[c]) + extra[c]) * scale for c < C (extra optional).
template <typename acc_t, typename out_t>
inline __attribute__((always_inline)) void unit_grad_row_body(const int32_t* __restrict__ am, int32_t k,
                                                              const acc_t* __restrict__ at_max,
                                                              const acc_t* __restrict__ at_rest,
                                                              const acc_t* __restrict__ extra, acc_t scale, int64_t C,
                                                              out_t* __restrict__ row) {
  if (extra != nullptr) {
    for (int64_t c = 0; c < C; ++c)
      row[c] = static_cast<out_t>(((am[c] == k ? at_max[c] : at_rest[c]) + extra[c]) * scale);
  } else {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) row[c] = static_cast<out_t>((am[c] == k ? at_max[c] : at_rest[c]) * scale);
  }
}
SELK_TARGET_CLONES void unit_grad_row(const int32_t* am, int32_t k, const float* at_max, const float* at_rest,
                                      const float* extra, float scale, int64_t C, float* row) {
  unit_grad_row_body(am, k, at_max, at_rest, extra, scale, C, row);
}
template <typename acc_t, typename out_t>
void unit_grad_row(const int32_t* am, int32_t k, const acc_t* at_max, const acc_t* at_rest, const acc_t* extra,
                   acc_t scale, int64_t C, out_t* row) {
  unit_grad_row_body(am, k, at_max, at_rest, extra, scale, C, row);
}

// Backward of every layer in one parallel region over (layer, chunk of samples) tasks.
std::vector<at::Tensor> segmented_unit_grad_cpu(at::TensorList grad_si, at::TensorList coeffs, at::TensorList argmax,
                                                at::TensorList grad_means, const at::Tensor& labels_in,
                                                const at::Tensor& counts_in, at::IntArrayRef channels,
                                                at::IntArrayRef spatial_sizes, at::IntArrayRef out_dtypes) {
  const size_t L = channels.size();
  const bool with_si = !grad_si.empty(), with_means = !grad_means.empty();
  check_unit_grad_lists(grad_si, coeffs, argmax, grad_means, channels, spatial_sizes, out_dtypes);
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor counts = counts_in.contiguous();
  const int64_t N = labels.size(0), K = counts.size(0);
  const int64_t* lab = labels.data_ptr<int64_t>();
  const int64_t* cnt = counts.data_ptr<int64_t>();
  struct LayerGrad {
    at::Tensor g_si, g_means, coeffs, argmax, out;
    int64_t C, S;
  };
  std::vector<LayerGrad> layers(L);
  for (size_t l = 0; l < L; ++l) {
    LayerGrad& G = layers[l];
    G.C = channels[l];
    G.S = spatial_sizes[l];
    const at::ScalarType acc = with_si      ? coeffs[l].scalar_type()
                               : with_means ? acc_type_of(grad_means[l].scalar_type())
                                            : at::kFloat;
    G.out = unit_grad_output(l, grad_si, coeffs, argmax, grad_means, G.C, N, K, out_dtypes[l], labels);
    if (with_si) {
      G.coeffs = coeffs[l].contiguous();
      G.argmax = argmax[l].to(at::kLong).contiguous();
      G.g_si = grad_si[l].to(acc).contiguous();
    }
    if (with_means) G.g_means = grad_means[l].to(acc).contiguous();
  }
  std::vector<MeansTask> tasks;
  for (size_t l = 0; l < L; ++l) {
    if (!layers[l].g_si.defined() && !layers[l].g_means.defined()) continue;
    const int64_t chunk = std::max<int64_t>(1, grain_for(layers[l].C));
    for (int64_t b = 0; b < N; b += chunk) tasks.push_back({static_cast<int64_t>(l), b, std::min(N, b + chunk)});
  }
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const MeansTask& task = tasks[t];
      LayerGrad& G = layers[task.layer];
      const at::ScalarType acc = G.g_si.defined() ? G.g_si.scalar_type() : G.g_means.scalar_type();
      AT_DISPATCH_FLOATING_TYPES(acc, "selkernels_unit_grad_acc", [&] {
        using acc_t = scalar_t;
        const int64_t C = G.C;
        // The SI term per unit, once per task: grad_si times the coefficient of the maximal class
        // and of the others, with the argmax as int32 (so the per-sample select vectorizes).
        std::vector<acc_t> at_max(C, acc_t(0)), at_rest(C, acc_t(0));
        std::vector<int32_t> am(C, -1);
        if (G.g_si.defined()) {
          const acc_t* gs = G.g_si.data_ptr<acc_t>();
          const acc_t* g_max = G.coeffs.data_ptr<acc_t>();
          const int64_t* argmax = G.argmax.data_ptr<int64_t>();
          for (int64_t c = 0; c < C; ++c) {
            at_max[c] = gs[c] * g_max[c];
            at_rest[c] = gs[c] * g_max[C + c];
            am[c] = static_cast<int32_t>(argmax[c]);
          }
        }
        const acc_t* gm = G.g_means.defined() ? G.g_means.data_ptr<acc_t>() : nullptr;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, G.out.scalar_type(), "selkernels_unit_grad", [&] {
          scalar_t* o = G.out.data_ptr<scalar_t>();
          for (int64_t n = task.begin; n < task.end; ++n) {
            const int64_t k = lab[n];
            scalar_t* row = o + n * C;
            if (k < 0 || k >= K || cnt[k] <= 0) {
              std::fill(row, row + C, scalar_t(0));
              continue;
            }
            const acc_t scale = acc_t(1) / (static_cast<acc_t>(cnt[k]) * static_cast<acc_t>(G.S));
            unit_grad_row(am.data(), static_cast<int32_t>(k), at_max.data(), at_rest.data(), gm ? gm + k * C : nullptr,
                          scale, C, row);
          }
        });
      });
    }
  });
  std::vector<at::Tensor> out;
  for (LayerGrad& G : layers) out.push_back(G.out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(selkernels, CPU, m) {
  m.impl("segment_labels", &segment_labels_cpu);
  m.impl("class_means_segmented", &class_means_segmented_cpu);
  m.impl("class_sums_accumulate_", &class_sums_accumulate_cpu);
  m.impl("selectivity_index_segmented", &selectivity_index_segmented_cpu);
  m.impl("segmented_unit_grad", &segmented_unit_grad_cpu);
  m.impl("selectivity_from_means", &selectivity_from_means_cpu);
  m.impl("selectivity_from_means_backward", &selectivity_from_means_backward_cpu);
}

}  // namespace selk
