#pragma once
// CUDA kernel bodies of the selectivity family, torch-free: the launchers in selectivity.cu and the
// CUDA-semantics harness (tests/cuda_harness) instantiate the same templates.
//
// Deterministic by construction: no float atomics anywhere. Samples are ordered by label with a
// stable counting sort on the device, and every output element is reduced by a fixed set of
// threads in a fixed order, so results are bitwise reproducible run to run.
//
// Forward (class_means, selectivity_index), b = bytes per x element, A = bytes of acc_t (4 or 8):
//   segment_labels_kernel   labels -> counts, offsets, stable order     N*8 + 2*N*4 + K*12 bytes
//   unit_means_*_kernel     a[n, c] = mean over s of x[n, c, s]         N*C*S*b read + N*C*A write
//   class_sum_kernel        means[k, c] = mean of a over class k rows   N*C*A + N*4 read + K*C*A write
//   si_kernel (SI only)     SI per unit from means, counts              K*C*A + K*8 read + C*A write
//   total: N*C*S*b + 2*N*C*A + (2 or 3)*K*C*A + O(N + K); x is read exactly once, and for S >= 4
//   (any conv layer) the N*C*S*b term dominates, so the forward runs at HBM bandwidth.
// Backward: grad_unit[n, c] (an [N, C] tensor the Python side broadcasts over the spatial dims):
//   class_means_backward    N*C*o write + rows of grad_means gathered per sample (<= N*C*A, L2-hot
//                           when K is small) + N*8 + K*8
//   selectivity_index_bwd   si_grad_coeffs_kernel K*C*A + K*8 read + C*(2A + 8) write, then the
//                           elementwise kernel as above plus C*(2A + 8) read
#include <cstdint>
#include <cstring>

#include "cuda/cuda_compat.cuh"

#include "common/selectivity.h"

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

constexpr int kWarpSize = 32;
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

// 16 bytes of storage elements, loaded with one 128-bit instruction when aligned.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kLen = static_cast<int>(16 / sizeof(T));
  T v[kLen];
};

// ------------------------------------------------------------------------------------------------
// Phase 0: stable counting sort of the labels, one block of kSegmentThreads threads.
// ------------------------------------------------------------------------------------------------
constexpr int kSegmentThreads = 1024;
constexpr int kMaxWarps = kSegmentThreads / kWarpSize;
// Class counts live in shared memory while they fit the default 48 KiB, else in global scratch.
constexpr int64_t kSegmentSmemBytes = 48 * 1024;

SELK_HOST_DEVICE inline bool segment_counts_in_smem(int64_t K) {
  return (K + kMaxWarps) * static_cast<int64_t>(sizeof(int32_t)) <= kSegmentSmemBytes;
}
SELK_HOST_DEVICE inline int64_t segment_smem_bytes(int64_t K) {
  return (kMaxWarps + (segment_counts_in_smem(K) ? K : 0)) * static_cast<int64_t>(sizeof(int32_t));
}

// Writes counts[k] (int64), offsets[k] = first position of class k in `order` (offsets[K] = number of
// counted samples), rank[n] = position of sample n inside its class, and order[offsets[l] + rank[n]]
// = n, with samples of one class in increasing n. Labels equal to ignore_index or outside [0, K) are
// skipped (never used as an index). count_scratch: int32 [K], used when the counts do not fit smem.
// blockDim.x must be a multiple of 32 and at most kSegmentThreads; one block.
// Work: one pass over the labels in chunks of blockDim.x: lanes rank themselves within their warp
// by shuffles, and warps of a chunk take turns to claim positions (a __syncthreads each), so the
// sort costs O(N / 32) barrier steps, microseconds for training batch sizes.
__global__ void __launch_bounds__(kSegmentThreads)
    segment_labels_kernel(const int64_t* __restrict__ labels, int64_t N, int64_t K, int64_t ignore_index,
                          int64_t* __restrict__ counts, int32_t* __restrict__ offsets, int32_t* __restrict__ rank,
                          int32_t* __restrict__ order, int32_t* __restrict__ count_scratch) {
  SELK_EXTERN_SHARED(int32_t, smem);
  const int t = static_cast<int>(threadIdx.x);
  const int T = static_cast<int>(blockDim.x);
  const int lane = t % kWarpSize, warp = t / kWarpSize, W = T / kWarpSize;
  int32_t* warp_sums = smem;
  int32_t* cnt = segment_counts_in_smem(K) ? smem + kMaxWarps : count_scratch;

  for (int64_t k = t; k < K; k += T) cnt[k] = 0;
  __syncthreads();

  for (int64_t base = 0; base < N; base += T) {
    const int64_t n = base + t;
    const int64_t remaining = N - base;
    const int active_warps = remaining >= T ? W : static_cast<int>((remaining + kWarpSize - 1) / kWarpSize);
    int32_t l = -1;
    if (n < N) {
      const int64_t raw = labels[n];
      if (raw != ignore_index && raw >= 0 && raw < K) l = static_cast<int32_t>(raw);
    }
    // Rank among the same label in lower lanes; `last`: no same label in a higher lane.
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
        __syncwarp();  // every lane has read cnt[l] before the label's last lane advances it
        if (l >= 0 && last) cnt[l] = r + 1;
      }
      __syncthreads();
    }
  }

  // Exclusive scan of the counts, blockDim.x classes at a time, carrying the running total.
  int32_t carry = 0;
  for (int64_t base = 0; base < K; base += T) {
    const int64_t k = base + t;
    const int32_t v = k < K ? cnt[k] : 0;
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
    if (k < K) {
      offsets[k] = carry + (warp > 0 ? warp_sums[warp - 1] : 0) + incl - v;
      counts[k] = v;
    }
    carry += warp_sums[W - 1];
    __syncthreads();  // warp_sums is rewritten by the next chunk
  }
  if (t == 0) offsets[K] = carry;
  __syncthreads();  // offsets visible to the whole block

  for (int64_t n = t; n < N; n += T) {
    const int64_t raw = labels[n];
    if (raw != ignore_index && raw >= 0 && raw < K) order[offsets[raw] + rank[n]] = static_cast<int32_t>(n);
  }
}

// ------------------------------------------------------------------------------------------------
// Phase 1: unit means a[n * C + c] = (1/S) sum over s of x[n, c, s].
// ------------------------------------------------------------------------------------------------
constexpr int kRowThreads = 256;

// Threads per row: enough to cover a row of S elements in one sweep of `vec`-wide loads, a power of
// two up to a warp, so short rows (S = 4, 16, 49) still keep every lane busy and coalesced.
SELK_HOST_DEVICE inline int row_group_size(int64_t S, int vec) {
  const int64_t chunks = (S + vec - 1) / vec;
  int g = 1;
  while (g < kWarpSize && g < chunks) g *= 2;
  return g;
}

// NCHW (rows of S contiguous elements). Groups of G lanes reduce one row each: lane-strided loads
// (VEC elements at a time when rows are 16-byte aligned), then a fixed shuffle tree within the group.
// Grid: 1-D, any size (grid-stride over warps); block: kRowThreads.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kRowThreads)
    unit_means_rows_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t S, int G, acc_t* __restrict__ a) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int rows_per_warp = kWarpSize / G;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarpSize);
  const int64_t warp_id = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
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

// channels_last: memory [N, S, C]. Block (32, kClRows): threadIdx.x walks channels (a warp reads 32
// consecutive channels of one position: coalesced), threadIdx.y splits the positions; the kClRows
// partial sums are added in a fixed order through shared memory (kClRows * 32 * A bytes).
// Grid: 1-D over N * ceil(C / 32) tiles, grid-stride.
constexpr int kClRows = 8;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarpSize* kClRows)
    unit_means_cl_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t C, int64_t S, acc_t* __restrict__ a) {
  SELK_EXTERN_SHARED(acc_t, part);
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  const int64_t c_tiles = (C + kWarpSize - 1) / kWarpSize;
  const acc_t inv_S = acc_t(1) / static_cast<acc_t>(S);
  for (int64_t tile = blockIdx.x; tile < N * c_tiles; tile += gridDim.x) {
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

// S == 1 (x is [N, C] or has only unit spatial dims): a = x in acc_t, any strides. Grid-stride 1-D.
template <typename scalar_t, typename acc_t>
__global__ void unit_values_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t C, int64_t stride_n,
                                   int64_t stride_c, acc_t* __restrict__ a) {
  const int64_t total = N * C;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / C, c = i % C;
    a[i] = to_acc<acc_t>(x[n * stride_n + c * stride_c]);
  }
}

// ------------------------------------------------------------------------------------------------
// Phase 2: means[k, c] = (1/count_k) sum over class-k samples (label-sorted order) of a[n, c].
// Grid (K, ceil(C / 32)); block (32, kClassRows): threadIdx.y takes every kClassRows-th sample of the
// segment, and the partial sums are added in a fixed order (smem kClassRows * 32 * A bytes). Absent
// classes get mean 0.
// ------------------------------------------------------------------------------------------------
constexpr int kClassRows = 8;

template <typename acc_t>
__global__ void __launch_bounds__(kWarpSize* kClassRows)
    class_sum_kernel(const acc_t* __restrict__ a, const int32_t* __restrict__ offsets,
                     const int32_t* __restrict__ order, int64_t C, acc_t* __restrict__ means) {
  SELK_EXTERN_SHARED(acc_t, part);
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  const int64_t k = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kWarpSize + tx;
  const int32_t begin = offsets[k], end = offsets[k + 1];
  acc_t sum = acc_t(0);
  if (c < C) {
    for (int32_t i = begin + ty; i < end; i += kClassRows) sum += a[static_cast<int64_t>(order[i]) * C + c];
  }
  part[ty * kWarpSize + tx] = sum;
  __syncthreads();
  if (ty == 0 && c < C) {
    acc_t total = part[tx];
    for (int y = 1; y < kClassRows; ++y) total += part[y * kWarpSize + tx];
    const int32_t n_k = end - begin;
    means[k * C + c] = n_k > 0 ? total * (acc_t(1) / static_cast<acc_t>(n_k)) : acc_t(0);
  }
}

// ------------------------------------------------------------------------------------------------
// Selectivity epilogue and its gradient: one thread per unit, classes read with stride C (a warp
// reads 32 consecutive units of one class: coalesced; counts[k] is a broadcast). 1-D grid over C.
// ------------------------------------------------------------------------------------------------
constexpr int kUnitThreads = 128;

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

// Per-unit gradient coefficients for the fused selectivity_index backward (the [K, C] gradient of
// SI is never materialised).
template <typename acc_t>
__global__ void __launch_bounds__(kUnitThreads)
    si_grad_coeffs_kernel(const acc_t* __restrict__ grad_si, const acc_t* __restrict__ means,
                          const int64_t* __restrict__ counts, int64_t K, int64_t C, acc_t eps,
                          acc_t* __restrict__ g_max, acc_t* __restrict__ g_rest, int64_t* __restrict__ argmax) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const SelectivityTerms<acc_t> t = selectivity_terms<acc_t>(means + c, C, counts, K, eps);
  const SelectivityGradCoeffs<acc_t> g = selectivity_grad_coeffs<acc_t>(t, grad_si[c], eps);
  g_max[c] = g.g_max;
  g_rest[c] = g.g_rest;
  argmax[c] = g.argmax;
}

// ------------------------------------------------------------------------------------------------
// Backward to the unit means: grad_unit[n, c] = G[label n, c] / (count * S), zero for ignored,
// out-of-range or absent labels, where G = grad_means (class_means) or
// G = grad_means + dSI/dmeans from the per-unit coefficients (selectivity_index; g_max != nullptr).
// Grid (ceil(C / kUnitThreads), min(N, 65535)), grid-stride over n; block kUnitThreads.
// ------------------------------------------------------------------------------------------------
template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(kUnitThreads)
    unit_grad_kernel(const acc_t* __restrict__ grad_means, const int64_t* __restrict__ counts,
                     const int64_t* __restrict__ labels, int64_t N, int64_t K, int64_t C, int64_t ignore_index,
                     int64_t spatial_size, const acc_t* __restrict__ g_max, const acc_t* __restrict__ g_rest,
                     const int64_t* __restrict__ argmax, out_t* __restrict__ out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const int64_t k = labels[n];
    acc_t g = acc_t(0);
    if (k != ignore_index && k >= 0 && k < K && counts[k] > 0) {
      // grad_means is null when nothing flows into the fused op's `means` output.
      acc_t gm = grad_means != nullptr ? grad_means[k * C + c] : acc_t(0);
      if (g_max != nullptr) gm = (k == argmax[c] ? g_max[c] : g_rest[c]) + gm;
      const acc_t scale = acc_t(1) / (static_cast<acc_t>(counts[k]) * static_cast<acc_t>(spatial_size));
      g = gm * scale;
    }
    out[n * C + c] = store_as<out_t, acc_t>(g);
  }
}

}  // namespace cuda
}  // namespace selk
