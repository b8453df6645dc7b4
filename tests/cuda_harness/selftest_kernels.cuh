#pragma once
// Toy kernels of the harness self-test. Plain CUDA (C++17): nvcc_check.sh compiles this file for
// sm_80 and sm_90 (via nvcc/selftest_kernels.cu), selftest.cpp runs it under the harness.
// The kernels named *_buggy_* / divergent_* are intentionally wrong; the self-test asserts the
// harness reports them.
#include "cuda/cuda_compat.cuh"

namespace selk_selftest {

// Sum of in[blockIdx.x * BLOCK + t] over the block (0 past n), tree reduction in static shared.
template <typename T, int BLOCK>
__global__ void block_reduce_sum(const T* __restrict__ in, T* __restrict__ out, int n) {
  __shared__ T s[BLOCK];
  const int t = threadIdx.x;
  const int i = blockIdx.x * BLOCK + t;
  s[t] = i < n ? in[i] : T(0);
  __syncthreads();
  for (int stride = BLOCK / 2; stride > 0; stride >>= 1) {
    if (t < stride) s[t] += s[t + stride];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

// Same with the barrier after the shared-memory fill deleted.
template <typename T, int BLOCK>
__global__ void block_reduce_buggy_no_fill_barrier(const T* __restrict__ in, T* __restrict__ out, int n) {
  __shared__ T s[BLOCK];
  const int t = threadIdx.x;
  const int i = blockIdx.x * BLOCK + t;
  s[t] = i < n ? in[i] : T(0);
  for (int stride = BLOCK / 2; stride > 0; stride >>= 1) {
    if (t < stride) s[t] += s[t + stride];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

// Same with the barrier inside the tree loop deleted.
template <typename T, int BLOCK>
__global__ void block_reduce_buggy_no_loop_barrier(const T* __restrict__ in, T* __restrict__ out, int n) {
  __shared__ T s[BLOCK];
  const int t = threadIdx.x;
  const int i = blockIdx.x * BLOCK + t;
  s[t] = i < n ? in[i] : T(0);
  __syncthreads();
  for (int stride = BLOCK / 2; stride > 0; stride >>= 1) {
    if (t < stride) s[t] += s[t + stride];
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

// Warp-shuffle reduction: shfl_down within warps, warp sums through shared memory, then
// shfl_xor in warp 0. blockDim.x must be a multiple of 32 and <= 1024. Grid-stride loop.
template <typename T>
__device__ __forceinline__ T warp_sum_down(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}
template <typename T>
__global__ void warp_reduce_sum(const T* __restrict__ in, T* __restrict__ out, long long n) {
  __shared__ T warp_sums[32];
  T v = T(0);
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    v += __ldg(in + i);
  v = warp_sum_down(v);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x / 32;
    T w = lane < nwarps ? warp_sums[lane] : T(0);
    for (int m = 16; m > 0; m >>= 1) w += __shfl_xor_sync(0xffffffffu, w, m);
    if (lane == 0) atomicAdd(out, w);
  }
}

// Every shuffle flavour, results per thread: out[8 * t + k].
__global__ void shuffle_semantics(int* out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % 32;
  const int v = 1000 * (int)blockIdx.x + (int)threadIdx.x;
  int* o = out + 8 * t;
  o[0] = __shfl_sync(0xffffffffu, v, 5);
  o[1] = __shfl_up_sync(0xffffffffu, v, 3);
  o[2] = __shfl_down_sync(0xffffffffu, v, 3);
  o[3] = __shfl_xor_sync(0xffffffffu, v, 6);
  o[4] = __shfl_sync(0xffffffffu, v, lane + 3, 8);
  o[5] = __shfl_down_sync(0xffffffffu, v, 2, 8);
  o[6] = (int)__ballot_sync(0xffffffffu, threadIdx.x % 3 == 0);
  o[7] = __any_sync(0xffffffffu, lane == 7) + 2 * __all_sync(0xffffffffu, lane < 31);
  __syncwarp();
}

// Multi-block atomics on every supported type.
__global__ void atomics_kernel(const int* __restrict__ keys, int n, int* hist, float* fsum, double* dsum,
                               unsigned long long* usum, unsigned* ucount, int* imax, int* imin, long long* llmax) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int k = keys[i];
  atomicAdd(&hist[k], 1);
  atomicAdd(fsum, 0.5f);
  atomicAdd(dsum, 0.25);
  atomicAdd(usum, (unsigned long long)k);
  atomicAdd(ucount, 1u);
  atomicMax(imax, k * 7 - 3);
  atomicMin(imin, k * 7 - 3);
  atomicMax(llmax, (long long)i << 33);
}

// Reverses each block's slice through dynamic shared memory (blockDim.x elements).
template <typename T>
__global__ void reverse_dynamic_smem(const T* __restrict__ in, T* __restrict__ out, int n) {
  SELK_EXTERN_SHARED(T, buf);
  const int t = threadIdx.x;
  const int i = blockIdx.x * blockDim.x + t;
  buf[t] = i < n ? in[i] : T(-1);
  __syncthreads();
  const int j = blockIdx.x * blockDim.x + (blockDim.x - 1 - t);
  if (j < n) out[j] = buf[t];
}

// Index mapping of 3-D grids/blocks: out[global linear id] = packed indices.
__global__ void index_mapping(unsigned* out) {
  const unsigned bx = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned tx = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned nthr = blockDim.x * blockDim.y * blockDim.z;
  out[bx * nthr + tx] = (threadIdx.x) | (threadIdx.y << 8) | (threadIdx.z << 16) | (blockIdx.x << 20) |
                        (blockIdx.y << 24) | (blockIdx.z << 28);
}

// Reads static and dynamic shared memory nobody wrote in this block (must read poison), then
// writes it: out[2 * global thread + {0, 1}].
__global__ void read_unwritten_shared(float* out) {
  __shared__ float s[64];
  SELK_EXTERN_SHARED(float, d);
  const int t = threadIdx.x;
  const float a = s[t];  // each thread touches only its own slot
  const float b = d[t];
  out[2 * (blockIdx.x * blockDim.x + t) + 0] = a;
  out[2 * (blockIdx.x * blockDim.x + t) + 1] = b;
  s[t] = 1.0f;
  d[t] = 2.0f;
}

// ticket[global thread] = order in which the threads ran (schedule probe).
__global__ void ticket_order(int* counter, int* ticket) {
  ticket[blockIdx.x * blockDim.x + threadIdx.x] = atomicAdd(counter, 1);
}

// __syncthreads_count / _and / _or.
__global__ void barrier_reductions(int* out) {
  const int t = threadIdx.x;
  const int c = __syncthreads_count(t % 4 == 0);
  const int a = __syncthreads_and(t < 1000);
  const int o = __syncthreads_or(t == 17);
  const int a2 = __syncthreads_and(t != 5);
  if (t == 0) {
    out[0] = c;
    out[1] = a;
    out[2] = o;
    out[3] = a2;
  }
}

// ----- intentionally broken kernels -----------------------------------------------------------
// Barrier reached only by threads < 16.
__global__ void divergent_syncthreads(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = 1.0f;
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// Two different barriers in the two branches.
__global__ void divergent_syncthreads_sites(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Lanes >= 16 return before the warp shuffle.
__global__ void divergent_shuffle(float* out) {
  float v = (float)threadIdx.x;
  if (threadIdx.x % 32 >= 16) return;
  v += __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// Half the warp goes to a block barrier while the other half shuffles: deadlock.
__global__ void shuffle_vs_barrier(float* out) {
  float v = (float)threadIdx.x;
  if (threadIdx.x % 32 < 16) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = v;
}

// A half-warp mask: valid CUDA, outside what the harness models (it must say so).
__global__ void partial_mask_shuffle(float* out) {
  float v = (float)threadIdx.x;
  if (threadIdx.x < 16) v = __shfl_down_sync(0x0000ffffu, v, 1);
  out[threadIdx.x] = v;
}

// Writes one element past the dynamic shared memory the launch provided.
__global__ void dynamic_smem_overflow(float* out, int nelem) {
  SELK_EXTERN_SHARED(float, buf);
  if (threadIdx.x == 0) buf[nelem] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = buf[0];
}

// Indexes a static __shared__ array out of bounds (runtime index).
__global__ void static_smem_overflow(float* out, int idx) {
  __shared__ float s[32];
  s[threadIdx.x] = 0.0f;
  __syncthreads();
  if (threadIdx.x == 0) s[idx] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

// Warp-synchronous reduction without __syncwarp (the pre-Volta idiom; a race on Volta+).
__global__ void warp_buggy_no_syncwarp(const float* __restrict__ in, float* __restrict__ out) {
  __shared__ float s[32];
  const int t = threadIdx.x;
  s[t] = in[t];
  __syncwarp();
  for (int off = 16; off > 0; off >>= 1) {
    if (t < off) s[t] += s[t + off];
  }
  if (t == 0) out[0] = s[0];
}

// Deep recursion to overflow a fiber stack.
__device__ __attribute__((noinline)) int burn_stack(int depth, volatile int* sink) {
  volatile char pad[4096];
  pad[0] = (char)depth;
  pad[4095] = (char)depth;
  if (depth <= 0) return pad[0];
  const int r = burn_stack(depth - 1, sink) + pad[4095];
  *sink = r;
  return r;
}
__global__ void stack_hog(int* out, int depth) { out[threadIdx.x] = burn_stack(depth, out + blockDim.x); }

}  // namespace selk_selftest
