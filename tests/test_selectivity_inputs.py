"""Arguments of the selectivity ops at their edges: a clear Python error naming the argument, or a
correct result, before any kernel runs or memory is allocated."""

import numpy as np
import pytest
import torch

import selkernels
from selkernels import ops

X = torch.rand(8, 4, 3, 3)
LABELS = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1])
FUSED = {
    "class_means": lambda x, lab, k, **kw: selkernels.class_means(x, lab, k, **kw),
    "selectivity_index": lambda x, lab, k, **kw: selkernels.selectivity_index(x, lab, k, **kw),
}


@pytest.mark.parametrize("op", FUSED.values(), ids=FUSED.keys())
@pytest.mark.parametrize("k", [2**31 + 5, 2**63, 2**64 + 1])
def test_num_classes_beyond_int32_rejected_by_name(op, k):
    with pytest.raises(ValueError, match=r"num_classes must be >= 1 and < 2\*\*31"):
        op(X, LABELS, k)


@pytest.mark.parametrize("op", FUSED.values(), ids=FUSED.keys())
def test_num_classes_that_cannot_fit_in_memory_rejected_before_allocating(op, monkeypatch):
    # On this machine's real memory: K = 2**31 - 1 classes of C = 64 units need ~1 TiB.
    with pytest.raises(ValueError, match=r"num_classes=2147483647 needs about .* GiB .* C=64 units"):
        op(torch.rand(2, 64, 3), torch.tensor([0, 1]), 2**31 - 1)
    # The boundary, on a pretend 1 MiB device (so nothing large is allocated): per class
    # 3 * 8 bytes of segmentation + 2 * C * 4 bytes of fp32 means and their gradient.
    monkeypatch.setattr(ops, "_CLASS_MEMORY_CHECK_BYTES", 0)
    monkeypatch.setattr(ops, "_device_memory_bytes", lambda device: 2**20)
    c = 16
    k_max = 2**20 // (3 * 8 + 2 * c * 4)
    x = torch.rand(2, c, 3)
    with pytest.raises(ValueError, match=f"num_classes={k_max + 1} needs about"):
        op(x, torch.tensor([0, 1]), k_max + 1)
    out = op(x, torch.tensor([0, 1]), k_max)
    assert (out[0] if isinstance(out, tuple) else out).shape[-1] == c


@pytest.mark.parametrize("op", FUSED.values(), ids=FUSED.keys())
@pytest.mark.parametrize("ignore_index", [2**63, -(2**63) - 1, 2**70])
def test_ignore_index_beyond_int64_rejected_by_name(op, ignore_index):
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        op(X, LABELS, 3, ignore_index=ignore_index)


def test_ignore_index_at_int64_limits_accepted():
    ref_means, ref_counts = selkernels.class_means(X, LABELS, 3)
    for ignore_index in (2**63 - 1, -(2**63)):
        means, counts = selkernels.class_means(X, LABELS, 3, ignore_index=ignore_index)
        torch.testing.assert_close(means, ref_means, rtol=0, atol=0)
        assert torch.equal(counts, ref_counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_float_counts_rejected(dtype):
    means = torch.rand(3, 4)
    with pytest.raises(TypeError, match="counts must be an integer tensor"):
        selkernels.selectivity_from_means(means, torch.tensor([0.5, 1.0, 2.0], dtype=dtype))
    with pytest.raises(TypeError, match="counts must be an integer tensor"):
        selkernels.selectivity_from_means(means, torch.tensor([True, True, False]))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32])
def test_integer_counts_of_any_width_accepted(dtype):
    means = torch.tensor([[1.0, 4.0], [3.0, 2.0], [9.0, 9.0]], dtype=torch.float64)
    si = selkernels.selectivity_from_means(means, torch.tensor([2, 5, 0]).to(dtype))
    # Class 2 is absent: per unit, mu_max vs the one other present class (paper definition).
    expected = [(3 - 1) / (3 + 1 + 1e-7), (4 - 2) / (4 + 2 + 1e-7)]
    np.testing.assert_allclose(si.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("op", FUSED.values(), ids=FUSED.keys())
@pytest.mark.parametrize("shape", [(8, 4, 0, 3), (8, 4, 0), (8, 4, 3, 0, 2)])
def test_zero_spatial_positions_rejected(op, shape):
    with pytest.raises(ValueError, match=r"x has no spatial positions .* 0/0"):
        op(torch.rand(shape), LABELS, 3)


@pytest.mark.parametrize("shape", [(0, 4, 0, 3), (8, 0, 0, 3), (0, 4, 3, 3), (8, 0, 3)])
def test_empty_batch_or_no_units_with_zero_positions_is_an_empty_result(shape):
    labels = LABELS[: shape[0]]
    means, counts = selkernels.class_means(torch.rand(shape), labels, 3)
    assert means.shape == (3, shape[1])
    assert torch.equal(counts, torch.bincount(labels, minlength=3))
    assert not means.isnan().any()


def _meta_matches_cpu(op):
    x = X.clone().requires_grad_(True)
    xm = X.to("meta").requires_grad_(True)
    out = op(x, LABELS, 3)
    out_m = op(xm, LABELS.to("meta"), 3)
    out, out_m = (out, out_m) if isinstance(out, tuple) else ((out,), (out_m,))
    for a, b in zip(out, out_m):
        assert b.device.type == "meta" and b.shape == a.shape and b.dtype == a.dtype
    (grad_m,) = torch.autograd.grad(out_m[0].sum(), xm)
    assert grad_m.device.type == "meta" and grad_m.shape == X.shape


@pytest.mark.parametrize("op", FUSED.values(), ids=FUSED.keys())
def test_meta_device_gives_shapes_forward_and_backward(op):
    _meta_matches_cpu(op)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_unsigned_labels_on_meta(dtype):
    si = selkernels.selectivity_index(X.to("meta"), LABELS.to(dtype).to("meta"), 3)
    assert si.device.type == "meta" and si.shape == (4,)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int16, torch.int32])
def test_labels_of_every_integer_width_match_int64(dtype):
    ref_means, ref_counts = selkernels.class_means(X, LABELS, 3)
    means, counts = selkernels.class_means(X, LABELS.to(dtype), 3)
    assert torch.equal(means, ref_means) and torch.equal(counts, ref_counts)
    si = selkernels.selectivity_index(X, LABELS.to(dtype), 3)
    assert torch.equal(si, selkernels.selectivity_index(X, LABELS, 3))


def test_segment_labels_refuses_num_classes_that_cannot_fit(monkeypatch):
    monkeypatch.setattr(ops, "_CLASS_MEMORY_CHECK_BYTES", 0)
    monkeypatch.setattr(ops, "_device_memory_bytes", lambda device: 2**20)
    with pytest.raises(ValueError, match=f"num_classes={2**20 // 24 + 1} needs about"):
        selkernels.segment_labels(LABELS, 2**20 // 24 + 1)
    assert selkernels.segment_labels(LABELS, 2**20 // 24).counts.shape == (2**20 // 24,)


def test_zero_positions_in_one_layer_of_a_list_named():
    with pytest.raises(ValueError, match=r"x\[1\] has no spatial positions"):
        selkernels.selectivity_index([X, torch.rand(8, 2, 0)], LABELS, 3)
    with pytest.raises(ValueError, match=r"x has no spatial positions"):
        selkernels.class_means(torch.rand(8, 0, 5), LABELS, 3, unit_dim=-1)  # [N, positions, D]
