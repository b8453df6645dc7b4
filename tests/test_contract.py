"""The contract every public op and module keeps, checked as one matrix: CASES x MODES.

A new op or module gets every check by being added to CASES (one ``Case``): how to make inputs,
how to call it (returning its output tensors), and an independent float64 reference. The modes:

* autocast  -- inside ``torch.autocast("cpu", bfloat16 / float16)`` the result equals the result
  outside (each op declares float32 compute and honours it; nothing is lowered silently);
* compile   -- ``torch.compile(fullgraph=True, dynamic=True)`` over two batch sizes equals eager,
  forward and backward;
* double_backward -- ``create_graph=True`` second derivatives equal the reference's (or a clear
  error; never silent zeros);
* copy      -- ``copy.deepcopy`` and ``pickle`` (of the module, mid-stream) continue identically;
* nonfinite -- a NaN or Inf in the input shows up in the output (never hidden as a finite value);
* empty     -- N = 0 and zero-size feature / spatial dims: no crash, the documented result;
* meta, fake -- meta-device and FakeTensorMode inputs give the real call's shapes and dtypes;
* label_widths -- integer labels of every width (int8..int64, uint8..uint64) equal int64 labels;
* label_range, uint64_labels -- labels outside [0, K) (including uint64 values that wrap to
  ignore_index in int64) raise ValueError.

A mode that a case does not yet pass because another change is fixing it is listed in the case's
``xfail`` with the reason (strict: it fails the suite once the fix lands, so the entry is removed).
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
from collections.abc import Sequence
from typing import Callable

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import selkernels
from selkernels import reference, spectrum

K = 4  # classes
C = 5  # units
SPATIAL = (3, 2)
D = 6  # spectral / covariance dim
TAU = 1

INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64)


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    name: str
    make: Callable[[int, torch.Generator], dict[str, torch.Tensor]]  # n -> inputs (float64 floats)
    run: Callable[..., tuple[torch.Tensor, ...]]  # public API -> output tensors
    ref: Callable[..., tuple[torch.Tensor, ...]]  # float64 reference
    float_keys: Sequence[str]  # activations (cast per mode)
    grad_keys: Sequence[str] = ()  # differentiable inputs
    label_key: str | None = None
    # stateful modules: build() -> obj, feed(obj, **inputs), read(obj) -> tensors; run = read(feed(build()))
    build: Callable | None = None
    feed: Callable | None = None
    read: Callable | None = None
    # modules built before the call (outside torch.compile): prepare() -> ctx, then run(ctx, **inputs)
    prepare: Callable | None = None
    empty: Sequence[Callable[[], dict[str, torch.Tensor]]] = ()  # zero-size inputs
    xfail: dict[str, str] = dataclasses.field(default_factory=dict)
    skip: dict[str, str] = dataclasses.field(default_factory=dict)  # modes that do not apply, and why
    tol: float = 1e-6

    def __str__(self):
        return self.name

    def call(self, inputs):
        return self.run(**inputs) if self.prepare is None else self.run(self.prepare(), **inputs)


def _labels(n, g):
    labels = torch.randint(0, K, (n,), generator=g)
    labels[: min(n, K)] = torch.arange(min(n, K))
    return labels


def _act(n, g):
    return {"x": torch.rand((n, C) + SPATIAL, generator=g, dtype=torch.float64) + 0.1, "labels": _labels(n, g)}


# Empty activations of the layer ops: no samples, then no units.
_ACT_EMPTY = [
    lambda: {"x": torch.rand(0, C, 3), "labels": torch.zeros(0, dtype=torch.int64)},
    lambda: {"x": torch.rand(6, 0, 3), "labels": torch.arange(6) % K},
]
_SAMPLES_EMPTY = [  # the streaming-covariance cases: N = 0 and zero trailing positions
    lambda: {"z": torch.rand(0, D, 2), "labels": torch.zeros(0, dtype=torch.int64)},
    lambda: {"z": torch.rand(5, D, 0), "labels": torch.arange(5) % K},
]


def _spectral(n, g):
    h = torch.randn(n, D, generator=g, dtype=torch.float64) @ torch.randn(D, D, generator=g, dtype=torch.float64)
    V, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    return {"h": h, "V": V}


def _segments_ref(labels):
    labels = labels.long()
    valid = (labels >= 0) & (labels < K)
    lab = torch.where(valid, labels, -1)
    counts = torch.bincount(lab[valid], minlength=K)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    order = torch.sort(torch.where(valid, lab, K), stable=True).indices
    return lab, counts, offsets, order, (~valid & (labels != -100)).sum()


def _two_layers(x, labels):
    """A second layer of another width and spatial shape, for the list form of the ops."""
    return {"x": x, "y": x[:, :3, :, 0] * 2 + 0.5, "labels": labels}


def _means_counts(n, g):
    return {"means": torch.rand(K, C, generator=g, dtype=torch.float64), "counts": torch.tensor([3, 0, 2, 5][:K])}


def _samples(n, g):
    return {"z": torch.randn(n, D, 2, generator=g, dtype=torch.float64) * 2 + 1, "labels": _labels(n, g)}


def _cov_batch(n, g):
    z = torch.randn(3, n, D, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, D, dtype=torch.float64)
    return {"cov": z.transpose(1, 2) @ z / max(n - 1, 1) + 1e-3 * torch.eye(D, dtype=torch.float64)}


def _ref_cov_state(z, labels=None):
    z = z.double().mean(-1)
    groups = [z] if labels is None else [z[labels.long() == k] for k in range(K)]
    counts, means, m2s = [], [], []
    for rows in groups:
        mean = rows.mean(0) if rows.shape[0] else torch.zeros(D, dtype=torch.float64)
        counts.append(rows.shape[0])
        means.append(mean)
        m2s.append((rows - mean).T @ (rows - mean))
    out = torch.tensor(counts), torch.stack(means), torch.stack(m2s)
    return tuple(t[0] for t in out) if labels is None else out


def _cov_read(stats):
    return stats.count, stats.mean, stats.M2


def _eigvals_ref(cov):
    return torch.linalg.eigvalsh(cov.double()).flip(-1).clamp_min(0)


def _eigvals_batch(n, g):
    return {"lam": _eigvals_ref(_cov_batch(n, g)["cov"])}


def _power_law_ref(lam):
    y, x = lam.double().log(), torch.arange(1, D + 1, dtype=torch.float64).log()
    return (-((y - y.mean(-1, keepdim=True)) * (x - x.mean())).sum(-1) / ((x - x.mean()) ** 2).sum(),)


class _Layer(nn.Module):
    """A fixed linear layer whose output [N, *out_shape] the regularizers hook. It runs outside
    autocast, so that the autocast mode checks the regularizer, not the layer."""

    def __init__(self, in_features, out_shape):
        super().__init__()
        numel = int(torch.tensor(out_shape).prod())
        self.weight = nn.Parameter(
            torch.sin(torch.arange(numel * in_features, dtype=torch.float64) * 0.7).view(numel, in_features) * 0.5
        )
        self.out_shape = out_shape

    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            return (x @ self.weight.to(x.dtype).T).view(x.shape[0], *self.out_shape)


def _class_selectivity_read(metric):
    result = metric.compute()[0]
    return result.class_sums, result.counts, result.si


def _class_selectivity_ref(x, labels):
    """Dataset-level SI of one batch: float64 class sums of the unit means, then the paper's SI."""
    means, counts = reference.class_means_reference(x.double(), labels.long(), K)
    return means * counts.unsqueeze(1), counts, reference.selectivity_from_means_reference(means, counts)


def _sel_reg_make(n, g):
    return {"x": torch.rand(n, 7, generator=g, dtype=torch.float64), "labels": _labels(n, g)}


def _sel_reg_prepare():
    layer = _Layer(7, (C,) + SPATIAL)
    return layer, selkernels.SelectivityRegularizer(layer, alpha=1.0, num_classes=K)


def _sel_reg_run(ctx, x, labels):
    layer, reg = ctx
    layer(x)
    return (reg.penalty(labels),)


def _sel_reg_ref(x, labels):
    return (-reference.selectivity_index_reference(_Layer(7, (C,) + SPATIAL)(x.double()), labels.long(), K).mean(),)


def _basis():
    return torch.linalg.qr(torch.cos(torch.arange(D * D, dtype=torch.float64)).view(D, D) + 2 * torch.eye(D))[0]


def _spec_reg_prepare():
    layer = _Layer(D, (D,))
    reg = selkernels.SpectralRegularizer(layer, beta=1.0, tau=TAU)
    reg.bases = [_basis()]
    return layer, reg


def _spec_reg_run(ctx, h):
    layer, reg = ctx
    layer(h)
    return (reg.penalty(),)


def _spec_reg_ref(h):
    return (reference.spectral_penalty_reference(_Layer(D, (D,))(h.double()), _basis(), tau=TAU),)


CASES = [
    Case(
        "class_means",
        _act,
        run=lambda x, labels: selkernels.class_means(x, labels, K),
        ref=lambda x, labels: reference.class_means_reference(x.double(), labels.long(), K),
        float_keys=("x",),
        grad_keys=("x",),
        label_key="labels",
        empty=_ACT_EMPTY,
    ),
    Case(
        "selectivity_index",
        _act,
        run=lambda x, labels: (selkernels.selectivity_index(x, labels, K),),
        ref=lambda x, labels: (reference.selectivity_index_reference(x.double(), labels.long(), K),),
        float_keys=("x",),
        grad_keys=("x",),
        label_key="labels",
        empty=_ACT_EMPTY,
    ),
    Case(
        "segment_labels",
        lambda n, g: {"labels": _labels(n, g)},
        run=lambda labels: tuple(selkernels.segment_labels(labels, K)),
        ref=_segments_ref,
        float_keys=(),
        label_key="labels",
        empty=[lambda: {"labels": torch.zeros(0, dtype=torch.int64)}],
    ),
    Case(
        "class_means[unit_dim=-1]",
        lambda n, g: {"x": _act(n, g)["x"].flatten(2).movedim(1, -1).contiguous(), "labels": _act(n, g)["labels"]},
        run=lambda x, labels: selkernels.class_means(x, labels, K, unit_dim=-1),
        ref=lambda x, labels: reference.class_means_reference(x.double().movedim(-1, 1), labels.long(), K),
        float_keys=("x",),
        grad_keys=("x",),
        label_key="labels",
        empty=[lambda: {"x": torch.rand(0, 3, C), "labels": torch.zeros(0, dtype=torch.int64)}],
    ),
    Case(
        "selectivity_index[layer list, LabelSegments]",
        lambda n, g: _two_layers(**_act(n, g)),
        run=lambda x, y, labels: tuple(selkernels.selectivity_index([x, y], selkernels.segment_labels(labels, K))),
        ref=lambda x, y, labels: (
            reference.selectivity_index_reference(x.double(), labels.long(), K),
            reference.selectivity_index_reference(y.double(), labels.long(), K),
        ),
        float_keys=("x", "y"),
        grad_keys=("x", "y"),
        label_key="labels",
    ),
    Case(
        "selectivity_from_means",
        _means_counts,
        run=lambda means, counts: (selkernels.selectivity_from_means(means, counts),),
        ref=lambda means, counts: (
            reference.selectivity_from_means_reference(means.double(), counts)
            if len(counts)
            else torch.zeros(means.shape[1], dtype=torch.float64),
        ),  # no class: SI 0
        float_keys=("means",),
        grad_keys=("means",),
        empty=[
            lambda: {"means": torch.rand(K, 0), "counts": torch.ones(K, dtype=torch.int64)},
            lambda: {"means": torch.rand(0, C), "counts": torch.zeros(0, dtype=torch.int64)},
        ],
    ),
    Case(
        "spectral_penalty",
        _spectral,
        run=lambda h, V: (selkernels.spectral_penalty(h, V, tau=TAU),),
        ref=lambda h, V: (reference.spectral_penalty_reference(h.double(), V.double(), tau=TAU),),
        float_keys=("h", "V"),
        grad_keys=("h", "V"),
        empty=[lambda: {"h": torch.rand(0, D), "V": torch.eye(D)}, lambda: {"h": torch.rand(8, 0), "V": torch.eye(0)}],
        tol=1e-5,
    ),
    Case(
        "StreamingCovariance",
        _samples,
        run=None,
        ref=lambda z, labels: _ref_cov_state(z),
        float_keys=("z",),
        build=lambda: selkernels.StreamingCovariance(D),
        feed=lambda stats, z, labels: stats.update(z),
        read=_cov_read,
        empty=_SAMPLES_EMPTY,
    ),
    Case(
        "StreamingCovariance[per class]",
        _samples,
        run=None,
        ref=lambda z, labels: _ref_cov_state(z, labels),
        float_keys=("z",),
        label_key="labels",
        build=lambda: selkernels.StreamingCovariance(D, num_classes=K),
        feed=lambda stats, z, labels: stats.update(z, labels),
        read=_cov_read,
        empty=_SAMPLES_EMPTY,
    ),
    Case(
        "ClassSelectivity",
        _act,
        run=None,
        ref=_class_selectivity_ref,
        float_keys=("x",),
        label_key="labels",
        build=lambda: selkernels.ClassSelectivity(None, K),
        feed=lambda metric, x, labels: metric.update_from(x, labels),
        read=_class_selectivity_read,
        empty=_ACT_EMPTY,
    ),
    Case(
        "SelectivityRegularizer",
        _sel_reg_make,
        run=_sel_reg_run,
        ref=_sel_reg_ref,
        prepare=_sel_reg_prepare,
        float_keys=("x",),
        grad_keys=("x",),
        label_key="labels",
        empty=[lambda: {"x": torch.rand(0, 7), "labels": torch.zeros(0, dtype=torch.int64)}],
    ),
    Case(
        "SpectralRegularizer",
        lambda n, g: {"h": _spectral(n, g)["h"]},
        run=_spec_reg_run,
        ref=_spec_reg_ref,
        prepare=_spec_reg_prepare,
        float_keys=("h",),
        grad_keys=("h",),
        empty=[lambda: {"h": torch.rand(0, D)}],
        tol=1e-5,
    ),
    Case(
        "spectrum.eigenvalues",
        _cov_batch,
        run=lambda cov: (spectrum.eigenvalues(cov),),
        ref=lambda cov: (_eigvals_ref(cov),),
        float_keys=("cov",),
        empty=[lambda: {"cov": torch.rand(0, D, D)}, lambda: {"cov": torch.rand(2, 0, 0)}],
    ),
    Case(
        "spectrum.participation_ratio",
        _eigvals_batch,
        run=lambda lam: (spectrum.participation_ratio(lam),),
        ref=lambda lam: (lam.double().sum(-1) ** 2 / (lam.double() ** 2).sum(-1),),
        float_keys=("lam",),
        empty=[lambda: {"lam": torch.rand(0, D)}],
    ),
    Case(
        "spectrum.effective_rank",
        _eigvals_batch,
        run=lambda lam: (spectrum.effective_rank(lam),),
        ref=lambda lam: (
            (lambda p: torch.exp(-(p * p.log()).sum(-1)))(lam.double() / lam.double().sum(-1, keepdim=True)),
        ),
        float_keys=("lam",),
        empty=[lambda: {"lam": torch.rand(0, D)}],
    ),
    Case(
        "spectrum.power_law_alpha",
        _eigvals_batch,
        run=lambda lam: (spectrum.power_law_alpha(lam, fit_range=(1, D)),),
        ref=_power_law_ref,
        float_keys=("lam",),
        empty=[lambda: {"lam": torch.rand(0, D)}],
    ),
    Case(
        "distributed.global_selectivity_index",
        _act,
        run=lambda x, labels: (selkernels.distributed.global_selectivity_index(x, labels, K),),
        ref=lambda x, labels: (reference.selectivity_index_reference(x.double(), labels.long(), K),),
        float_keys=("x",),
        grad_keys=("x",),
        label_key="labels",
        empty=_ACT_EMPTY[:1],
    ),
]

for _case in CASES:
    if _case.build is not None:
        _case.run = (lambda c: lambda **inp: c.read(_fed(c, c.build(), inp)))(_case)


def _fed(case, obj, inputs):
    case.feed(obj, **inputs)
    return obj


def _inputs(case, n=24, seed=0, dtype=torch.float32):
    inputs = case.make(n, torch.Generator().manual_seed(seed))
    return {k: (v.to(dtype) if k in case.float_keys else v) for k, v in inputs.items()}


def _close(got, expected, tol, what=""):
    assert len(got) == len(expected), what
    for a, b in zip(got, expected):
        assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        if a.dtype.is_floating_point or b.dtype.is_floating_point:
            torch.testing.assert_close(
                a.double(),
                b.double(),
                rtol=tol,
                atol=tol * max(1.0, b.double().abs().max().item() if b.numel() else 1.0),
                equal_nan=True,
                msg=what,
            )
        else:
            assert torch.equal(a.long(), b.long()), what


def _mode(case, mode):
    marks = []
    if mode in case.xfail:
        marks.append(pytest.mark.xfail(reason=case.xfail[mode], strict=True))
    if mode in case.skip:
        marks.append(pytest.mark.skip(reason=case.skip[mode]))
    return pytest.param(case, id=case.name, marks=marks)


def cases_for(mode, where: Callable[[Case], bool] = lambda c: True):
    return [_mode(c, mode) for c in CASES if where(c)]


# ------------------------------------------------------------------------------------------------
# Baseline: every case matches its reference (float64), so the modes below compare against truth
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", cases_for("reference"))
def test_matches_reference(case):
    inputs = _inputs(case, dtype=torch.float64)
    _close(case.call(inputs), case.ref(**inputs), 1e-9, case.name)


# ------------------------------------------------------------------------------------------------
# autocast
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", cases_for("autocast"))
def test_autocast_does_not_lower_precision(case, amp_dtype):
    inputs = _inputs(case, dtype=torch.float32)
    outside = case.call(inputs)
    with torch.autocast("cpu", dtype=amp_dtype):
        inside = case.call(inputs)
    for a, b in zip(inside, outside):
        assert a.dtype == b.dtype
    _close(inside, outside, 1e-6, f"{case.name} under {amp_dtype} autocast")


# ------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True, dynamic=True)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", cases_for("compile"))
def test_compile_fullgraph_dynamic(case):
    torch._dynamo.reset()
    if case.build is not None:  # stateful: compile the update of a live module
        eager_obj, compiled_obj = case.build(), case.build()
        step = torch.compile(
            lambda inp: case.feed(compiled_obj, **inp), fullgraph=True, dynamic=True, backend="aot_eager"
        )
        for n, seed in ((24, 0), (31, 1)):
            inputs = _inputs(case, n, seed)
            case.feed(eager_obj, **inputs)
            step(inputs)
        _close(case.read(compiled_obj), case.read(eager_obj), 1e-6, case.name)
        return
    ctx = None if case.prepare is None else case.prepare()
    run = case.run if ctx is None else (lambda **inp: case.run(ctx, **inp))
    fn = torch.compile(lambda inp: run(**inp), fullgraph=True, dynamic=True, backend="aot_eager")
    for n, seed in ((24, 0), (31, 1)):
        inputs = _inputs(case, n, seed)
        eager_in = {k: v.clone().requires_grad_(k in case.grad_keys) for k, v in inputs.items()}
        comp_in = {k: v.clone().requires_grad_(k in case.grad_keys) for k, v in inputs.items()}
        eager, compiled = case.call(eager_in), fn(comp_in)
        _close(compiled, eager, 1e-6, case.name)
        if case.grad_keys:
            torch.autograd.backward(
                [o for o in eager if o.requires_grad], [torch.ones_like(o) for o in eager if o.requires_grad]
            )
            torch.autograd.backward(
                [o for o in compiled if o.requires_grad], [torch.ones_like(o) for o in compiled if o.requires_grad]
            )
            for k in case.grad_keys:
                _close((comp_in[k].grad,), (eager_in[k].grad,), 1e-5, f"{case.name} grad {k}")


# ------------------------------------------------------------------------------------------------
# double backward
# ------------------------------------------------------------------------------------------------
def _second_derivatives(fn, inputs, grad_keys):
    """Derivatives of a scalar of the vector-Jacobian product v^T J (create_graph=True) w.r.t. the
    inputs and v: nonzero in v for every differentiable op (the backward is linear in v), and in
    the inputs wherever the op is nonlinear. None (unused) is returned as zeros."""
    inputs = {k: v.clone().requires_grad_(k in grad_keys) for k, v in inputs.items()}
    outs = [o for o in fn(**inputs) if o.dtype.is_floating_point]
    vs = [torch.linspace(0.5, 1.5, o.numel(), dtype=o.dtype).view_as(o).requires_grad_() for o in outs]
    wrt = [inputs[k] for k in grad_keys]
    first = torch.autograd.grad(sum((o * v).sum() for o, v in zip(outs, vs)), wrt, create_graph=True)
    scalar = sum((g * g * torch.linspace(-1, 1, g.numel(), dtype=g.dtype).view_as(g)).sum() for g in first)
    second = torch.autograd.grad(scalar, wrt + vs, allow_unused=True)
    return [torch.zeros_like(t) if d is None else d for d, t in zip(second, wrt + vs)]


@pytest.mark.parametrize("case", cases_for("double_backward", lambda c: bool(c.grad_keys)))
def test_double_backward_matches_reference(case):
    inputs = _inputs(case, dtype=torch.float64)
    got = _second_derivatives(lambda **inp: case.call(inp), inputs, case.grad_keys)
    expected = _second_derivatives(case.ref, inputs, case.grad_keys)
    assert any(b.abs().max() > 0 for b in expected), f"{case.name}: the reference has no second derivative"
    names = list(case.grad_keys) + [f"grad_output{i}" for i in range(len(got) - len(case.grad_keys))]
    for name, a, b in zip(names, got, expected):
        _close((a,), (b,), 1e-7, f"{case.name} d2/d{name}")


# ------------------------------------------------------------------------------------------------
# deepcopy / pickle of the module mid-stream
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("case", cases_for("copy", lambda c: c.build is not None))
def test_copy_continues_identically(case, how):
    original = case.build()
    case.feed(original, **_inputs(case, 24, 0))
    clone = copy.deepcopy(original) if how == "deepcopy" else pickle.loads(pickle.dumps(original))
    more = _inputs(case, 17, 1)
    case.feed(original, **more)
    case.feed(clone, **more)
    _close(case.read(clone), case.read(original), 0, case.name)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("reg_class", ["SelectivityRegularizer", "SpectralRegularizer"])
def test_regularizer_survives_copies_of_the_model(reg_class, how):
    layer = _Layer(D, (D, 2))
    if reg_class == "SelectivityRegularizer":
        reg = selkernels.SelectivityRegularizer(layer, alpha=1.0, num_classes=K)
        penalty = lambda r: r.penalty(torch.arange(12) % K)  # noqa: E731
    else:
        reg = selkernels.SpectralRegularizer(layer, beta=1.0, tau=TAU)
        reg.bases = [torch.eye(2 * D, dtype=torch.float64)]
        penalty = lambda r: r.penalty()  # noqa: E731
    x = torch.rand(12, D, dtype=torch.float64)
    layer(x)
    expected = penalty(reg)
    model_copy = copy.deepcopy(layer) if how == "deepcopy" else pickle.loads(pickle.dumps(layer))
    layer(x)
    model_copy(x * 3)  # the copy's hooks must not write into reg
    torch.testing.assert_close(penalty(reg), expected)
    pair = copy.deepcopy((layer, reg)) if how == "deepcopy" else pickle.loads(pickle.dumps((layer, reg)))
    pair[0](x)
    torch.testing.assert_close(penalty(pair[1]), expected)


# ------------------------------------------------------------------------------------------------
# NaN / Inf inputs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("case", cases_for("nonfinite"))
def test_nonfinite_input_is_not_hidden(case, value):
    for key in case.float_keys:
        inputs = _inputs(case, dtype=torch.float64)
        poisoned = inputs[key].clone(memory_format=torch.contiguous_format)
        poisoned.view(-1)[poisoned.numel() // 2] = value
        inputs[key] = poisoned
        outs = [o for o in case.call(inputs) if o.dtype.is_floating_point]
        assert any(not torch.isfinite(o).all() for o in outs), f"{case.name}: {value} in {key} hidden"


# ------------------------------------------------------------------------------------------------
# empty and zero-size inputs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", cases_for("empty", lambda c: bool(c.empty)))
def test_empty_and_zero_size(case):
    for make in case.empty:
        inputs = {k: (v.double() if k in case.float_keys else v) for k, v in make().items()}
        if case.name.startswith("StreamingCovariance") and inputs["z"].shape[-1] == 0:
            obj = case.build()
            with pytest.raises(ValueError, match="no spatial positions"):
                case.feed(obj, **inputs)
            assert int(obj.count.sum()) == 0
            continue
        got = case.call(inputs)
        for o in got:
            assert not (o.dtype.is_floating_point and torch.isnan(o).any()), f"{case.name}: NaN from empty input"
        _close(got, case.ref(**inputs), 1e-9, f"{case.name} on {[tuple(v.shape) for v in inputs.values()]}")


# ------------------------------------------------------------------------------------------------
# meta and fake tensors
# ------------------------------------------------------------------------------------------------
def _shapes(outs):
    return [(tuple(o.shape), o.dtype) for o in outs]


@pytest.mark.parametrize("case", cases_for("meta", lambda c: c.build is None and c.prepare is None))
def test_meta_tensors(case):
    inputs = _inputs(case)
    real = case.call(inputs)
    meta = case.call({k: v.to("meta") for k, v in inputs.items()})
    assert all(o.device.type == "meta" for o in meta)
    assert _shapes(meta) == _shapes(real)


@pytest.mark.parametrize("case", cases_for("fake", lambda c: c.build is None and c.prepare is None))
def test_fake_tensors(case):
    inputs = _inputs(case)
    real = case.call(inputs)
    with FakeTensorMode() as mode:
        fake = case.call({k: mode.from_tensor(v) for k, v in inputs.items()})
    assert _shapes(fake) == _shapes(real)


# ------------------------------------------------------------------------------------------------
# integer labels of every width
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize("case", cases_for("label_widths", lambda c: c.label_key is not None))
def test_integer_label_widths(case, dtype):
    inputs = _inputs(case, dtype=torch.float64)
    expected = case.call(inputs)
    inputs[case.label_key] = inputs[case.label_key].to(dtype)
    _close(case.call(inputs), expected, 0, f"{case.name} with {dtype} labels")


def _refused(case, bad, dtype):
    inputs = _inputs(case, dtype=torch.float64)
    labels = inputs[case.label_key].to(dtype)
    inputs[case.label_key] = torch.cat([labels[:1], torch.tensor([bad], dtype=dtype), labels[2:]])
    with pytest.raises(ValueError, match="labels"):
        case.call(inputs)


@pytest.mark.parametrize("bad", [K, -7])
@pytest.mark.parametrize("case", cases_for("label_range", lambda c: c.label_key is not None))
def test_out_of_range_labels_are_refused(case, bad):
    _refused(case, bad, torch.int64)


@pytest.mark.parametrize("case", cases_for("uint64_labels", lambda c: c.label_key is not None))
def test_uint64_labels_past_int64_are_refused(case):
    # 2**64 - 100 as uint64 is -100 (the default ignore_index) once cast to int64: it must be
    # refused, never silently ignored
    _refused(case, 2**64 - 100, torch.uint64)
