"""ClassSelectivity (dataset-level SI), unit_dim, transforms, statistic="sum", layer groups.

Oracles: numpy float64 on the joined data (the definition of Leavitt & Morcos), and the published
computations of Ranadive et al. in selkernels.reference (per-sample dict accumulation of class sums).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import selkernels
from selkernels import ClassSelectivity, SelectivityRegularizer
from selkernels.reference import published_dataset_selectivity, published_grouped_penalty

K = 6


def numpy_selectivity(
    acts: np.ndarray, labels: np.ndarray, num_classes: int, *, statistic="mean", eps=1e-7, ignore_index=-100
):
    """(si, class_means, counts, preferred) in float64 from per-sample unit activations [N, C]."""
    keep = labels != ignore_index
    acts, labels = acts[keep].astype(np.float64), labels[keep]
    c = acts.shape[1]
    sums = np.zeros((num_classes, c))
    counts = np.zeros(num_classes, dtype=np.int64)
    for k in range(num_classes):
        sums[k] = acts[labels == k].sum(0)
        counts[k] = (labels == k).sum()
    means = sums / np.maximum(counts, 1)[:, None]
    present = np.flatnonzero(counts > 0)
    values = (means if statistic == "mean" else sums)[present]
    if len(present) < 2:
        return np.zeros(c), means, counts, None
    mu_max = values.max(0)
    mu_rest = (values.sum(0) - mu_max) / (len(present) - 1)
    preferred = present[values.argmax(0)]
    return (mu_max - mu_rest) / (mu_max + mu_rest + eps), means, counts, preferred


def unit_acts(x: torch.Tensor, unit_dim: int) -> np.ndarray:
    x = x.double()
    if unit_dim == 1:
        return x.flatten(2).mean(-1).numpy() if x.dim() > 2 else x.numpy()
    return x.reshape(x.shape[0], -1, x.shape[-1]).mean(1).numpy()


def make_batches(shapes, num_batches=5, seed=0, dtype=torch.float64, signed=False, imbalanced=True):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for b in range(num_batches):
        n = 7 + 5 * b
        xs = [torch.randn((n,) + s, generator=g, dtype=torch.float64) for s in shapes]
        xs = [(x if signed else x.abs() + 0.05).to(dtype) for x in xs]
        probs = torch.tensor([8.0, 4, 2, 1, 1, 0.0]) if imbalanced else torch.ones(K)  # class 5 absent
        y = torch.multinomial(probs, n, replacement=True, generator=g)
        y[0] = -100  # an ignored sample in every batch
        batches.append((xs, y))
    return batches


def joined(batches):
    return [torch.cat([xs[i] for xs, _ in batches]) for i in range(len(batches[0][0]))], torch.cat(
        [y for _, y in batches]
    )


@pytest.mark.parametrize("statistic", ["mean", "sum"])
@pytest.mark.parametrize("unit_dim,shapes", [(1, [(5, 3, 4), (7,)]), (-1, [(9, 8), (3, 2, 6)])])
def test_many_batches_equal_numpy_on_joined_data(statistic, unit_dim, shapes):
    batches = make_batches(shapes)
    metric = ClassSelectivity(None, K, unit_dim=unit_dim, statistic=statistic)
    for xs, y in batches:
        metric.update_from(xs, y)
    results = metric.compute()
    xs_all, y_all = joined(batches)
    for res, x in zip(results, xs_all):
        si, means, counts, preferred = numpy_selectivity(unit_acts(x, unit_dim), y_all.numpy(), K, statistic=statistic)
        assert res.si.dtype == torch.float64 and res.class_means.dtype == torch.float64
        assert res.counts.dtype == torch.int64 and res.preferred_class.dtype == torch.int64
        np.testing.assert_allclose(res.si.numpy(), si, rtol=0, atol=1e-12)
        np.testing.assert_allclose(res.class_means.numpy(), means, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(res.counts.numpy(), counts)
        np.testing.assert_array_equal(res.preferred_class.numpy(), preferred)
        assert res.mean_si == pytest.approx(float(si.mean()), abs=1e-12)


def test_float32_input_matches_float64_reference():
    batches = make_batches([(16, 4, 4)], dtype=torch.float32, num_batches=8)
    metric = ClassSelectivity(None, K)
    for xs, y in batches:
        metric.update_from(xs, y)
    xs_all, y_all = joined(batches)
    si, means, _, _ = numpy_selectivity(unit_acts(xs_all[0], 1), y_all.numpy(), K)
    res = metric.compute()[0]
    np.testing.assert_allclose(res.class_means.numpy(), means, rtol=2e-6)
    np.testing.assert_allclose(res.si.numpy(), si, rtol=1e-5, atol=1e-6)


def test_batches_equal_one_pass_and_merge_equals_single_pass():
    batches = make_batches([(4, 3, 3), (5, 2)], num_batches=6)
    streamed = ClassSelectivity(None, K)
    for xs, y in batches:
        streamed.update_from(xs, y)
    one_pass = ClassSelectivity(None, K)
    one_pass.update_from(*joined(batches))
    first, second = ClassSelectivity(None, K), ClassSelectivity(None, K)
    for j, (xs, y) in enumerate(batches):
        (first if j % 2 else second).update_from(xs, y)
    merged = first.merge(second)
    for a, b, c in zip(streamed.compute(), one_pass.compute(), merged.compute()):
        for other in (b, c):
            torch.testing.assert_close(a.class_sums, other.class_sums, rtol=0, atol=1e-12)
            torch.testing.assert_close(a.si, other.si, rtol=0, atol=1e-12)
            assert torch.equal(a.counts, other.counts)
    merged.merge(ClassSelectivity(None, K))  # an empty metric adds nothing
    assert torch.equal(merged.compute()[0].counts, streamed.compute()[0].counts)
    with pytest.raises(ValueError, match="statistic"):
        merged.merge(ClassSelectivity(None, K, statistic="sum"))
    bad = ClassSelectivity(None, K)
    bad.update_from([torch.rand(4, 3), torch.rand(4, 5)], torch.arange(4))
    with pytest.raises(ValueError, match="units"):
        merged.merge(bad)


def test_state_dict_round_trip_and_validation():
    batches = make_batches([(4, 2, 2)], num_batches=3)
    metric = ClassSelectivity(None, K, statistic="sum", transform="relu")
    for xs, y in batches:
        metric.update_from(xs, y)
    state = metric.state_dict()
    restored = ClassSelectivity(None, K, statistic="sum", transform="relu")
    restored.load_state_dict(state)
    for a, b in zip(metric.compute(), restored.compute()):
        assert torch.equal(a.si, b.si) and torch.equal(a.counts, b.counts)
    # the restored metric keeps accumulating
    restored.update_from(*batches[0])
    metric.update_from(*batches[0])
    assert torch.equal(metric.compute()[0].class_sums, restored.compute()[0].class_sums)
    with pytest.raises(ValueError, match="transform"):
        ClassSelectivity(None, K, statistic="sum").load_state_dict(state)
    with pytest.raises(ValueError, match="num_classes"):
        ClassSelectivity(None, K + 1, statistic="sum", transform="relu").load_state_dict(state)
    for key, value, match in [
        ("counts", -state["counts"] - 1, "counts"),
        ("counts", state["counts"].float(), "counts"),
        ("sums", [state["sums"][0].float()], "sums"),
        ("sums", [state["sums"][0][:-1]], "sums"),
        ("sums", [state["sums"][0] * float("nan")], "sums"),
    ]:
        broken = dict(state, **{key: value})
        fresh = ClassSelectivity(None, K, statistic="sum", transform="relu")
        with pytest.raises(ValueError, match=match):
            fresh.load_state_dict(broken)
        with pytest.raises(RuntimeError, match="no data"):
            fresh.compute()  # a rejected state changes nothing
    with pytest.raises(ValueError, match="lacks"):
        restored.load_state_dict({"counts": state["counts"]})


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.tokens = nn.Sequential(nn.Linear(4, 6), nn.GELU())
        self.head = nn.Linear(6, K)

    def forward(self, x):
        h = self.conv(x)  # [N, 4, 5, 5]
        t = self.tokens(h.flatten(2).transpose(1, 2))  # [N, 25, 6] tokens
        return self.head(t.mean(1))


def test_hooks_update_and_context_manager():
    torch.manual_seed(0)
    net = TinyNet()
    data = [(torch.randn(9, 1, 5, 5), torch.randint(0, K, (9,))) for _ in range(3)]
    outs = {}
    net.conv.register_forward_hook(lambda m, i, o: outs.__setitem__("conv", o))
    net.tokens.register_forward_hook(lambda m, i, o: outs.__setitem__("tok", o))
    by_hand_conv = ClassSelectivity(None, K)
    by_hand_tok = ClassSelectivity(None, K, unit_dim=-1, transform="abs")
    with (
        ClassSelectivity({"conv": net.conv}, K) as conv_metric,
        ClassSelectivity([net.tokens], K, unit_dim=-1, transform="abs") as tok_metric,
        torch.no_grad(),
    ):
        for x, y in data:
            net(x)
            conv_metric.update(y)
            tok_metric.update(y)
            by_hand_conv.update_from(outs["conv"], y)
            by_hand_tok.update_from(outs["tok"], y)
        with pytest.raises(RuntimeError, match="forward"):
            conv_metric.update(data[0][1])  # no forward since the last update
    assert conv_metric.compute()[0].name == "conv"
    assert torch.equal(conv_metric.compute()[0].si, by_hand_conv.compute()[0].si)
    assert torch.equal(tok_metric.compute()[0].si, by_hand_tok.compute()[0].si)
    assert tok_metric.compute()[0].si.shape == (6,)
    n_hooks = len(net.conv._forward_hooks)
    with ClassSelectivity(net.conv, K):
        assert len(net.conv._forward_hooks) == n_hooks + 1
    assert len(net.conv._forward_hooks) == n_hooks


@pytest.mark.parametrize("transform", [None, "abs", "relu"])
def test_unit_dim_minus_one_equals_transposed(transform):
    batches = make_batches([(5, 3, 7)], signed=transform is not None)
    tokens = ClassSelectivity(None, K, unit_dim=-1, transform=transform)
    transposed = ClassSelectivity(None, K, unit_dim=1, transform=transform)
    for (x,), y in batches:
        tokens.update_from(x, y)
        transposed.update_from(x.movedim(-1, 1), y)
    a, b = tokens.compute()[0], transposed.compute()[0]
    assert a.si.shape == (7,)
    torch.testing.assert_close(a.si, b.si, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.class_means, b.class_means, rtol=0, atol=1e-12)


@pytest.mark.parametrize("transform", ["abs", "relu", None])
def test_sum_statistic_matches_published_analysis(transform):
    """The published ViT analysis: [N, tokens, D] averaged over D (its units are the tokens), |.|
    per sample, class sums, SI over the classes seen, eps 1e-6."""
    batches = make_batches([(6, 10)], signed=transform is not None, num_batches=4)
    batches = [([x], y.clamp_min(0)) for (x,), y in batches]  # the published code has no ignore_index
    metric = ClassSelectivity(None, K, statistic="sum", transform=transform, eps=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # signed input without transform
        for (x,), y in batches:
            metric.update_from(x, y)
        ours = metric.compute()[0].si
    published = published_dataset_selectivity([(x, y) for (x,), y in batches], transform=transform, eps=1e-6)
    torch.testing.assert_close(ours, published, rtol=0, atol=1e-12)
    # per-neuron SI of the same activations: unit_dim=-1 equals the published code on the transpose
    per_neuron = ClassSelectivity(None, K, unit_dim=-1, statistic="sum", transform=transform, eps=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for (x,), y in batches:
            per_neuron.update_from(x, y)
        ours_d = per_neuron.compute()[0].si
    published_d = published_dataset_selectivity(
        [(x.transpose(1, 2), y) for (x,), y in batches], transform=transform, eps=1e-6
    )
    torch.testing.assert_close(ours_d, published_d, rtol=0, atol=1e-12)


def test_mean_and_sum_statistics_differ_on_imbalanced_data():
    batches = make_batches([(12,)], num_batches=4)
    means = ClassSelectivity(None, K)
    sums = ClassSelectivity(None, K, statistic="sum")
    for xs, y in batches:
        means.update_from(xs, y)
        sums.update_from(xs, y)
    # class sums follow the class sizes (8:4:2:1:1), so the largest class dominates mu_max
    assert sums.compute()[0].mean_si > means.compute()[0].mean_si + 0.1
    assert bool((sums.compute()[0].preferred_class == 0).all())


def test_dead_units_do_not_warn():
    metric = ClassSelectivity(None, 3)
    x = torch.rand(6, 2, dtype=torch.float64)
    x[:, 1] = 0  # a dead ReLU unit: SI 0
    metric.update_from(x, torch.tensor([0, 1, 2, 0, 1, 2]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(metric.compute()[0].si[1]) == 0.0


def test_signed_activations_warn_once_per_layer():
    x = torch.tensor([[1.0, 2.0], [-1.2, 2.0], [0.1, 1.0], [0.0, 3.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    metric = ClassSelectivity(None, 2)
    metric.update_from([x, x.abs()], y)
    with pytest.warns(RuntimeWarning, match="layer '0': 1 of 2 units"):
        results = metric.compute()
    # unit 0: class means 0.55 and -0.6, so mu_max + mu_rest < 0 and SI is outside [-1, 1]
    assert float(results[0].si[0]) == pytest.approx((0.55 + 0.6) / (0.55 - 0.6 + 1e-7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metric.compute()  # warned once already
        relu = ClassSelectivity(None, 2, transform="relu")
        relu.update_from(x, y)
        si = relu.compute()[0].si  # relu(x) per sample: no warning, SI in [0, 1]
    assert bool(((si >= 0) & (si <= 1)).all())


def test_layer_groups_mean_si():
    batches = make_batches([(4,), (6,), (3, 2)], num_batches=2)
    metric = ClassSelectivity(None, K, layer_groups=[[0, 2], [1]])
    for xs, y in batches:
        metric.update_from(xs, y)
    res = metric.compute()
    pooled = torch.cat([res[0].si, res[2].si]).mean()
    assert metric.mean_si() == pytest.approx(float((pooled + res[1].si.mean()) / 2), abs=1e-15)
    ungrouped = ClassSelectivity(None, K)
    ungrouped.update_from(*batches[0])
    ungrouped.update_from(*batches[1])
    assert ungrouped.mean_si() == pytest.approx(sum(r.mean_si for r in res) / 3, abs=1e-15)


@pytest.mark.parametrize("statistic", ["mean", "sum"])
def test_regularizer_grouped_sum_matches_published_penalty(statistic):
    """SelectivityRegularizer(statistic="sum", layer_groups=...) is the published training
    regularizer, values and gradients, in float64."""
    g = torch.Generator().manual_seed(3)
    layers = [nn.Identity() for _ in range(3)]
    xs = [torch.rand(12, c, 3, 3, generator=g, dtype=torch.float64, requires_grad=True) for c in (4, 4, 6)]
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 0, 1])
    groups = [[0, 1], [2]]
    with SelectivityRegularizer(
        layers, alpha=0.3, num_classes=K, eps=1e-6, statistic=statistic, layer_groups=groups
    ) as reg:
        for layer, x in zip(layers, xs):
            layer(x)
        ours = reg.penalty(y)
    grads = torch.autograd.grad(ours, xs)
    if statistic == "sum":
        published = published_grouped_penalty(xs, y, groups, alpha=0.3, eps=1e-6)
    else:  # class means: the same grouping over the library's per-layer SI
        si = [selkernels.selectivity_index(x, y, K, eps=1e-6) for x in xs]
        published = -0.3 * (torch.cat(si[:2]).mean() + si[2].mean()) / 2
    ref_grads = torch.autograd.grad(published, xs)
    torch.testing.assert_close(ours, published, rtol=0, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("statistic", ["mean", "sum"])
def test_regularizer_unit_dim_minus_one_equals_transposed(statistic):
    g = torch.Generator().manual_seed(5)
    x = torch.rand(10, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)  # [N, tokens, D]
    y = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 0, 1])
    tok, chan = nn.Identity(), nn.Identity()
    with (
        SelectivityRegularizer(tok, 1.0, K, unit_dim=-1, statistic=statistic) as reg_t,
        SelectivityRegularizer(chan, 1.0, K, statistic=statistic) as reg_c,
    ):
        tok(x)
        xt = x.transpose(1, 2)
        chan(xt)
        si_t = reg_t.unit_selectivity(y)[0]
        si_c = reg_c.unit_selectivity(y)[0]
    assert si_t.shape == (5,)
    torch.testing.assert_close(si_t, si_c, rtol=0, atol=1e-12)
    w = torch.linspace(-1, 2, 5, dtype=torch.float64)
    (g_t,) = torch.autograd.grad((si_t * w).sum(), x, retain_graph=True)
    (g_c,) = torch.autograd.grad((si_c * w).sum(), x)
    torch.testing.assert_close(g_t, g_c, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda z: selkernels.selectivity_index(z, y, K, unit_dim=-1), (x.detach().requires_grad_(),)
    )


def test_empty_batches_and_absent_classes():
    metric = ClassSelectivity(None, K)
    metric.update_from(torch.rand(0, 3, 2), torch.zeros(0, dtype=torch.long))
    res = metric.compute()[0]
    assert torch.equal(res.si, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(res.preferred_class, torch.full((3,), -1))
    metric.update_from(torch.rand(4, 3, 2), torch.full((4,), 2))  # one class: SI 0, preferred 2
    res = metric.compute()[0]
    assert torch.equal(res.si, torch.zeros(3, dtype=torch.float64)) and bool((res.preferred_class == 2).all())


def test_bad_arguments_are_clear_errors():
    for kwargs, match in [
        (dict(unit_dim=0), "unit_dim"),
        (dict(unit_dim=2), "unit_dim"),
        (dict(statistic="median"), "statistic"),
        (dict(transform="gelu"), "transform"),
        (dict(eps=-1.0), "eps"),
        (dict(sync="all"), "sync"),
    ]:
        with pytest.raises(ValueError, match=match):
            ClassSelectivity(None, K, **kwargs)
    layers = [nn.Identity(), nn.Identity()]
    for groups in ([[0]], [[0, 1], [1]], [[0], []], [[0, 2], [1]]):
        with pytest.raises(ValueError, match="layer_groups"):
            ClassSelectivity(layers, K, layer_groups=groups)
        with pytest.raises(ValueError, match="layer_groups"):
            SelectivityRegularizer(layers, 1.0, K, layer_groups=groups)
    with pytest.raises(ValueError, match="statistic"):
        SelectivityRegularizer(layers, 1.0, K, statistic="max")
    with pytest.raises(ValueError, match="unit_dim"):
        SelectivityRegularizer(layers, 1.0, K, unit_dim=2)
    metric = ClassSelectivity(None, K)
    with pytest.raises(RuntimeError, match="no data"):
        metric.compute()
    with pytest.raises(RuntimeError, match="update_from"):
        metric.update(torch.zeros(3, dtype=torch.long))
    metric.update_from(torch.rand(4, 3), torch.arange(4))
    before = metric.state_dict()
    for xs, y, err, match in [
        (torch.rand(4, 5), torch.arange(4), ValueError, "units"),
        ([torch.rand(4, 3), torch.rand(4, 3)], torch.arange(4), ValueError, "1 tensors"),
        (torch.rand(4, 3), torch.tensor([0, 1, 2, K]), ValueError, "labels"),
        (torch.rand(4, 3).long(), torch.arange(4), TypeError, "float"),
        (torch.rand(4), torch.arange(4), ValueError, "2 dims"),
    ]:
        with pytest.raises(err, match=match):
            metric.update_from(xs, y)
    after = metric.state_dict()
    assert torch.equal(before["counts"], after["counts"]) and torch.equal(before["sums"][0], after["sums"][0])


def test_torchmetrics_adapter():
    pytest.importorskip("torchmetrics")
    from selkernels.torchmetrics_adapter import ClassSelectivityMetric

    batches = make_batches([(5, 2, 2), (3,)], num_batches=4)
    tm = ClassSelectivityMetric(K, [5, 3], statistic="sum")
    ours = ClassSelectivity(None, K, statistic="sum")
    for xs, y in batches:
        tm.update(xs, y)
        ours.update_from(xs, y)
    for a, b in zip(tm.compute(), ours.compute()):
        torch.testing.assert_close(a.si, b.si, rtol=0, atol=1e-12)
        assert torch.equal(a.counts, b.counts)
    assert tm.mean_si() == pytest.approx(ours.mean_si(), abs=1e-12)
    other = ClassSelectivityMetric(K, [5, 3], statistic="sum")
    other.merge_state(tm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchmetrics: compute() on merged, never-updated state
        torch.testing.assert_close(other.compute()[0].class_sums, tm.compute()[0].class_sums)
    tm.reset()
    assert int(tm.counts.sum()) == 0
    with pytest.raises(ValueError, match="num_units"):
        tm.update([torch.rand(3, 4, 2), torch.rand(3, 3)], torch.arange(3))
