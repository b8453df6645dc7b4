import numpy as np
import pytest
import torch
from conftest import make_batch
from hypothesis import given, settings
from hypothesis import strategies as st

import selkernels
from selkernels import reference

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def numpy_class_means(x, labels, k, ignore_index=-100):
    """Independent fp64 oracle: loops over classes in numpy."""
    a = x.double().numpy().reshape(x.shape[0], x.shape[1], max(1, int(np.prod(x.shape[2:])))).mean(-1)
    lab = labels.numpy()
    means = np.zeros((k, x.shape[1]))
    counts = np.zeros(k, dtype=np.int64)
    for cls in range(k):
        rows = a[lab == cls]
        counts[cls] = len(rows)
        if len(rows):
            means[cls] = rows.mean(0)
    return means, counts


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spatial", [(), (7,), (3, 5), (2, 3, 2)])
def test_matches_numpy(device, dtype, spatial):
    x, labels = make_batch(n=30, c=9, spatial=spatial, k=6, dtype=dtype, relu=False, device=device)
    means, counts = selkernels.class_means(x, labels, 6)
    ref_means, ref_counts = numpy_class_means(x.cpu(), labels.cpu(), 6)
    assert means.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert counts.dtype == torch.int64 and means.device == counts.device == x.device
    np.testing.assert_array_equal(counts.cpu().numpy(), ref_counts)
    np.testing.assert_allclose(means.double().cpu().numpy(), ref_means, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_every_row_length_matches_numpy(dtype):
    """The CPU kernel picks a code path by the number of positions S (scalar rows below 8, two rows
    per vector at 4, eight rows per group up to 64 with masked tails, streamed rows above; compile-time
    lengths at 16, 49 and 64): every S up to 70, and longer rows with and without a tail, on row
    counts that leave partial groups."""
    for s in list(range(1, 71)) + [96, 196, 257]:
        x, labels = make_batch(n=7, c=3, spatial=(s,), k=4, dtype=dtype, relu=False, seed=s)
        means, _ = selkernels.class_means(x, labels, 4)
        ref_means, _ = numpy_class_means(x, labels, 4)
        np.testing.assert_allclose(
            means.double().numpy(), ref_means, rtol=TOL[dtype], atol=TOL[dtype], err_msg=f"S={s}"
        )


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_layouts_match_contiguous(device, layout):
    x, labels = make_batch(n=20, c=8, spatial=(5, 6), k=4, dtype=torch.float32, device=device)
    if layout == "channels_last":
        xv = x.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        xv = x.transpose(2, 3).contiguous().transpose(2, 3)
    else:
        xv = torch.stack([x, x], dim=2)[:, :, 1]
    assert not xv.is_contiguous()
    ref, _ = selkernels.class_means(x.contiguous(), labels, 4)
    out, _ = selkernels.class_means(xv, labels, 4)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_absent_classes_and_ignore_index(device):
    x, _ = make_batch(n=10, c=3, k=2, device=device)
    labels = torch.tensor([0, 2, 2, -100, 0, 2, -100, 0, 0, 2], device=device)
    means, counts = selkernels.class_means(x, labels, 5)
    assert counts.tolist() == [4, 0, 4, 0, 0]
    assert torch.all(means[[1, 3, 4]] == 0)
    keep = labels >= 0
    ref_means, _ = numpy_class_means(x[keep].cpu(), labels[keep].cpu(), 5)
    np.testing.assert_allclose(means.cpu().numpy(), ref_means, rtol=1e-12)
    means_ign, counts_ign = selkernels.class_means(x, torch.where(labels < 0, 7, labels), 5, ignore_index=7)
    torch.testing.assert_close(means_ign, means)
    assert counts_ign.tolist() == counts.tolist()


def test_empty_batch(device):
    means, counts = selkernels.class_means(
        torch.zeros(0, 4, 2, 2, device=device), torch.zeros(0, dtype=torch.long, device=device), 3
    )
    assert means.shape == (3, 4) and torch.all(means == 0) and torch.all(counts == 0)


def test_int32_labels_accepted(device):
    x, labels = make_batch(device=device)
    a, _ = selkernels.class_means(x, labels.int(), 5)
    b, _ = selkernels.class_means(x, labels, 5)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("spatial", [(), (3, 4)])
def test_gradcheck(device, spatial):
    x, labels = make_batch(n=12, c=3, spatial=spatial, k=4, device=device)
    labels[5] = -100
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: selkernels.class_means(t, labels, 4)[0], (x,))


def test_gradient_matches_reference_and_is_compact(device):
    x, labels = make_batch(n=16, c=5, spatial=(4, 4), k=3, device=device)
    x.requires_grad_()
    w = torch.randn(3, 5, dtype=torch.float64).to(device)
    (g_fused,) = torch.autograd.grad((selkernels.class_means(x, labels, 3)[0] * w).sum(), x)
    (g_ref,) = torch.autograd.grad((reference.class_means_reference(x, labels, 3)[0] * w).sum(), x)
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-12, atol=1e-14)
    # The gradient is a broadcast view of an [N, C] tensor: no N*C*S buffer is built.
    assert g_fused.stride()[2:] == (0, 0)


def test_opcheck(device):
    x, labels = make_batch(n=10, c=4, spatial=(2, 3), k=3, dtype=torch.float32, device=device)
    x.requires_grad_()
    labels[2] = -100
    ops = torch.ops.selkernels
    torch.library.opcheck(ops.segment_labels, (labels, 3, -100))
    seg = selkernels.segment_labels(labels, 3)
    y = torch.randn(10, 5, 3, dtype=torch.float64).to(device).requires_grad_()
    torch.library.opcheck(ops.class_means_segmented, ([x, y], *seg))
    gm = [torch.randn(3, 4).to(device), torch.randn(3, 5, dtype=torch.float64).to(device)]
    torch.library.opcheck(ops.segmented_unit_grad, ([], [], [], gm, seg.labels, seg.counts, [4, 5], [6, 3], [6, 7]))


def test_deterministic_bitwise():
    x, labels = make_batch(n=257, c=33, spatial=(9, 9), k=7, dtype=torch.float32)
    first, _ = selkernels.class_means(x, labels, 7)
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            again, _ = selkernels.class_means(x, labels, 7)
        finally:
            torch.set_num_threads(old)
        assert torch.equal(first, again)


def test_double_backward_matches_reference(device):
    # loss = sum(w * means^2): d/dx is linear in the means, so the second derivative is nonzero.
    x, labels = make_batch(n=14, c=3, spatial=(2, 2), k=4, device=device)
    labels[3] = -100
    x.requires_grad_()
    w = torch.randn(4, 3, dtype=torch.float64).to(device)
    v = torch.randn_like(x)

    def second(fn):
        (g,) = torch.autograd.grad((fn(x)[0] ** 2 * w).sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad((g * v).sum(), x)
        return gg

    fused = second(lambda t: selkernels.class_means(t, labels, 4))
    ref = second(lambda t: reference.class_means_reference(t, labels, 4))
    assert fused.abs().max() > 1e-3
    torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradgradcheck(lambda t: selkernels.class_means(t, labels, 4)[0], (x,))


@pytest.mark.parametrize("unit_dim", [1, -1])
def test_list_of_layers_matches_each_layer(device, unit_dim):
    _, labels = make_batch(n=18, k=5, device=device)
    labels[4] = -100
    g = torch.Generator().manual_seed(3)
    xs = [
        torch.randn(18, 4, 3, 5, generator=g, dtype=torch.float64),
        torch.randn(18, 7, generator=g).to(torch.float32),
        torch.randn(18, 6, 2, 2, generator=g).to(torch.bfloat16).to(memory_format=torch.channels_last),
        torch.randn(18, 3, 2, 2, 2, generator=g).to(torch.float16),
    ]
    xs = [x.to(device).requires_grad_() for x in xs]
    seg = selkernels.segment_labels(labels, 5)
    out = selkernels.class_means(xs, seg, unit_dim=unit_dim)
    ws = [torch.randn(m.shape, dtype=m.dtype).to(device) for m, _ in out]
    grads = torch.autograd.grad(sum((m * w).sum() for (m, _), w in zip(out, ws)), xs)
    for x, (m, c), w, g_list in zip(xs, out, ws, grads):
        single, counts = selkernels.class_means(x, labels, 5, unit_dim=unit_dim)
        torch.testing.assert_close(m, single, rtol=0, atol=0)
        assert torch.equal(c, counts)
        xr = x.detach().double().movedim(-1, 1) if unit_dim == -1 else x.detach().double()
        xr.requires_grad_()
        ref, _ = reference.class_means_reference(xr, labels, 5)
        tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(x.dtype, 1e-5)
        torch.testing.assert_close(m.double(), ref, rtol=tol, atol=tol)
        (g_ref,) = torch.autograd.grad((ref * w.double()).sum(), xr)
        g_ref = g_ref.movedim(1, -1) if unit_dim == -1 else g_ref
        assert g_list.dtype == x.dtype and g_list.shape == x.shape
        torch.testing.assert_close(
            g_list.double(), g_ref, rtol=1e-2 if x.dtype in (torch.float16, torch.bfloat16) else 1e-6, atol=1e-5
        )


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 40),
    c=st.integers(1, 9),
    s=st.sampled_from([(), (1,), (3,), (2, 5)]),
    k=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(n, c, s, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, c) + s, generator=g, dtype=torch.float64)
    labels = torch.randint(-1, k, (n,), generator=g)
    means, counts = selkernels.class_means(x, labels, k, ignore_index=-1)
    keep = labels >= 0
    ref_means, ref_counts = numpy_class_means(x[keep], labels[keep], k)
    np.testing.assert_array_equal(counts.numpy(), ref_counts)
    np.testing.assert_allclose(means.numpy(), ref_means, rtol=1e-12, atol=1e-12)
