// CPU kernels of the selectivity family. Deterministic: labels are counting-sorted once and every
// output element is reduced by one thread in a fixed order (no atomics), so results do not depend
// on the thread count.
//
// Forward = two phases (see the roofline note in benchmarks/README.md):
//   1. unit means a[n, c] = mean over s of x[n, c, s]   one read of x, vectorized over s (NCHW)
//                                                        or over c (channels_last)
//   2. means[k, c] = mean over {n : label n = k} of a   O(N*C), segments in label-sorted order
// Backward: grad_unit[n, c] = grad_means[label n, c] / (count * S), an [N, C] tensor that Python
// broadcasts over the spatial positions without copying.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <memory>
#include <vector>

#include "common/selectivity.h"
#include "cpu/pairwise_sum.h"
#include "cpu/row_means_avx2.h"

namespace selk {
namespace {

// Runtime dispatch to the widest vector unit without building the wheel for one CPU.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SELK_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SELK_TARGET_CLONES
#endif

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

#define SELK_MEANS_FOR(scalar_t, acc_t)                                                                        \
  SELK_TARGET_CLONES void row_means(const scalar_t* p, int64_t rows, int64_t S, acc_t scale, acc_t* out) {     \
    row_means_body(p, rows, S, scale, out);                                                                    \
  }                                                                                                            \
  SELK_TARGET_CLONES void column_means(const scalar_t* p, int64_t S, int64_t C, acc_t scale,                   \
                                       PairwiseRows<acc_t>& acc, acc_t* out) {                                 \
    column_means_body(p, S, C, scale, acc, out);                                                               \
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

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Counting sort of labels: samples of class k are order[offsets[k] .. offsets[k + 1]).
struct LabelSegments {
  at::Tensor counts;  // int64 [K]
  std::vector<int64_t> offsets;
  std::vector<int64_t> order;
};

LabelSegments segment_labels(const at::Tensor& labels, int64_t K, int64_t ignore_index) {
  const int64_t N = labels.size(0);
  const at::Tensor lab = labels.contiguous();
  const int64_t* l = lab.data_ptr<int64_t>();
  LabelSegments seg;
  seg.counts = at::zeros({K}, labels.options().dtype(at::kLong));
  int64_t* counts = seg.counts.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    if (l[n] == ignore_index) continue;
    // selkernels/ops.py turns this message into a ValueError: keep its prefix.
    TORCH_CHECK(l[n] >= 0 && l[n] < K, "selkernels: labels must lie in [0, num_classes=", K,
                ") or equal ignore_index=", ignore_index, "; found labels[", n, "] = ", l[n]);
    ++counts[l[n]];
  }
  seg.offsets.assign(K + 1, 0);
  for (int64_t k = 0; k < K; ++k) seg.offsets[k + 1] = seg.offsets[k] + counts[k];
  seg.order.resize(seg.offsets[K]);
  std::vector<int64_t> fill(seg.offsets.begin(), seg.offsets.end() - 1);
  for (int64_t n = 0; n < N; ++n) {
    if (l[n] != ignore_index) seg.order[fill[l[n]]++] = n;
  }
  return seg;
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

// Phase 1: a[n * C + c] = mean over spatial positions of x[n, c, ...].
template <typename scalar_t, typename acc_t>
void unit_means(const at::Tensor& x_stored, acc_t* a) {
  const at::Tensor x_in = without_broadcast_positions(x_stored);
  const int64_t N = x_in.size(0), C = x_in.size(1);
  const int64_t S = N * C == 0 ? 1 : x_in.numel() / (N * C);
  const acc_t inv_S = acc_t(1) / static_cast<acc_t>(S);
  if (S == 1) {
    const at::Tensor x2 = x_in.reshape({N, C});  // a view: all trailing dims are 1
    const scalar_t* p = x2.data_ptr<scalar_t>();
    const int64_t sn = x2.stride(0), sc = x2.stride(1);
    at::parallel_for(0, N, grain_for(C), [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n)
        for (int64_t c = 0; c < C; ++c) a[n * C + c] = static_cast<acc_t>(p[n * sn + c * sc]);
    });
    return;
  }
  std::vector<int64_t> cl_perm{0};
  for (int64_t d = 2; d < x_in.dim(); ++d) cl_perm.push_back(d);
  cl_perm.push_back(1);
  const bool channels_last = !x_in.is_contiguous() && x_in.permute(cl_perm).is_contiguous();
  if (channels_last) {
    // Memory is [N, S, C]: accumulate rows of C so the inner loop is unit-stride.
    const scalar_t* p = x_in.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_for(S * C), [&](int64_t b, int64_t e) {
      PairwiseRows<acc_t> acc(C, (S + kColumnSumBlock - 1) / kColumnSumBlock);
      for (int64_t n = b; n < e; ++n) column_means(p + n * S * C, S, C, inv_S, acc, a + n * C);
    });
    return;
  }
  // Any other stride pattern is copied once to NCHW (documented in the Python docstrings).
  const at::Tensor x = x_in.contiguous();
  const scalar_t* p = x.data_ptr<scalar_t>();
  at::parallel_for(0, N * C, grain_for(S), [&](int64_t b, int64_t e) {
#ifdef SELK_HAVE_AVX2_ROW_MEANS
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (avx2::supported()) return avx2::row_means(p + b * S, e - b, S, inv_S, a + b);
    }
#endif
    row_means(p + b * S, e - b, S, inv_S, a + b);
  });
}

// Phase 2: means[k, c] from the unit means, in label-sorted order (deterministic).
template <typename acc_t>
void segment_means(const acc_t* a, int64_t C, const LabelSegments& seg, int64_t K, acc_t* means) {
  constexpr int64_t kChannelBlock = 256;
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  // Each task owns one (class, channel block): its segment's rows plus its output rows.
  const int64_t task_work = (seg.offsets[K] / std::max<int64_t>(1, K) + 1) * std::min(C, kChannelBlock);
  int64_t largest = 0;
  for (int64_t k = 0; k < K; ++k) largest = std::max(largest, seg.offsets[k + 1] - seg.offsets[k]);
  at::parallel_for(0, K * blocks, grain_for(task_work), [&](int64_t b, int64_t e) {
    PairwiseRows<acc_t> acc(std::min(C, kChannelBlock), (largest + kColumnSumBlock - 1) / kColumnSumBlock);
    for (int64_t task = b; task < e; ++task) {
      const int64_t k = task / blocks, c0 = (task % blocks) * kChannelBlock;
      const int64_t c1 = std::min(C, c0 + kChannelBlock);
      acc_t* out = means + k * C;
      const int64_t begin = seg.offsets[k], end = seg.offsets[k + 1];
      segment_sum(a + c0, C, seg.order.data() + begin, end - begin, c1 - c0, acc, out + c0);
      if (end > begin) {
        const acc_t inv = acc_t(1) / static_cast<acc_t>(end - begin);
        for (int64_t c = c0; c < c1; ++c) out[c] *= inv;
      }
    }
  });
}

void check_common(const at::Tensor& x, const at::Tensor& labels, int64_t K) {
  TORCH_CHECK(x.dim() >= 2, "selkernels: x must be [N, C, *spatial], got ", x.dim(), " dims");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "selkernels: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0), "selkernels: labels must be [N] with N = x.size(0)");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "selkernels: labels must be int64");
  TORCH_CHECK(K >= 1, "selkernels: num_classes must be >= 1");
}

std::tuple<at::Tensor, at::Tensor> class_means_impl(const at::Tensor& x, const at::Tensor& labels, int64_t K,
                                                    int64_t ignore_index) {
  check_common(x, labels, K);
  const int64_t N = x.size(0), C = x.size(1);
  const auto acc = acc_type_of(x.scalar_type());
  const LabelSegments seg = segment_labels(labels, K, ignore_index);
  at::Tensor means = at::empty({K, C}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "selkernels_class_means", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    // Every element is written by unit_means: no zero-fill.
    std::unique_ptr<acc_t[]> a(new acc_t[N * C]);
    unit_means<scalar_t, acc_t>(x, a.get());
    segment_means<acc_t>(a.get(), C, seg, K, means.data_ptr<acc_t>());
  });
  return {means, seg.counts};
}

// Per-unit SI terms for units [c0, c1), sweeping the [K, C] means row by row so the inner loop is
// unit-stride (the per-unit strided loop of common/selectivity.h suits the GPU's coalescing instead).
// Same semantics: present = classes with count > 0, first maximum on ties, NaN propagates.
template <typename acc_t>
struct UnitTerms {
  std::vector<acc_t> mu_max, mu_rest;
  std::vector<int32_t> argmax;  // int32 (K < 2^31) so the select below vectorizes
  int64_t present = 0;
};

template <typename acc_t>
void unit_terms(const acc_t* means, const int64_t* counts, int64_t K, int64_t C, int64_t c0, int64_t c1,
                UnitTerms<acc_t>& t) {
  const int64_t len = c1 - c0;
  t.mu_max.assign(len, acc_t(0));
  t.mu_rest.assign(len, acc_t(0));
  t.argmax.assign(len, -1);
  std::vector<acc_t> sum_buf(len, acc_t(0));
  acc_t* __restrict__ sum = sum_buf.data();
  acc_t* __restrict__ mx = t.mu_max.data();
  int32_t* __restrict__ am = t.argmax.data();
  t.present = 0;
  for (int64_t k = 0; k < K; ++k) {
    if (counts[k] <= 0) continue;
    const acc_t* __restrict__ row = means + k * C + c0;
    const int32_t kk = static_cast<int32_t>(k);
    if (t.present == 0) {
      for (int64_t c = 0; c < len; ++c) {
        sum[c] = row[c];
        mx[c] = row[c];
        am[c] = kk;
      }
    } else {
      for (int64_t c = 0; c < len; ++c) {
        sum[c] += row[c];
        const bool take = !(row[c] <= mx[c]);  // strictly greater, or NaN: first max wins ties
        mx[c] = take ? row[c] : mx[c];
        am[c] = take ? kk : am[c];
      }
    }
    ++t.present;
  }
  if (t.present < 2) {
    std::fill(t.mu_max.begin(), t.mu_max.end(), acc_t(0));
    std::fill(t.argmax.begin(), t.argmax.end(), -1);
    return;
  }
  const acc_t inv = acc_t(1) / static_cast<acc_t>(t.present - 1);
  for (int64_t c = 0; c < len; ++c) t.mu_rest[c] = (sum[c] - mx[c]) * inv;
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
  TORCH_CHECK(means_in.dim() == 2, "selkernels: means must be [K, C]");
  TORCH_CHECK(counts_in.dim() == 1 && counts_in.size(0) == means_in.size(0), "selkernels: counts must be [K]");
  const at::Tensor means = means_in.to(acc_type_of(means_in.scalar_type())).contiguous();
  const at::Tensor counts = counts_in.to(at::kLong).contiguous();
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
  const at::Tensor means = means_in.contiguous();
  const at::Tensor counts = counts_in.to(at::kLong).contiguous();
  const at::Tensor grad_si = grad_si_in.to(means.scalar_type()).contiguous();
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

// grad_unit[n, c] = grad_means[label n, c] / (count * S); zero for ignored samples.
at::Tensor class_means_backward_cpu(const at::Tensor& grad_means_in, const at::Tensor& counts_in,
                                    const at::Tensor& labels_in, int64_t ignore_index, int64_t spatial_size,
                                    at::ScalarType out_dtype) {
  const at::Tensor grad_means = grad_means_in.contiguous();
  const at::Tensor counts = counts_in.to(at::kLong).contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const int64_t N = labels.size(0), K = grad_means.size(0), C = grad_means.size(1);
  TORCH_CHECK(counts.size(0) == K, "selkernels: counts must be [K]");
  at::Tensor out = at::empty({N, C}, grad_means.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES(grad_means.scalar_type(), "selkernels_class_means_backward_acc", [&] {
    using acc_t = scalar_t;
    const acc_t* gm = grad_means.data_ptr<acc_t>();
    const int64_t* cnt = counts.data_ptr<int64_t>();
    const int64_t* l = labels.data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_dtype, "selkernels_class_means_backward", [&] {
      scalar_t* o = out.data_ptr<scalar_t>();
      at::parallel_for(0, N, grain_for(C), [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          const int64_t k = l[n];
          if (k == ignore_index || k < 0 || k >= K || cnt[k] == 0) {
            std::fill(o + n * C, o + (n + 1) * C, scalar_t(0));
            continue;
          }
          const acc_t scale = acc_t(1) / (static_cast<acc_t>(cnt[k]) * static_cast<acc_t>(spatial_size));
          for (int64_t c = 0; c < C; ++c) o[n * C + c] = static_cast<scalar_t>(gm[k * C + c] * scale);
        }
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> selectivity_index_cpu(const at::Tensor& x, const at::Tensor& labels,
                                                                     int64_t K, double eps, int64_t ignore_index) {
  auto [means, counts] = class_means_impl(x, labels, K, ignore_index);
  return {selectivity_from_means_cpu(means, counts, eps), means, counts};
}

// Without materialising a [K, C] gradient: d SI_c / d means[k, c] is g_max[c] for k = argmax[c],
// g_rest[c] for the other present classes, so each sample needs only its unit's argmax.
// grad_means_out (the gradient reaching the op's `means` output) is undefined when unused.
at::Tensor selectivity_index_backward_cpu(const at::Tensor& grad_si_in, const c10::optional<at::Tensor>& grad_means_out,
                                          const at::Tensor& means_in, const at::Tensor& counts_in,
                                          const at::Tensor& labels_in, double eps, int64_t ignore_index,
                                          int64_t spatial_size, at::ScalarType out_dtype) {
  const at::Tensor means = means_in.contiguous();
  const at::Tensor counts = counts_in.to(at::kLong).contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor grad_si = grad_si_in.to(means.scalar_type()).contiguous();
  const bool has_extra = grad_means_out.has_value() && grad_means_out->defined();
  const at::Tensor extra = has_extra ? grad_means_out->to(means.scalar_type()).contiguous() : at::Tensor();
  const int64_t N = labels.size(0), K = means.size(0), C = means.size(1);
  at::Tensor out = at::empty({N, C}, means.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "selkernels_selectivity_index_backward_acc", [&] {
    using acc_t = scalar_t;
    const acc_t* m = means.data_ptr<acc_t>();
    const acc_t* g = grad_si.data_ptr<acc_t>();
    const acc_t* gx = has_extra ? extra.data_ptr<acc_t>() : nullptr;
    const int64_t* cnt = counts.data_ptr<int64_t>();
    const int64_t* l = labels.data_ptr<int64_t>();
    const auto coeffs = unit_grad_coeffs<acc_t>(m, cnt, g, K, C, static_cast<acc_t>(eps));
    const acc_t* g_max = coeffs.g_max.data();
    const acc_t* g_rest = coeffs.g_rest.data();
    const int32_t* argmax = coeffs.argmax.data();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_dtype, "selkernels_selectivity_index_backward", [&] {
      scalar_t* o = out.data_ptr<scalar_t>();
      at::parallel_for(0, N, grain_for(C), [&](int64_t b, int64_t end) {
        for (int64_t n = b; n < end; ++n) {
          const int64_t k = l[n];
          scalar_t* row = o + n * C;
          if (k == ignore_index || k < 0 || k >= K || cnt[k] == 0) {
            std::fill(row, row + C, scalar_t(0));
            continue;
          }
          const acc_t scale = acc_t(1) / (static_cast<acc_t>(cnt[k]) * static_cast<acc_t>(spatial_size));
          for (int64_t c = 0; c < C; ++c) {
            acc_t grad = argmax[c] == k ? g_max[c] : g_rest[c];
            if (gx != nullptr) grad += gx[k * C + c];
            row[c] = static_cast<scalar_t>(grad * scale);
          }
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(selkernels, CPU, m) {
  m.impl("class_means", &class_means_impl);
  m.impl("class_means_backward", &class_means_backward_cpu);
  m.impl("selectivity_from_means", &selectivity_from_means_cpu);
  m.impl("selectivity_from_means_backward", &selectivity_from_means_backward_cpu);
  m.impl("selectivity_index", &selectivity_index_cpu);
  m.impl("selectivity_index_backward", &selectivity_index_backward_cpu);
}

}  // namespace selk
