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
#include <type_traits>

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

// The last n (1..7) elements of a row of at least 8, as the upper n lanes of the row's last eight
// values with the lower 8 - n lanes zeroed: stays inside the row, no per-row copy.
template <typename T>
SELK_AVX2 inline __m256 load_tail(const T* row_end, int64_t n) {
  static const int32_t ramp[8] = {0, 1, 2, 3, 4, 5, 6, 7};
  const __m256i keep = _mm256_cmpgt_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ramp)),
                                          _mm256_set1_epi32(static_cast<int32_t>(7 - n)));
  return _mm256_and_ps(load8(row_end - 8), _mm256_castsi256_ps(keep));
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

// Rows longer than 64: one sequential stream per row (eight interleaved streams that end every few
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
    if (i < S) rest = _mm256_add_ps(rest, load_tail(row + S, S - i));
    sum.push(rest);
    out[r] = horizontal_sum(sum.total()) * scale;
  }
}

// Rows of four (2x2 positions): two rows per vector, eight rows reduced by two rounds of pairwise
// adds.
template <typename T>
SELK_AVX2 void quad_row_means(const T* p, int64_t rows, float scale, float* out) {
  const __m256 vscale = _mm256_set1_ps(scale);
  int64_t r0 = 0;
  for (; r0 + 8 <= rows; r0 += 8) {
    const T* b = p + r0 * 4;
    // hadd pairs within 128-bit halves: lanes hold rows (0 2 4 6 | 1 3 5 7) after two rounds
    const __m256 h01 = _mm256_hadd_ps(load8(b), load8(b + 8));        // r0 r0 r2 r2 | r1 r1 r3 r3
    const __m256 h23 = _mm256_hadd_ps(load8(b + 16), load8(b + 24));  // r4 r4 r6 r6 | r5 r5 r7 r7
    const __m256 sums = _mm256_hadd_ps(h01, h23);                     // r0 r2 r4 r6 | r1 r3 r5 r7
    const __m256 ordered = _mm256_permutevar8x32_ps(sums, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_ps(out + r0, _mm256_mul_ps(ordered, vscale));
  }
  for (; r0 < rows; ++r0) {
    const T* row = p + r0 * 4;
    out[r0] = ((static_cast<float>(row[0]) + static_cast<float>(row[1])) +
               (static_cast<float>(row[2]) + static_cast<float>(row[3]))) *
              scale;
  }
}

// Rows shorter than 8 other than 4 (rare shapes): a scalar loop.
template <typename T>
SELK_AVX2 void tiny_row_means(const T* p, int64_t rows, int64_t S, float scale, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    float sum = 0.f;
    for (int64_t i = 0; i < S; ++i) sum += static_cast<float>(p[r * S + i]);
    out[r] = sum * scale;
  }
}

// Rows of 8 to 64 elements (64 included: whose groups of eight rows are one contiguous 2 KB block
// the prefetcher follows): eight rows at a time. `S` is an int64_t or a std::integral_constant, so
// the common late-stage sizes get loops with a compile-time trip count (unrolled, no tail code).
template <typename T, typename Size>
SELK_AVX2 inline void grouped_row_means(const T* p, int64_t rows, Size S, float scale, float* out) {
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
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_add_ps(acc[j], load_tail(row[j] + S, S - full));
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

// out[r] = scale * sum of row r, rows r < count of the [rows, S] block starting at p.
template <typename T>
SELK_AVX2 void row_means(const T* p, int64_t rows, int64_t S, float scale, float* out) {
  switch (S) {
    case 4:  // 2x2
      return quad_row_means(p, rows, scale, out);
    case 16:  // 4x4
      return grouped_row_means(p, rows, std::integral_constant<int64_t, 16>{}, scale, out);
    case 49:  // 7x7
      return grouped_row_means(p, rows, std::integral_constant<int64_t, 49>{}, scale, out);
    case 64:  // 8x8
      return grouped_row_means(p, rows, std::integral_constant<int64_t, 64>{}, scale, out);
    default:
      if (S > 64) return long_row_means(p, rows, S, scale, out);
      if (S < 8) return tiny_row_means(p, rows, S, scale, out);
      return grouped_row_means(p, rows, S, scale, out);
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
