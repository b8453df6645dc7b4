#pragma once
// Include this first in every CUDA kernel header (csrc/cuda/*.cuh). Torch-free.
//
// The same kernel source compiles in two worlds:
//   * nvcc (__CUDACC__): the real thing.
//   * the CPU CUDA-semantics harness (SELK_CUDA_SIM, g++ -std=c++20 -I tests/cuda_harness):
//     tests/cuda_harness/cuda_sim.h supplies threadIdx, __syncthreads, shuffles, atomics, ...
//     and runs each CUDA thread as a fiber. See tests/cuda_harness/README.md.
//
// Kernel-writing rules that keep both worlds honest:
//   * dynamic shared memory only through SELK_EXTERN_SHARED (a raw `extern __shared__` does not
//     compile under the harness);
//   * static `__shared__ T x[N];` is fine (the harness re-poisons it at every block start);
//   * no `#ifdef __CUDA_ARCH__` device paths the harness would not see (it does not define it).
#if defined(SELK_CUDA_SIM)
#include "cuda_sim.h"
#endif

#include "common/host_device.h"

#if defined(SELK_CUDA_SIM)
// Pointer to the current block's dynamic shared memory (dyn_smem_bytes of the launch),
// 16-byte aligned, poisoned with 0xFF bytes at block start.
#define SELK_EXTERN_SHARED(type, name) type* name = ::selk_sim::detail::dynamic_shared<type>()
#elif defined(__CUDACC__)
#define SELK_EXTERN_SHARED(type, name)                        \
  extern __shared__ __align__(16) unsigned char selk_smem_[]; \
  type* name = reinterpret_cast<type*>(selk_smem_)
#endif
