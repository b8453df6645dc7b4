"""Every hooked layer in one call: segment_labels once, then selectivity_index / class_means on a
list of layers (mixed C, spatial shapes, layouts, dtypes, unit_dim) equal the per-layer op and the
fp64 reference, values and gradients; exact second derivatives; torch.compile without recompiles;
the CUDA launch plan."""

import pytest
import torch
from conftest import make_batch
from torch._dynamo.utils import counters

import selkernels
from selkernels import reference

HALF = (torch.float16, torch.bfloat16)


def layers(n, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    xs = [
        torch.randn(n, 6, 3, 4, generator=g, dtype=torch.float64),  # NCHW fp64
        torch.randn(n, 5, 4, 4, generator=g).to(memory_format=torch.channels_last),  # channels_last fp32
        torch.randn(n, 9, generator=g).to(torch.bfloat16),  # [N, C] bf16
        torch.randn(n, 3, 2, 2, 2, generator=g).to(torch.float16),  # 3-D spatial fp16
        torch.randn(n, 7, 10, generator=g)[:, :, ::2],  # strided: copied once
    ]
    return [(x.relu() + 0.1).to(device).requires_grad_() for x in xs]


def reference_si(x, labels, k, unit_dim=1):
    xr = x.detach().double()
    xr = xr.movedim(-1, 1) if unit_dim == -1 else xr
    return reference.selectivity_index_reference(xr, labels, k)


def tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 2e-3)


def test_list_equals_each_layer_and_reference(device):
    _, labels = make_batch(n=20, k=6, device=device)
    labels[[2, 11]] = -100
    xs = layers(20, device=device)
    seg = selkernels.segment_labels(labels, 6)
    si = selkernels.selectivity_index(xs, seg)
    assert isinstance(si, list) and len(si) == len(xs)
    ws = [torch.randn(s.shape, dtype=s.dtype).to(device) for s in si]
    grads = torch.autograd.grad(sum((s * w).sum() for s, w in zip(si, ws)), xs)
    for x, s, w, g in zip(xs, si, ws, grads):
        one = selkernels.selectivity_index(x, labels, 6)
        assert torch.equal(s, one)  # the list call is the per-layer op, bit for bit
        (g_one,) = torch.autograd.grad((one * w).sum(), x)
        assert torch.equal(g, g_one)
        assert s.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(s.double(), reference_si(x, labels, 6), rtol=tol(x.dtype), atol=tol(x.dtype))
        xr = x.detach().double().requires_grad_()
        (g_ref,) = torch.autograd.grad((reference.selectivity_index_reference(xr, labels, 6) * w.double()).sum(), xr)
        assert g.dtype == x.dtype and g.shape == x.shape
        torch.testing.assert_close(
            g.double(), g_ref, rtol=1e-2 if x.dtype in HALF else 1e-6, atol=1e-4 if x.dtype in HALF else 1e-9
        )


def test_unit_dim_last_reads_a_view(device):
    # [N, T, D] tokens and [N, H, W, D] maps: units on the last dim, positions averaged.
    _, labels = make_batch(n=12, k=4, device=device)
    tokens = torch.randn(12, 7, 5, dtype=torch.float64).to(device).requires_grad_()
    maps = torch.randn(12, 3, 2, 6, dtype=torch.float64).to(device).requires_grad_()
    si = selkernels.selectivity_index([tokens, maps], labels, 4, unit_dim=-1)
    for x, s in zip((tokens, maps), si):
        torch.testing.assert_close(s, reference_si(x, labels, 4, unit_dim=-1), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda a, b: selkernels.selectivity_index([a, b], labels, 4, unit_dim=-1), (tokens, maps)
    )
    (g,) = torch.autograd.grad(si[0].sum(), tokens)
    assert g.shape == tokens.shape and g.stride()[1] == 0  # broadcast over positions, no copy


def test_gradcheck_and_gradgradcheck_of_a_list(device):
    _, labels = make_batch(n=14, k=4, device=device)
    labels[5] = -100
    g = torch.Generator().manual_seed(1)
    xs = [
        (torch.rand(14, 3, 2, 3, generator=g, dtype=torch.float64) + 0.1).to(device).requires_grad_(),
        (torch.rand(14, 4, generator=g, dtype=torch.float64) + 0.1).to(device).requires_grad_(),
    ]
    seg = selkernels.segment_labels(labels, 4)
    fn = lambda *t: selkernels.selectivity_index(list(t), seg)  # noqa: E731
    assert torch.autograd.gradcheck(fn, xs)
    assert torch.autograd.gradgradcheck(fn, xs)


def second_derivative(fn, x, w, v):
    (g,) = torch.autograd.grad((fn(x) * w).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad((g * v).sum(), x)
    return gg


@pytest.mark.parametrize("spatial", [(), (2, 3)])
def test_second_derivative_of_si_matches_reference(device, spatial):
    x, labels = make_batch(n=16, c=4, spatial=spatial, k=5, device=device)
    x.requires_grad_()
    w, v = torch.randn(4, dtype=torch.float64).to(device), torch.randn(x.shape, dtype=x.dtype).to(device)
    fused = second_derivative(lambda t: selkernels.selectivity_index(t, labels, 5), x, w, v)
    ref = second_derivative(lambda t: reference.selectivity_index_reference(t, labels, 5), x, w, v)
    assert fused.abs().max() > 1e-3  # SI is not linear in the means: never silent zeros
    torch.testing.assert_close(fused, ref, rtol=1e-9, atol=1e-12)


def test_second_derivative_of_selectivity_from_means(device):
    g = torch.Generator().manual_seed(2)
    means = (torch.rand(6, 5, generator=g, dtype=torch.float64) + 0.2).to(device).requires_grad_()
    counts = torch.tensor([3, 0, 2, 5, 1, 4], device=device)
    w, v = torch.randn(5, dtype=torch.float64).to(device), torch.randn(6, 5, dtype=torch.float64).to(device)
    fused = second_derivative(lambda m: selkernels.selectivity_from_means(m, counts), means, w, v)
    ref = second_derivative(lambda m: reference.selectivity_from_means_reference(m, counts), means, w, v)
    assert fused.abs().max() > 1e-3
    torch.testing.assert_close(fused, ref, rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradgradcheck(lambda m: selkernels.selectivity_from_means(m, counts), (means,))
    # ... and through the class means: SI(class_means(x)) twice differentiated w.r.t. x.
    x, labels = make_batch(n=12, c=3, spatial=(2,), k=4, device=device)
    x.requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda t: selkernels.selectivity_from_means(*selkernels.class_means(t, labels, 4)), (x,)
    )


def test_fewer_than_two_classes_gives_zero_si_and_zero_gradients_to_second_order(device):
    x = torch.rand(6, 3, 2, dtype=torch.float64).to(device).requires_grad_()
    labels = torch.tensor([2, 2, -100, 2, 2, 2], device=device)
    si = selkernels.selectivity_index([x, x * 2], labels, 4)
    assert all(torch.all(s == 0) for s in si)
    assert torch.autograd.gradgradcheck(lambda t: selkernels.selectivity_index(t, labels, 4), (x,))


def test_zero_size_inputs(device):
    labels = torch.zeros(0, dtype=torch.long, device=device)
    x = torch.zeros(0, 4, 2, 2, device=device, requires_grad=True)
    si = selkernels.selectivity_index([x, torch.zeros(0, 3, device=device)], labels, 3)
    assert si[0].shape == (4,) and torch.all(si[0] == 0)
    (g,) = torch.autograd.grad(si[0].sum(), x)
    assert g.shape == x.shape
    x0 = torch.zeros(5, 0, 3, device=device, requires_grad=True)
    assert selkernels.selectivity_index(x0, torch.arange(5, device=device) % 2, 2).shape == (0,)


def test_opcheck_on_every_new_op(device):
    _, labels = make_batch(n=10, k=3, device=device)
    labels[1] = -100
    ops = torch.ops.selkernels
    torch.library.opcheck(ops.segment_labels, (labels, 3, -100))
    seg = selkernels.segment_labels(labels, 3)
    xs = [x.float().detach().requires_grad_() for x in layers(10, device=device)[:2]]
    xs.append(layers(10, device=device)[3].detach())
    torch.library.opcheck(ops.selectivity_index_segmented, (xs, *seg, 1e-7))
    torch.library.opcheck(ops.class_means_segmented, (xs, *seg))


def test_segment_labels_contract(device):
    labels = torch.tensor([3, -100, 0, 3, 1, -100, 0, 3], dtype=torch.int32, device=device)
    seg = selkernels.segment_labels(labels, 5)
    assert isinstance(seg, selkernels.LabelSegments)
    assert all(t.device == labels.device for t in seg)
    assert seg.labels.tolist() == [3, -1, 0, 3, 1, -1, 0, 3]
    assert seg.counts.tolist() == [2, 1, 0, 3, 0]
    assert seg.offsets.tolist() == [0, 2, 3, 3, 6, 6]
    assert seg.order.tolist() == [2, 6, 4, 0, 3, 7, 1, 5]  # stable; ignored last
    assert int(seg.invalid) == 0
    assert all(t.dtype == torch.int64 for t in seg)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_dynamic_no_recompile_when_k_and_n_change(backend):
    def step(x, tokens, labels, k):
        seg = selkernels.segment_labels(labels, k)
        si = selkernels.selectivity_index([x.relu(), x.square()], seg)
        si_tok = selkernels.selectivity_index(tokens, seg, unit_dim=-1)
        means = selkernels.class_means(x, seg)[0]
        return -(si[0].mean() + si[1].mean() + si_tok.mean()) + means.square().sum()

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=backend)
    for i, (n, k) in enumerate([(16, 5), (24, 7), (20, 11), (32, 3)]):
        x, labels = make_batch(n=n, c=4, spatial=(3, 3), k=k, dtype=torch.float32, seed=i)
        x.requires_grad_()
        tokens = torch.randn(n, 6, 5, requires_grad=True)
        out = compiled(x, tokens, labels, k)
        grads = torch.autograd.grad(out, (x, tokens))
        ref = step(x, tokens, labels, k)
        ref_grads = torch.autograd.grad(ref, (x, tokens))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1  # one graph for every K and N: no recompiles


def test_cuda_launch_plan_of_a_resnet18_step():
    shapes = [
        (256, c, s, s) for c, s in ((64, 56), (64, 56), (128, 28), (128, 28), (256, 14), (256, 14), (512, 7), (512, 7))
    ]
    plan = selkernels.ops.cuda_launch_plan(shapes, 1000, torch.float32)
    assert [p["kernel"] for p in plan] == [
        "segment_labels_kernel",
        "unit_means_kernel",
        "class_si_kernel",
        "unit_grad_kernel",
    ]
    assert len(plan) <= 12 and all(p["host_syncs"] == 0 for p in plan)
    x_bytes = sum(256 * c * s * s * 4 for _, c, s, _ in shapes)
    assert plan[1]["bytes_read"] == x_bytes and plan[1]["grid"][1] == 8
    assert plan[2]["grid"] == (16, 8, 1) and plan[2]["block"] == (32, 8, 1)
    assert plan[3]["bytes_written"] == sum(256 * c * 4 for _, c, _, _ in shapes)
    mixed = selkernels.ops.cuda_launch_plan(shapes, 100, [torch.bfloat16] * 4 + [torch.float32] * 4, channels_last=True)
    assert len(mixed) == 1 + 2 + 1 + 2  # one launch per dtype (class/SI: per accumulation type)
    with pytest.raises(ValueError, match="same N"):
        selkernels.ops.cuda_launch_plan([(4, 3), (5, 3)], 10)
