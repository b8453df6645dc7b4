#pragma once
// What torch-free kernel headers need from CUDA, so the same kernel bodies compile with nvcc and
// with g++ in the CUDA-semantics test harness (SELK_CUDA_SIM, tests/cuda_harness).
#include "common/host_device.h"

#if defined(SELK_CUDA_SIM)
#include "cuda_sim.h"
#elif defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

// Dynamic shared memory as `type* name` (a kernel's launch gives its size).
#ifndef SELK_EXTERN_SHARED
#define SELK_EXTERN_SHARED(type, name)                              \
  extern __shared__ __align__(16) unsigned char selk_smem_raw_[]; \
  type* name = reinterpret_cast<type*>(selk_smem_raw_)
#endif

#if defined(__CUDACC__)
#define SELK_LAUNCH_BOUNDS(threads) __launch_bounds__(threads)
#else
#define SELK_LAUNCH_BOUNDS(threads)
#endif
