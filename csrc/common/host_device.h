#pragma once
// Torch-free equivalent of C10_HOST_DEVICE, so kernel headers compile with nvcc, with g++ inside
// the extension, and with g++ in the CUDA-semantics test harness (which defines __host__/__device__).
#if defined(__CUDACC__) || defined(SELK_CUDA_SIM)
#define SELK_HOST_DEVICE __host__ __device__
#else
#define SELK_HOST_DEVICE
#endif
