// nvcc_check.sh: csrc/common/selectivity.h must compile as device code.
#include "selectivity_kernels.cuh"

namespace selk_harness_check {
template __global__ void selectivity_per_unit<float, float>(const float*, const int64_t*, int64_t, int64_t, float,
                                                            float*, float*);
template __global__ void selectivity_per_unit<double, float>(const float*, const int64_t*, int64_t, int64_t, double,
                                                             double*, double*);
}  // namespace selk_harness_check
