#pragma once
// Include this first in every CUDA kernel header (csrc/cuda/*.cuh). Torch-free.
//
// The same kernel source compiles in two worlds:
//   * nvcc (__CUDACC__): the real thing.
//   * the CPU CUDA-semantics simulator (tools/cuda_sim/cuda_sim.h), which the harness build
//     injects with `-include` and `-DSELK_CUDA_SIM`: it supplies threadIdx, __syncthreads,
//     shuffles, atomics, ... and runs each CUDA thread as a fiber. See tools/cuda_sim/README.md.
//     Nothing here refers to it, so production code never depends on the test tooling.
//
// Kernel-writing rules that keep both worlds honest:
//   * dynamic shared memory only through SELK_EXTERN_SHARED (a raw `extern __shared__` does not
//     compile under the simulator);
//   * static `__shared__ T x[N];` is fine (the simulator re-poisons it at every block start);
//   * no `#ifdef __CUDA_ARCH__` device paths the simulator would not see (it does not define it).
#include "common/host_device.h"

// The simulator defines its own SELK_EXTERN_SHARED before this header is read.
#if !defined(SELK_EXTERN_SHARED)
#define SELK_EXTERN_SHARED(type, name)                        \
  extern __shared__ __align__(16) unsigned char selk_smem_[]; \
  type* name = reinterpret_cast<type*>(selk_smem_)
#endif
