"""Class-conditional density models, shrinkage, DP mixtures and the two-mode summary."""

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import requires_cuda
from scipy.stats import multivariate_normal
from sklearn.covariance import oas

from selkernels import StreamingCovariance
from selkernels.analysis import (
    ClassConditionalGaussian,
    ClassDensityReport,
    class_density,
    fit_dp_mixture,
    two_mode_split,
)


def _gaussian_classes(k=4, d=3, n=60, seed=0, scales=None):
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in range(k):
        a = torch.randn(d, d, generator=g, dtype=torch.float64) * (1 if scales is None else scales[c])
        xs.append(
            torch.randn(n, d, generator=g, dtype=torch.float64) @ a
            + 4 * torch.randn(d, generator=g, dtype=torch.float64)
        )
        ys.append(torch.full((n,), c))
    perm = torch.randperm(k * n, generator=g)
    return torch.cat(xs)[perm], torch.cat(ys)[perm]


def _stats(x, y, k, batch=17):
    st = StreamingCovariance(x.shape[1], num_classes=k)
    for i in range(0, len(x), batch):
        st.update(x[i : i + batch], y[i : i + batch])
    return st


def test_log_prob_matches_scipy_without_shrinkage():
    x, y = _gaussian_classes()
    model = ClassConditionalGaussian.from_statistics(_stats(x, y, 4), shrinkage=0.0, ridge=0.0)
    z = torch.randn(25, 3, dtype=torch.float64) * 3
    lp = model.log_prob(z)
    assert lp.shape == (25, 4) and lp.dtype == torch.float64
    for c in range(4):
        xc = x[y == c].numpy()
        ref = multivariate_normal(mean=xc.mean(0), cov=np.cov(xc.T)).logpdf(z.numpy())
        np.testing.assert_allclose(lp[:, c].numpy(), ref, rtol=1e-10, atol=1e-10)


def test_log_prob_explicit_parameters_float32_input():
    g = torch.Generator().manual_seed(1)
    means = torch.randn(3, 4, generator=g, dtype=torch.float64)
    a = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    covs = a @ a.transpose(1, 2) + 0.5 * torch.eye(4, dtype=torch.float64)
    model = ClassConditionalGaussian(means, covs)
    z = torch.randn(10, 4, generator=g)
    lp = model.log_prob(z)
    for c in range(3):
        ref = multivariate_normal(mean=means[c].numpy(), cov=covs[c].numpy()).logpdf(z.double().numpy())
        np.testing.assert_allclose(lp[:, c].numpy(), ref, rtol=1e-10)


def test_oas_matches_sklearn():
    x, y = _gaussian_classes(k=3, d=5, n=12, seed=2)  # few samples: substantial shrinkage
    model = ClassConditionalGaussian.from_statistics(_stats(x, y, 3), shrinkage="oas", ridge=0.0)
    for c in range(3):
        cov_ref, coef_ref = oas(x[y == c].numpy())
        assert float(model.shrinkage_coef[c]) == pytest.approx(coef_ref, rel=1e-10)
        np.testing.assert_allclose(model.covariances[c].numpy(), cov_ref, rtol=1e-10, atol=1e-12)


def test_fixed_shrinkage_and_ridge_formula():
    x, y = _gaussian_classes(k=2, d=4, n=30, seed=3)
    a, ridge = 0.3, 1e-3
    model = ClassConditionalGaussian.from_statistics(_stats(x, y, 2), shrinkage=a, ridge=ridge)
    covs = [np.cov(x[y == c].numpy().T) for c in range(2)]
    s = np.mean([np.trace(cv) / 4 for cv in covs])
    for c in range(2):
        ref = (1 - a) * covs[c] + (a * np.trace(covs[c]) / 4 + ridge * s) * np.eye(4)
        np.testing.assert_allclose(model.covariances[c].numpy(), ref, rtol=1e-10)


@pytest.mark.parametrize("shrinkage", [0.0, 0.4, "oas"])
def test_mean_log_density_is_mean_of_own_log_probs(shrinkage):
    x, y = _gaussian_classes(k=3, d=4, n=40, seed=4)
    model = ClassConditionalGaussian.from_statistics(_stats(x, y, 3), shrinkage=shrinkage, ridge=0.0)
    lp = model.log_prob(x)
    ref = torch.stack([lp[y == c, c].mean() for c in range(3)])
    torch.testing.assert_close(model.mean_log_density(), ref, rtol=1e-10, atol=1e-10)


def test_rank_deficient_absent_and_singleton_classes():
    d = 6
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3 + 20 + 1, d, generator=g, dtype=torch.float64)
    y = torch.tensor([0] * 3 + [1] * 20 + [3])  # class 0: 3 samples < D, class 2 absent, class 3 single
    st = _stats(x, y, 4)
    with pytest.raises(ValueError, match="shrinkage"):
        ClassConditionalGaussian.from_statistics(st, shrinkage=0.0, ridge=0.0)
    model = ClassConditionalGaussian.from_statistics(st, shrinkage=0.0, ridge=1e-6)
    lp = model.log_prob(x)
    assert torch.isfinite(lp[:, [0, 1, 3]]).all()
    assert torch.isneginf(lp[:, 2]).all()
    mld = model.mean_log_density()
    assert math.isnan(float(mld[2])) and torch.isfinite(mld[[0, 1, 3]]).all()
    # the singleton class falls back to the isotropic pooled variance
    pooled = np.mean([np.trace(np.cov(x[y == c].numpy().T)) / d for c in (0, 1)])
    np.testing.assert_allclose(model.covariances[3].numpy(), pooled * (1 + 1e-6) * np.eye(d), rtol=1e-10)
    split = two_mode_split(mld)
    assert sorted(split.order) == [0, 1, 3]


def test_two_mode_split_finds_planted_gap():
    g = torch.Generator().manual_seed(6)
    low = -5 + 0.5 * torch.rand(6, generator=g, dtype=torch.float64)
    high = 1 + 0.5 * torch.rand(4, generator=g, dtype=torch.float64)
    perm = torch.randperm(10, generator=g)
    values = torch.cat([low, high])[perm]
    is_low = (perm < 6).tolist()
    s = two_mode_split(values)
    assert sorted(s.low) == sorted(i for i in range(10) if is_low[i])
    assert sorted(s.high) == sorted(i for i in range(10) if not is_low[i])
    assert -4.5 < s.threshold < 1
    assert s.gap > 5.0 and s.gap_ratio > 10
    assert s.values == sorted(s.values)
    # evenly spread values have no standout gap
    assert two_mode_split(torch.arange(8.0)).gap_ratio == pytest.approx(1.0)


class Features(nn.Module):
    def __init__(self, d, k):
        super().__init__()
        self.body = nn.Identity()
        self.head = nn.Linear(d, k).double()

    def forward(self, x):
        return self.head(self.body(x).flatten(2).mean(-1) if x.dim() > 2 else self.body(x))


def test_class_density_recovers_two_modes_end_to_end(tmp_path):
    # Classes 0-4 are tight (variance 0.01: high log-density of their own samples), 5-9 broad
    # (variance 1): the split separates exactly these groups. Inputs are [N, C, H, W] maps
    # whose spatial mean is the class sample, so global average pooling recovers it.
    k, d, n = 10, 4, 80
    scales = [0.1] * 5 + [1.0] * 5
    x, y = _gaussian_classes(k=k, d=d, n=n, seed=7, scales=scales)
    maps = x[:, :, None, None] + torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    loader = [(maps[i : i + 64], y[i : i + 64]) for i in range(0, len(y), 64)]
    model = Features(d, k).train()
    rep = class_density(model, ["body"], loader, k, shrinkage=0.0, ridge=0.0)
    assert isinstance(rep, ClassDensityReport) and model.training
    s = rep.splits["body"]
    assert sorted(s.high) == [0, 1, 2, 3, 4] and sorted(s.low) == [5, 6, 7, 8, 9]
    # matches a direct fit on the pooled features
    direct = ClassConditionalGaussian.from_statistics(_stats(x, y, k), shrinkage=0.0, ridge=0.0)
    torch.testing.assert_close(rep.mean_log_density["body"], direct.mean_log_density(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rep.log_prob("body", x), direct.log_prob(x), rtol=1e-9, atol=1e-9)
    rows = rep.to_rows()
    assert rows[0]["n_low"] == 5 and rows[0]["n_high"] == 5 and rows[0]["mean_high"] > rows[0]["mean_low"]
    assert "gap_ratio" in str(rep)
    rep.to_csv(tmp_path / "c.csv")
    with open(tmp_path / "c.csv") as f:
        assert list(csv.DictReader(f))[0]["layer"] == "body"
    rep.plot(tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_projection_top_k_principal_subspace():
    d, k, n = 10, 3, 400
    g = torch.Generator().manual_seed(8)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scales = torch.tensor([5.0, 4.0, 3.0] + [0.1] * 7, dtype=torch.float64)
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ basis.t()
    y = torch.randint(0, 2, (n,), generator=g)
    loader = [(x[i : i + 100], y[i : i + 100]) for i in range(0, n, 100)]
    rep = class_density(Features(d, 2), ["body"], loader, 2, project_dim={"body": k})
    proj = rep.projections["body"]
    assert rep.models["body"].dim == k
    torch.testing.assert_close(proj.components.t() @ proj.components, torch.eye(k, dtype=torch.float64))
    _, vecs = np.linalg.eigh(np.cov(x.numpy().T))
    top = vecs[:, ::-1][:, :k]
    np.testing.assert_allclose(proj.components.numpy() @ proj.components.numpy().T, top @ top.T, atol=1e-9)
    assert 0.9 < proj.explained < 1


def test_dp_mixture_per_class():
    g = np.random.default_rng(9)
    # class 0 bimodal, class 1 unimodal, far apart
    x0 = np.concatenate([g.normal(-6, 0.5, (60, 2)), g.normal(6, 0.5, (60, 2))])
    x1 = g.normal([0, 20], 0.5, (120, 2))
    x = np.concatenate([x0, x1])
    y = np.array([0] * 120 + [1] * 120)
    dp = fit_dp_mixture(x, y, n_components=3)
    lp = dp.log_prob(torch.from_numpy(x))
    assert lp.shape == (240, 2)
    assert (lp.argmax(1).numpy() == y).all()
    np.testing.assert_allclose(dp.mean_log_density[0], dp.models[0].score_samples(x0).mean())
    assert dp.active_components[0] >= 2
    # the mixture fits the bimodal class far better than one Gaussian
    st = _stats(torch.from_numpy(x), torch.from_numpy(y), 2)
    gauss = ClassConditionalGaussian.from_statistics(st, shrinkage=0.0, ridge=0.0)
    assert float(dp.mean_log_density[0]) > float(gauss.mean_log_density()[0]) + 1.0


def test_class_density_with_dp_mixture():
    x, y = _gaussian_classes(k=3, d=3, n=40, seed=10)
    loader = [(x[i : i + 50], y[i : i + 50]) for i in range(0, len(y), 50)]
    rep = class_density(Features(3, 3), ["body"], loader, 3, dp_mixture={"n_components": 3, "max_iter": 100})
    assert rep.dp_models["body"].mean_log_density.shape == (3,)
    assert "dp_gap_ratio" in rep.to_rows()[0]


def test_bad_inputs():
    x, y = _gaussian_classes(k=2, d=3, n=10)
    loader = [(x, y)]
    model = Features(3, 2)
    with pytest.raises(ValueError, match="shrinkage"):
        class_density(model, ["body"], loader, 2, shrinkage=1.5)
    with pytest.raises(ValueError, match="shrinkage"):
        class_density(model, ["body"], loader, 2, shrinkage="ledoit")
    with pytest.raises(ValueError, match="ridge"):
        class_density(model, ["body"], loader, 2, ridge=-1.0)
    with pytest.raises(ValueError, match="num_classes"):
        class_density(model, ["body"], loader, 1)
    with pytest.raises(ValueError, match="project_dim"):
        class_density(model, ["body"], loader, 2, project_dim=0)
    with pytest.raises(ValueError, match="project_dim"):
        class_density(model, ["body"], loader, 2, project_dim={"other": 2})
    with pytest.raises(ValueError, match="labels"):
        class_density(model, ["body"], [(x, y + 5)], 2)
    with pytest.raises(ValueError, match="layers"):
        class_density(model, ["missing"], loader, 2)
    gm = ClassConditionalGaussian.from_statistics(_stats(x, y, 2))
    with pytest.raises(ValueError, match="z"):
        gm.log_prob(torch.randn(4, 5))
    with pytest.raises(TypeError, match="z"):
        gm.log_prob(torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="stats"):
        ClassConditionalGaussian.from_statistics(StreamingCovariance(3))
    with pytest.raises(ValueError, match="covariances"):
        ClassConditionalGaussian(torch.zeros(2, 3), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="values"):
        two_mode_split([1.0, float("nan")])
    with pytest.raises(ValueError, match="n_components"):
        fit_dp_mixture(x, y, n_components=0)
    with pytest.raises(ValueError, match="labels"):
        fit_dp_mixture(x, y.double())


@requires_cuda
def test_cuda_matches_cpu():
    x, y = _gaussian_classes(k=4, d=5, n=50, seed=11)
    loader = [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(y), 64)]
    cpu = class_density(Features(5, 4), ["body"], loader, 4, project_dim=3)
    gpu = class_density(Features(5, 4).cuda(), ["body"], loader, 4, project_dim=3)
    assert gpu.models["body"].cholesky.is_cuda
    torch.testing.assert_close(gpu.mean_log_density["body"], cpu.mean_log_density["body"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gpu.log_prob("body", x.cuda()).cpu(), cpu.log_prob("body", x), rtol=1e-6, atol=1e-6)
