"""CUDA kernels of the selectivity family against the CPU kernels (themselves tested against fp64
oracles in test_class_means.py / test_selectivity_index.py), on the shapes, layouts and dtypes that
pick distinct CUDA code paths, and what only CUDA has: no host sync, CUDA graph capture, the
deterministic-algorithms mode, torch.compile on the GPU. Skipped without a GPU.

The op tests themselves (against the oracles, gradcheck, opcheck, edge cases, bitwise determinism)
have one body for every device: they take the `device` fixture of conftest.py and run here too.

Under the CUDA sanitizers (on a GPU machine, from the repository root):
    compute-sanitizer --tool memcheck  --leak-check full .venv/bin/python -m pytest tests/test_cuda.py -q -x
    compute-sanitizer --tool racecheck .venv/bin/python -m pytest tests/test_cuda.py -q -x
    compute-sanitizer --tool synccheck .venv/bin/python -m pytest tests/test_cuda.py -q -x
    compute-sanitizer --tool initcheck .venv/bin/python -m pytest tests/test_cuda.py -q -x
"""

import pytest
import torch
from conftest import make_batch, requires_cuda

import selkernels

pytestmark = requires_cuda

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# CUDA and CPU both accumulate in fp32 (fp64) but in different orders; fp16/bf16 inputs are exact
# in fp32, so the tolerance is that of fp32 summation, not of the storage type.
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
GRAD_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
_ops = torch.ops.selkernels


def _fused(x, labels, k, ignore_index=-100):
    """SI, class means and counts through the public API (one segmentation for both)."""
    seg = selkernels.segment_labels(labels, k, ignore_index=ignore_index)
    means, counts = selkernels.class_means(x, seg)
    return selkernels.selectivity_index(x, seg), means, counts


def _layout(x, layout):
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last)
    if layout == "transposed":  # a stride pattern the kernels copy once
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    raise ValueError(layout)


def _to_cuda(x, layout):
    return _layout(x.cuda(), layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("spatial,k", [((4, 4), 5), ((7, 7), 40), ((1, 1), 3), ((2, 3), 1500)])
def test_class_means_matches_cpu(dtype, layout, spatial, k):
    x, labels = make_batch(n=70, c=37, spatial=spatial, k=min(k, 70), dtype=dtype, relu=False)
    means_cpu, counts_cpu = selkernels.class_means(x, labels, k)
    means, counts = selkernels.class_means(_to_cuda(x, layout), labels.cuda(), k)
    assert means.dtype == means_cpu.dtype and counts.dtype == torch.int64 and means.is_cuda
    torch.testing.assert_close(counts.cpu(), counts_cpu, rtol=0, atol=0)
    torch.testing.assert_close(means.cpu(), means_cpu, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(50, 13), (33, 8, 1), (300, 260, 3), (5, 3, 2, 2, 2)])
def test_other_shapes_match_cpu(dtype, shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, 7, (shape[0],), generator=g)
    si_cpu, means_cpu, counts_cpu = _fused(x, labels, 7)
    si, means, counts = _fused(x.cuda(), labels.cuda(), 7)
    torch.testing.assert_close(counts.cpu(), counts_cpu, rtol=0, atol=0)
    torch.testing.assert_close(means.cpu(), means_cpu, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(si.cpu(), si_cpu, rtol=1e-4 if dtype != torch.float64 else 1e-10, atol=1e-5)


def test_strided_2d_input():
    x, labels = make_batch(n=40, c=24, spatial=(), k=4, dtype=torch.float32)
    xc = x.cuda().t().contiguous().t()  # [N, C] with stride (1, N): read in place
    torch.testing.assert_close(
        selkernels.class_means(xc, labels.cuda(), 4)[0].cpu(),
        selkernels.class_means(x, labels, 4)[0],
        rtol=1e-6,
        atol=1e-6,
    )


def test_misaligned_rows_use_the_scalar_path():
    # S * 4 bytes = 20 is not a multiple of 16, and a storage offset misaligns the base.
    base = torch.randn(1 + 30 * 6 * 5, dtype=torch.float32)
    x = base[1:].view(30, 6, 5)
    labels = torch.arange(30) % 4
    torch.testing.assert_close(
        selkernels.class_means(x.cuda(), labels.cuda(), 4)[0].cpu(),
        selkernels.class_means(x, labels, 4)[0],
        rtol=1e-6,
        atol=1e-6,
    )


def test_ignore_index_absent_classes_and_large_k():
    x, labels = make_batch(n=300, c=20, spatial=(3, 3), k=9, dtype=torch.float32)
    labels[::4] = -1
    labels[1] = 20000  # a class far beyond those seen, K too large for the shared-memory counts
    k = 20001
    si_cpu, means_cpu, counts_cpu = _fused(x, labels, k, -1)
    si, means, counts = _fused(x.cuda(), labels.cuda(), k, -1)
    torch.testing.assert_close(counts.cpu(), counts_cpu, rtol=0, atol=0)
    torch.testing.assert_close(means.cpu(), means_cpu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(si.cpu(), si_cpu, rtol=1e-5, atol=1e-6)


def test_invalid_labels_give_nan_without_a_sync_and_check_labels_raises():
    # CUDA cannot raise without a host sync: the segmentation counts the bad labels on the device,
    # every result is NaN (never silently wrong, never read out of bounds), check_labels raises.
    x = torch.randn(16, 4, 3, device="cuda", requires_grad=True)
    labels = torch.tensor([0, 1, 5, -7, 1, 0, 2, 99, 0, 1, 2, 2, 1, 0, 1, -100], device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        seg = selkernels.segment_labels(labels, 3)
        si = selkernels.selectivity_index(x, seg)
        means, _ = selkernels.class_means(x, seg)
        (g,) = torch.autograd.grad(si.sum(), x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(seg.invalid) == 3
    assert torch.isnan(si).all() and torch.isnan(means).all()
    assert seg.labels.tolist() == [0, 1, -1, -1, 1, 0, 2, -1, 0, 1, 2, 2, 1, 0, 1, -1]
    with pytest.raises(ValueError, match=r"labels\[2\] = 5 \(3 such labels\)"):
        selkernels.check_labels(seg, labels)


def test_segment_labels_matches_cpu():
    labels = torch.randint(-3, 12, (3000,))
    labels[::7] = -100
    cpu = selkernels.segment_labels(torch.where((labels < 0) | (labels >= 10), -100, labels), 10)
    gpu = selkernels.segment_labels(labels.cuda(), 10)
    bad = ((labels != -100) & ((labels < 0) | (labels >= 10))).sum()
    assert int(gpu.invalid) == int(bad)
    for a, b in zip(gpu[:4], cpu[:4]):
        assert torch.equal(a.cpu(), b)


def test_layer_list_matches_cpu_mixed_dtypes_and_layouts():
    _, labels = make_batch(n=40, k=7)
    labels[3] = -100
    g = torch.Generator().manual_seed(4)
    xs = [
        torch.randn(40, 64, 8, 8, generator=g),
        torch.randn(40, 33, 5, 5, generator=g).to(torch.bfloat16),
        torch.randn(40, 20, 3, 3, generator=g, dtype=torch.float64),
        torch.randn(40, 17, generator=g).half(),
        torch.randn(40, 6, 9, generator=g),
    ]
    layouts = ["contiguous", "channels_last", "channels_last", None, None]
    on_gpu = [x.cuda() if lay is None else _to_cuda(x, lay) for x, lay in zip(xs, layouts)]
    ws = [torch.randn(x.shape[1], dtype=torch.float64) for x in xs]

    def run(tensors, lab):
        tensors = [t.detach().requires_grad_() for t in tensors]
        si = selkernels.selectivity_index(tensors, lab, 7)
        grads = torch.autograd.grad(sum((s * w.to(s.device, s.dtype)).sum() for s, w in zip(si, ws)), tensors)
        return si, grads

    si_cpu, g_cpu = run(xs, labels)
    si_gpu, g_gpu = run(on_gpu, labels.cuda())
    for a, b, ga, gb, x in zip(si_gpu, si_cpu, g_gpu, g_cpu, xs):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4 if x.dtype != torch.float64 else 1e-10, atol=1e-5)
        torch.testing.assert_close(
            ga.cpu().double(), gb.double(), rtol=GRAD_TOL[x.dtype], atol=GRAD_TOL[x.dtype] * 1e-2
        )
    tok = torch.randn(40, 5, 12, generator=g)
    torch.testing.assert_close(
        selkernels.selectivity_index(tok.cuda(), labels.cuda(), 7, unit_dim=-1).cpu(),
        selkernels.selectivity_index(tok, labels, 7, unit_dim=-1),
        rtol=1e-4,
        atol=1e-5,
    )


def test_no_host_sync_in_a_step():
    xs = [torch.randn(32, c, s, s, device="cuda", requires_grad=True) for c, s in ((16, 8), (32, 4), (64, 2))]
    labels = torch.randint(0, 10, (32,), device="cuda")
    selkernels.selectivity_index(xs, labels, 10)  # warm-up (allocator, lazy init)
    torch.cuda.set_sync_debug_mode("error")
    try:
        si = selkernels.selectivity_index(xs, labels, 10)
        torch.autograd.grad(sum(s.mean() for s in si), xs)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradients_match_cpu(dtype, layout):
    x, labels = make_batch(n=48, c=10, spatial=(3, 3), k=6, dtype=dtype)
    w = torch.randn(10, dtype=torch.float64)
    wm = torch.randn(6, 10, dtype=torch.float64)

    def grads(xx, lab, ww, wwm):
        xx = xx.requires_grad_()
        si = selkernels.selectivity_index(xx, lab, 6)
        (g_si,) = torch.autograd.grad((si * ww.to(si.dtype)).sum(), xx)
        means2, _ = selkernels.class_means(xx, lab, 6)
        (g_cm,) = torch.autograd.grad((means2 * wwm.to(means2.dtype)).sum(), xx)
        return g_si, g_cm

    cpu = grads(x.clone(), labels, w, wm)
    gpu = grads(_to_cuda(x, layout), labels.cuda(), w.cuda(), wm.cuda())
    for a, b in zip(gpu, cpu):
        assert a.dtype == dtype
        torch.testing.assert_close(a.cpu().double(), b.double(), rtol=GRAD_TOL[dtype], atol=GRAD_TOL[dtype] * 1e-2)


def test_selectivity_from_means_and_backward_match_cpu():
    g = torch.Generator().manual_seed(3)
    means = torch.randn(30, 50, generator=g, dtype=torch.float64).abs()
    counts = torch.randint(0, 3, (30,), generator=g)
    grad_si = torch.randn(50, generator=g, dtype=torch.float64)
    for dt in (torch.float64, torch.float32):
        m = means.to(dt)
        torch.testing.assert_close(
            _ops.selectivity_from_means(m.cuda(), counts.cuda(), 1e-7).cpu(),
            _ops.selectivity_from_means(m, counts, 1e-7),
        )
        torch.testing.assert_close(
            _ops.selectivity_from_means_backward(grad_si.to(dt).cuda(), m.cuda(), counts.cuda(), 1e-7).cpu(),
            _ops.selectivity_from_means_backward(grad_si.to(dt), m, counts, 1e-7),
        )


def test_deterministic_algorithms_mode():
    x, labels = make_batch(n=32, c=8, spatial=(2, 2), k=4, dtype=torch.float32)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        si = selkernels.selectivity_index(x.cuda(), labels.cuda(), 4)
    finally:
        torch.use_deterministic_algorithms(prev)
    torch.testing.assert_close(si.cpu(), selkernels.selectivity_index(x, labels, 4), rtol=1e-5, atol=1e-6)


def test_cuda_graph_capture_of_a_whole_step():
    # segment_labels, the fused forward of every layer and its backward, in one graph.
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(64, c, s, s, generator=g).cuda().requires_grad_() for c, s in ((16, 4), (32, 2))]
    labels = torch.randint(0, 10, (64,), generator=g).cuda()

    def step():
        seg = selkernels.segment_labels(labels, 10)
        si = selkernels.selectivity_index(xs, seg)
        loss = -sum(s.mean() for s in si)
        return (loss,) + torch.autograd.grad(loss, xs)

    expected = [t.clone() for t in step()]
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside capture
        with torch.cuda.graph(graph):
            out = step()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_compile_fullgraph():
    x, labels = make_batch(n=32, c=8, spatial=(3, 3), k=5, dtype=torch.float32)
    x, labels = x.cuda(), labels.cuda()
    fn = torch.compile(lambda t, lab: selkernels.selectivity_index(t, lab, 5), fullgraph=True)
    torch.testing.assert_close(fn(x, labels), selkernels.selectivity_index(x, labels, 5), rtol=0, atol=0)
