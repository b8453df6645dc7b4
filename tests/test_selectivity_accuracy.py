"""fp32 accumulation of the selectivity ops: error growing as log S and log N (pairwise sums), as in
torch's own fp32 reductions, compared with fp64 numpy on the same fp32 inputs."""

import numpy as np
import pytest
import torch

import selkernels


def max_rel_err(values: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.max(np.abs(values.double().numpy() - ref) / np.abs(ref)))


@pytest.mark.parametrize("S", [1 << 29 | 3, (1 << 30) + 3, (1 << 31) - 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_huge_broadcast_spatial_size(S, dtype):
    # ones expanded (stride 0): no memory; fp32 lane accumulators once saturated at 2^24 per lane.
    x = torch.ones((), dtype=dtype).expand(2, 1, S)
    means, counts = selkernels.class_means(x, torch.tensor([0, 1]), 2)
    assert means.tolist() == [[1.0], [1.0]] and counts.tolist() == [1, 1]
    si = selkernels.selectivity_index(x, torch.tensor([0, 1]), 2)
    assert si.tolist() == [0.0]


def test_huge_broadcast_spatial_size_gradient():
    S = (1 << 31) - 1
    base = torch.full((2, 3, 1), 2.0, requires_grad=True)
    x = base.expand(2, 3, S)
    means, _ = selkernels.class_means(x, torch.tensor([0, 1]), 2)
    assert torch.equal(means, torch.full((2, 3), 2.0))
    (grad,) = torch.autograd.grad(means.sum(), base)
    # d mean / d base = S * (1 / S) per element: one per sample and unit.
    torch.testing.assert_close(grad, torch.ones(2, 3, 1))


def test_partly_broadcast_positions_match_materialised():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(6, 5, 1, 7, generator=g)
    x = base.expand(6, 5, 9, 7)  # stride 0 on one spatial dim
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    means, counts = selkernels.class_means(x, labels, 3)
    ref_means, ref_counts = selkernels.class_means(x.contiguous(), labels, 3)
    torch.testing.assert_close(means, ref_means, rtol=1e-6, atol=0)
    assert torch.equal(counts, ref_counts)


def _offset_rows(s: int, offset: float, rows: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (offset + torch.rand(2, rows // 2, s, generator=g, dtype=torch.float64)).float()


@pytest.mark.parametrize("S", [64, 1024, 1 << 16, 1 << 20])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_spatial_mean_at_offset_1e6_near_torch(S, layout):
    x = _offset_rows(S, 1e6)
    ref = x.double().numpy().mean(-1)
    torch_err = max_rel_err(x.mean(-1), ref)
    xin = x if layout == "contiguous" else x.unsqueeze(-1).contiguous(memory_format=torch.channels_last)
    means, _ = selkernels.class_means(xin, torch.tensor([0, 1]), 2)
    ours = max_rel_err(means, ref)
    # Half an fp32 ULP of the result is the floor (the result itself is rounded to fp32).
    floor = np.spacing(np.float32(1e6)) / 2 / 1e6
    assert ours <= max(2 * torch_err, floor), (ours, torch_err)
    # A plain serial fp32 sum drifts by ~S * 2^-24 relative here (several ULP already at S = 1024).
    naive = np.add.accumulate(x.numpy(), axis=-1, dtype=np.float32)[..., -1] / np.float32(S)
    if S >= 1024:
        assert ours < max_rel_err(torch.from_numpy(naive), ref) / 4


@pytest.mark.parametrize("n,offset", [(1 << 20, 1e3), (1 << 16, 1e6)])
def test_class_sums_over_many_samples_near_torch(n, offset):
    g = torch.Generator().manual_seed(1)
    x = (offset + torch.rand(n, 4, generator=g, dtype=torch.float64)).float()
    labels = torch.zeros(n, dtype=torch.long)
    labels[::7] = 1
    a, lab = x.double().numpy(), labels.numpy()
    ref = np.stack([a[lab == k].mean(0) for k in range(2)])
    torch_err = max_rel_err(torch.stack([x[labels == k].mean(0) for k in range(2)]), ref)
    means, counts = selkernels.class_means(x, labels, 2)
    ours = max_rel_err(means, ref)
    assert counts.tolist() == [int((lab == 0).sum()), int((lab == 1).sum())]
    assert ours <= 2 * torch_err, (ours, torch_err)
    naive = torch.zeros(2, 4).index_add(0, labels, x) / counts[:, None]  # serial fp32 sums
    assert ours < max_rel_err(naive, ref) / 100
    # The fused SI op runs the same reduction.
    si = selkernels.selectivity_index(x.view(n, 4, 1), labels, 2)
    assert torch.equal(si, selkernels.selectivity_from_means(means, counts))


def test_results_independent_of_thread_count():
    x = _offset_rows(5000, 1e6, rows=64)
    labels = torch.arange(2)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = selkernels.class_means(x, labels, 2)[0]
        torch.set_num_threads(max(2, old))
        many = selkernels.class_means(x, labels, 2)[0]
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, many)
