import numpy as np
import pytest
import torch

import selkernels
from selkernels import reference


def test_matches_reference_with_absent_classes():
    means = torch.randn(6, 5, dtype=torch.float64).abs()
    counts = torch.tensor([3, 0, 2, 5, 0, 1])
    si = selkernels.selectivity_from_means(means, counts)
    present = means[counts > 0].numpy()
    top = present.max(0)
    rest = (present.sum(0) - top) / (present.shape[0] - 1)
    np.testing.assert_allclose(si.numpy(), (top - rest) / (top + rest + 1e-7), rtol=1e-12)
    torch.testing.assert_close(si, reference.selectivity_from_means_reference(means, counts))


def test_gradcheck_and_ties():
    means = torch.rand(5, 4, dtype=torch.float64) + 0.5
    counts = torch.tensor([1, 2, 0, 4, 1])
    means.requires_grad_()
    assert torch.autograd.gradcheck(lambda m: selkernels.selectivity_from_means(m, counts), (means,))
    with torch.no_grad():
        means[1, 0] = means[3, 0] = 3.0  # a tie for the maximum: gradient goes to the first, as torch.max
    (g,) = torch.autograd.grad(selkernels.selectivity_from_means(means, counts).sum(), means)
    (g_ref,) = torch.autograd.grad(reference.selectivity_from_means_reference(means, counts).sum(), means)
    torch.testing.assert_close(g, g_ref)
    assert torch.all(g[2] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_dtype(dtype):
    si = selkernels.selectivity_from_means(torch.rand(3, 2).to(dtype), torch.ones(3, dtype=torch.long))
    assert si.dtype == torch.float32


def test_one_class_present():
    means = torch.rand(4, 3, requires_grad=True)
    si = selkernels.selectivity_from_means(means, torch.tensor([0, 7, 0, 0]))
    assert torch.all(si == 0)
    (g,) = torch.autograd.grad(si.sum(), means)
    assert torch.all(g == 0)


def test_opcheck():
    means = torch.rand(4, 3, requires_grad=True)
    counts = torch.tensor([1, 0, 2, 3])
    torch.library.opcheck(torch.ops.selkernels.selectivity_from_means, (means, counts, 1e-7))
    torch.library.opcheck(
        torch.ops.selkernels.selectivity_from_means_backward, (torch.randn(3), means.detach(), counts, 1e-7)
    )
