"""Dimensionality analysis, perturbations and gradient variability on synthetic data with known answers."""

import csv

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import requires_cuda

from selkernels.analysis import DimensionalityReport, GaussianNoise, PGDAttack, dimensionality


def _whitened(n, k, seed):
    """[n, k] centred coefficients whose sample covariance (ddof=1) is exactly I_k."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, k, generator=g, dtype=torch.float64)
    c = c - c.mean(0)
    q, _ = torch.linalg.qr(c)
    return q * (n - 1) ** 0.5


def _basis(d, k, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return q


def _loader(x, y, batch):
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]


class Head(nn.Module):
    """Identity 'rep' layer on the input, then a linear classifier (so attacks have logits)."""

    def __init__(self, d, k=3):
        super().__init__()
        self.rep = nn.Identity()
        self.fc = nn.Linear(d, k).double()

    def forward(self, x):
        return self.fc(self.rep(x).flatten(1))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_subspace_gives_k_components(k):
    d, n = 20, 300
    x = _whitened(n, k, seed=k) @ _basis(d, k, seed=10 + k).t() + 3.0  # offset: the mean is irrelevant
    y = torch.zeros(n, dtype=torch.long)
    rep = dimensionality(Head(d), ["rep"], _loader(x, y, 64), {}, grad_units=0)
    assert rep.n_components["clean"]["rep"] == k
    assert rep.participation_ratio["clean"]["rep"] == pytest.approx(k, rel=1e-9)
    ev = rep.eigenvalues["clean"]["rep"]
    assert torch.allclose(ev[:k], torch.ones(k, dtype=torch.float64), atol=1e-9)
    assert float(ev[k:].abs().max()) < 1e-9


@pytest.mark.parametrize("features", ["mean", "flatten"])
def test_conv_features_modes(features):
    # [N, C, H, W] outputs constant over space, carrying a k-dim signal in the channels: both the
    # per-unit spatial mean (D = C) and the flattened output (D = C*H*W) have k components.
    k, c, n = 3, 6, 200
    v = _whitened(n, k, seed=1) @ _basis(c, k, seed=2).t()
    x = v[:, :, None, None].expand(n, c, 2, 3).contiguous()
    model = Head(c * 6)
    rep = dimensionality(
        model, ["rep"], _loader(x, torch.zeros(n, dtype=torch.long), 50), {}, features=features, grad_units=0
    )
    assert rep.covariances["clean"]["rep"].dim == (c if features == "mean" else c * 6)
    assert rep.n_components["clean"]["rep"] == k


def test_matches_numpy_and_is_batch_independent():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64)
    y = torch.zeros(120, dtype=torch.long)
    a = dimensionality(Head(5), ["rep"], _loader(x, y, 7), {}, grad_units=0)
    b = dimensionality(Head(5), ["rep"], _loader(x, y, 120), {}, grad_units=0)
    ref = np.sort(np.linalg.eigvalsh(np.cov(x.numpy().T)))[::-1]
    np.testing.assert_allclose(a.eigenvalues["clean"]["rep"].numpy(), ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b.eigenvalues["clean"]["rep"].numpy(), ref, rtol=1e-10, atol=1e-12)


def test_isotropic_noise_change_is_full_dimensional():
    # Isotropic data through an orthogonal layer; the change caused by isotropic noise is isotropic
    # noise, so it needs every dimension, while a perturbation confined to 2 directions needs 2.
    d, n = 8, 4000
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.zeros(n, dtype=torch.long)
    model = Head(d)
    dirs = _basis(d, 2, seed=4)

    def planar(x, y):
        return x + torch.randn(x.shape[0], 2, dtype=x.dtype) @ dirs.t()

    rep = dimensionality(
        model,
        ["rep"],
        _loader(x, y, 500),
        {"noise": GaussianNoise(0.5, generator=torch.Generator().manual_seed(5)), "planar": planar},
        grad_units=0,
    )
    assert rep.n_components["delta_noise"]["rep"] == d
    assert rep.participation_ratio["delta_noise"]["rep"] > 0.95 * d
    assert rep.n_components["delta_planar"]["rep"] == 2
    # the noise variance is recovered: delta = noise exactly through the identity layer
    assert float(rep.eigenvalues["delta_noise"]["rep"].mean()) == pytest.approx(0.25, rel=0.05)


def test_gradient_variability_known_values():
    # Linear units f_u = w_u . x: every sample has the same gradient w_u (variability across samples
    # 0); with orthonormal w_u over all D units the mean direction has squared norm 1/D, so the
    # variability across units is 1 - 1/D.
    d = 6
    lin = nn.Linear(d, d, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(_basis(d, d, seed=7).t() * torch.arange(1, d + 1, dtype=torch.float64)[:, None])
    model = nn.Sequential(lin, nn.Linear(d, 3).double())
    x = torch.randn(40, d, dtype=torch.float64)
    rep = dimensionality(
        model, ["0"], _loader(x, torch.zeros(40, dtype=torch.long), 16), {}, grad_units=d, grad_samples=30
    )
    across_samples, across_units = rep.gradient_variability["0"]
    assert across_samples == pytest.approx(0.0, abs=1e-12)
    assert across_units == pytest.approx(1 - 1 / d, abs=1e-12)
    assert all(p.grad is None for p in model.parameters())  # input gradients only


def test_gradient_variability_relu_positive():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    x = torch.randn(64, 10)
    rep = dimensionality(
        model, ["1", "3"], _loader(x, torch.zeros(64, dtype=torch.long), 32), {}, grad_units=8, grad_samples=64
    )
    for name in ("1", "3"):
        s, u = rep.gradient_variability[name]
        assert 0 < s <= 1 and 0 < u <= 1


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def test_pgd_within_ball_and_range_and_increases_loss():
    model = _mlp().train()
    x = torch.rand(64, 1, 4, 4)
    y = torch.randint(0, 4, (64,))
    eps = 0.05
    attack = PGDAttack(model, eps=eps, step_size=0.02, steps=7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # works inside no_grad callers
        xa = attack(x, y)
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())
    assert float((xa - x).abs().max()) <= eps + 1e-6
    assert float(xa.min()) >= 0 and float(xa.max()) <= 1
    model.eval()
    with torch.no_grad():
        clean, adv = F.cross_entropy(model(x), y), F.cross_entropy(model(xa), y)
    assert float(adv) > float(clean)
    fgsm = PGDAttack.fgsm(model, eps)(x, y)
    with torch.no_grad():
        assert float(adv) >= float(F.cross_entropy(model(fgsm), y)) - 1e-6  # more steps, no weaker


def test_fgsm_is_one_signed_gradient_step():
    model = _mlp().eval()
    x = torch.rand(32, 1, 4, 4)
    y = torch.randint(0, 4, (32,))
    eps = 0.1
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    expected = (x + eps * grad.sign()).clamp(0, 1)
    assert torch.equal(PGDAttack.fgsm(model, eps)(x, y), expected)
    assert torch.equal(PGDAttack(model, eps, eps, 1, random_start=False)(x, y), expected)


def test_gaussian_noise_statistics_and_clamp():
    x = torch.zeros(20000)
    out = GaussianNoise(0.3, generator=torch.Generator().manual_seed(0))(x)
    assert float(out.std()) == pytest.approx(0.3, rel=0.03)
    clamped = GaussianNoise(2.0, clamp=(0, 1))(x)
    assert float(clamped.min()) >= 0 and float(clamped.max()) <= 1


def test_default_perturbations_and_report_outputs(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    ).train()
    x = torch.rand(48, 1, 6, 6)
    y = torch.randint(0, 3, (48,))
    rep = dimensionality(model, [model[1], "3"], _loader(x, y, 16), grad_units=2, grad_samples=8)
    assert isinstance(rep, DimensionalityReport)
    assert model.training
    assert rep.layers == ["1", "3"] and rep.conditions == ["clean", "delta_noise", "delta_pgd"]
    rows = rep.to_rows()
    assert [r["layer"] for r in rows] == ["1", "3"]
    assert rows[0]["samples"] == 48 and rows[1]["units"] == 6
    for r in rows:
        for c in rep.conditions:
            assert 1 <= r[f"{c}_ncomp"] <= r["units"]
    text = str(rep)
    assert "delta_pgd_ncomp" in text and "gradvar_samples" in text
    rep.to_csv(tmp_path / "d.csv")
    with open(tmp_path / "d.csv") as f:
        read = list(csv.DictReader(f))
    assert [r["layer"] for r in read] == ["1", "3"] and int(read[1]["clean_ncomp"]) == rows[1]["clean_ncomp"]
    rep.plot(tmp_path / "d.png")
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_inputs():
    model = Head(4)
    x = torch.randn(8, 4, dtype=torch.float64)
    loader = _loader(x, torch.zeros(8, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="frac"):
        dimensionality(model, ["rep"], loader, {}, frac=0.0)
    with pytest.raises(ValueError, match="features"):
        dimensionality(model, ["rep"], loader, {}, features="pixels")
    with pytest.raises(ValueError, match="layers"):
        dimensionality(model, ["nope"], loader, {})
    with pytest.raises(ValueError, match="layers"):
        dimensionality(model, [nn.Linear(2, 2)], loader, {})
    with pytest.raises(TypeError, match="layers"):
        dimensionality(model, "rep", loader, {})
    with pytest.raises(TypeError, match="perturbations"):
        dimensionality(model, ["rep"], loader, [GaussianNoise(0.1)])
    with pytest.raises(TypeError, match="perturbations"):
        dimensionality(model, ["rep"], loader, {"x": 3})
    with pytest.raises(ValueError, match="perturbations\\['bad'\\]"):
        dimensionality(model, ["rep"], loader, {"bad": lambda x, y: x[:1]}, grad_units=0)
    with pytest.raises(ValueError, match="grad_units"):
        dimensionality(model, ["rep"], loader, {}, grad_units=-1)
    with pytest.raises(ValueError, match="no batches"):
        dimensionality(model, ["rep"], [], {})
    with pytest.raises(TypeError, match="model"):
        dimensionality("model", ["rep"], loader, {})
    with pytest.raises(ValueError, match="std"):
        GaussianNoise(-1.0)
    with pytest.raises(ValueError, match="clamp"):
        GaussianNoise(0.1, clamp=(1, 0))
    with pytest.raises(ValueError, match="eps"):
        PGDAttack(model, eps=0.0, step_size=0.1, steps=1)
    with pytest.raises(ValueError, match="step_size"):
        PGDAttack(model, eps=0.1, step_size=-0.1, steps=1)
    with pytest.raises(ValueError, match="steps"):
        PGDAttack(model, eps=0.1, step_size=0.1, steps=0)
    with pytest.raises(TypeError, match="model"):
        PGDAttack(None, eps=0.1, step_size=0.1, steps=1)
    with pytest.raises(TypeError, match="y"):
        PGDAttack(model, eps=0.1, step_size=0.1, steps=1)(x, torch.zeros(8))


@requires_cuda
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    y = torch.zeros(64, dtype=torch.long)
    model = Head(6)
    cpu = dimensionality(model, ["rep"], _loader(x, y, 16), {}, grad_units=3, grad_samples=16)
    gpu = dimensionality(model.cuda(), ["rep"], _loader(x, y, 16), {}, grad_units=3, grad_samples=16)
    torch.testing.assert_close(gpu.eigenvalues["clean"]["rep"], cpu.eigenvalues["clean"]["rep"])
    assert gpu.gradient_variability["rep"] == pytest.approx(cpu.gradient_variability["rep"], abs=1e-9)
