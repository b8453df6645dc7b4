// __shfl_*_sync takes only scalar types (int, unsigned, long, long long, float, double, ...).
#include "cuda/cuda_compat.cuh"
struct Pair {
  float a, b;
};
__global__ void must_reject_kernel(Pair* p) {
  Pair v = p[threadIdx.x];
  v = __shfl_down_sync(0xffffffffu, v, 1);
  p[threadIdx.x] = v;
}
