"""Spectrum statistics against numpy / scipy float64."""

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from selkernels import spectrum


def power_law_cov(D, alpha, seed):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    lam = np.arange(1, D + 1, dtype=np.float64) ** -alpha
    return (q * lam) @ q.T, lam


def test_eigenvalues_vs_scipy_batched():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 40, 20))
    covs = np.einsum("kni,knj->kij", a, a) / 39
    got = spectrum.eigenvalues(torch.from_numpy(covs))
    for k in range(3):
        ref = scipy.linalg.eigh(covs[k], eigvals_only=True)[::-1].clip(min=0)
        np.testing.assert_allclose(got[k].numpy(), ref, rtol=1e-10, atol=1e-12)
    assert torch.all(got[:, :-1] >= got[:, 1:])
    vals, vecs = spectrum.eigenvalues(torch.from_numpy(covs[0]), eigenvectors=True)
    np.testing.assert_allclose((vecs @ torch.diag(vals) @ vecs.T).numpy(), covs[0], atol=1e-12)


def test_eigenvalues_clamps_rank_deficient():
    x = np.random.default_rng(1).standard_normal((5, 30))
    vals = spectrum.eigenvalues(torch.from_numpy(x.T @ x))
    assert (vals >= 0).all() and (vals[5:] < 1e-10).all()


def test_power_law_alpha_vs_scipy_linregress():
    cov, lam = power_law_cov(200, 1.3, 2)
    vals = spectrum.eigenvalues(torch.from_numpy(cov))
    got = spectrum.power_law_alpha(vals)
    assert spectrum.default_fit_range(200) == (10, 100)
    n = np.arange(10, 101)
    ref = -scipy.stats.linregress(np.log(n), np.log(lam[9:100])).slope
    np.testing.assert_allclose(got.item(), ref, rtol=1e-8)
    np.testing.assert_allclose(got.item(), 1.3, rtol=1e-8)
    got = spectrum.power_law_alpha(torch.from_numpy(np.stack([lam, lam**2])), fit_range=(2, 50))
    np.testing.assert_allclose(got.numpy(), [1.3, 2.6], rtol=1e-12)


def np_power_law_fit(lam, lo, hi, weighted):
    """Weighted least squares of log lambda_n = b - alpha log n over ranks lo..hi (numpy, fp64)."""
    n = np.arange(lo, hi + 1, dtype=np.float64)
    y = np.log(lam[lo - 1 : hi])
    X = np.stack([np.ones_like(n), -np.log(n)], axis=1)
    sw = np.sqrt(1.0 / n) if weighted else np.ones_like(n)
    (b, alpha), *_ = np.linalg.lstsq(X * sw[:, None], y * sw, rcond=None)
    pred = X @ np.array([b, alpha])
    r2 = 1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    return alpha, r2


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("fit_range", [None, (11, 100), (6, 100)])
def test_power_law_fit_weighted_and_r2_vs_numpy(weighted, fit_range):
    # a noisy, bent spectrum: the two weightings and the ranges give different alphas
    rng = np.random.default_rng(5)
    D = 256
    lam = np.sort(
        np.arange(1, D + 1, dtype=np.float64) ** -1.2
        * np.exp(0.3 * rng.standard_normal(D))
        * (1 + 5 * np.exp(-np.arange(D) / 4))
    )[::-1].copy()
    alpha, r2 = spectrum.power_law_alpha(torch.from_numpy(lam), fit_range, weighted=weighted, return_r2=True)
    lo, hi = spectrum.default_fit_range(D) if fit_range is None else fit_range
    ref_alpha, ref_r2 = np_power_law_fit(lam, lo, hi, weighted)
    np.testing.assert_allclose(alpha.item(), ref_alpha, rtol=1e-10)
    np.testing.assert_allclose(r2.item(), ref_r2, rtol=1e-10)
    assert 0 < r2.item() < 1
    assert spectrum.power_law_alpha(torch.from_numpy(lam), fit_range, weighted=weighted).item() == alpha.item()
    other, _ = np_power_law_fit(lam, lo, hi, not weighted)
    assert abs(other - ref_alpha) > 1e-3  # the weighting matters on this spectrum


def test_power_law_fit_exact_and_batched():
    lam = np.arange(1, 201, dtype=np.float64) ** -1.3
    batch = torch.from_numpy(np.stack([lam, 3 * lam**2]))
    alpha, r2 = spectrum.power_law_alpha(batch, (11, 100), weighted=True, return_r2=True)
    np.testing.assert_allclose(alpha.numpy(), [1.3, 2.6], rtol=1e-12)
    np.testing.assert_allclose(r2.numpy(), [1.0, 1.0], rtol=1e-12)


def test_power_law_alpha_bad_range_and_zero():
    lam = torch.linspace(1, 0.1, 20, dtype=torch.float64)
    with pytest.raises(ValueError, match="fit_range"):
        spectrum.power_law_alpha(lam, fit_range=(0, 5))
    with pytest.raises(ValueError, match="fit_range"):
        spectrum.power_law_alpha(lam, fit_range=(5, 21))
    lam[-1] = 0
    assert torch.isnan(spectrum.power_law_alpha(lam, fit_range=(1, 20)))
    assert spectrum.default_fit_range(12) == (1, 12)


def test_participation_ratio_and_effective_rank():
    rng = np.random.default_rng(3)
    lam = np.sort(rng.random((4, 30)), axis=1)[:, ::-1].copy()
    t = torch.from_numpy(lam)
    np.testing.assert_allclose(spectrum.participation_ratio(t).numpy(), lam.sum(1) ** 2 / (lam**2).sum(1), rtol=1e-13)
    p = lam / lam.sum(1, keepdims=True)
    np.testing.assert_allclose(spectrum.effective_rank(t).numpy(), np.exp(scipy.stats.entropy(p, axis=1)), rtol=1e-12)
    flat = torch.ones(7, dtype=torch.float64)
    assert spectrum.participation_ratio(flat).item() == pytest.approx(7)
    assert spectrum.effective_rank(torch.tensor([2.0, 0.0, 0.0])).item() == pytest.approx(1)


def test_n_components():
    lam = torch.tensor([[5.0, 3.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    got = spectrum.n_components(lam, frac=0.8)
    ref = [int(np.searchsorted(np.cumsum(r) / r.sum(), 0.8) + 1) for r in lam[:2].numpy()]
    assert got[:2].tolist() == ref == [2, 1]
    assert got[2].item() == 4
    assert spectrum.n_components(lam[0], frac=1.0).item() == 4
    rng = np.random.default_rng(4)
    r = np.sort(rng.random(50))[::-1]
    for frac in (0.5, 0.9, 0.95, 0.99):
        expected = int(np.argmax(np.cumsum(r) / r.sum() >= frac) + 1)
        assert spectrum.n_components(torch.from_numpy(r.copy()), frac).item() == expected
    with pytest.raises(ValueError, match="frac"):
        spectrum.n_components(lam, frac=0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="cov must have shape"):
        spectrum.eigenvalues(torch.ones(3, 4))
    with pytest.raises(TypeError, match="cov must be a floating"):
        spectrum.eigenvalues(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="eigvals must be a torch.Tensor"):
        spectrum.participation_ratio([1.0, 2.0])
    with pytest.raises(ValueError, match="eigvals must have shape"):
        spectrum.effective_rank(torch.tensor(1.0))
