// nvcc_check.sh: the layer kernels of csrc/cuda/selectivity.cuh, instantiated for every dtype.
#include "cuda/selectivity.cuh"

namespace selk {
namespace cuda {
template __global__ void unit_means_kernel<double, double>(MeansTable<double, double>);
template __global__ void unit_means_kernel<float, float>(MeansTable<float, float>);
template __global__ void unit_means_kernel<f16_t, float>(MeansTable<f16_t, float>);
template __global__ void unit_means_kernel<bf16_t, float>(MeansTable<bf16_t, float>);
template __global__ void class_si_kernel<float>(ClassTable<float>, const int64_t*, const int64_t*, const int64_t*,
                                                const int64_t*, int64_t, float);
template __global__ void class_si_kernel<double>(ClassTable<double>, const int64_t*, const int64_t*, const int64_t*,
                                                 const int64_t*, int64_t, double);
template __global__ void unit_grad_kernel<double, double>(GradTable<double, double>, const int64_t*, const int64_t*,
                                                          int64_t);
template __global__ void unit_grad_kernel<float, float>(GradTable<float, float>, const int64_t*, const int64_t*,
                                                        int64_t);
template __global__ void unit_grad_kernel<float, f16_t>(GradTable<float, f16_t>, const int64_t*, const int64_t*,
                                                        int64_t);
template __global__ void unit_grad_kernel<float, bf16_t>(GradTable<float, bf16_t>, const int64_t*, const int64_t*,
                                                         int64_t);
}  // namespace cuda
}  // namespace selk
