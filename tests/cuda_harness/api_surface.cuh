#pragma once
// Every device-side name the harness provides, used with the signatures CUDA has. nvcc_check.sh
// compiles this with nvcc (sm_80, sm_90) and with g++ under the harness, so the two overload
// sets cannot silently drift apart. Add a use here when cuda_sim.h gains an intrinsic.
#include "cuda/cuda_compat.cuh"

namespace selk_api_surface {

__device__ __forceinline__ float helper(float x) { return rsqrtf(x) + __fdividef(x, 2.0f); }

__global__ void __launch_bounds__(256)
    api_surface_kernel(int* __restrict__ i, unsigned* __restrict__ u, unsigned long long* __restrict__ ull,
                       long long* __restrict__ ll, float* __restrict__ f, double* __restrict__ d,
                       const float* __restrict__ cf, const long* __restrict__ cl) {
  __shared__ float s[256];
  SELK_EXTERN_SHARED(double, dyn);
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  s[t % 256] = __ldg(cf + t) + (float)__ldg(cl + t);
  dyn[t] = (double)b;
  __syncthreads();
  const int cnt = __syncthreads_count(t % 2 == 0) + __syncthreads_and(1) + __syncthreads_or(0);
  __threadfence();
  __threadfence_block();
  __threadfence_system();

  atomicAdd(i, 1);
  atomicAdd(u, 1u);
  atomicAdd(ull, 1ull);
  atomicAdd(f, 1.0f);
  atomicAdd(d, 1.0);
  atomicSub(i, 1);
  atomicSub(u, 1u);
  atomicMax(i, cnt);
  atomicMin(i, cnt);
  atomicMax(u, 3u);
  atomicMin(u, 3u);
  atomicMax(ull, 3ull);
  atomicMin(ull, 3ull);
  atomicMax(ll, 3ll);
  atomicMin(ll, 3ll);
  atomicExch(i, 1);
  atomicExch(u, 1u);
  atomicExch(ull, 1ull);
  atomicExch(f, 1.0f);
  atomicCAS(i, 1, 2);
  atomicCAS(u, 1u, 2u);
  atomicCAS(ull, 1ull, 2ull);
  atomicAnd(i, 1);
  atomicOr(u, 1u);
  atomicXor(ull, 1ull);

  const unsigned nthr = blockDim.x * blockDim.y * blockDim.z;
  float fv = s[(t + 1) % nthr] + helper(2.0f);
  double dv = dyn[t];
  int iv = (int)t;
  unsigned uv = t;
  long lv = (long)t;
  long long llv = (long long)t;
  unsigned long long ullv = t;
  fv += __shfl_sync(0xffffffffu, fv, 0);
  dv += __shfl_up_sync(0xffffffffu, dv, 1u);
  iv += __shfl_down_sync(0xffffffffu, iv, 1u, 16);
  uv += __shfl_xor_sync(0xffffffffu, uv, 1);
  lv += __shfl_sync(0xffffffffu, lv, 3, 8);
  llv += __shfl_down_sync(0xffffffffu, llv, 2);
  ullv += __shfl_xor_sync(0xffffffffu, ullv, 4, 32);
  const unsigned ballot = __ballot_sync(0xffffffffu, iv > 3);
  const int any = __any_sync(0xffffffffu, iv > 3), all = __all_sync(0xffffffffu, iv > 3);
  __syncwarp();
  __syncwarp(0xffffffffu);

  unsigned misc = __popc(ballot) + __popcll(ullv) + __ffs(iv) + __ffsll(llv) + __clz(iv) + __clzll(llv) + any + all;
  misc +=
      (unsigned)__float_as_int(fv) + __float_as_uint(fv) + (unsigned)__int_as_float(iv) + (unsigned)__uint_as_float(uv);
  misc += (unsigned)__double_as_longlong(dv) + (unsigned)(__longlong_as_double(llv) != 0.0) + warpSize;
  misc += min(iv, 3) + max(iv, 3) + min(uv, 3u) + max(uv, 3u) + (unsigned)min(lv, 3l) + (unsigned)max(lv, 3l);
  misc += (unsigned)min(llv, 3ll) + (unsigned)max(llv, 3ll) + (unsigned)min(ullv, 3ull) + (unsigned)max(ullv, 3ull);
  fv += min(fv, 1.0f) + max(fv, 1.0f);
  dv += min(dv, 1.0) + max(dv, 1.0);
  const unsigned o = 1 + b * nthr + t;
  i[o] = (int)(misc & 0x7fffffffu);
  f[o] = fv;
  d[o] = dv;
}

}  // namespace selk_api_surface
