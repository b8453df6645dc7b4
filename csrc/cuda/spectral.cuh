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

// lam[j] = sum_i P[i, j]^2 * inv (inv = 1 / (N - 1), or 0 when N < 2). Block (kColTile,
// kRowGroups): thread (tx, ty) sums rows ty, ty + kRowGroups, ... of column j, then the
// kRowGroups partial sums are added in ty order.
template <typename T>
__global__ void column_sumsq_kernel(const T* __restrict__ P, int64_t N, int64_t D, T inv, T* __restrict__ lam) {
  __shared__ T partial[kRowGroups][kColTile];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColTile + tx;
  T sum = T(0);
  if (j < D) {
    for (int64_t i = ty; i < N; i += kRowGroups) {
      const T p = P[i * D + j];
      sum += p * p;
    }
  }
  partial[ty][tx] = sum;
  __syncthreads();
  if (ty == 0 && j < D) {
    T total = T(0);
    for (int g = 0; g < kRowGroups; ++g) total += partial[g][tx];
    lam[j] = total * inv;
  }
}

constexpr int kLossThreads = 256;

// One block of kLossThreads threads. sorted: the projected variances sorted descending, order:
// their original indices. Writes loss[0] = (1 / D) sum of the terms, and, if w != nullptr,
// w[order[n]] = grad_scale * dL/ds_n (0 for n <= tau and below the floor); grad_scale folds in
// 2 / (N - 1) and the incoming gradient, read from grad_loss when it is not null.
template <typename T>
__global__ void spectral_loss_kernel(const T* __restrict__ sorted, const int64_t* __restrict__ order, int64_t D,
                                     int64_t tau, T slope, T eps, T grad_scale, const T* __restrict__ grad_loss,
                                     T* __restrict__ loss, T* __restrict__ w) {
  __shared__ T partial[kLossThreads];
  const int t = threadIdx.x;
  const bool active = tau >= 0 && D > tau + 1;
  const T inv_d = T(1) / static_cast<T>(D);
  const T scale = grad_loss ? grad_scale * grad_loss[0] : grad_scale;
  T sum = T(0);
  for (int64_t n = t; n < D; n += kLossThreads) {
    T grad = T(0);
    if (active && n > tau) {
      const SpectralTerm<T> term =
          spectral_term(sorted[n], spectral_target(sorted[tau], tau, n, slope), spectral_floor(sorted[0], D, eps));
      sum += term.value;
      grad = term.grad;
    }
    if (w) w[order[n]] = grad * inv_d * scale;
  }
  partial[t] = sum;
  __syncthreads();
  for (int stride = kLossThreads / 2; stride > 0; stride >>= 1) {
    if (t < stride) partial[t] += partial[t + stride];
    __syncthreads();
  }
  if (t == 0 && loss) loss[0] = partial[0] * inv_d;
}

}  // namespace cuda
}  // namespace selk
