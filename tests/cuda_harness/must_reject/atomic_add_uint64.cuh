// uint64_t is unsigned long on Linux, not unsigned long long: no atomicAdd overload.
#include <cstdint>
#include "cuda/cuda_compat.cuh"
__global__ void must_reject_kernel(uint64_t* p) { atomicAdd(p, (uint64_t)1); }
