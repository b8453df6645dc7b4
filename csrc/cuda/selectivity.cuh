#pragma once
// CUDA kernel bodies of the selectivity family, torch-free: the launchers in selectivity.cu and the
// CUDA-semantics harness (tests/cuda_harness) instantiate the same templates.
//
// Deterministic by construction: no float atomics anywhere. Samples are ordered by label with a
// stable counting sort on the device, and every output element is reduced by a fixed set of
// threads in a fixed order, so results are bitwise reproducible run to run.
//
// A training step (every hooked layer in one call; the exact grids and bytes of each launch are
// computed by cuda/launch_plan.h, the same code the launchers size their grids with):
//   segment_labels_kernel   once per batch: labels -> counts, offsets, stable order, invalid count
//   unit_means_kernel       all layers of one dtype: a[n, c] = mean over s of x[n, c, s]
//   class_si_kernel         all layers of one acc type: class means, SI and the gradient
//                           coefficients per unit, parallel over channels and classes
//   unit_grad_kernel        backward, all layers of one dtype: one elementwise pass
// x is read exactly once; for S >= 4 (any conv layer) that read dominates, so the forward runs at
// HBM bandwidth, and the backward writes an [N, C] tensor per layer (broadcast over the spatial
// positions by the caller). Nothing syncs with the host: invalid labels are counted on the device
// and turn the results into NaN.
#include <cstdint>
#include <cstring>

#include "cuda/cuda_compat.cuh"

#include "common/selectivity.h"
#include "cuda/launch_plan.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define SELK_UNROLL _Pragma("unroll")
#define SELK_UNROLL_4 _Pragma("unroll 4")
#else
#define SELK_UNROLL
#define SELK_UNROLL_4
#endif

namespace selk {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// ------------------------------------------------------------------------------------------------
// Storage types. Half and bfloat16 are carried as their 16 bits, so the kernels need neither c10
// nor cuda_fp16 types in their signatures; the launchers reinterpret at::Half / at::BFloat16
// pointers (same size and bits). bfloat16 and the host side of half use the IEEE bit manipulations
// (round to nearest even), which the harness runs and checks exhaustively; on the device half uses
// the conversion instructions instead (same IEEE results), because decoding half in integer code
// costs ~10 instructions per element and would make the fp16 forward compute-bound.
// ------------------------------------------------------------------------------------------------
struct f16_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

SELK_HOST_DEVICE inline float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));  // a register move after optimisation, host and device
  return f;
}
SELK_HOST_DEVICE inline uint32_t float_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

SELK_HOST_DEVICE inline float to_float(f16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h.bits));
#else
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu;
  const uint32_t mant = h.bits & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24 is exact in float.
    const float v = static_cast<float>(mant) * bits_to_float(0x33800000u);
    return bits_to_float(sign | float_to_bits(v));
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
#endif
}

SELK_HOST_DEVICE inline float to_float(bf16_t h) { return bits_to_float(static_cast<uint32_t>(h.bits) << 16); }

template <typename T>
SELK_HOST_DEVICE inline T from_float(float v);

template <>
SELK_HOST_DEVICE inline f16_t from_float<f16_t>(float v) {
#if defined(__CUDA_ARCH__)
  return f16_t{__half_as_ushort(__float2half_rn(v))};
#else
  uint32_t f = float_to_bits(v);
  const uint16_t sign = static_cast<uint16_t>((f >> 16) & 0x8000u);
  f &= 0x7fffffffu;
  if (f >= 0x7f800000u) return f16_t{static_cast<uint16_t>(sign | (f > 0x7f800000u ? 0x7e00u : 0x7c00u))};
  if (f >= 0x477ff000u) return f16_t{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (f < 0x38800000u) {
    // Result is subnormal (or zero): adding 0.5 makes the float adder round |v| to a multiple of
    // 2^-24 (the half subnormal step) with round-to-nearest-even; the low bits are the result.
    const float r = bits_to_float(f) + 0.5f;
    return f16_t{static_cast<uint16_t>(sign | (float_to_bits(r) - 0x3f000000u))};
  }
  // Rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even.
  f += 0xc8000fffu + ((f >> 13) & 1u);
  return f16_t{static_cast<uint16_t>(sign | (f >> 13))};
#endif
}

template <>
SELK_HOST_DEVICE inline bf16_t from_float<bf16_t>(float v) {
  const uint32_t u = float_to_bits(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{0x7fc0u};  // quiet NaN, as c10::BFloat16
  return bf16_t{static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

template <>
SELK_HOST_DEVICE inline float from_float<float>(float v) {
  return v;
}

// Accumulator of a storage type: float for float / half / bfloat16, double for double.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename acc_t>
SELK_HOST_DEVICE inline acc_t to_acc(float v) {
  return static_cast<acc_t>(v);
}
template <typename acc_t>
SELK_HOST_DEVICE inline acc_t to_acc(double v) {
  return static_cast<acc_t>(v);
}
template <typename acc_t>
SELK_HOST_DEVICE inline acc_t to_acc(f16_t v) {
  return static_cast<acc_t>(to_float(v));
}
template <typename acc_t>
SELK_HOST_DEVICE inline acc_t to_acc(bf16_t v) {
  return static_cast<acc_t>(to_float(v));
}

// acc_t -> storage type, rounding once (double -> half goes through float, as at::Half does).
template <typename out_t, typename acc_t>
SELK_HOST_DEVICE inline out_t store_as(acc_t v) {
  return from_float<out_t>(static_cast<float>(v));
}
template <>
SELK_HOST_DEVICE inline double store_as<double, double>(double v) {
  return v;
}
template <>
SELK_HOST_DEVICE inline float store_as<float, double>(double v) {
  return static_cast<float>(v);
}
template <>
SELK_HOST_DEVICE inline double store_as<double, float>(float v) {
  return static_cast<double>(v);
}

// A quiet NaN without <limits> (not every device toolchain has it constexpr).
template <typename acc_t>
SELK_HOST_DEVICE inline acc_t bits_nan() {
  return static_cast<acc_t>(bits_to_float(0x7fc00000u));
}

// 16 bytes of storage elements, loaded with one 128-bit instruction when aligned.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kLen = static_cast<int>(16 / sizeof(T));
  T v[kLen];
};

// ------------------------------------------------------------------------------------------------
// Label segmentation, once per batch: a stable counting sort in one block of kSegmentThreads.
// Bucket K collects ignored and invalid samples, so they come last in `order`.
// ------------------------------------------------------------------------------------------------
// Writes seg_labels[n] (the label, -1 if ignored or invalid), counts[k] (k < K), offsets[k] (k <= K;
// offsets[K] = number of counted samples), order (class-sorted sample indices, stable, ignored and
// invalid samples last in index order) and *invalid (labels that are neither ignore_index nor in
// [0, K)). rank: int32 [N] scratch; count_scratch: int32 [K + 1], used when the counts do not fit
// shared memory. blockDim.x a multiple of 32, at most kSegmentThreads; one block.
// Work: one pass over the labels in chunks of blockDim.x: lanes rank themselves within their warp
// by shuffles, and warps of a chunk take turns to claim positions (a __syncthreads each), so the
// sort costs O(N / 32) barrier steps, microseconds for training batch sizes.
__global__ void __launch_bounds__(kSegmentThreads)
    segment_labels_kernel(const int64_t* __restrict__ labels, int64_t N, int64_t K, int64_t ignore_index,
                          int64_t* __restrict__ seg_labels, int64_t* __restrict__ counts, int64_t* __restrict__ offsets,
                          int64_t* __restrict__ order, int64_t* __restrict__ invalid, int32_t* __restrict__ rank,
                          int32_t* __restrict__ count_scratch) {
  SELK_EXTERN_SHARED(int32_t, smem);
  const int t = static_cast<int>(threadIdx.x);
  const int T = static_cast<int>(blockDim.x);
  const int lane = t % kWarpSize, warp = t / kWarpSize, W = T / kWarpSize;
  int32_t* warp_sums = smem;
  int32_t* cnt = segment_counts_in_smem(K) ? smem + kMaxWarps : count_scratch;
  const int64_t buckets = K + 1;

  for (int64_t k = t; k < buckets; k += T) cnt[k] = 0;
  __syncthreads();

  int64_t bad = 0;  // the same in every thread: __syncthreads_count is block-wide
  for (int64_t base = 0; base < N; base += T) {
    const int64_t n = base + t;
    const int64_t remaining = N - base;
    const int active_warps = remaining >= T ? W : static_cast<int>((remaining + kWarpSize - 1) / kWarpSize);
    int32_t l = -1;  // -1: lane past N
    bool is_bad = false;
    if (n < N) {
      const int64_t raw = labels[n];
      const bool valid = raw >= 0 && raw < K;
      is_bad = !valid && raw != ignore_index;
      l = static_cast<int32_t>(valid ? raw : K);
      seg_labels[n] = valid ? raw : -1;
    }
    bad += __syncthreads_count(is_bad);
    // Rank among the same bucket in lower lanes; `last`: no same bucket in a higher lane.
    int32_t before = 0;
    bool last = true;
    for (int j = 0; j < kWarpSize; ++j) {
      const int32_t other = __shfl_sync(kFullMask, l, j);
      if (other == l) {
        if (j < lane) ++before;
        if (j > lane) last = false;
      }
    }
    for (int w = 0; w < active_warps; ++w) {
      if (warp == w) {
        int32_t r = 0;
        if (l >= 0) {
          r = cnt[l] + before;
          rank[n] = r;
        }
        __syncwarp();  // every lane has read cnt[l] before the bucket's last lane advances it
        if (l >= 0 && last) cnt[l] = r + 1;
      }
      __syncthreads();
    }
  }

  // Exclusive scan of the K + 1 bucket counts, blockDim.x at a time, carrying the running total.
  int64_t carry = 0;
  for (int64_t base = 0; base < buckets; base += T) {
    const int64_t k = base + t;
    const int32_t v = k < buckets ? cnt[k] : 0;
    int32_t incl = v;
    for (int d = 1; d < kWarpSize; d *= 2) {
      const int32_t up = __shfl_up_sync(kFullMask, incl, d);
      if (lane >= d) incl += up;
    }
    if (lane == kWarpSize - 1) warp_sums[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      int32_t ws = lane < W ? warp_sums[lane] : 0;
      for (int d = 1; d < kWarpSize; d *= 2) {
        const int32_t up = __shfl_up_sync(kFullMask, ws, d);
        if (lane >= d) ws += up;
      }
      if (lane < W) warp_sums[lane] = ws;
    }
    __syncthreads();
    if (k < buckets) {
      offsets[k] = carry + (warp > 0 ? warp_sums[warp - 1] : 0) + incl - v;  // bucket start
      if (k < K) counts[k] = v;
    }
    carry += warp_sums[W - 1];
    __syncthreads();  // warp_sums is rewritten by the next chunk
  }
  if (t == 0) *invalid = bad;
  __syncthreads();  // offsets visible to the whole block

  for (int64_t n = t; n < N; n += T) {
    const int64_t l = seg_labels[n];
    order[offsets[l >= 0 ? l : K] + rank[n]] = n;
  }
}

// ------------------------------------------------------------------------------------------------
// Layer tables: every layer op takes all layers of one dtype in one launch. The table travels as a
// kernel parameter (no host-to-device copy); blockIdx.y picks the layer, and blocks past a layer's
// own grid exit at once.
// ------------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
struct MeansLayer {
  const scalar_t* x;
  acc_t* a;  // [N, C]
  int64_t C, S, stride_n, stride_c;
  int32_t layout;  // MeansLayout
  int32_t group;   // rows layouts: lanes per row (row_group_size)
  int64_t blocks;  // this layer's grid (<= gridDim.x)
};

template <typename scalar_t, typename acc_t>
struct MeansTable {
  MeansLayer<scalar_t, acc_t> layer[kMaxLayersPerLaunch];
  int64_t N;
};

// ------------------------------------------------------------------------------------------------
// Phase 1: unit means a[n * C + c] = (1/S) sum over s of x[n, c, s].
// ------------------------------------------------------------------------------------------------
// Dynamic shared memory of unit_means_kernel (positions-major partial sums).
template <typename acc_t>
SELK_HOST_DEVICE inline int64_t unit_means_smem_bytes() {
  return kMeansThreads * static_cast<int64_t>(sizeof(acc_t));
}

// NCHW rows: groups of G lanes reduce one row each: lane-strided loads (VEC elements at a time),
// then a fixed shuffle tree within the group. Grid-stride over warps of this layer's blocks.
template <typename scalar_t, typename acc_t, int VEC>
__device__ inline void unit_means_rows(const scalar_t* __restrict__ x, int64_t rows, int64_t S, int G, int64_t block,
                                       int64_t blocks, acc_t* __restrict__ a) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int rows_per_warp = kWarpSize / G;
  const int64_t warps_total = blocks * (kMeansThreads / kWarpSize);
  const int64_t warp_id = (block * kMeansThreads + threadIdx.x) / kWarpSize;
  const acc_t inv_S = acc_t(1) / static_cast<acc_t>(S);
  const int sub = lane % G;
  // The loop bound is uniform across the warp, so every lane reaches the shuffles.
  for (int64_t row0 = warp_id * rows_per_warp; row0 < rows; row0 += warps_total * rows_per_warp) {
    const int64_t row = row0 + lane / G;
    acc_t sum = acc_t(0);
    if (row < rows) {
      const scalar_t* p = x + row * S;
      if constexpr (VEC > 1) {
        static_assert(VEC == Vec16<scalar_t>::kLen, "VEC is 1 or a full 16-byte vector");
        const Vec16<scalar_t>* pv = reinterpret_cast<const Vec16<scalar_t>*>(p);
        const int64_t nv = S / VEC;
        SELK_UNROLL_4
        for (int64_t i = sub; i < nv; i += G) {
          const Vec16<scalar_t> v = pv[i];
          SELK_UNROLL
          for (int e = 0; e < Vec16<scalar_t>::kLen; ++e) sum += to_acc<acc_t>(v.v[e]);
        }
      } else {
        SELK_UNROLL_4
        for (int64_t s = sub; s < S; s += G) sum += to_acc<acc_t>(p[s]);
      }
    }
    for (int d = G / 2; d > 0; d /= 2) sum += __shfl_xor_sync(kFullMask, sum, d);
    if (row < rows && sub == 0) a[row] = sum * inv_S;
  }
}

// Memory [N, S, C]: a warp reads 32 consecutive channels of one position (coalesced), the 8 warps
// split the positions, and their partial sums are added in a fixed order through shared memory.
// Tiles of (sample, 32 channels), grid-stride over this layer's blocks.
template <typename scalar_t, typename acc_t>
__device__ inline void unit_means_positions_major(const scalar_t* __restrict__ x, int64_t N, int64_t C, int64_t S,
                                                  int64_t block, int64_t blocks, acc_t* __restrict__ part,
                                                  acc_t* __restrict__ a) {
  const int tx = static_cast<int>(threadIdx.x) % kWarpSize, ty = static_cast<int>(threadIdx.x) / kWarpSize;
  const int64_t c_tiles = (C + kWarpSize - 1) / kWarpSize;
  const acc_t inv_S = acc_t(1) / static_cast<acc_t>(S);
  for (int64_t tile = block; tile < N * c_tiles; tile += blocks) {
    const int64_t n = tile / c_tiles;
    const int64_t c = (tile % c_tiles) * kWarpSize + tx;
    acc_t sum = acc_t(0);
    if (c < C) {
      const scalar_t* p = x + n * S * C + c;
      SELK_UNROLL_4
      for (int64_t s = ty; s < S; s += kClRows) sum += to_acc<acc_t>(p[s * C]);
    }
    part[ty * kWarpSize + tx] = sum;
    __syncthreads();
    if (ty == 0 && c < C) {
      acc_t total = part[tx];
      for (int y = 1; y < kClRows; ++y) total += part[y * kWarpSize + tx];
      a[n * C + c] = total * inv_S;
    }
    __syncthreads();  // `part` is reused by the next tile
  }
}

// Grid (max over layers of MeansLayer::blocks, layers in the table), block kMeansThreads, dynamic
// smem unit_means_smem_bytes<acc_t>().
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMeansThreads) unit_means_kernel(MeansTable<scalar_t, acc_t> table) {
  SELK_EXTERN_SHARED(acc_t, part);
  // By value: this layer's fields in registers (a reference into the parameter table can make
  // the compiler copy the whole table to local memory).
  const MeansLayer<scalar_t, acc_t> L = table.layer[blockIdx.y];
  const int64_t block = blockIdx.x;
  if (block >= L.blocks) return;  // uniform per block
  const int64_t N = table.N;
  switch (L.layout) {
    case kValues:
      for (int64_t i = block * kMeansThreads + threadIdx.x; i < N * L.C; i += L.blocks * kMeansThreads) {
        const int64_t n = i / L.C, c = i % L.C;
        L.a[i] = to_acc<acc_t>(L.x[n * L.stride_n + c * L.stride_c]);
      }
      break;
    case kRows:
      unit_means_rows<scalar_t, acc_t, 1>(L.x, N * L.C, L.S, L.group, block, L.blocks, L.a);
      break;
    case kRowsVec:
      if constexpr (Vec16<scalar_t>::kLen > 1)
        unit_means_rows<scalar_t, acc_t, Vec16<scalar_t>::kLen>(L.x, N * L.C, L.S, L.group, block, L.blocks, L.a);
      break;
    default:
      unit_means_positions_major<scalar_t, acc_t>(L.x, N, L.C, L.S, block, L.blocks, part, L.a);
      break;
  }
}

// ------------------------------------------------------------------------------------------------
// Phase 2 and the SI epilogue, fused: per block one layer's tile of 32 channels; the 8 warp rows
// take the classes k = ty, ty + 8, ... (absent classes cost one offsets read each), each computes
// its classes' means from the label-sorted samples and keeps the running sum, maximum (first on
// ties) and number of present classes; the 8 rows are then combined in a fixed order (smem), and
// row 0 writes SI and the gradient coefficients. Deterministic; no [K, C] re-read.
// Grid (max over layers of ceil(C / 32), layers in the table); block (32, kClassRows).
// ------------------------------------------------------------------------------------------------
template <typename acc_t>
struct ClassLayer {
  const acc_t* a;   // [N, C] unit means
  acc_t* means;     // [K, C], or nullptr (not written: SI only, or sums)
  double* sums;     // [K, C] float64 state the class sums are added to, or nullptr
  acc_t* si;        // [C], or nullptr (class means only)
  acc_t* coeffs;    // [4, C]: dSI/dmu_max, dSI/dmu_rest / (P - 1), mu_max, mu_rest; with si
  int64_t* argmax;  // [C], -1 when P < 2; with si
  int64_t C;
};

template <typename acc_t>
struct ClassTable {
  ClassLayer<acc_t> layer[kMaxLayersPerLaunch];
};

template <typename acc_t>
SELK_HOST_DEVICE inline int64_t class_si_smem_bytes() {
  return kClassRows * kWarpSize * static_cast<int64_t>(2 * sizeof(acc_t) + 2 * sizeof(int64_t));
}

template <typename acc_t>
__global__ void __launch_bounds__(kWarpSize* kClassRows)
    class_si_kernel(ClassTable<acc_t> table, const int64_t* __restrict__ counts, const int64_t* __restrict__ offsets,
                    const int64_t* __restrict__ order, const int64_t* __restrict__ invalid, int64_t K, acc_t eps) {
  SELK_EXTERN_SHARED(acc_t, smem);
  const ClassLayer<acc_t> L = table.layer[blockIdx.y];
  const int64_t C = L.C;
  const int64_t tile = blockIdx.x;
  if (tile * kWarpSize >= C) return;  // uniform per block
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  const int64_t c = tile * kWarpSize + tx;
  const bool bad = *invalid > 0;
  const acc_t nan = bits_nan<acc_t>();
  acc_t sum = acc_t(0), mx = acc_t(0);
  int64_t am = -1, present = 0;
  for (int64_t k = ty; k < K; k += kClassRows) {
    const int64_t begin = offsets[k], end = offsets[k + 1];
    if (end == begin) {
      if (c < C && L.means != nullptr) L.means[k * C + c] = bad ? nan : acc_t(0);
      if (c < C && L.sums != nullptr && bad) L.sums[k * C + c] = bits_nan<double>();
      continue;
    }
    acc_t m = acc_t(0);
    if (c < C) {
      SELK_UNROLL_4
      for (int64_t i = begin; i < end; ++i) m += L.a[order[i] * C + c];  // loads pipelined across i
      if (L.sums != nullptr) {  // accumulation: one read-modify-write of this thread's own entry
        L.sums[k * C + c] = bad ? bits_nan<double>() : L.sums[k * C + c] + static_cast<double>(m);
        continue;
      }
      m = m * (acc_t(1) / static_cast<acc_t>(end - begin));
      if (bad) m = nan;
      if (L.means != nullptr) L.means[k * C + c] = m;
    }
    sum += m;
    if (present == 0 || !(m <= mx)) {  // strictly greater, or NaN: the first maximum wins ties
      mx = m;
      am = k;
    }
    ++present;
  }
  if (L.si == nullptr) return;  // uniform: class means only
  acc_t* s_sum = smem;
  acc_t* s_max = smem + kClassRows * kWarpSize;
  int64_t* s_am = reinterpret_cast<int64_t*>(smem + 2 * kClassRows * kWarpSize);
  int64_t* s_present = s_am + kClassRows * kWarpSize;
  const int slot = ty * kWarpSize + tx;
  s_sum[slot] = sum;
  s_max[slot] = mx;
  s_am[slot] = am;
  s_present[slot] = present;
  __syncthreads();
  if (ty != 0 || c >= C) return;
  for (int y = 1; y < kClassRows; ++y) {
    const int o = y * kWarpSize + tx;
    if (s_present[o] == 0) continue;
    sum += s_sum[o];
    const acc_t m = s_max[o];
    // Rows hold interleaved classes: on equal maxima the smaller class index wins.
    if (present == 0 || !(m <= mx) || (m == mx && s_am[o] < am)) {
      mx = m;
      am = s_am[o];
    }
    present += s_present[o];
  }
  acc_t si = acc_t(0), g_max = acc_t(0), g_rest = acc_t(0), rest = acc_t(0);
  if (present >= 2) {
    rest = (sum - mx) / static_cast<acc_t>(present - 1);
    si = selectivity_value(mx, rest, eps);
    selectivity_grad_coeffs(mx, rest, present, eps, acc_t(1), &g_max, &g_rest);
  } else {
    am = -1;
    mx = acc_t(0);
  }
  if (bad) si = g_max = g_rest = mx = rest = nan;
  L.si[c] = si;
  L.coeffs[c] = g_max;
  L.coeffs[C + c] = g_rest;
  L.coeffs[2 * C + c] = mx;
  L.coeffs[3 * C + c] = rest;
  L.argmax[c] = am;
}

// ------------------------------------------------------------------------------------------------
// selectivity_from_means (the public [K, C] op) and its backward: one thread per unit, classes
// read with stride C (a warp reads 32 consecutive units of one class: coalesced). 1-D grid over C.
// ------------------------------------------------------------------------------------------------
template <typename acc_t>
__global__ void __launch_bounds__(kUnitThreads)
    si_kernel(const acc_t* __restrict__ means, const int64_t* __restrict__ counts, int64_t K, int64_t C, acc_t eps,
              acc_t* __restrict__ si) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  si[c] = selectivity_terms<acc_t>(means + c, C, counts, K, eps).si;
}

// grad_means[k, c] = grad_si[c] * dSI[c] / dmeans[k, c].   K*C*A read + K*C*A write.
template <typename acc_t>
__global__ void __launch_bounds__(kUnitThreads)
    si_backward_kernel(const acc_t* __restrict__ grad_si, const acc_t* __restrict__ means,
                       const int64_t* __restrict__ counts, int64_t K, int64_t C, acc_t eps,
                       acc_t* __restrict__ grad_means) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const SelectivityTerms<acc_t> t = selectivity_terms<acc_t>(means + c, C, counts, K, eps);
  selectivity_grad<acc_t>(t, grad_si[c], counts, K, eps, grad_means + c, C);
}

// ------------------------------------------------------------------------------------------------
// Backward of every layer of one dtype, one elementwise pass: grad_unit[n, c] = G[label n, c] /
// (count * S) with G[k, c] = grad_si[c] * (k == argmax[c] ? coeffs[c] : coeffs[C + c]) (when
// grad_si is set) + grad_means[k, c] (when set); 0 for ignored samples.
// Grid (max over layers of GradLayer::blocks, layers in the table), block kGradThreads, grid-stride.
// ------------------------------------------------------------------------------------------------
template <typename acc_t, typename out_t>
struct GradLayer {
  const acc_t* grad_si;     // [C] or nullptr
  const acc_t* coeffs;      // [2, C], with grad_si
  const int64_t* argmax;    // [C], with grad_si
  const acc_t* grad_means;  // [K, C] or nullptr
  out_t* out;               // [N, C]
  int64_t C, S, blocks;
};

template <typename acc_t, typename out_t>
struct GradTable {
  GradLayer<acc_t, out_t> layer[kMaxLayersPerLaunch];
};

template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(kGradThreads)
    unit_grad_kernel(GradTable<acc_t, out_t> table, const int64_t* __restrict__ labels,
                     const int64_t* __restrict__ counts, int64_t N) {
  const GradLayer<acc_t, out_t> L = table.layer[blockIdx.y];
  const int64_t block = blockIdx.x;
  if (block >= L.blocks) return;
  const int64_t C = L.C;
  for (int64_t i = block * kGradThreads + threadIdx.x; i < N * C; i += L.blocks * kGradThreads) {
    const int64_t n = i / C, c = i % C;
    const int64_t k = labels[n];
    acc_t g = acc_t(0);
    if (k >= 0) {
      if (L.grad_si != nullptr) g = L.grad_si[c] * (k == L.argmax[c] ? L.coeffs[c] : L.coeffs[C + c]);
      if (L.grad_means != nullptr) g += L.grad_means[k * C + c];
      g = g / (static_cast<acc_t>(counts[k]) * static_cast<acc_t>(L.S));
    }
    L.out[i] = store_as<out_t, acc_t>(g);
  }
}

}  // namespace cuda
}  // namespace selk
