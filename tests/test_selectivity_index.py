import numpy as np
import pytest
import torch
from conftest import make_batch

import selkernels
from selkernels import reference

# Tolerances vs the fp64 oracle; fp16/bf16 inputs are rounded before accumulation in fp32.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def numpy_selectivity(x, labels, k, eps=1e-7):
    """Independent fp64 definition (Leavitt & Morcos): loops over units and present classes."""
    a = x.double().numpy().reshape(x.shape[0], x.shape[1], -1).mean(-1)
    lab = labels.numpy()
    present = [cls for cls in range(k) if np.any(lab == cls)]
    si = np.zeros(x.shape[1])
    if len(present) < 2:
        return si
    for c in range(x.shape[1]):
        mus = np.array([a[lab == cls, c].mean() for cls in present])
        top = mus.max()
        rest = (mus.sum() - top) / (len(mus) - 1)
        si[c] = (top - rest) / (top + rest + eps)
    return si


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spatial,k", [((), 3), ((4, 4), 5), ((2, 3), 40)])
def test_matches_numpy(device, dtype, spatial, k):
    x, labels = make_batch(n=60, c=7, spatial=spatial, k=k, dtype=dtype, device=device)
    si = selkernels.selectivity_index(x, labels, k)
    assert si.device == x.device
    expected = numpy_selectivity(x.cpu(), labels.cpu(), k)
    np.testing.assert_allclose(si.double().cpu().numpy(), expected, rtol=TOL[dtype], atol=TOL[dtype])


def test_matches_paper_script_forward_and_gradient_fp64(device):
    x, labels = make_batch(n=40, c=6, spatial=(3, 3), k=4, device=device)
    x.requires_grad_()
    si = selkernels.selectivity_index(x, labels, 4)
    si_paper = reference.paper_class_selectivity(x, labels)
    torch.testing.assert_close(si, si_paper, rtol=1e-10, atol=1e-12)
    w = torch.randn(6, dtype=torch.float64).to(device)
    (g,) = torch.autograd.grad((si * w).sum(), x)
    (g_paper,) = torch.autograd.grad((si_paper * w).sum(), x)
    torch.testing.assert_close(g, g_paper, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_gradient(device, dtype):
    x, labels = make_batch(n=32, c=5, spatial=(4, 4), k=4, device=device)
    x_low = x.to(dtype).requires_grad_()
    x_ref = x_low.detach().double().requires_grad_()
    (g,) = torch.autograd.grad(selkernels.selectivity_index(x_low, labels, 4).sum(), x_low)
    (g_ref,) = torch.autograd.grad(reference.selectivity_index_reference(x_ref, labels, 4).sum(), x_ref)
    assert g.dtype == dtype
    torch.testing.assert_close(g.double(), g_ref, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 1e-2)


def test_layouts(device):
    x, labels = make_batch(n=18, c=6, spatial=(5, 5), k=4, dtype=torch.float32, device=device)
    ref = selkernels.selectivity_index(x, labels, 4)
    for xv in (x.to(memory_format=torch.channels_last), x.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)):
        xv = xv.clone().requires_grad_()
        torch.testing.assert_close(selkernels.selectivity_index(xv, labels, 4), ref, rtol=1e-6, atol=1e-6)
        (g,) = torch.autograd.grad(selkernels.selectivity_index(xv, labels, 4).sum(), xv)
        assert g.shape == xv.shape


def test_fewer_than_two_classes_gives_zero_and_zero_gradient(device):
    x, _ = make_batch(n=8, c=4, spatial=(2, 2), k=3, device=device)
    x.requires_grad_()
    labels = torch.full((8,), 2, device=device)
    si = selkernels.selectivity_index(x, labels, 3)
    assert torch.all(si == 0)
    (g,) = torch.autograd.grad(si.sum(), x)
    assert torch.all(g == 0)
    # The published script divides by zero here.
    assert torch.isnan(reference.paper_class_selectivity(x, labels)).all()


def test_zero_activations(device):
    x = torch.zeros(6, 3, 2, 2, device=device)
    labels = torch.tensor([0, 1, 2, 0, 1, 2], device=device)
    assert torch.all(selkernels.selectivity_index(x, labels, 3) == 0)
    assert torch.isnan(selkernels.selectivity_index(x, labels, 3, eps=0.0)).all()


def test_absent_classes_are_skipped(device):
    x, labels = make_batch(n=30, c=4, spatial=(2,), k=3, device=device)
    # Same batch, labels renamed into a larger label space with gaps: SI must not change.
    remapped = torch.tensor([1, 4, 9], device=device)[labels]
    torch.testing.assert_close(
        selkernels.selectivity_index(x, remapped, 12), selkernels.selectivity_index(x, labels, 3)
    )


def test_ignore_index(device):
    x, labels = make_batch(n=20, c=4, spatial=(3,), k=3, device=device)
    labels_ign = labels.clone()
    labels_ign[::4] = -100
    keep = labels_ign != -100
    x.requires_grad_()
    si = selkernels.selectivity_index(x, labels_ign, 3)
    torch.testing.assert_close(si, selkernels.selectivity_index(x[keep], labels[keep], 3))
    (g,) = torch.autograd.grad(si.sum(), x)
    assert torch.all(g[~keep] == 0)


def test_gradcheck_fp64(device):
    x, labels = make_batch(n=14, c=3, spatial=(2, 3), k=4, device=device)
    labels[3] = -100
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: selkernels.selectivity_index(t, labels, 4), (x,))


def test_fused_equals_composition(device):
    x, labels = make_batch(n=50, c=8, spatial=(3, 3), k=6, dtype=torch.float32, device=device)
    means, counts = selkernels.class_means(x, labels, 6)
    torch.testing.assert_close(
        selkernels.selectivity_index(x, labels, 6), selkernels.selectivity_from_means(means, counts)
    )


def test_opcheck(device):
    x, labels = make_batch(n=12, c=4, spatial=(3, 2), k=3, dtype=torch.float32, device=device)
    x.requires_grad_()
    y = torch.randn(12, 2, 5, dtype=torch.float64).to(device).movedim(-1, 1).requires_grad_()
    ops = torch.ops.selkernels
    seg = selkernels.segment_labels(labels, 3)
    torch.library.opcheck(ops.selectivity_index_segmented, ([x, y], *seg, 1e-7))
    si, coeffs, argmax = ops.selectivity_index_segmented([x.detach(), y.detach()], *seg, 1e-7)
    grad_si = [torch.randn(4).to(device), torch.randn(5, dtype=torch.float64).to(device)]
    grad_means_given = [torch.randn(3, 4).to(device), torch.randn(3, 5, dtype=torch.float64).to(device)]
    unit_coeffs = [c[:2] for c in coeffs]  # dSI/dmu_max, dSI/dmu_rest / (P - 1), as the backward passes them
    for grad_means in ([], grad_means_given):
        torch.library.opcheck(
            ops.segmented_unit_grad,
            (grad_si, unit_coeffs, list(argmax), grad_means, seg.labels, seg.counts, [4, 5], [6, 2], [6, 7]),
        )


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_dynamic(backend):
    def loss(t, lab):
        means, _ = selkernels.class_means(t, lab, 4)
        return -selkernels.selectivity_index(t.relu(), lab, 4).mean() + means.square().sum()

    compiled = torch.compile(loss, fullgraph=True, dynamic=True, backend=backend)
    for n in (16, 24):  # a second batch size reuses the dynamic graph
        x, labels = make_batch(n=n, c=4, spatial=(3, 3), k=4, dtype=torch.float32)
        x.requires_grad_()
        out = compiled(x, labels)
        (g,) = torch.autograd.grad(out, x)
        out_eager = loss(x, labels)
        (g_eager,) = torch.autograd.grad(out_eager, x)
        torch.testing.assert_close(out, out_eager)
        torch.testing.assert_close(g, g_eager)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("n,c,s,k", [(300, 40, 6, 9), (512, 64, 8, 100)])
def test_deterministic_bitwise(device, dtype, layout, n, c, s, k):
    x, labels = make_batch(n=n, c=c, spatial=(s, s), k=k, dtype=dtype, device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    runs = []
    for _ in range(3):
        si = selkernels.selectivity_index(x, labels, k)
        (g,) = torch.autograd.grad(si.sum(), x)
        runs.append((si, g.contiguous()))
    for si, g in runs[1:]:
        assert torch.equal(si, runs[0][0]) and torch.equal(g, runs[0][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [53, 16, 7])
def test_fold_partial_tiles_equal_full_tiles_bitwise(dtype, c):
    """The forward folds the class-mean rows in register tiles of 64 bytes of units, the last
    partial tile from a zero-padded copy of its units. A layer cut into 7-unit slices (partial tiles
    only) gives the whole layer's bits, as does selectivity_from_means, with many classes (pairwise
    class sums over several levels), frequent ties for the maximum, and a NaN."""
    torch.manual_seed(0)
    n, k = 1500, 700
    x = (torch.randint(0, 4, (n, c, 2, 2)).to(dtype) / 4).requires_grad_()  # coarse values: ties
    labels = torch.randint(0, k, (n,))
    with torch.no_grad():
        x[3, c - 1, 0, 0] = float("nan")
    si = selkernels.selectivity_index(x, labels, k)
    narrow = torch.cat(selkernels.selectivity_index([x[:, i : i + 7] for i in range(0, c, 7)], labels, k))
    torch.testing.assert_close(si, narrow, rtol=0, atol=0, equal_nan=True)
    means, counts = selkernels.class_means(x, labels, k)
    si_from_means = selkernels.selectivity_from_means(means, counts)
    torch.testing.assert_close(si, si_from_means, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(si[c - 1]) and not torch.isnan(si[: c - 1]).any()
    grad = torch.rand(c, dtype=dtype)
    (g,) = torch.autograd.grad(si[: c - 1], x, grad[: c - 1])
    (g_ref,) = torch.autograd.grad(si_from_means[: c - 1], x, grad[: c - 1])
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(g[:, : c - 1], g_ref[:, : c - 1], rtol=tol, atol=tol)
    expected = numpy_selectivity(x.detach().double(), labels, k)
    np.testing.assert_allclose(si[: c - 1].double().detach().numpy(), expected[: c - 1], rtol=TOL[dtype], atol=1e-7)
