"""accumulate_class_sums (op class_sums_accumulate_): float64 per-class sums of unit means, in place,
against numpy in float64; opcheck; bad arguments refused before the state changes."""

import numpy as np
import pytest
import torch
from conftest import make_batch

import selkernels
from selkernels.ops import accumulate_class_sums

NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=NO_GPU)]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def numpy_class_sums(x, labels, k, ignore_index=-100):
    """Independent fp64 oracle: per-sample unit means, then a loop over classes in numpy."""
    a = x.double().numpy().reshape(x.shape[0], x.shape[1], -1).mean(-1)
    lab = labels.numpy()
    return np.stack([a[lab == cls].sum(0) if (lab == cls).any() else np.zeros(x.shape[1]) for cls in range(k)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spatial", [(), (4,), (2, 2), (7, 7), (3, 5)])
def test_batches_add_up_to_numpy(device, dtype, spatial):
    sums = torch.full((6, 9), 0.5, dtype=torch.float64, device=device)
    expected = np.full((6, 9), 0.5)
    for seed in range(3):
        x, labels = make_batch(n=25, c=9, spatial=spatial, k=5, dtype=dtype, relu=False, seed=seed)  # class 5 absent
        accumulate_class_sums(x.to(device), labels.to(device), sums, 6)
        expected += numpy_class_sums(x, labels, 6)
    np.testing.assert_allclose(sums.cpu().numpy(), expected, rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.equal(sums[5].cpu(), torch.full((9,), 0.5, dtype=torch.float64))  # absent class untouched


def test_layer_list_equals_each_layer_and_ignore_index():
    g = torch.Generator().manual_seed(3)
    xs = [
        torch.randn(30, 4, 5, 5, generator=g),
        torch.randn(30, 7, 3, 3, generator=g, dtype=torch.float64).to(memory_format=torch.channels_last),
        torch.randn(30, 6, generator=g).bfloat16(),
    ]
    labels = torch.randint(-1, 4, (30,), generator=g)
    fused = [torch.zeros(4, x.shape[1], dtype=torch.float64) for x in xs]
    accumulate_class_sums(xs, selkernels.segment_labels(labels, 4, ignore_index=-1), fused)
    keep = labels >= 0
    for x, s in zip(xs, fused):
        one = torch.zeros_like(s)
        accumulate_class_sums(x, labels, one, 4, ignore_index=-1)
        assert torch.equal(one, s)
        np.testing.assert_allclose(s.numpy(), numpy_class_sums(x[keep], labels[keep], 4), rtol=1e-2, atol=1e-2)


def test_unit_dim_last_equals_transposed():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(12, 5, 8, generator=g, dtype=torch.float64)  # [N, tokens, D]
    labels = torch.randint(0, 3, (12,), generator=g)
    tokens = torch.zeros(3, 8, dtype=torch.float64)
    accumulate_class_sums(x, labels, tokens, 3, unit_dim=-1)
    np.testing.assert_allclose(tokens.numpy(), numpy_class_sums(x.movedim(-1, 1), labels, 3), rtol=1e-12, atol=1e-12)


def test_empty_batch_changes_nothing():
    sums = torch.ones(3, 4, dtype=torch.float64)
    accumulate_class_sums(torch.rand(0, 4, 2), torch.zeros(0, dtype=torch.int64), sums, 3)
    assert torch.equal(sums, torch.ones(3, 4, dtype=torch.float64))


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: torch.zeros(3, 4, dtype=torch.float32), "float64"),
        (lambda: torch.zeros(3, 5, dtype=torch.float64), r"\[3, 4\]"),
        (lambda: torch.zeros(4, 3, dtype=torch.float64).t(), "non-contiguous"),
        (lambda: [torch.zeros(3, 4, dtype=torch.float64)], "tensor for a tensor x"),
    ],
)
def test_bad_sums_refused(bad, match):
    x, labels = make_batch(n=8, c=4, spatial=(2,), k=3)
    with pytest.raises((TypeError, ValueError), match=match):
        accumulate_class_sums(x, labels, bad(), 3)


def test_bad_labels_refused_before_the_state_changes():
    x, labels = make_batch(n=8, c=4, spatial=(2,), k=3)
    labels[3] = 7
    sums = torch.ones(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="labels"):
        accumulate_class_sums(x, labels, sums, 3)
    assert torch.equal(sums, torch.ones(3, 4, dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, labels = make_batch(n=20, c=5, spatial=(3, 2), k=4, dtype=torch.float32)
    seg = selkernels.segment_labels(labels.to(device), 4)
    y = torch.randn(20, 3, dtype=torch.float64, device=device)
    sums = [torch.zeros(4, c, dtype=torch.float64, device=device) for c in (5, 3)]
    x = x.to(device)
    torch.library.opcheck(torch.ops.selkernels.class_sums_accumulate_.default, ([x, y], *seg, sums))
