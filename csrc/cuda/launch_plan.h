#pragma once
// The launch plan of the selectivity CUDA kernels, torch-free and CUDA-free: the launch
// geometry constants, the grid-size functions the launchers in selectivity.cu size their grids
// with, and plan_step(), which lists for given layer shapes, K and dtypes every kernel a training
// step launches (forward + backward), with its grid, block, shared memory and bytes moved. The CPU
// build exposes plan_step as selkernels::cuda_launch_plan, so the modeled GPU cost of a step is
// reproducible (and tested) without a GPU. No kernel in the plan syncs with the host.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/host_device.h"

namespace selk {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kMaxLayersPerLaunch = 16;  // layer tables travel as kernel parameters (< 4 KiB)
constexpr int kSegmentThreads = 1024;    // segment_labels_kernel: one block
constexpr int kMaxWarps = kSegmentThreads / kWarpSize;
constexpr int64_t kSegmentSmemBytes = 48 * 1024;
constexpr int kMeansThreads = 256;  // unit_means_kernel
constexpr int kClRows = kMeansThreads / kWarpSize;
constexpr int kClassRows = 8;      // class_si_kernel: block (32, kClassRows)
constexpr int kGradThreads = 256;  // unit_grad_kernel
constexpr int kUnitThreads = 128;  // si_kernel / si_backward_kernel (selectivity_from_means)

// How phase 1 reads a layer.
enum MeansLayout : int32_t {
  kValues = 0,          // S == 1: a = x, any strides
  kRows = 1,            // contiguous NCHW: rows of S elements, scalar loads
  kRowsVec = 2,         // contiguous NCHW, rows 16-byte aligned: 16-byte loads
  kPositionsMajor = 3,  // memory [N, S, C] (channels_last, or [N, *positions, D] with units last)
};

// Bucket counts (K classes + the ignored/invalid bucket) live in shared memory while they fit.
SELK_HOST_DEVICE inline bool segment_counts_in_smem(int64_t K) {
  return (K + 1 + kMaxWarps) * static_cast<int64_t>(sizeof(int32_t)) <= kSegmentSmemBytes;
}
SELK_HOST_DEVICE inline int64_t segment_smem_bytes(int64_t K) {
  return (kMaxWarps + (segment_counts_in_smem(K) ? K + 1 : 0)) * static_cast<int64_t>(sizeof(int32_t));
}

// Threads per row: enough to cover a row of S elements in one sweep of `vec`-wide loads, a power of
// two up to a warp, so short rows (S = 4, 16, 49) still keep every lane busy and coalesced.
SELK_HOST_DEVICE inline int row_group_size(int64_t S, int vec) {
  const int64_t chunks = (S + vec - 1) / vec;
  int g = 1;
  while (g < kWarpSize && g < chunks) g *= 2;
  return g;
}

// Enough blocks to fill the GPU several times over; grid-stride loops cover the rest.
inline int64_t capped_blocks(int64_t needed, int64_t sm_count) {
  return std::max<int64_t>(1, std::min(needed, sm_count * 32));
}

// Elements per 16-byte vector of a storage type of `bytes` bytes.
inline int vec_len(int64_t bytes) { return static_cast<int>(16 / bytes); }

// Grid (x) of one layer in unit_means_kernel.
inline int64_t means_layer_blocks(int64_t N, int64_t C, int64_t S, int32_t layout, int group, int64_t sm_count) {
  const int64_t warps_per_block = kMeansThreads / kWarpSize;
  switch (layout) {
    case kValues:
      return capped_blocks((N * C + kMeansThreads - 1) / kMeansThreads, sm_count);
    case kPositionsMajor:
      return capped_blocks(N * ((C + kWarpSize - 1) / kWarpSize), sm_count);
    default: {
      const int64_t rows_per_warp = kWarpSize / group;
      const int64_t warps = (N * C + rows_per_warp - 1) / rows_per_warp;
      return capped_blocks((warps + warps_per_block - 1) / warps_per_block, sm_count);
    }
  }
}

inline int64_t class_tiles(int64_t C) { return (C + kWarpSize - 1) / kWarpSize; }

inline int64_t grad_layer_blocks(int64_t N, int64_t C, int64_t sm_count) {
  return capped_blocks((N * C + kGradThreads - 1) / kGradThreads, sm_count);
}

// Layers of one launch: same key (storage dtype, or acc type for class_si), at most
// kMaxLayersPerLaunch, in call order. Layers with C == 0 are skipped.
inline std::vector<std::vector<int64_t>> launch_groups(const std::vector<int32_t>& keys,
                                                       const std::vector<int64_t>& channels) {
  std::vector<std::vector<int64_t>> groups;
  std::vector<int32_t> seen;
  for (size_t i = 0; i < keys.size(); ++i) {
    if (channels[i] == 0 || std::find(seen.begin(), seen.end(), keys[i]) != seen.end()) continue;
    seen.push_back(keys[i]);
    std::vector<int64_t> group;
    for (size_t j = i; j < keys.size(); ++j) {
      if (keys[j] != keys[i] || channels[j] == 0) continue;
      group.push_back(static_cast<int64_t>(j));
      if (static_cast<int>(group.size()) == kMaxLayersPerLaunch) {
        groups.push_back(group);
        group.clear();
      }
    }
    if (!group.empty()) groups.push_back(group);
  }
  return groups;
}

// ScalarType codes (as c10): 5 half, 6 float, 7 double, 15 bfloat16.
inline int64_t storage_bytes(int32_t dtype) { return dtype == 7 ? 8 : dtype == 6 ? 4 : 2; }
inline int32_t acc_dtype(int32_t dtype) { return dtype == 7 ? 7 : 6; }

struct LayerShape {
  int64_t C, S;
  int32_t dtype;   // ScalarType code of x
  int32_t layout;  // MeansLayout
};

// The layout and lanes per row the launcher picks for a contiguous layer (rows aligned when
// S * bytes is a multiple of 16 and x is 16-byte aligned, as the caching allocator gives).
inline int32_t default_layout(int64_t S, int32_t dtype) {
  if (S == 1) return kValues;
  return (S * storage_bytes(dtype)) % 16 == 0 ? kRowsVec : kRows;
}
inline int row_group_of(int64_t S, int32_t layout, int32_t dtype) {
  return row_group_size(S, layout == kRowsVec ? vec_len(storage_bytes(dtype)) : 1);
}

enum KernelId : int32_t {
  kSegmentLabelsKernel = 0,
  kUnitMeansKernel = 1,
  kClassSiKernel = 2,
  kUnitGradKernel = 3,
};

struct Launch {
  int32_t kernel;  // KernelId
  int64_t grid[3], block[3];
  int64_t smem_bytes, bytes_read, bytes_written;
};

// Every launch of one training step with the regularizer on: segment the labels, the fused forward
// of selectivity_index over all layers, and its backward. K classes, N samples.
inline std::vector<Launch> plan_step(const std::vector<LayerShape>& layers, int64_t N, int64_t K, int64_t sm_count) {
  std::vector<Launch> plan;
  const int64_t L = static_cast<int64_t>(layers.size());
  plan.push_back({kSegmentLabelsKernel,
                  {1, 1, 1},
                  {kSegmentThreads, 1, 1},
                  segment_smem_bytes(K),
                  N * 8 + N * 4 + N * 8,
                  N * 8 + N * 4 + N * 8 + K * 8 + (K + 1) * 8 + 8});
  std::vector<int32_t> storage_keys, acc_keys;
  std::vector<int64_t> channels;
  for (const LayerShape& l : layers) {
    storage_keys.push_back(l.dtype);
    acc_keys.push_back(acc_dtype(l.dtype));
    channels.push_back(l.C);
  }
  (void)L;
  for (const auto& group : launch_groups(storage_keys, channels)) {
    int64_t grid = 1, read = 0, written = 0;
    for (int64_t i : group) {
      const LayerShape& l = layers[i];
      grid = std::max(grid, means_layer_blocks(N, l.C, l.S, l.layout, row_group_of(l.S, l.layout, l.dtype), sm_count));
      read += N * l.C * l.S * storage_bytes(l.dtype);
      written += N * l.C * storage_bytes(acc_dtype(l.dtype));
    }
    const int64_t acc_bytes = storage_bytes(acc_dtype(layers[group[0]].dtype));
    plan.push_back({kUnitMeansKernel,
                    {grid, static_cast<int64_t>(group.size()), 1},
                    {kMeansThreads, 1, 1},
                    kMeansThreads * acc_bytes,
                    read,
                    written});
  }
  for (const auto& group : launch_groups(acc_keys, channels)) {
    int64_t grid = 1, read = 0, written = 0;
    const int64_t A = storage_bytes(acc_keys[group[0]]);
    for (int64_t i : group) {
      const int64_t C = layers[i].C;
      grid = std::max(grid, class_tiles(C));
      // Unit means once, the sorted order and offsets once per 32-channel tile (L2-resident).
      read += N * C * A + class_tiles(C) * (N * 8 + (K + 1) * 8) + 8;
      written += C * (5 * A + 8);  // si, coeffs [4, C], argmax (no [K, C] means)
    }
    plan.push_back({kClassSiKernel,
                    {grid, static_cast<int64_t>(group.size()), 1},
                    {kWarpSize, kClassRows, 1},
                    kClassRows * kWarpSize * (2 * A + 16),
                    read,
                    written});
  }
  for (const auto& group : launch_groups(storage_keys, channels)) {
    int64_t grid = 1, read = 0, written = 0;
    const int64_t A = storage_bytes(acc_dtype(layers[group[0]].dtype));
    for (int64_t i : group) {
      const LayerShape& l = layers[i];
      grid = std::max(grid, grad_layer_blocks(N, l.C, sm_count));
      read += N * 8 + K * 8 + l.C * (3 * A + 8);  // labels, counts, grad_si + coeffs + argmax
      written += N * l.C * storage_bytes(l.dtype);
    }
    plan.push_back(
        {kUnitGradKernel, {grid, static_cast<int64_t>(group.size()), 1}, {kGradThreads, 1, 1}, 0, read, written});
  }
  return plan;
}

}  // namespace cuda
}  // namespace selk
