"""StreamingCovariance: numpy float64 two-pass oracles, Chan merge exactness, per-class fused op."""

import numpy as np
import pytest
import torch
from conftest import requires_cuda

import selkernels
from selkernels import StreamingCovariance


def np_cov(x, ddof=1):
    x = np.asarray(x, dtype=np.float64)
    xc = x - x.mean(0)  # two-pass
    return xc.T @ xc / (x.shape[0] - ddof)


def rel_err(a, b):
    a = a.cpu().numpy() if isinstance(a, torch.Tensor) else a
    return np.abs(a - b).max() / np.abs(b).max()


def test_large_offset_matches_two_pass_to_1e9():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 24, generator=g, dtype=torch.float64) + 1e6
    s = StreamingCovariance(24)
    for chunk in x.split(97):
        s.update(chunk)
    assert int(s.count) == 3000
    assert rel_err(s.mean, x.numpy().mean(0)) < 1e-14
    assert rel_err(s.covariance(), np_cov(x.numpy())) < 1e-9
    assert rel_err(s.covariance(ddof=0), np_cov(x.numpy(), ddof=0)) < 1e-9


@pytest.mark.parametrize("batch", [1, 2])
def test_tiny_batches(batch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(301, 8, generator=g, dtype=torch.float64) * 3 + 1e6
    s = StreamingCovariance(8)
    for chunk in x.split(batch):
        s.update(chunk)
    assert rel_err(s.covariance(), np_cov(x.numpy())) < 1e-9


def test_float32_input_gemm_in_float32():
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2000, 32, generator=g) * 2 + 100).float()
    s = StreamingCovariance(32)
    for chunk in x.split(128):
        s.update(chunk)
    assert s.M2.dtype == torch.float64
    assert rel_err(s.covariance(), np_cov(x.double().numpy())) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 16, generator=g).to(dtype)
    s = StreamingCovariance(16)
    for chunk in x.split(100):
        s.update(chunk)
    assert rel_err(s.covariance(), np_cov(x.double().numpy())) < 1e-5


def test_correlation_and_edge_cases():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64)
    s = StreamingCovariance(6)
    s.update(x)
    np.testing.assert_allclose(s.correlation().numpy(), np.corrcoef(x.numpy(), rowvar=False), rtol=1e-12, atol=1e-13)
    one = StreamingCovariance(3)
    one.update(torch.ones(1, 3, dtype=torch.float64))
    assert torch.isnan(one.covariance()).all()
    assert torch.equal(one.covariance(ddof=0), torch.zeros(3, 3, dtype=torch.float64))
    assert torch.isnan(one.correlation()).all()  # zero variance


def test_spatial_reduce_modes():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(20, 4, 3, 5, generator=g, dtype=torch.float64)
    s = StreamingCovariance(4)
    s.update(z)  # reduce="mean"
    assert rel_err(s.covariance(), np_cov(z.mean((2, 3)).numpy())) < 1e-12
    f = StreamingCovariance(4)
    f.update(z, reduce="flatten")
    rows = z.permute(0, 2, 3, 1).reshape(-1, 4).numpy()
    assert int(f.count) == 20 * 15
    assert rel_err(f.covariance(), np_cov(rows)) < 1e-12


def test_merge_uneven_and_empty():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1001, 10, generator=g, dtype=torch.float64) * 5 + 1e5
    a, b, empty = StreamingCovariance(10), StreamingCovariance(10), StreamingCovariance(10)
    a.update(x[:3])
    b.update(x[3:700])
    b.update(x[700:])
    a.merge(b).merge(empty)
    assert int(a.count) == 1001
    assert rel_err(a.covariance(), np_cov(x.numpy())) < 1e-9
    empty.merge(a)
    assert torch.equal(empty.M2, a.M2) and torch.equal(empty.mean, a.mean)


def test_state_dict_round_trip():
    g = torch.Generator().manual_seed(7)
    s = StreamingCovariance(5, num_classes=3)
    s.update(torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g))
    t = StreamingCovariance(5, num_classes=3)
    t.load_state_dict(s.state_dict())
    for name in ("count", "mean", "M2"):
        assert torch.equal(getattr(t, name), getattr(s, name))
    with pytest.raises(ValueError, match="dim"):
        StreamingCovariance(4).load_state_dict(s.state_dict())


# ---------------------------------------------------------------------------------------------
# per-class mode
# ---------------------------------------------------------------------------------------------
def per_class_oracle(x, labels, K):
    x, labels = x.double().numpy(), labels.numpy()
    out = []
    for k in range(K):
        rows = x[labels == k]
        out.append(
            (
                len(rows),
                rows.mean(0) if len(rows) else np.zeros(x.shape[1]),
                (rows - rows.mean(0)).T @ (rows - rows.mean(0)) if len(rows) else np.zeros((x.shape[1],) * 2),
            )
        )
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_per_class_matches_oracle(dtype, tol):
    g = torch.Generator().manual_seed(8)
    K, D = 7, 12
    x = (torch.randn(900, D, generator=g, dtype=torch.float64) + 1e4 * torch.arange(D)).to(dtype)
    labels = torch.randint(0, K - 1, (900,), generator=g)  # class K-1 never occurs
    s = StreamingCovariance(D, num_classes=K)
    for xc, lc in zip(x.split(61), labels.split(61)):
        s.update(xc, lc)
    for k, (n, mean, m2) in enumerate(per_class_oracle(x, labels, K)):
        assert int(s.count[k]) == n
        if n == 0:
            assert not s.M2[k].any() and not s.mean[k].any()
            continue
        assert rel_err(s.mean[k], mean) < 1e-12
        assert rel_err(s.M2[k], m2) < tol


def test_per_class_tiny_batches_and_merge_with_absent_classes():
    g = torch.Generator().manual_seed(9)
    K, D = 4, 6
    x = torch.randn(120, D, generator=g, dtype=torch.float64) + 1e6
    labels = torch.randint(0, K, (120,), generator=g)
    labels[:60][labels[:60] == 3] = 0  # class 3 absent from the first half
    a, b = StreamingCovariance(D, num_classes=K), StreamingCovariance(D, num_classes=K)
    for i in range(60):
        a.update(x[i : i + 1], labels[i : i + 1])
    b.update(x[60:], labels[60:])
    assert int(a.count[3]) == 0
    a.merge(b)
    for k, (n, _mean, m2) in enumerate(per_class_oracle(x, labels, K)):
        assert int(a.count[k]) == n
        assert rel_err(a.M2[k], m2) < 1e-9


def test_per_class_flatten_repeats_labels():
    g = torch.Generator().manual_seed(10)
    z = torch.randn(12, 3, 2, 2, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 2, (12,), generator=g)
    s = StreamingCovariance(3, num_classes=2)
    s.update(z, labels, reduce="flatten")
    rows = z.permute(0, 2, 3, 1).reshape(-1, 3)
    oracle = per_class_oracle(rows, labels.repeat_interleave(4), 2)
    for k in range(2):
        assert int(s.count[k]) == oracle[k][0]
        assert rel_err(s.M2[k], oracle[k][2]) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d,k", [(30, 5, 4), (200, 70, 2), (150, 9, 1)])  # small classes, BLAS classes, one set
def test_class_moments_update_opcheck(device, dtype, n, d, k):
    g = torch.Generator().manual_seed(11)
    labels = torch.randint(0, max(k - 1, 1), (n,), generator=g)
    labels[::7] = -100  # ignored samples: no class
    args = (
        torch.randn(n, d, generator=g).to(dtype).to(device),
        *selkernels.segment_labels(labels.to(device), k),
        torch.zeros(k, dtype=torch.int64, device=device),
        torch.zeros(k, d, dtype=torch.float64, device=device),
        torch.zeros(k, d, d, dtype=torch.float64, device=device),
    )
    torch.library.opcheck(torch.ops.selkernels.class_moments_update_, args)


def test_per_class_state_too_large_is_refused_before_allocating():
    # 10^6 classes of 2048 x 2048 float64: 33.6 TB
    with pytest.raises(MemoryError, match=r"dim=2048, num_classes=1000000.*num_classes \* dim \* dim float64"):
        StreamingCovariance(2048, num_classes=10**6)
    StreamingCovariance(64, num_classes=10)  # small state is allocated as usual


def test_state_stays_exactly_symmetric():
    g = torch.Generator().manual_seed(13)
    for K, n, dtype in ((None, 300, torch.float32), (5, 300, torch.float32), (3, 700, torch.float64)):
        s = StreamingCovariance(70, num_classes=K)  # 70: partial tiles, large (BLAS) and small classes
        for _ in range(3):
            z = (torch.randn(n, 70, generator=g, dtype=torch.float64) * 3 + 50).to(dtype)
            s.update(z, None if K is None else torch.randint(0, K, (n,), generator=g))
        assert torch.equal(s.M2, s.M2.transpose(-1, -2))


def test_float32_first_rows_unlike_the_rest():
    # Large float32 batches are centred on the mean of their first rows when the batch mean is
    # near it; columns where it is not (here: 50 standard deviations away, with a large offset,
    # or sorted data) must be centred again on the batch mean, else float32 cancellation shows.
    g = torch.Generator().manual_seed(18)
    x = torch.randn(3000, 24, generator=g, dtype=torch.float64) * 0.1 + 1e4
    x[:40] += 5.0
    x[:, 3] = x[:, 3].sort().values
    x = x.float()
    for labels in (None, torch.zeros(3000, dtype=torch.int64)):
        s = StreamingCovariance(24, num_classes=None if labels is None else 1)
        for chunk, lc in zip(x.split(1000), [None] * 3 if labels is None else labels.split(1000)):
            s.update(chunk, lc)
        cov = s.covariance() if labels is None else s.covariance()[0]
        assert rel_err(cov, np_cov(x.double().numpy())) < 1e-5


@pytest.mark.parametrize(
    "n,d,k",
    [
        (1500, 70, None),  # one set, BLAS over all rows (a multi-threaded GEMM would cut the rows)
        (9000, 130, None),  # one set cut into row chunks, their products summed in chunk order
        (512, 256, None),
        (3000, 40, 2),  # large classes
        (1024, 96, 50),  # small classes
        (5000, 70, 3),  # unsorted labels, mixed sizes
    ],
)
def test_results_independent_of_thread_count(n, d, k):
    g = torch.Generator().manual_seed(17)
    z = torch.randn(n, d, generator=g) * 2 + 1e3
    labels = None if k is None else torch.randint(0, k, (n,), generator=g)
    if k == 3:
        labels[: n // 2] = 0  # one large class, the others smaller
    states = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            s = StreamingCovariance(d, num_classes=k)
            for zc, lc in zip(z.split(n // 2 + 1), [None, None] if k is None else labels.split(n // 2 + 1)):
                s.update(zc, lc)
            states.append(s.state_dict())
    finally:
        torch.set_num_threads(threads)
    for other in states[1:]:
        for name in ("count", "mean", "M2"):
            assert torch.equal(states[0][name], other[name]), name


def test_empty_batch_is_a_no_op():
    for k in (None, 3):
        s = StreamingCovariance(4, num_classes=k)
        s.update(torch.randn(5, 4), None if k is None else torch.tensor([0, 1, 1, 2, 0]))
        before = s.state_dict()
        s.update(torch.empty(0, 4), None if k is None else torch.empty(0, dtype=torch.int64))
        after = s.state_dict()
        for name in ("count", "mean", "M2"):
            assert torch.equal(before[name], after[name])


def test_bad_inputs():
    s = StreamingCovariance(4)
    with pytest.raises(ValueError, match="dim"):
        StreamingCovariance(0)
    with pytest.raises(ValueError, match="num_classes"):
        StreamingCovariance(4, num_classes=0)
    with pytest.raises(TypeError, match="z must be a torch.Tensor"):
        s.update([[1.0] * 4])
    with pytest.raises(TypeError, match="z must be float"):
        s.update(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"z.shape\[1\]"):
        s.update(torch.ones(3, 5))
    with pytest.raises(ValueError, match="reduce"):
        s.update(torch.ones(3, 4, 2), reduce="max")
    with pytest.raises(ValueError, match="labels must be None"):
        s.update(torch.ones(3, 4), torch.zeros(3, dtype=torch.int64))
    c = StreamingCovariance(4, num_classes=2)
    with pytest.raises(ValueError, match="labels are required"):
        c.update(torch.ones(3, 4))
    with pytest.raises(TypeError, match="labels must be an integer"):
        c.update(torch.ones(3, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="labels must lie"):
        c.update(torch.ones(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="labels must have shape"):
        c.update(torch.ones(3, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="dim=4, num_classes=2"):
        s.merge(c)


@requires_cuda
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(500, 16, generator=g, dtype=torch.float64) + 1e6
    labels = torch.randint(0, 5, (500,), generator=g)
    for K in (None, 5):
        cpu, gpu = StreamingCovariance(16, num_classes=K), StreamingCovariance(16, num_classes=K, device="cuda")
        for xc, lc in zip(x.split(50), labels.split(50)):
            cpu.update(xc, None if K is None else lc)
            gpu.update(xc.cuda(), None if K is None else lc.cuda())
        assert torch.equal(cpu.count, gpu.count.cpu())
        assert rel_err(gpu.M2, cpu.M2.numpy()) < 1e-9


@requires_cuda
def test_cuda_per_class_no_host_sync_and_k_beyond_grid_limits():
    # K = 70000 > 65535 (the old grid.y limit); only a few classes present; no device-to-host sync
    g = torch.Generator().manual_seed(14)
    K, D = 70000, 24
    x = torch.randn(200, D, generator=g, dtype=torch.float64) + 1e3
    labels = torch.randint(0, 7, (200,), generator=g) * 9999  # classes 0, 9999, ..., 69993
    cpu = StreamingCovariance(D, num_classes=K)
    gpu = StreamingCovariance(D, num_classes=K, device="cuda")
    cpu.update(x, labels)
    xg, lg = x.cuda(), labels.cuda()
    gpu.update(xg, lg)  # warm-up: lazy CUDA initialization may sync
    torch.cuda.synchronize()
    gpu = StreamingCovariance(D, num_classes=K, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu.update(xg, lg)  # the whole update: label segmentation, checks and the op
    finally:
        torch.cuda.set_sync_debug_mode("default")
    present = labels.unique()
    assert torch.equal(cpu.count, gpu.count.cpu())
    assert rel_err(gpu.M2[present.cuda()], cpu.M2[present].numpy()) < 1e-10


@requires_cuda
def test_cuda_kernels_once_match_cpu():
    from selkernels.bench.covariance import run_kernels_once

    errors = run_kernels_once("cuda")
    assert all(err < 1e-10 for err in errors.values()), errors


def test_shared_segmentation_equals_labels():
    # the step's LabelSegments (one segmentation for the selectivity ops and the covariance) gives
    # the same statistics as the labels, for rows and for flattened positions
    g = torch.Generator().manual_seed(21)
    z = torch.randn(24, 5, 2, 3, generator=g) + 3
    labels = torch.randint(0, 4, (24,), generator=g)
    labels[[2, 9]] = -1
    seg = selkernels.segment_labels(labels, 4, ignore_index=-1)
    for reduce in ("mean", "flatten"):
        a = StreamingCovariance(5, num_classes=4, ignore_index=-1)
        b = StreamingCovariance(5, num_classes=4, ignore_index=-1)
        a.update(z, labels, reduce=reduce)
        b.update(z, seg, reduce=reduce)
        for name in ("count", "mean", "M2"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (reduce, name)
        rows = z.flatten(2).mean(-1) if reduce == "mean" else z.flatten(2).transpose(1, 2).reshape(-1, 5)
        row_labels = labels if reduce == "mean" else labels.repeat_interleave(6)
        oracle = per_class_oracle(rows, row_labels, 4)
        for k in range(4):
            assert int(b.count[k]) == oracle[k][0]
            assert rel_err(b.M2[k], oracle[k][2]) < 1e-5
    with pytest.raises(ValueError, match="K = 4 classes and N = 24 samples; expected num_classes=3"):
        StreamingCovariance(5, num_classes=3).update(z, seg)
    with pytest.raises(ValueError, match="N = z.shape"):
        StreamingCovariance(5, num_classes=4).update(z[:10], seg)


def test_op_refuses_invalid_labels_and_bad_segmentations_before_any_change():
    z = torch.randn(6, 3)
    labels = torch.tensor([0, 1, 1, 0, 2, 1])
    f64 = torch.float64
    state = (torch.zeros(2, dtype=torch.int64), torch.zeros(2, 3, dtype=f64), torch.zeros(2, 3, 3, dtype=f64))
    seg = selkernels.LabelSegments(*torch.ops.selkernels.segment_labels(torch.tensor([0, 1, 1, 0, 0, 1]), 2, -100))
    bad = seg._replace(invalid=torch.tensor(1))  # what a CUDA segmentation of `labels` reports
    with pytest.raises(ValueError, match=r"1 labels lie outside \[0, num_classes=2\)"):
        torch.ops.selkernels.class_moments_update_(z, *bad, *state)
    with pytest.raises(RuntimeError, match="order"):
        torch.ops.selkernels.class_moments_update_(z, *seg._replace(order=seg.order + 6), *state)
    with pytest.raises(RuntimeError, match="offsets"):
        torch.ops.selkernels.class_moments_update_(z, *seg._replace(offsets=torch.tensor([0, 4, 9])), *state)
    assert not any(t.any() for t in state)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=2\).*labels\[4\] = 2"):
        StreamingCovariance(3, num_classes=2).update(z, labels)


@requires_cuda
def test_cuda_invalid_labels_leave_the_batch_out_and_raise_at_the_next_read():
    g = torch.Generator().manual_seed(22)
    z = torch.randn(40, 6, generator=g, dtype=torch.float64).cuda()
    labels = torch.randint(0, 3, (40,), generator=g).cuda()
    s = StreamingCovariance(6, num_classes=3, device="cuda")
    s.update(z[:20], labels[:20])
    before = s.state_dict()
    bad = labels[20:].clone()
    bad[4] = 7
    s.update(z[20:], bad)  # no sync, no error yet
    with pytest.raises(ValueError, match=r"1 labels outside \[0, num_classes=3\)"):
        s.covariance()
    after = s.state_dict()  # raised once; the state is the good batch's alone
    for name in ("count", "mean", "M2"):
        assert torch.equal(before[name], after[name])
