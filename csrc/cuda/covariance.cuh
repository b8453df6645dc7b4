#pragma once
// Torch-free CUDA kernel bodies of the per-class streaming moments update (launcher:
// csrc/cuda/covariance.cu). Rows are visited in label-sorted order (order[offsets[k] ..
// offsets[k + 1]) is class k), every output element is reduced by one thread in a fixed order:
// deterministic, no atomics. Indices are int64 (N * D may exceed 2^31).
#include "cuda/cuda_compat.cuh"  // first: defines __host__/__device__ under the harness

#include <cstdint>

#include "common/moments.h"

namespace selk {
namespace cuda {

// One thread per (class k = blockIdx.y, column j): the class batch mean in float64 over the
// class's rows, its rounding c to the GEMM precision and the remainder d = mean - c.
// Absent classes are skipped (their outputs are never read).
template <typename scalar_t, typename gemm_t>
__global__ void class_batch_mean_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ order,
                                        const int64_t* __restrict__ offsets, int64_t D,
                                        double* __restrict__ mean_b, gemm_t* __restrict__ shift,
                                        double* __restrict__ rem) {
  const int64_t k = blockIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t lo = offsets[k], hi = offsets[k + 1];
  if (j >= D || hi == lo) return;
  double sum = 0.0;
  for (int64_t r = lo; r < hi; ++r) sum += static_cast<double>(x[order[r] * D + j]);
  const double m = sum / static_cast<double>(hi - lo);
  const gemm_t c = static_cast<gemm_t>(m);
  mean_b[k * D + j] = m;
  shift[k * D + j] = c;
  rem[k * D + j] = m - static_cast<double>(c);
}

// xc[r, j] = x[order[r], j] - shift[row_class[r], j]: centred rows, class-contiguous.
template <typename scalar_t, typename gemm_t>
__global__ void class_center_rows_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ order,
                                         const int64_t* __restrict__ row_class, const gemm_t* __restrict__ shift,
                                         int64_t N, int64_t D, gemm_t* __restrict__ xc) {
  const int64_t total = N * D;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t r = idx / D, j = idx - r * D;
    xc[idx] = static_cast<gemm_t>(x[order[r] * D + j]) - shift[row_class[r] * D + j];
  }
}

// Chan merge of class k's batch (n_b rows, Gram matrix gram about the shift) into M2[k]; reads
// the state's count and mean of class k, which are updated afterwards by
// class_merge_mean_count_kernel. One thread per entry of the D x D block.
template <typename gemm_t>
__global__ void class_merge_m2_kernel(const gemm_t* __restrict__ gram, const int64_t* __restrict__ count,
                                      const double* __restrict__ mean, const double* __restrict__ mean_b,
                                      const double* __restrict__ rem, int64_t k, int64_t n_b, int64_t D,
                                      double* __restrict__ m2) {
  const int64_t total = D * D;
  const ChanWeights w = chan_weights(count[k], n_b);
  const double* ma = mean + k * D;
  const double* mb = mean_b + k * D;
  const double* d = rem + k * D;
  double* out = m2 + k * total;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t i = idx / D, j = idx - i * D;
    out[idx] = chan_m2_entry(out[idx], static_cast<double>(gram[idx]), static_cast<double>(n_b), d[i], d[j],
                             w.m2_coef, mb[i] - ma[i], mb[j] - ma[j]);
  }
}

// mean[k] += (mean_b[k] - mean[k]) n_b / n and count[k] = count_before[k] + n_b, for every class;
// one thread per (k = blockIdx.y, column j). count_before is a snapshot of count taken before the
// launch, so the thread that writes count[k] races with no reader.
// (A template only so that the header can be included by several translation units.)
template <typename acc_t>
__global__ void class_merge_mean_count_kernel(const int64_t* __restrict__ batch_counts,
                                              const acc_t* __restrict__ mean_b, int64_t D,
                                              int64_t* __restrict__ count, acc_t* __restrict__ mean,
                                              const int64_t* __restrict__ count_before) {
  const int64_t k = blockIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_b = batch_counts[k];
  if (n_b == 0 || j >= D) return;
  const ChanWeights w = chan_weights(count_before[k], n_b);
  mean[k * D + j] += (mean_b[k * D + j] - mean[k * D + j]) * w.mean_weight;
  if (j == 0) count[k] = count_before[k] + n_b;
}

}  // namespace cuda
}  // namespace selk
