// selkernels::cuda_launch_plan: the CUDA launchers' own plan (cuda/launch_plan.h is torch-free and
// CUDA-free), callable on every build so the modeled GPU cost of a step is reproducible anywhere.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/launch_plan.h"

namespace selk {
namespace {

at::Tensor cuda_launch_plan(at::IntArrayRef channels, at::IntArrayRef spatial_sizes, at::IntArrayRef dtypes,
                            at::IntArrayRef layouts, int64_t batch, int64_t num_classes, int64_t sm_count) {
  const size_t L = channels.size();
  TORCH_CHECK(spatial_sizes.size() == L && dtypes.size() == L && layouts.size() == L,
              "selkernels: cuda_launch_plan needs one channel count, spatial size, dtype and layout per layer");
  TORCH_CHECK(batch >= 0 && num_classes >= 1 && sm_count >= 1,
              "selkernels: cuda_launch_plan: bad batch, K or sm_count");
  std::vector<cuda::LayerShape> layers;
  for (size_t l = 0; l < L; ++l) {
    TORCH_CHECK(dtypes[l] == 5 || dtypes[l] == 6 || dtypes[l] == 7 || dtypes[l] == 15,
                "selkernels: cuda_launch_plan: dtype codes are 5 (half), 6 (float), 7 (double), 15 (bfloat16)");
    TORCH_CHECK(layouts[l] >= cuda::kValues && layouts[l] <= cuda::kPositionsMajor, "selkernels: bad layout code");
    layers.push_back(
        {channels[l], spatial_sizes[l], static_cast<int32_t>(dtypes[l]), static_cast<int32_t>(layouts[l])});
  }
  const std::vector<cuda::Launch> plan = cuda::plan_step(layers, batch, num_classes, sm_count);
  at::Tensor out = at::empty({static_cast<int64_t>(plan.size()), 10}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  for (const cuda::Launch& l : plan) {
    const int64_t row[10] = {l.kernel,   l.grid[0],  l.grid[1],    l.grid[2],    l.block[0],
                             l.block[1], l.block[2], l.smem_bytes, l.bytes_read, l.bytes_written};
    std::copy(row, row + 10, o);
    o += 10;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(selkernels, CompositeExplicitAutograd, m) { m.impl("cuda_launch_plan", &cuda_launch_plan); }

}  // namespace selk
