#pragma once
// Runtime dispatch to the widest vector unit without building the wheel for one CPU: a function
// marked SELK_TARGET_CLONES is compiled once per instruction set (GCC on x86-64) and the loader
// picks the widest the machine has; elsewhere it is compiled once.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SELK_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SELK_TARGET_CLONES
#endif
