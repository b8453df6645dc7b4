#pragma once
// Torch-free CUDA kernel bodies of the 1/n spectral penalty (launcher: csrc/cuda/spectral.cu).
// Deterministic: fixed-order reductions in shared memory, no atomics.
#include "cuda/cuda_compat.cuh"  // first: defines __host__/__device__ under the harness

#include <cstdint>

#include "common/spectral.h"

namespace selk {
namespace cuda {

constexpr int kColTile = 32;   // columns per block (one warp wide: coalesced row reads)
constexpr int kRowGroups = 8;  // row groups per block, reduced in shared memory

// Column sums of squares of P [N, D] over one chunk of rows: block (x = column tile, y = row
// chunk) covers rows [y * rows_per_chunk, min(N, (y + 1) * rows_per_chunk)) of its kColTile
// columns and writes out[y * D + j] = scale * sum. Splitting the rows over gridDim.y fills the GPU
// whatever D is (ceil(D / 32) column tiles alone are 8-16 blocks for D = 256-512). Thread (tx, ty)
// sums rows ty, ty + kRowGroups, ... of its chunk, then the kRowGroups partial sums are added in
// ty order: a fixed order, deterministic.
template <typename T>
__global__ void column_sumsq_kernel(const T* __restrict__ P, int64_t N, int64_t D, int64_t rows_per_chunk, T scale,
                                    T* __restrict__ out) {
  __shared__ T partial[kRowGroups][kColTile];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColTile + tx;
  const int64_t lo = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t hi = lo + rows_per_chunk < N ? lo + rows_per_chunk : N;
  T sum = T(0);
  if (j < D) {
    for (int64_t i = lo + ty; i < hi; i += kRowGroups) {
      const T p = P[i * D + j];
      sum += p * p;
    }
  }
  partial[ty][tx] = sum;
  __syncthreads();
  if (ty == 0 && j < D) {
    T total = T(0);
    for (int g = 0; g < kRowGroups; ++g) total += partial[g][tx];
    out[static_cast<int64_t>(blockIdx.y) * D + j] = total * scale;
  }
}

// lam[j] = scale * sum over c < chunks of partial[c * D + j], in chunk order (grid-stride over j).
template <typename T>
__global__ void chunk_sum_kernel(const T* __restrict__ partial, int64_t chunks, int64_t D, T scale,
                                 T* __restrict__ lam) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < D; j += stride) {
    T total = T(0);
    for (int64_t c = 0; c < chunks; ++c) total += partial[c * D + j];
    lam[j] = total * scale;
  }
}

constexpr int kLossThreads = 256;

// One block of kLossThreads threads. sorted: the projected variances sorted descending, order:
// their original indices. Writes loss[0] = (1 / D) sum of the terms and w[order[n]] = dL/ds_n
// (0 for n <= tau and below the floor), the gradient the backward reuses.
template <typename T>
__global__ void spectral_loss_kernel(const T* __restrict__ sorted, const int64_t* __restrict__ order, int64_t D,
                                     int64_t tau, T slope, T eps, T* __restrict__ loss, T* __restrict__ w) {
  __shared__ T partial[kLossThreads];
  const int t = threadIdx.x;
  const bool active = tau >= 0 && D > tau + 1;
  const T inv_d = T(1) / static_cast<T>(D);
  T sum = T(0);
  for (int64_t n = t; n < D; n += kLossThreads) {
    T grad = T(0);
    if (active && n > tau) {
      const SpectralTerm<T> term =
          spectral_term(sorted[n], spectral_target(sorted[tau], tau, n, slope), spectral_floor(sorted[0], D, eps));
      sum += term.value;
      grad = term.grad;
    }
    w[order[n]] = grad * inv_d;
  }
  partial[t] = sum;
  __syncthreads();
  for (int stride = kLossThreads / 2; stride > 0; stride >>= 1) {
    if (t < stride) partial[t] += partial[t + stride];
    __syncthreads();
  }
  if (t == 0) loss[0] = partial[0] * inv_d;
}

}  // namespace cuda
}  // namespace selk
