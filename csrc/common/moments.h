#pragma once
// Torch-free scalar math of the pairwise (Chan, Golub & LeVeque 1979) merge of running moments,
// shared by the CPU kernels, the CUDA kernel bodies and the CUDA-semantics test harness.
//
// State a = (n_a, mean_a, M2_a), batch b = (n_b, mean_b, M2_b), M2 the sum of centred outer products:
//   delta = mean_b - mean_a
//   mean  = mean_a + delta * n_b / n
//   M2    = M2_a + M2_b + delta delta^T * n_a n_b / n
// Exact in exact arithmetic for any split; a side with count 0 contributes nothing.
#include <cstdint>

#include "common/host_device.h"

namespace selk {

struct ChanWeights {
  double mean_weight;  // n_b / n: step of the mean towards mean_b
  double m2_coef;      // n_a n_b / n: weight of delta delta^T
};

SELK_HOST_DEVICE inline ChanWeights chan_weights(int64_t n_a, int64_t n_b) {
  const int64_t n = n_a + n_b;
  if (n == 0) return {0.0, 0.0};
  const double inv = 1.0 / static_cast<double>(n);
  return {static_cast<double>(n_b) * inv, static_cast<double>(n_a) * static_cast<double>(n_b) * inv};
}

// One entry of the merged M2. The batch's Gram matrix s_ij is taken about a shift c (the batch
// mean rounded to the GEMM precision), d = mean_b - c, so M2_b = s - n_b d d^T exactly. The
// products d_i d_j and delta_i delta_j are formed first, so swapping (i, j) gives the same bits:
// entries (i, j) and (j, i) of a symmetric state stay equal.
// No FMA contraction (the device intrinsics below; host callers compile it with fp-contract=off):
// whether a compiler fuses a multiply-add could differ between the two call sites of a mirrored pair.
SELK_HOST_DEVICE inline double chan_m2_entry(double m2_a, double s_ij, double n_b, double d_i, double d_j,
                                             double m2_coef, double delta_i, double delta_j) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(__dadd_rn(m2_a, __dsub_rn(s_ij, __dmul_rn(n_b, __dmul_rn(d_i, d_j)))),
                   __dmul_rn(m2_coef, __dmul_rn(delta_i, delta_j)));
#else
  return m2_a + (s_ij - n_b * (d_i * d_j)) + m2_coef * (delta_i * delta_j);
#endif
}

}  // namespace selk
