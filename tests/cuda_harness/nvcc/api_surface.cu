// nvcc_check.sh: the harness's intrinsic surface, compiled as real CUDA.
#include "api_surface.cuh"
