#pragma once
// Row means of an [rows, S] block for NCHW activations with AVX2, eight rows at a time.
//
// Why not a plain vectorized loop per row: for the short rows of late network stages (S = 16..64)
// the per-row horizontal reduction dominates (the compiler spills the vector and adds its lanes one
// by one). Here eight rows accumulate in eight registers and one transpose-and-add network reduces
// them together, so every load and add is a full vector op. Each row's result depends only on that
// row (a fixed order per lane), so chunking rows across threads never changes a bit. Long rows are
// summed pairwise (PairwiseVector): the error grows as log S, not S.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define SELK_HAVE_AVX2_ROW_MEANS 1
#define SELK_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace selk {
namespace avx2 {

SELK_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
SELK_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
SELK_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The last S % 8 elements of a row, zero-padded (never reads past the row).
template <typename T>
SELK_AVX2 inline __m256 load_tail(const T* p, int64_t n) {
  T buf[8];
  std::memset(static_cast<void*>(buf), 0, sizeof(buf));
  std::memcpy(static_cast<void*>(buf), p, n * sizeof(T));
  return load8(buf);
}

// Lane j of the result = sum of the lanes of v[j].
SELK_AVX2 inline __m256 transpose_sum8(const __m256* v) {
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]);
  const __m256 t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]);
  const __m256 t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1);  // rows 0-3: low halves in lanes 0-3, high in 4-7
  const __m256 u1 = _mm256_hadd_ps(t2, t3);  // rows 4-7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

SELK_AVX2 inline float horizontal_sum(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

// Pairwise sum of vectors (each the sum of 32 consecutive values), as a binary counter: level j
// holds the sum of 2^j vectors. A lane then adds O(log S) partial sums, never a long serial chain:
// with a large common offset (values near 1e6) a chain of 32 additions already drifts by ~4 ULP,
// since every addend is rounded to the coarse spacing of the growing sum.
struct PairwiseVector {
  __m256 level[64];
  int64_t count = 0;

  SELK_AVX2 inline void push(__m256 v) {
    int j = 0;
    for (int64_t b = count++; b & 1; b >>= 1, ++j) v = _mm256_add_ps(level[j], v);
    level[j] = v;
  }
  SELK_AVX2 inline __m256 total() const {
    __m256 sum = _mm256_setzero_ps();
    for (int j = 0; j < 64 && (count >> j) != 0; ++j)
      if ((count >> j) & 1) sum = _mm256_add_ps(level[j], sum);
    return sum;
  }
};

// Rows of 64 and more: one sequential stream per row (eight interleaved streams that end every few
// cache lines defeat the hardware prefetcher), 32 values at a time summed as a tree, the groups
// combined pairwise.
template <typename T>
SELK_AVX2 void long_row_means(const T* p, int64_t rows, int64_t S, float scale, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = p + r * S;
    PairwiseVector sum;
    int64_t i = 0;
    for (; i + 32 <= S; i += 32)
      sum.push(_mm256_add_ps(_mm256_add_ps(load8(row + i), load8(row + i + 8)),
                             _mm256_add_ps(load8(row + i + 16), load8(row + i + 24))));
    __m256 rest = _mm256_setzero_ps();
    for (; i + 8 <= S; i += 8) rest = _mm256_add_ps(rest, load8(row + i));
    if (i < S) rest = _mm256_add_ps(rest, load_tail(row + i, S - i));
    sum.push(rest);
    out[r] = horizontal_sum(sum.total()) * scale;
  }
}

// out[r] = scale * sum of row r, rows r < count of the [rows, S] block starting at p.
template <typename T>
SELK_AVX2 void row_means(const T* p, int64_t rows, int64_t S, float scale, float* out) {
  if (S >= 64) return long_row_means(p, rows, S, scale, out);
  const int64_t full = S / 8 * 8;
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t r0 = 0; r0 < rows; r0 += 8) {
    const int64_t valid = rows - r0 < 8 ? rows - r0 : 8;
    // A partial group repeats its last row so every lane runs the same code.
    const T* row[8];
    for (int j = 0; j < 8; ++j) row[j] = p + (r0 + (j < valid ? j : valid - 1)) * S;
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t i = 0; i < full; i += 8)
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_add_ps(acc[j], load8(row[j] + i));
    if (full < S)
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_add_ps(acc[j], load_tail(row[j] + full, S - full));
    const __m256 means = _mm256_mul_ps(transpose_sum8(acc), vscale);
    if (valid == 8) {
      _mm256_storeu_ps(out + r0, means);
    } else {
      float tmp[8];
      _mm256_storeu_ps(tmp, means);
      std::memcpy(out + r0, tmp, valid * sizeof(float));
    }
  }
}

inline bool supported() {
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
}

}  // namespace avx2
}  // namespace selk

#undef SELK_AVX2
#endif
