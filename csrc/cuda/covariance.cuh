#pragma once
// Torch-free CUDA kernel bodies of the streaming moments update (launcher: csrc/cuda/covariance.cu).
// No host sync anywhere: the launcher sizes every grid from host-known bounds (N, K, D) and the
// kernels read the batch's class layout from device memory: its segmentation (segment_labels), so
// class k is rows order[offsets[k] .. offsets[k + 1]) and ignored or invalid samples fall outside
// every class (they are never read).
//   1. (ATen) rank[k], the inclusive prefix count of non-empty classes; num_present = rank[K-1], or
//      0 when the batch holds invalid labels (then nothing is updated).
//   2. class_present_kernel: the present classes in increasing order, present[p] = k.
//      Per-batch temporaries are indexed by p (at most min(N, K) of them), never by k.
//   3. class_batch_mean_kernel: per (p, 32 columns) the class batch mean in float64, its rounding
//      c to the GEMM precision, d = mean_b - c, delta = mean_b - mean_a, and the Chan weights.
//   4. class_center_rows_kernel: xc[r] = x[order[r]] - c of its class (0 for rows in no class).
//   5. class_gram_merge_kernel: per (p, upper 64 x 64 tile pair (I, J), I <= J) the tile of the
//      class's Gram matrix in registers, merged straight into the float64 state at (I, J) and its
//      mirror (J, I): one read-write pass over the state, the product itself never in memory.
//      (One-set updates, K = 1, use a cuBLAS GEMM and class_merge_gram_kernel instead: one class of
//      many rows would give this kernel too few blocks.)
//   6. class_merge_mean_count_kernel: mean += delta * n_b / n and count += n_b.
// Every output element is reduced by one thread (or one block) in a fixed order: deterministic, no
// atomics. Indices are int64 (N * D may exceed 2^31); grids are 1-D and grid-strided, so K is
// limited by memory only.
#include "cuda/cuda_compat.cuh"  // first: defines __host__/__device__ under the harness

#include <cstdint>

#include "common/moments.h"

namespace selk {
namespace cuda {

// (The index_t templates only let the header be included by several translation units.)
// present[rank[k] - 1] = k for every class k with offsets[k + 1] > offsets[k]; rank is the inclusive
// prefix count of non-empty classes.
template <typename index_t>
__global__ void class_present_kernel(const index_t* __restrict__ offsets, const index_t* __restrict__ rank, index_t K,
                                     index_t* __restrict__ present) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t k = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < K; k += stride)
    if (offsets[k + 1] > offsets[k]) present[rank[k] - 1] = k;
}

constexpr int kMeanCols = 32;  // columns per work item of the batch mean (one warp wide)
constexpr int kMeanRowGroups = 8;

// Block (kMeanCols, kMeanRowGroups); work item (p, column tile), items = max_present * col_tiles,
// grid-strided. Thread (tx, ty) sums rows ty, ty + kMeanRowGroups, ... of its class in sorted order;
// the partial sums are added in ty order. Writes, for present class p (k = present[p]):
// shift[p, j] = c (mean rounded to gemm_t), rem[p, j] = mean_b - c, delta[p, j] = mean_b - mean[k, j],
// and from column 0 weights[2 p] = n_b / n, weights[2 p + 1] = n_a n_b / n.
template <typename scalar_t, typename gemm_t>
__global__ void class_batch_mean_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ order,
                                        const int64_t* __restrict__ offsets, const int64_t* __restrict__ present,
                                        const int64_t* __restrict__ num_present, const int64_t* __restrict__ count,
                                        const double* __restrict__ mean, int64_t D, int64_t items,
                                        gemm_t* __restrict__ shift, double* __restrict__ rem,
                                        double* __restrict__ delta, double* __restrict__ weights) {
  __shared__ double partial[kMeanRowGroups][kMeanCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col_tiles = (D + kMeanCols - 1) / kMeanCols;
  const int64_t P = *num_present;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t p = item / col_tiles;
    if (p >= P) break;  // items are ordered by p: every later item is absent too (uniform per block)
    const int64_t k = present[p];
    const int64_t j = (item % col_tiles) * kMeanCols + tx;
    const int64_t lo = offsets[k], hi = offsets[k + 1];
    double sum = 0.0;
    if (j < D)
      for (int64_t r = lo + ty; r < hi; r += kMeanRowGroups) sum += static_cast<double>(x[order[r] * D + j]);
    partial[ty][tx] = sum;
    __syncthreads();
    if (ty == 0 && j < D) {
      double total = 0.0;
      for (int g = 0; g < kMeanRowGroups; ++g) total += partial[g][tx];
      const double m = total / static_cast<double>(hi - lo);
      const gemm_t c = static_cast<gemm_t>(m);
      shift[p * D + j] = c;
      rem[p * D + j] = m - static_cast<double>(c);
      delta[p * D + j] = m - mean[k * D + j];
      if (j == 0) {
        const ChanWeights w = chan_weights(count[k], hi - lo);
        weights[2 * p] = w.mean_weight;
        weights[2 * p + 1] = w.m2_coef;
      }
    }
    __syncthreads();
  }
}

// xc[r, j] = x[order[r], j] - shift[rank[k] - 1, j], k = labels[order[r]] the row's class; 0 for
// rows in no class (label -1: ignored or invalid) and for every row when no class is present.
template <typename scalar_t, typename gemm_t>
__global__ void class_center_rows_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ order,
                                         const int64_t* __restrict__ labels, const int64_t* __restrict__ rank,
                                         const int64_t* __restrict__ num_present, const gemm_t* __restrict__ shift,
                                         int64_t N, int64_t D, int64_t K, gemm_t* __restrict__ xc) {
  const int64_t total = N * D;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const bool any = *num_present > 0;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t r = idx / D, j = idx - r * D;
    const int64_t row = order[r], k = labels[row];
    xc[idx] = (any && k >= 0 && k < K) ? static_cast<gemm_t>(x[row * D + j]) - shift[(rank[k] - 1) * D + j] : gemm_t(0);
  }
}

constexpr int kGramTile = 64;           // state tile side
constexpr int kGramSide = 16;           // block (kGramSide, kGramSide); each thread owns 4 x 4 tile entries
constexpr int kGramRows = 16;           // rows of xc staged in shared memory per step
constexpr int kGramLd = kGramTile + 1;  // padded row of the transposed tile (no bank conflicts)
constexpr int kGramPerThread = kGramTile / kGramSide;

// (ti, tj) of upper tile pair q (row-major over ti, tj >= ti) of a T x T tiling.
__device__ inline void upper_tile_pair(int64_t q, int64_t T, int64_t& ti, int64_t& tj) {
  ti = 0;
  while (q >= T - ti) {
    q -= T - ti;
    ++ti;
  }
  tj = ti + q;
}

// Work item (p, q): present class p, upper tile pair q of T = ceil(D / kGramTile) tiles per side,
// items = max_present * T (T + 1) / 2, grid-strided. The tile's entries of S = xc_k^T xc_k
// accumulate in registers over the class's rows (staged kGramRows at a time in shared memory), then
// are merged into M2[k]: entry (i, j) by its thread; for an off-diagonal tile also the mirror
// (j, i), through a transpose in shared memory so that those writes are coalesced as well. On a
// diagonal tile the A and B stages hold the same values, so S_ij and S_ji are the same FMAs in the
// same order: the state stays exactly symmetric.
template <typename gemm_t>
__global__ void __launch_bounds__(kGramSide* kGramSide)
    class_gram_merge_kernel(const gemm_t* __restrict__ xc, const int64_t* __restrict__ offsets,
                            const int64_t* __restrict__ present, const int64_t* __restrict__ num_present,
                            const double* __restrict__ rem, const double* __restrict__ delta,
                            const double* __restrict__ weights, int64_t D, int64_t items, double* __restrict__ m2) {
  __shared__ gemm_t buf[kGramTile * kGramLd];  // the two row stages, later the transposed tile
  gemm_t* a_stage = buf;
  gemm_t* b_stage = buf + kGramRows * kGramTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kGramSide + tx;
  const int64_t T = (D + kGramTile - 1) / kGramTile;
  const int64_t pairs = T * (T + 1) / 2;
  const int64_t P = *num_present;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t p = item / pairs;
    if (p >= P) break;  // items are ordered by p (uniform per block)
    int64_t ti, tj;
    upper_tile_pair(item % pairs, T, ti, tj);
    const int64_t i0 = ti * kGramTile, j0 = tj * kGramTile;
    const int64_t k = present[p];
    const int64_t lo = offsets[k], hi = offsets[k + 1];
    gemm_t acc[kGramPerThread][kGramPerThread];
    for (int m = 0; m < kGramPerThread; ++m)
      for (int n = 0; n < kGramPerThread; ++n) acc[m][n] = gemm_t(0);
    for (int64_t r0 = lo; r0 < hi; r0 += kGramRows) {
      for (int e = tid; e < kGramRows * kGramTile; e += kGramSide * kGramSide) {
        const int64_t r = r0 + e / kGramTile;
        const int64_t c = e % kGramTile;
        a_stage[e] = (r < hi && i0 + c < D) ? xc[r * D + i0 + c] : gemm_t(0);
        b_stage[e] = (r < hi && j0 + c < D) ? xc[r * D + j0 + c] : gemm_t(0);
      }
      __syncthreads();
      for (int rr = 0; rr < kGramRows; ++rr) {
        gemm_t a[kGramPerThread], b[kGramPerThread];
        for (int m = 0; m < kGramPerThread; ++m) a[m] = a_stage[rr * kGramTile + ty + kGramSide * m];
        for (int n = 0; n < kGramPerThread; ++n) b[n] = b_stage[rr * kGramTile + tx + kGramSide * n];
        for (int m = 0; m < kGramPerThread; ++m)
          for (int n = 0; n < kGramPerThread; ++n) acc[m][n] += a[m] * b[n];
      }
      __syncthreads();
    }
    const double n_b = static_cast<double>(hi - lo);
    const double coef = weights[2 * p + 1];
    const double* d = rem + p * D;
    const double* dl = delta + p * D;
    double* out = m2 + k * D * D;
    for (int m = 0; m < kGramPerThread; ++m) {
      const int64_t i = i0 + ty + kGramSide * m;
      for (int n = 0; n < kGramPerThread; ++n) {
        const int64_t j = j0 + tx + kGramSide * n;
        if (i < D && j < D)
          out[i * D + j] =
              chan_m2_entry(out[i * D + j], static_cast<double>(acc[m][n]), n_b, d[i], d[j], coef, dl[i], dl[j]);
      }
    }
    if (ti != tj) {  // uniform per block
      for (int m = 0; m < kGramPerThread; ++m)
        for (int n = 0; n < kGramPerThread; ++n) buf[(ty + kGramSide * m) * kGramLd + tx + kGramSide * n] = acc[m][n];
      __syncthreads();
      // thread (tx, ty) now owns mirror entries (j, i): row j = j0 + ty + 16 m, column i = i0 + tx + 16 n
      for (int m = 0; m < kGramPerThread; ++m) {
        const int64_t b = ty + kGramSide * m, j = j0 + b;
        for (int n = 0; n < kGramPerThread; ++n) {
          const int64_t a = tx + kGramSide * n, i = i0 + a;
          if (i < D && j < D)
            out[j * D + i] = chan_m2_entry(out[j * D + i], static_cast<double>(buf[a * kGramLd + b]), n_b, d[j], d[i],
                                           coef, dl[j], dl[i]);
        }
      }
    }
    __syncthreads();  // buf is restaged by the next item
  }
}

// One-set update (K = 1): the Chan merge of a cuBLAS Gram matrix gram [D, D] (about the shift) into
// M2 [D, D], one thread per entry, grid-strided. Entry (i, j) reads gram at (min, max), so both
// mirror entries use the same value. n_b = offsets[1] - offsets[0] is read on the device; nothing
// is merged when the class is absent (num_present = 0).
template <typename gemm_t>
__global__ void class_merge_gram_kernel(const gemm_t* __restrict__ gram, const int64_t* __restrict__ offsets,
                                        const int64_t* __restrict__ num_present, const double* __restrict__ rem,
                                        const double* __restrict__ delta, const double* __restrict__ weights, int64_t D,
                                        double* __restrict__ m2) {
  const int64_t n_b = offsets[1] - offsets[0];
  if (*num_present == 0 || n_b == 0) return;
  const int64_t total = D * D;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t i = idx / D, j = idx - i * D;
    const gemm_t s = i <= j ? gram[i * D + j] : gram[j * D + i];
    m2[idx] = chan_m2_entry(m2[idx], static_cast<double>(s), static_cast<double>(n_b), rem[i], rem[j], weights[1],
                            delta[i], delta[j]);
  }
}

// mean[k] += delta[p] * n_b / n and count[k] += n_b for present class p (k = present[p]); work item
// (p, j), items = max_present * D, grid-strided. The merge weights were taken from the count before
// this kernel (class_batch_mean_kernel), so the one writer of count[k] races with no reader.
template <typename acc_t>
__global__ void class_merge_mean_count_kernel(const int64_t* __restrict__ offsets, const int64_t* __restrict__ present,
                                              const int64_t* __restrict__ num_present, const acc_t* __restrict__ delta,
                                              const acc_t* __restrict__ weights, int64_t D, int64_t items,
                                              int64_t* __restrict__ count, acc_t* __restrict__ mean) {
  const int64_t P = *num_present;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < items; idx += stride) {
    const int64_t p = idx / D, j = idx - p * D;
    if (p >= P) break;
    const int64_t k = present[p];
    mean[k * D + j] += delta[p * D + j] * weights[2 * p];
    if (j == 0) count[k] += offsets[k + 1] - offsets[k];
  }
}

}  // namespace cuda
}  // namespace selk
