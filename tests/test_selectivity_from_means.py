import numpy as np
import pytest
import torch

import selkernels
from selkernels import reference


def test_matches_reference_with_absent_classes(device):
    means = torch.randn(6, 5, dtype=torch.float64).abs().to(device)
    counts = torch.tensor([3, 0, 2, 5, 0, 1], device=device)
    si = selkernels.selectivity_from_means(means, counts)
    assert si.device == means.device
    present = means[counts > 0].cpu().numpy()
    top = present.max(0)
    rest = (present.sum(0) - top) / (present.shape[0] - 1)
    np.testing.assert_allclose(si.cpu().numpy(), (top - rest) / (top + rest + 1e-7), rtol=1e-12)
    torch.testing.assert_close(si, reference.selectivity_from_means_reference(means, counts))


def test_gradcheck_and_ties(device):
    means = (torch.rand(5, 4, dtype=torch.float64) + 0.5).to(device)
    counts = torch.tensor([1, 2, 0, 4, 1], device=device)
    means.requires_grad_()
    assert torch.autograd.gradcheck(lambda m: selkernels.selectivity_from_means(m, counts), (means,))
    with torch.no_grad():
        means[1, 0] = means[3, 0] = 3.0  # a tie for the maximum: gradient goes to the first, as torch.max
    (g,) = torch.autograd.grad(selkernels.selectivity_from_means(means, counts).sum(), means)
    (g_ref,) = torch.autograd.grad(reference.selectivity_from_means_reference(means, counts).sum(), means)
    torch.testing.assert_close(g, g_ref)
    assert torch.all(g[2] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_dtype(device, dtype):
    means = torch.rand(3, 2).to(dtype).to(device)
    si = selkernels.selectivity_from_means(means, torch.ones(3, dtype=torch.long, device=device))
    assert si.dtype == torch.float32


def test_one_class_present(device):
    means = torch.rand(4, 3).to(device).requires_grad_()
    si = selkernels.selectivity_from_means(means, torch.tensor([0, 7, 0, 0], device=device))
    assert torch.all(si == 0)
    (g,) = torch.autograd.grad(si.sum(), means)
    assert torch.all(g == 0)


def test_opcheck(device):
    means = torch.rand(4, 3).to(device).requires_grad_()
    counts = torch.tensor([1, 0, 2, 3], device=device)
    torch.library.opcheck(torch.ops.selkernels.selectivity_from_means, (means, counts, 1e-7))
    grad_si = torch.randn(3).to(device)
    torch.library.opcheck(torch.ops.selkernels.selectivity_from_means_backward, (grad_si, means.detach(), counts, 1e-7))
