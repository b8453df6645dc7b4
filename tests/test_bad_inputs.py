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
@pytest.mark.parametrize(
    "x,labels,k,kwargs,exc,match",
    [
        (torch.rand(4), LABELS, 3, {}, ValueError, "x must have shape"),
        (torch.ones(4, 3, dtype=torch.long), LABELS, 3, {}, TypeError, "x must be float"),
        ([[1.0]], LABELS, 3, {}, TypeError, r"x\[0\] must be a torch.Tensor"),
        ("x", LABELS, 3, {}, TypeError, "x must be a torch.Tensor or a list"),
        (X, LABELS[:3], 3, {}, ValueError, "labels must have shape"),
        (X, LABELS.view(2, 2), 3, {}, ValueError, "labels must have shape"),
        (X, LABELS.float(), 3, {}, TypeError, "labels must be an integer"),
        (X, LABELS.bool(), 3, {}, TypeError, "labels must be an integer"),
        (X, torch.tensor([0, 1, 3, 1]), 3, {}, ValueError, "labels must lie in"),
        (X, torch.tensor([0, -1, 2, 1]), 3, {}, ValueError, "labels must lie in"),
        (X, LABELS, 0, {}, ValueError, "num_classes must be >= 1"),
        (X, LABELS, 2.5, {}, TypeError, "num_classes must be an int"),
        (X, LABELS, 3, {"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
        (X, LABELS, 3, {"unit_dim": 2}, ValueError, "unit_dim must be 1"),
        ([X, X[:3]], LABELS, 3, {}, ValueError, "same N"),
        ([], LABELS, 3, {}, ValueError, "at least one tensor"),
        ([X, "a"], LABELS, 3, {}, TypeError, r"x\[1\] must be a torch.Tensor"),
        (X, LABELS, None, {}, TypeError, "num_classes is required"),
    ],
)
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
    # Direct torch.ops calls skip the Python checks; the CPU kernel still refuses with a ValueError
    # (TORCH_CHECK_VALUE), never reads out of bounds.
    with pytest.raises(ValueError, match=r"labels must lie in .*labels\[2\] = 9"):
        torch.ops.selkernels.segment_labels(torch.tensor([0, 1, 9, 1]), 3, -100)


def test_segment_labels_names_the_first_bad_label():
    with pytest.raises(ValueError, match=r"labels\[2\] = 9"):
        selkernels.segment_labels(torch.tensor([0, 1, 9, -4]), 3)


def test_segmentation_must_match_x():
    seg = selkernels.segment_labels(LABELS, 3)
    with pytest.raises(ValueError, match="N = 4 samples, x has 5"):
        selkernels.selectivity_index(torch.rand(5, 3), seg)
    with pytest.raises(ValueError, match="does not match the segmentation"):
        selkernels.class_means(X, seg, 4)


def test_check_labels_on_a_segmentation_with_invalid_labels():
    # What a CUDA segmentation of bad labels holds (CPU raises at once): results are NaN, and
    # check_labels raises naming the value.
    labels = torch.tensor([0, 1, 7, 1])
    seg = selkernels.segment_labels(torch.tensor([0, 1, -100, 1]), 3)
    seg = seg._replace(invalid=torch.tensor(1))
    assert torch.isnan(selkernels.selectivity_index(X, seg)).all()
    assert torch.isnan(selkernels.class_means(X, seg)[0]).all()
    with pytest.raises(ValueError, match=r"labels\[2\] = 7"):
        selkernels.check_labels(seg, labels)
    with pytest.raises(ValueError, match="1 such labels"):
        selkernels.check_labels(seg)
    selkernels.check_labels(selkernels.segment_labels(LABELS, 3))  # valid: no error
