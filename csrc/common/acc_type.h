#pragma once
// Accumulation dtype of the kernels, shared by the CPU kernels and the CUDA launchers (host code;
// kernel bodies take it as a template parameter): float64 stays float64, every other floating
// type (float32, float16, bfloat16) accumulates in float32.
#include <c10/core/ScalarType.h>

namespace selk {

inline c10::ScalarType acc_type_of(c10::ScalarType t) { return t == c10::kDouble ? c10::kDouble : c10::kFloat; }

}  // namespace selk
