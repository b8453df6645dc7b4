#pragma once
// Harness check of the shared host/device header csrc/common/selectivity.h: a toy kernel calls
// the SELK_HOST_DEVICE functions (one thread per unit); test_selectivity_header.cpp compares it
// with the same functions called on the host, nvcc/selectivity_kernels.cu compiles it with nvcc.
#include "common/selectivity.h"
#include "cuda/cuda_compat.cuh"

namespace selk_harness_check {

// means [K, U] (unit fastest), counts [K]; si [U], grad [K, U] = dSI/dmeans for grad_si = 1.
template <typename acc_t, typename mean_t>
__global__ void selectivity_per_unit(const mean_t* __restrict__ means, const int64_t* __restrict__ counts, int64_t K,
                                     int64_t U, acc_t eps, acc_t* __restrict__ si, acc_t* __restrict__ grad) {
  const int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (u >= U) return;
  const selk::SelectivityTerms<acc_t> t = selk::selectivity_terms<acc_t>(means + u, U, counts, K, eps);
  si[u] = t.si;
  selk::selectivity_grad<acc_t>(t, acc_t(1), counts, K, eps, grad + u, U);
}

}  // namespace selk_harness_check
