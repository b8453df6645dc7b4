"""Eigen-spectrum statistics of representation covariances.

Every function takes either a covariance matrix [..., D, D] (symmetric PSD; ``eigenvalues`` is
applied first) or, for the ``*_from_eigvals`` entry points, eigenvalues [..., D] sorted
descending; leading dims are batch dims (e.g. per-class covariances [K, D, D]). All results are
float64 and live on the input's device.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "eigenvalues",
    "power_law_alpha",
    "participation_ratio",
    "effective_rank",
    "n_components",
    "default_fit_range",
]


def _check_matrix(cov) -> torch.Tensor:
    if not isinstance(cov, torch.Tensor):
        raise TypeError(f"cov must be a torch.Tensor, got {type(cov).__name__}")
    if not cov.dtype.is_floating_point:
        raise TypeError(f"cov must be a floating-point tensor, got {cov.dtype}")
    if cov.dim() < 2 or cov.shape[-1] != cov.shape[-2]:
        raise ValueError(f"cov must have shape [..., D, D], got {tuple(cov.shape)}")
    return cov


def _check_eigvals(eigvals) -> torch.Tensor:
    if not isinstance(eigvals, torch.Tensor):
        raise TypeError(f"eigvals must be a torch.Tensor, got {type(eigvals).__name__}")
    if not eigvals.dtype.is_floating_point:
        raise TypeError(f"eigvals must be a floating-point tensor, got {eigvals.dtype}")
    if eigvals.dim() < 1 or eigvals.shape[-1] < 1:
        raise ValueError(f"eigvals must have shape [..., D] with D >= 1, got {tuple(eigvals.shape)}")
    return eigvals.double()


def eigenvalues(cov: torch.Tensor, *, eigenvectors: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues of a symmetric covariance [..., D, D], float64, descending, clamped at 0.

    Computed with a float64 ``torch.linalg.eigh`` (the matrix is symmetrised first, so rounding
    asymmetry of an accumulated covariance does not matter, and scaled by its largest entry, so
    entries near the float64 range neither overflow nor underflow). Tiny negative eigenvalues are
    rounding noise of a PSD matrix and are clamped to 0. With ``eigenvectors=True`` returns
    ``(eigvals, V)``, the columns of V in the same (descending) order.

    A matrix with a NaN or Inf entry (e.g. the covariance of a class never seen, see
    :meth:`selkernels.StreamingCovariance.covariance`) gets all-NaN eigenvalues (and eigenvectors);
    the other matrices of the batch are unaffected. Memory: a few float64 copies of cov.
    """
    cov = _check_matrix(cov).double()
    finite = torch.isfinite(cov).flatten(-2).all(-1)
    scale = (
        cov.abs().flatten(-2).amax(-1)
        if cov.shape[-1]
        else torch.zeros(cov.shape[:-2], dtype=cov.dtype, device=cov.device)
    )
    scale = torch.where(finite & (scale > 0), scale, torch.ones_like(scale))
    # eigh fails for the whole batch on one non-finite matrix; decompose zeros there, then mark NaN
    cov = torch.where(finite[..., None, None], cov, torch.zeros_like(cov)) / scale[..., None, None]
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    nan = torch.full((), float("nan"), dtype=cov.dtype, device=cov.device)
    if eigenvectors:
        vals, vecs = torch.linalg.eigh(cov)
        vals = torch.where(finite[..., None], vals.flip(-1).clamp_min(0) * scale[..., None], nan)
        return vals, torch.where(finite[..., None, None], vecs.flip(-1), nan)
    vals = torch.linalg.eigvalsh(cov).flip(-1).clamp_min(0) * scale[..., None]
    return torch.where(finite[..., None], vals, nan)


def default_fit_range(dim: int) -> tuple[int, int]:
    """Default 1-based rank range (lo, hi) of the power-law fit for D eigenvalues: (10, D // 2).

    The leading ~10 eigenvalues reflect a few dominant directions (and the mean structure) rather
    than the tail's power law, and the trailing half is bent down by finite-sample noise (a
    covariance estimated from finitely many samples underestimates small eigenvalues), so the
    fit uses the middle of the spectrum, as in Stringer et al. (2019) and Nassar et al. (2020).
    For small D the range shrinks to (1, D) when (10, D // 2) holds fewer than 2 ranks. The
    published code of Stringer et al. and reptrix fit ranks 11..100 instead, weighted by 1/n:
    see :func:`power_law_alpha`.
    """
    lo, hi = 10, dim // 2
    return (lo, hi) if hi - lo + 1 >= 2 else (1, dim)


def power_law_alpha(
    eigvals: torch.Tensor, fit_range: tuple[int, int] | None = None, *, weighted: bool = False, return_r2: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exponent alpha of lambda_n ~ n^-alpha: minus the least-squares slope of log lambda_n vs log n.

    ``eigvals`` [..., D], descending; n is 1-based. ``fit_range = (lo, hi)`` selects ranks
    lo..hi inclusive. Two conventions are in use, and their alphas differ:

    * default (:func:`default_fit_range`): ranks 10..D/2, unweighted (Stringer et al. 2019 and
      Nassar et al. 2020 as described in the papers);
    * ``fit_range=(11, 100), weighted=True``: the fit of the Stringer et al. code and of reptrix
      (alpha-ReQ, Agrawal et al. 2022), 0-based indices 10..99, each point weighted by 1/n
      (reptrix's ``get_alpha`` defaults to 0-based indices 5..99, i.e. ``fit_range=(6, 100)``).

    ``weighted=True`` minimises sum_n (1/n) (log lambda_n - b + alpha log n)^2 (weighted least
    squares, weights 1/n: the low ranks, few and well estimated, count as much as the many high
    ones); ``weighted=False`` gives every rank weight 1.

    Returns float64 [...] alpha, or ``(alpha, r2)`` with ``return_r2=True``: r2 = 1 - SS_res / SS_tot,
    the coefficient of determination of the fitted line for log lambda_n over the fitted ranks
    (unweighted sums, as ``sklearn.metrics.r2_score``; 1 for an exact power law). NaN where a
    fitted eigenvalue is <= 0 (its log is undefined); r2 is NaN when log lambda is constant over
    the range (SS_tot = 0).
    """
    lam = _check_eigvals(eigvals)
    dim = lam.shape[-1]
    lo, hi = default_fit_range(dim) if fit_range is None else fit_range
    if not (isinstance(lo, int) and isinstance(hi, int)) or not 1 <= lo < hi <= dim:
        raise ValueError(f"fit_range must be (lo, hi) ints with 1 <= lo < hi <= D={dim}, got {fit_range!r}")
    sel = lam[..., lo - 1 : hi]
    y = torch.where(sel > 0, sel, torch.full_like(sel, float("nan"))).log()
    ranks = torch.arange(lo, hi + 1, dtype=torch.float64, device=lam.device)
    x = ranks.log()
    w = ranks.reciprocal() if weighted else torch.ones_like(ranks)
    w = w / w.sum()
    xc = x - (w * x).sum()
    y_mean_w = (w * y).sum(-1, keepdim=True)
    slope = (w * xc * (y - y_mean_w)).sum(-1) / (w * xc * xc).sum()
    if not return_r2:
        return -slope
    residual = y - y_mean_w - slope[..., None] * xc
    ss_res = (residual * residual).sum(-1)
    yc = y - y.mean(-1, keepdim=True)
    return -slope, 1 - ss_res / (yc * yc).sum(-1)


def _scaled(lam: torch.Tensor) -> torch.Tensor:
    """lam divided by its largest magnitude along the last dim (where that is positive and finite), so
    sums and squares neither overflow nor underflow; the ratios below are scale-invariant."""
    top = lam.abs().amax(-1, keepdim=True)
    return lam / torch.where((top > 0) & (top < math.inf), top, torch.ones_like(top))


def participation_ratio(eigvals: torch.Tensor) -> torch.Tensor:
    """(sum lambda)^2 / sum lambda^2, float64 [...], scale-invariant (computed on lambda / max |lambda|,
    so 1e-200 or 1e200 spectra are fine). NaN for an all-zero spectrum, or one with NaN or Inf."""
    lam = _scaled(_check_eigvals(eigvals))
    return lam.sum(-1) ** 2 / (lam * lam).sum(-1)


def effective_rank(eigvals: torch.Tensor) -> torch.Tensor:
    """exp of the Shannon entropy of p = lambda / sum lambda (Roy & Vetterli 2007), float64 [...].

    0 log 0 = 0; scale-invariant (computed on lambda / max lambda). NaN for an all-zero spectrum,
    and for one with a NaN, Inf or negative entry (clamp rounding noise first;
    :func:`eigenvalues` does).
    """
    raw = _check_eigvals(eigvals)
    lam = _scaled(raw)
    total = lam.sum(-1, keepdim=True)
    p = lam / total
    plogp = torch.where(p > 0, p * p.log(), torch.zeros_like(p))
    valid = ((raw >= 0) & (raw < math.inf)).all(-1) & (total.squeeze(-1) > 0)
    return torch.where(valid, torch.exp(-plogp.sum(-1)), torch.full_like(total.squeeze(-1), float("nan")))


def n_components(eigvals: torch.Tensor, frac: float = 0.95) -> torch.Tensor:
    """Smallest number of leading components whose cumulative variance fraction is >= frac.

    ``eigvals`` [..., D] descending, ``frac`` in (0, 1]. Returns int64 [...]; D for an all-zero
    spectrum, -1 (not a count) for a spectrum with a NaN entry. The comparison allows a relative
    1e-12 slack so that frac = 1 is reached despite rounding of the cumulative sum.
    """
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1 or math.isnan(frac):
        raise ValueError(f"frac must be a float in (0, 1], got {frac!r}")
    lam = _check_eigvals(eigvals)
    cum = lam.cumsum(-1)
    total = cum[..., -1:]
    reached = cum >= (frac - 1e-12) * total
    reached = reached & (total > 0)
    first = torch.where(
        reached.any(-1), reached.int().argmax(-1), torch.full(lam.shape[:-1], lam.shape[-1] - 1, device=lam.device)
    )
    return torch.where(torch.isnan(lam).any(-1), -1, first.long() + 1)
