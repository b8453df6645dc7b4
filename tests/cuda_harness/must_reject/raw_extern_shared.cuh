// Dynamic shared memory must go through SELK_EXTERN_SHARED (nvcc accepts the raw form, the
// harness must not, so kernels stay testable): this file is expected to fail under g++ only.
// NVCC_ACCEPTS
#include "cuda/cuda_compat.cuh"
__global__ void must_reject_kernel(float* p) {
  extern __shared__ float buf[];
  buf[threadIdx.x] = 1.0f;
  p[threadIdx.x] = buf[0];
}
