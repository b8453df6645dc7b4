// nvcc_check.sh: the streaming-moments and spectral-penalty kernel bodies, instantiated as the
// launchers (csrc/cuda/covariance.cu, spectral.cu) instantiate them (the half types need torch's
// headers: the extension build compiles those).
#include "cuda/covariance.cuh"
#include "cuda/spectral.cuh"

namespace selk {
namespace cuda {
template __global__ void class_present_kernel<int64_t>(const int64_t*, const int64_t*, int64_t, int64_t*);
#define SELK_INSTANTIATE_MEAN_CENTER(scalar_t, gemm_t)                                                                 \
  template __global__ void class_batch_mean_kernel<scalar_t, gemm_t>(                                                  \
      const scalar_t*, const int64_t*, const int64_t*, const int64_t*, const int64_t*, const int64_t*, const double*,  \
      int64_t, int64_t, gemm_t*, double*, double*, double*);                                                           \
  template __global__ void class_center_rows_kernel<scalar_t, gemm_t>(const scalar_t*, const int64_t*, const int64_t*, \
                                                                      const int64_t*, const int64_t*, const gemm_t*,   \
                                                                      int64_t, int64_t, int64_t, gemm_t*);
SELK_INSTANTIATE_MEAN_CENTER(double, double)
SELK_INSTANTIATE_MEAN_CENTER(float, float)
#undef SELK_INSTANTIATE_MEAN_CENTER
template __global__ void class_gram_merge_kernel<float>(const float*, const int64_t*, const int64_t*, const int64_t*,
                                                        const double*, const double*, const double*, int64_t, int64_t,
                                                        double*);
template __global__ void class_gram_merge_kernel<double>(const double*, const int64_t*, const int64_t*, const int64_t*,
                                                         const double*, const double*, const double*, int64_t, int64_t,
                                                         double*);
template __global__ void class_merge_gram_kernel<float>(const float*, const int64_t*, const int64_t*, const double*,
                                                        const double*, const double*, int64_t, double*);
template __global__ void class_merge_gram_kernel<double>(const double*, const int64_t*, const int64_t*, const double*,
                                                         const double*, const double*, int64_t, double*);
template __global__ void class_merge_mean_count_kernel<double>(const int64_t*, const int64_t*, const int64_t*,
                                                               const double*, const double*, int64_t, int64_t, int64_t*,
                                                               double*);
template __global__ void column_sumsq_kernel<float>(const float*, int64_t, int64_t, int64_t, float, float*);
template __global__ void column_sumsq_kernel<double>(const double*, int64_t, int64_t, int64_t, double, double*);
template __global__ void chunk_sum_kernel<float>(const float*, int64_t, int64_t, float, float*);
template __global__ void chunk_sum_kernel<double>(const double*, int64_t, int64_t, double, double*);
template __global__ void spectral_loss_kernel<float>(const float*, const int64_t*, int64_t, int64_t, float, float,
                                                     float*, float*);
template __global__ void spectral_loss_kernel<double>(const double*, const int64_t*, int64_t, int64_t, double, double,
                                                      double*, double*);
}  // namespace cuda
}  // namespace selk
