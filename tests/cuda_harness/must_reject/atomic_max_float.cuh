// nvcc has no atomicMax for float.
#include "cuda/cuda_compat.cuh"
__global__ void must_reject_kernel(float* p) { atomicMax(p, 1.0f); }
