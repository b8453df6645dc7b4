"""Regression tests for misbehaviour found by hostile-but-realistic use: each fails on the code
before its fix (a hidden NaN, a silent zero, a lowered precision, a copy writing into the original,
an unpicklable hook, corrupt state accepted, a misleading error) and passes after it."""

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import selkernels
from selkernels import SelectivityRegularizer, SpectralRegularizer, StreamingCovariance, spectral_penalty, spectrum
from selkernels.reference import spectral_penalty_reference


def spectral_inputs(N=48, D=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64) @ torch.randn(D, D, generator=g, dtype=torch.float64)
    V, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    return h.to(dtype), V.to(torch.float64 if dtype == torch.float64 else torch.float32)


def second_derivatives(fn, h, V, tau):
    """d/d(h, V) of a scalar built from the first derivatives (create_graph=True)."""
    h, V = h.clone().requires_grad_(), V.clone().requires_grad_()
    gh, gV = torch.autograd.grad(fn(h, V, tau=tau), (h, V), create_graph=True)
    weight_h, weight_V = torch.linspace(-1, 1, gh.numel(), dtype=gh.dtype).view_as(gh), torch.ones_like(gV)
    return torch.autograd.grad((gh * gh * weight_h).sum() + (gV * weight_V).sum(), (h, V))


# ---- row 1: double backward of spectral_penalty ------------------------------------------------
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("N,D,tau", [(48, 16, 2), (10, 16, 3)])  # full rank, and rank-deficient
def test_spectral_penalty_double_backward_matches_reference(dtype, rtol, N, D, tau):
    h, V = spectral_inputs(N, D, seed=N, dtype=dtype)
    got = second_derivatives(spectral_penalty, h, V, tau)
    ref = second_derivatives(spectral_penalty_reference, h, V, tau)
    for a, b in zip(got, ref):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())


# ---- row 2: non-finite inputs give NaN, not 0 --------------------------------------------------
def _poisoned(kind):
    h, V = spectral_inputs(dtype=torch.float32)
    if kind == "nan_h":
        h[3, 2] = float("nan")
    elif kind == "inf_h":
        h[0, 0] = float("inf")
    elif kind == "nan_V":
        V[1, 4] = float("nan")
    else:  # the float32 variance overflows
        h = h * 1e20
    return h, V


@pytest.mark.parametrize("kind", ["nan_h", "inf_h", "nan_V", "overflow"])
def test_spectral_penalty_propagates_nan(kind):
    h, V = _poisoned(kind)
    h.requires_grad_()
    loss = spectral_penalty(h, V, tau=2)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.isnan(h.grad).all()


# ---- rows 3 and 12: copies of the hooked model, pickling the regularizer ---------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(12, 8, generator=g), torch.arange(12) % 3


def test_deepcopy_of_hooked_model_does_not_write_into_the_original():
    model = Net()
    reg = SelectivityRegularizer(model.fc1, alpha=1.0, num_classes=3)
    ema = copy.deepcopy(model)
    x, y = _batch()
    model(x)
    with torch.no_grad():
        ema(x + 3.0)  # the EMA/teacher forward runs after the student's
    penalty = reg.penalty(y)
    assert penalty.requires_grad
    fc1 = nn.functional.linear(x, model.fc1.weight, model.fc1.bias)  # not through the hook
    expected = -selkernels.selectivity_index(fc1, y, 3).mean()
    torch.testing.assert_close(penalty, expected)
    penalty.backward()
    assert model.fc1.weight.grad.abs().sum() > 0
    with torch.no_grad():
        ema(x)
    with pytest.raises(RuntimeError, match="produced no output"):
        reg.penalty(y)


def test_deepcopy_of_model_and_regularizer_together_binds_the_copy():
    model = Net()
    reg = SpectralRegularizer(model.fc1, beta=1.0, tau=1)
    model_copy, reg_copy = copy.deepcopy((model, reg))
    assert reg_copy.modules[0] is model_copy.fc1
    x, _ = _batch()
    model_copy(x)
    assert reg_copy._outputs[0] is not None and reg._outputs[0] is None
    reg_copy.remove()
    model_copy(x)
    assert reg_copy._outputs[0] is None


def test_regularizer_pickles_and_torch_save_of_hooked_model():
    model = Net()
    reg = SelectivityRegularizer([model.fc1, model.fc2], alpha=-0.5, num_classes=3)
    x, y = _batch()
    model(x)  # held (non-leaf) outputs must not stop a copy
    loaded_model, loaded_reg = pickle.loads(pickle.dumps((model, reg)))
    assert loaded_reg.alpha == -0.5 and loaded_reg._outputs == [None, None]
    loaded_model(x)
    torch.testing.assert_close(loaded_reg.penalty(y), reg.penalty(y))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    restored = torch.load(buf, weights_only=False)
    restored(x)  # inert hooks: the original regularizer sees nothing
    with pytest.raises(RuntimeError, match="produced no output"):
        reg.penalty(y)


# ---- rows 4 and 5: autocast -----------------------------------------------------------------------
def _rel_err(got, ref):
    return float((got - ref).norm() / ref.norm())


@pytest.mark.parametrize("num_classes", [None, 4])
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_streaming_covariance_under_autocast_keeps_float32(num_classes, amp_dtype):
    # (the per-class path was already right; it is here so that both paths stay so)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(512, 32, generator=g) + 3
    labels = torch.arange(512) % 4
    stats = StreamingCovariance(32, num_classes=num_classes)
    with torch.autocast("cpu", dtype=amp_dtype):
        stats.update(z, None if num_classes is None else labels)
    zd = z.double().numpy()
    if num_classes is None:
        ref = torch.from_numpy(np.cov(zd, rowvar=False))
    else:
        ref = torch.stack([torch.from_numpy(np.cov(zd[labels.numpy() == k], rowvar=False)) for k in range(4)])
    assert _rel_err(stats.covariance(), ref) < 1e-6


def test_class_moments_op_under_autocast_keeps_float32():
    g = torch.Generator().manual_seed(3)
    z, labels = torch.randn(256, 16, generator=g) + 2, torch.arange(256) % 3
    state = (
        torch.zeros(3, dtype=torch.int64),
        torch.zeros(3, 16, dtype=torch.float64),
        torch.zeros(3, 16, 16, dtype=torch.float64),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.ops.selkernels.class_moments_update_(z, *selkernels.segment_labels(labels, 3), *state)
    zd = z.double()
    ref = torch.stack(
        [
            torch.from_numpy(np.cov(zd[labels == k].numpy(), rowvar=False)) * (int((labels == k).sum()) - 1)
            for k in range(3)
        ]
    )
    assert _rel_err(state[2], ref) < 1e-6


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_spectral_penalty_under_autocast_equals_outside(amp_dtype, in_dtype):
    h, V = spectral_inputs(dtype=in_dtype)
    h = (h / h.float().std()).to(in_dtype)
    outside = spectral_penalty(h, V, tau=2)
    with torch.autocast("cpu", dtype=amp_dtype):
        inside = spectral_penalty(h, V, tau=2)
    assert inside.dtype == outside.dtype
    torch.testing.assert_close(inside, outside, rtol=1e-6, atol=0)


# ---- row 6 (and 15 for tau): traceable, complete argument checks ---------------------------------
def test_spectral_penalty_compiles_fullgraph_dynamic_with_python_float_slope():
    torch._dynamo.reset()
    f = torch.compile(
        lambda h, V, slope: spectral_penalty(h, V, slope=slope, tau=2),
        fullgraph=True,
        dynamic=True,
        backend="aot_eager",
    )
    for N, slope in ((40, 1.5), (56, 0.75)):
        h, V = spectral_inputs(N, 16, seed=N, dtype=torch.float32)
        torch.testing.assert_close(f(h, V, slope), spectral_penalty(h, V, slope=slope, tau=2))


@pytest.mark.parametrize(
    "tau,exc,match",
    [
        (2**63, ValueError, "tau must be >= 0 and fit in int64"),
        (-1, ValueError, "tau must be >= 0"),
        (2.0, TypeError, "tau must be an int"),
    ],
)
def test_spectral_penalty_tau_range(tau, exc, match):
    h, V = spectral_inputs()
    with pytest.raises(exc, match=match):
        spectral_penalty(h, V, tau=tau)


@pytest.mark.parametrize("slope", [float("nan"), float("inf"), "1"])
def test_spectral_penalty_bad_slope(slope):
    h, V = spectral_inputs()
    with pytest.raises(TypeError, match="slope must be a finite float"):
        spectral_penalty(h, V, slope=slope)


# ---- row 9: load_state_dict validates before it changes anything -----------------------------------
def _trained(num_classes):
    stats = StreamingCovariance(3, num_classes=num_classes)
    g = torch.Generator().manual_seed(4)
    stats.update(torch.randn(20, 3, generator=g), None if num_classes is None else torch.arange(20) % 2)
    return stats


def _corrupt(state, key, value):
    state = dict(state)
    state[key] = value
    return state


@pytest.mark.parametrize("num_classes", [None, 2])
@pytest.mark.parametrize(
    "corruption,exc,match",
    [
        (lambda s: _corrupt(s, "mean", s["mean"].flatten()[:1]), ValueError, r"state\['mean'\] must have shape"),
        (lambda s: _corrupt(s, "M2", s["M2"][..., 0]), ValueError, r"state\['M2'\] must have shape"),
        (
            lambda s: (
                _corrupt(s, "count", torch.tensor(5)) if s["num_classes"] else _corrupt(s, "count", torch.tensor([5]))
            ),
            ValueError,
            r"state\['count'\] must have shape",
        ),
        (lambda s: _corrupt(s, "count", s["count"] - 100), ValueError, r"state\['count'\] must be >= 0"),
        (lambda s: _corrupt(s, "count", s["count"].double() + 0.5), TypeError, r"state\['count'\] must be an integer"),
        (lambda s: _corrupt(s, "mean", torch.full_like(s["mean"], float("nan"))), ValueError, "NaN or Inf"),
        (lambda s: _corrupt(s, "M2", torch.full_like(s["M2"], float("inf"))), ValueError, "NaN or Inf"),
        (lambda s: _corrupt(s, "mean", s["mean"].long()), TypeError, r"state\['mean'\] must be a floating"),
        (lambda s: _corrupt(s, "mean", s["mean"].tolist()), TypeError, r"state\['mean'\] must be a torch.Tensor"),
        (lambda s: {k: v for k, v in s.items() if k != "M2"}, ValueError, r"missing \['M2'\]"),
        (lambda s: list(s.items()), TypeError, "state must be a dict"),
    ],
)
def test_load_state_dict_rejects_corrupt_state(num_classes, corruption, exc, match):
    stats = _trained(num_classes)
    before = stats.state_dict()
    with pytest.raises(exc, match=match):
        stats.load_state_dict(corruption(_trained(num_classes).state_dict()))
    after = stats.state_dict()
    for key in ("count", "mean", "M2"):
        assert torch.equal(before[key], after[key])
    stats.update(torch.ones(2, 3), None if num_classes is None else torch.tensor([0, 1]))  # still usable


def test_load_state_dict_round_trip_and_continue():
    source = _trained(None)
    target = StreamingCovariance(3)
    target.load_state_dict(source.state_dict())
    batch = torch.randn(7, 3)
    source.update(batch)
    target.update(batch)
    assert torch.equal(source.M2, target.M2) and int(target.count) == 27


# ---- row 10: spectrum statistics at the edges ----------------------------------------------------------
@pytest.mark.parametrize(
    "lam,pr,er",
    [
        (torch.zeros(5), float("nan"), float("nan")),
        (torch.tensor([1.0, float("nan")]), float("nan"), float("nan")),
        (torch.tensor([1.0, float("inf")]), float("nan"), float("nan")),
        (torch.tensor([2.0, -1.0]), 1.0 / 5.0, float("nan")),
        (torch.full((5,), 1e308, dtype=torch.float64), 5.0, 5.0),
        (torch.full((5,), 1e-200, dtype=torch.float64), 5.0, 5.0),
        (torch.full((5,), 1e200, dtype=torch.float64), 5.0, 5.0),
        (torch.tensor([1e300, 1e300, 0.0], dtype=torch.float64), 2.0, 2.0),
    ],
)
def test_spectrum_statistics_edges(lam, pr, er):
    for fn, expected in ((spectrum.participation_ratio, pr), (spectrum.effective_rank, er)):
        got = fn(lam).item()
        assert (np.isnan(got) and np.isnan(expected)) or got == pytest.approx(expected, rel=1e-12), fn.__name__


def test_n_components_marks_nan_spectra():
    lam = torch.tensor([[3.0, 1.0], [float("nan"), 1.0]], dtype=torch.float64)
    assert spectrum.n_components(lam, 0.7).tolist() == [1, -1]


# ---- row 11: one unseen class does not fail the whole batch of eigendecompositions --------------------
def test_eigenvalues_with_an_unseen_class():
    stats = StreamingCovariance(4, num_classes=3)
    g = torch.Generator().manual_seed(5)
    stats.update(torch.randn(30, 4, generator=g), torch.arange(30) % 2)  # class 2 never seen
    cov = stats.covariance()
    vals = spectrum.eigenvalues(cov)
    vals_v, vecs = spectrum.eigenvalues(cov, eigenvectors=True)
    assert torch.isnan(vals[2]).all() and torch.isnan(vecs[2]).all()
    for k in (0, 1):
        ref = np.sort(np.linalg.eigvalsh(cov[k].numpy()))[::-1]
        np.testing.assert_allclose(vals[k].numpy(), ref, rtol=1e-12)
        torch.testing.assert_close(cov[k] @ vecs[k], vecs[k] * vals_v[k])


def test_eigenvalues_near_the_float64_range():
    # entries above half the float64 maximum: symmetrising as cov + cov^T would overflow
    for top in (1e308, 1e-315):
        lam = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64) * top
        rot, _ = torch.linalg.qr(
            torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, -1.0, 1.0]], dtype=torch.float64)
        )
        cov = (rot * (lam / top)) @ rot.T * top
        torch.testing.assert_close(spectrum.eigenvalues(cov) / top, lam / top)


# ---- row 14: no spatial positions ----------------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [None, 3])
def test_streaming_covariance_zero_spatial_size(num_classes):
    stats = (
        _trained(None if num_classes is None else 2) if num_classes is None else StreamingCovariance(3, num_classes=3)
    )
    labels = None if num_classes is None else torch.arange(8) % 3
    before = stats.state_dict()
    with pytest.raises(ValueError, match="no spatial positions"):
        stats.update(torch.randn(8, 3, 0), labels)
    stats.update(torch.randn(8, 3, 0, 2), labels, reduce="flatten")  # zero samples: a no-op
    after = stats.state_dict()
    for key in ("count", "mean", "M2"):
        assert torch.equal(before[key], after[key])
        assert torch.isfinite(after[key].double()).all()


# ---- row 15: label widths and ignore_index in the per-class update ------------------------------------
INT_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64]


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_streaming_covariance_accepts_every_integer_label_width(dtype):
    g = torch.Generator().manual_seed(6)
    z, labels = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.arange(40) % 4
    ref, got = StreamingCovariance(5, num_classes=4), StreamingCovariance(5, num_classes=4)
    ref.update(z, labels)
    got.update(z, labels.to(dtype))
    assert torch.equal(ref.count, got.count) and torch.equal(ref.M2, got.M2)


def test_streaming_covariance_ignore_index():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(30, 4, 2, generator=g, dtype=torch.float64)
    labels = torch.arange(30) % 3
    labels[::4] = -100
    for reduce in ("mean", "flatten"):
        got = StreamingCovariance(4, num_classes=3)
        got.update(z, labels, reduce=reduce)
        ref = StreamingCovariance(4, num_classes=3)
        keep = labels != -100
        ref.update(z[keep], labels[keep], reduce=reduce)
        assert torch.equal(got.count, ref.count)
        torch.testing.assert_close(got.M2, ref.M2, rtol=1e-12, atol=1e-12)
    custom = StreamingCovariance(4, num_classes=3, ignore_index=2)
    custom.update(z[:, :, 0], labels.clamp_min(0))
    assert custom.count[2] == 0 and custom.count.sum() == int((labels.clamp_min(0) != 2).sum())


@pytest.mark.parametrize(
    "labels,match",
    [
        (torch.tensor([0, 1, 2**64 - 100], dtype=torch.uint64), r"found labels\[2\] = 18446744073709551516"),
        (torch.tensor([0, 1, 300], dtype=torch.uint16), r"found labels\[2\] = 300"),
        (torch.tensor([0, -5, 1]), r"found labels\[1\] = -5"),
    ],
)
def test_streaming_covariance_bad_labels_name_the_value(labels, match):
    stats = StreamingCovariance(2, num_classes=3)
    with pytest.raises(ValueError, match=match):
        stats.update(torch.ones(3, 2), labels)
    assert stats.count.sum() == 0


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"ignore_index": 2**63}, ValueError, "ignore_index must fit in int64"),
        ({"ignore_index": 1.0}, TypeError, "ignore_index must be an int"),
        ({"num_classes": 2**63}, ValueError, "num_classes"),
    ],
)
def test_streaming_covariance_constructor_ranges(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        StreamingCovariance(3, **{"num_classes": 2, **kwargs})


def test_per_class_update_compiles_with_ignored_labels():
    torch._dynamo.reset()
    eager, compiled = StreamingCovariance(4, num_classes=3), StreamingCovariance(4, num_classes=3)
    step = torch.compile(lambda z, y: compiled.update(z, y), fullgraph=True, dynamic=True, backend="aot_eager")
    g = torch.Generator().manual_seed(8)
    for n in (20, 27):
        z, labels = torch.randn(n, 4, generator=g, dtype=torch.float64), torch.arange(n) % 3
        labels[::5] = -100
        eager.update(z, labels)
        step(z, labels)
    assert torch.equal(eager.count, compiled.count)
    torch.testing.assert_close(eager.M2, compiled.M2, rtol=1e-12, atol=1e-12)
    before = compiled.state_dict()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=3\).*labels\[3\] = 3"):
        step(torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1]))
    assert all(torch.equal(before[k], compiled.state_dict()[k]) for k in ("count", "mean", "M2"))
