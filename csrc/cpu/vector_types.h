#pragma once
// GCC vector types for the CPU kernels compiled once per instruction set (target_clones.h): each
// clone gets its own instructions for them, and a running value of such a type stays in a
// register where an array would stay on the stack.

typedef float selk_v8f __attribute__((vector_size(32)));
typedef float selk_v16f __attribute__((vector_size(64)));
typedef double selk_v8d __attribute__((vector_size(64)));

namespace selk {

// The 64-byte vector of acc_t: 16 floats or 8 doubles.
template <typename acc_t>
struct Vector64;
template <>
struct Vector64<float> {
  using type = selk_v16f;
};
template <>
struct Vector64<double> {
  using type = selk_v8d;
};

}  // namespace selk
