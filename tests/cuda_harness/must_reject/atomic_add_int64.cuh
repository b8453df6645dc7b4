// nvcc has no atomicAdd for int64_t (= long on Linux); only unsigned long long.
#include "cuda/cuda_compat.cuh"
__global__ void must_reject_kernel(int64_t* p) { atomicAdd(p, (int64_t)1); }
