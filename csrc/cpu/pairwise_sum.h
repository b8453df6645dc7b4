#pragma once
// Blocked pairwise summation for the CPU reductions of the selectivity family (the scheme of torch's
// cascade sums). A run of values is added directly in blocks, and the block sums are combined
// pairwise, so the fp32 rounding error of a sum of n values grows as block + log2(n / block) rather
// than n, and no accumulator ever holds more than one block (fp32 ones summed into one accumulator
// stop growing at 2^24).
//
// The combination is a binary counter over consecutive blocks (level j holds the sum of 2^j blocks),
// written as plain loops so that it inlines into the vectorized, per-ISA clones of its callers.
#include <algorithm>
#include <cstdint>
#include <vector>

namespace selk {

// Values per directly-added block of a row sum, spread over the vector lanes (4 to 16 additions per
// lane): with a large common offset, every addition to a lane is rounded to the spacing of its
// growing sum, so long serial chains drift (32 additions of values near 1e6: ~4 ULP).
constexpr int64_t kRowSumBlock = 64;
// Rows per directly-added block of a column-wise sum of rows (channels_last positions, or the
// samples of one class).
constexpr int64_t kColumnSumBlock = 16;

// Scalar sums of consecutive blocks, combined pairwise.
template <typename acc_t>
struct PairwiseScalar {
  acc_t level[64];
  int64_t blocks = 0;

  inline __attribute__((always_inline)) void push(acc_t v) {
    int j = 0;
    for (int64_t b = blocks++; b & 1; b >>= 1, ++j) v = level[j] + v;
    level[j] = v;
  }
  // Remaining levels from the newest (smallest) to the oldest (largest).
  inline __attribute__((always_inline)) acc_t total() const {
    acc_t sum = acc_t(0);
    bool first = true;
    for (int j = 0; j < 64 && (blocks >> j) != 0; ++j) {
      if ((blocks >> j) & 1) {
        sum = first ? level[j] : level[j] + sum;
        first = false;
      }
    }
    return sum;
  }
};

// Levels needed by PairwiseRows for n blocks: one per bit of n, plus the block being filled.
inline int64_t pairwise_levels(int64_t blocks) {
  int64_t levels = 1;
  while ((int64_t(1) << (levels - 1)) < blocks && levels < 63) ++levels;
  return levels + 1;
}

// Sums of `len` columns over consecutive blocks of rows, combined pairwise. Usage: fill `current()`
// with one block's sum (overwrite), `push()`, repeat; `total(out)` writes the sum of all blocks.
// Buffers are swapped, never copied.
template <typename acc_t>
class PairwiseRows {
 public:
  PairwiseRows(int64_t len, int64_t max_blocks)
      : len_(len), storage_(static_cast<size_t>(len * pairwise_levels(max_blocks))) {
    const int64_t levels = pairwise_levels(max_blocks);
    for (int64_t j = 0; j < levels; ++j) buffers_.push_back(storage_.data() + j * len);
    level_.assign(static_cast<size_t>(levels), nullptr);
    free_ = buffers_;
  }
  void reset() {
    blocks_ = 0;
    std::fill(level_.begin(), level_.end(), nullptr);
    free_ = buffers_;
  }
  acc_t* current() { return free_.back(); }

  inline __attribute__((always_inline)) void push() {
    acc_t* cur = free_.back();
    free_.pop_back();
    int64_t j = 0;
    for (int64_t b = blocks_++; b & 1; b >>= 1, ++j) {
      acc_t* __restrict__ c = cur;
      const acc_t* __restrict__ l = level_[j];
      for (int64_t i = 0; i < len_; ++i) c[i] = l[i] + c[i];
      free_.push_back(level_[j]);
      level_[j] = nullptr;
    }
    level_[j] = cur;
  }

  inline __attribute__((always_inline)) void total(acc_t* __restrict__ out) const {
    bool first = true;
    for (int64_t j = 0; j < static_cast<int64_t>(level_.size()); ++j) {
      const acc_t* __restrict__ l = level_[j];
      if (l == nullptr) continue;
      if (first) {
        std::copy(l, l + len_, out);
      } else {
        for (int64_t i = 0; i < len_; ++i) out[i] = l[i] + out[i];
      }
      first = false;
    }
    if (first) std::fill(out, out + len_, acc_t(0));
  }

 private:
  int64_t len_, blocks_ = 0;
  std::vector<acc_t> storage_;
  std::vector<acc_t*> buffers_, level_, free_;
};

}  // namespace selk
