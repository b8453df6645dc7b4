"""Bad input gets a clear Python error naming the argument, before any kernel runs."""
import pytest
import torch

import selkernels

X = torch.rand(4, 3, 2, 2)
LABELS = torch.tensor([0, 1, 2, 1])
FUSED = [
    lambda x, lab, k, **kw: selkernels.class_means(x, lab, k, **kw),
    lambda x, lab, k, **kw: selkernels.selectivity_index(x, lab, k, **kw),
]


@pytest.mark.parametrize("op", FUSED)
@pytest.mark.parametrize("x,labels,k,kwargs,exc,match", [
    (torch.rand(4), LABELS, 3, {}, ValueError, "x must have shape"),
    (torch.ones(4, 3, dtype=torch.long), LABELS, 3, {}, TypeError, "x must be float"),
    ([[1.0]], LABELS, 3, {}, TypeError, "x must be a torch.Tensor"),
    (X, LABELS[:3], 3, {}, ValueError, "labels must have shape"),
    (X, LABELS.view(2, 2), 3, {}, ValueError, "labels must have shape"),
    (X, LABELS.float(), 3, {}, TypeError, "labels must be an integer"),
    (X, LABELS.bool(), 3, {}, TypeError, "labels must be an integer"),
    (X, torch.tensor([0, 1, 3, 1]), 3, {}, ValueError, "labels must lie in"),
    (X, torch.tensor([0, -1, 2, 1]), 3, {}, ValueError, "labels must lie in"),
    (X, LABELS, 0, {}, ValueError, "num_classes must be >= 1"),
    (X, LABELS, 2.5, {}, TypeError, "num_classes must be an int"),
    (X, LABELS, 3, {"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
])
def test_rejected(op, x, labels, k, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        op(x, labels, k, **kwargs)


@pytest.mark.parametrize("eps,exc", [(-1e-3, ValueError), (float("nan"), ValueError), ("1", TypeError)])
def test_bad_eps(eps, exc):
    with pytest.raises(exc, match="eps"):
        selkernels.selectivity_index(X, LABELS, 3, eps=eps)
    with pytest.raises(exc, match="eps"):
        selkernels.selectivity_from_means(torch.rand(3, 2), torch.ones(3, dtype=torch.long), eps=eps)


def test_bad_means_and_counts():
    with pytest.raises(ValueError, match="means must be a 2-D"):
        selkernels.selectivity_from_means(torch.rand(3), torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="counts must be"):
        selkernels.selectivity_from_means(torch.rand(3, 2), torch.ones(4, dtype=torch.long))
    with pytest.raises(TypeError, match="means must be a floating"):
        selkernels.selectivity_from_means(torch.ones(3, 2, dtype=torch.long), torch.ones(3, dtype=torch.long))


def test_raw_op_refuses_out_of_range_labels():
    # Direct torch.ops calls skip the Python checks; the CPU kernel still refuses, never reads out of bounds.
    with pytest.raises(RuntimeError, match="labels must lie in"):
        torch.ops.selkernels.class_means(X, torch.tensor([0, 1, 9, 1]), 3, -100)
