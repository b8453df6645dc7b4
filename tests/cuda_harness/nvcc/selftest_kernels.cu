// nvcc_check.sh: the self-test kernels must be real CUDA (sm_80 / sm_90).
#include "selftest_kernels.cuh"

namespace selk_selftest {
template __global__ void block_reduce_sum<float, 256>(const float*, float*, int);
template __global__ void block_reduce_sum<double, 256>(const double*, double*, int);
template __global__ void block_reduce_buggy_no_fill_barrier<float, 256>(const float*, float*, int);
template __global__ void block_reduce_buggy_no_loop_barrier<float, 256>(const float*, float*, int);
template __global__ void warp_reduce_sum<float>(const float*, float*, long long);
template __global__ void warp_reduce_sum<double>(const double*, double*, long long);
template __global__ void reverse_dynamic_smem<float>(const float*, float*, int);
template __global__ void reverse_dynamic_smem<double>(const double*, double*, int);
template __global__ void reverse_dynamic_smem<int>(const int*, int*, int);
}  // namespace selk_selftest
