"""Class-conditional density models of representations (Jamroz & Kurdziel, AAAI 2023).

"Residual networks fit classes in two modes": class-conditional density models of the
global-average-pooled features of a layer (optionally projected to k dims by the top-k principal
directions) reveal, in deep layers, two groups of classes whose own samples are fitted with markedly
different densities. This module fits

* :class:`ClassConditionalGaussian` -- one Gaussian per class from the per-class streaming moments
  (:class:`selkernels.StreamingCovariance` with ``num_classes``), shrunk and evaluated on the device
  with one batched Cholesky factorisation over classes;
* :func:`fit_dp_mixture` -- the paper's per-class Dirichlet-process Gaussian mixtures
  (scikit-learn's BayesianGaussianMixture) on collected (projected) features;

and summarises each layer by :func:`two_mode_split` of the per-class mean log-density of each
class's own samples. Entry point: :func:`class_density`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import spectrum
from ..covariance import StreamingCovariance
from ._common import Recorder, batches, format_table, model_device, resolve_layers, write_csv

__all__ = [
    "ClassConditionalGaussian",
    "Projection",
    "TwoModeSplit",
    "two_mode_split",
    "DPMixtureModels",
    "fit_dp_mixture",
    "ClassDensityReport",
    "class_density",
]

_LOG_2PI = math.log(2 * math.pi)


def _check_shrinkage(shrinkage) -> float | str:
    if shrinkage == "oas":
        return shrinkage
    if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float)) or not 0 <= shrinkage <= 1:
        raise ValueError(f"shrinkage must be a float in [0, 1] or 'oas', got {shrinkage!r}")
    return float(shrinkage)


def _check_ridge(ridge) -> float:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite float >= 0, got {ridge!r}")
    return float(ridge)


class ClassConditionalGaussian:
    """K Gaussians N(mu_k, Sigma_k) in D dims with batched on-device log-densities.

    Shrinkage of the class covariance S_k (float64):

        Sigma_k = (1 - a_k) S_k + a_k (tr S_k / D) I + ridge * s * I

    * ``shrinkage`` a float in [0, 1]: a_k = shrinkage for every class, S_k = covariance(ddof=1);
    * ``shrinkage="oas"``: a_k is the Oracle Approximating Shrinkage coefficient of Chen, Wiesel,
      Eldar & Hero (2010) for class k, in the form scikit-learn uses (``sklearn.covariance.oas``;
      their Eq. 23 without the 2/D terms), a_k = min(1, (tr(S^2) + tr(S)^2) /
      ((n_k + 1)(tr(S^2) - tr(S)^2 / D))), with S_k the maximum-likelihood (ddof=0) covariance, as
      there;
    * ``ridge`` (default 1e-6) times s, the mean over present classes of tr(S_k) / D, keeps
      rank-deficient classes (n_k <= D with little shrinkage) positive definite at a scale
      relative to the features'.

    Edge cases: a class with no samples is absent (``present`` False): its log-density is -inf and its
    mean log-density NaN. A class with too few samples to estimate a covariance (n_k <= ddof, i.e. a
    single sample) gets S_k = s I, the isotropic pooled average variance.

    Build from per-class streaming moments with :meth:`from_statistics`, or from explicit
    parameters with the constructor (``covariances`` are then used as they are, no shrinkage).
    """

    def __init__(
        self,
        means: torch.Tensor,
        covariances: torch.Tensor,
        counts: torch.Tensor | None = None,
        *,
        scatter: torch.Tensor | None = None,
        shrinkage_coef: torch.Tensor | None = None,
    ) -> None:
        if not isinstance(means, torch.Tensor) or not isinstance(covariances, torch.Tensor):
            raise TypeError("means and covariances must be torch.Tensors")
        if means.dim() != 2:
            raise ValueError(f"means must have shape [K, D], got {tuple(means.shape)}")
        k, d = means.shape
        if covariances.shape != (k, d, d):
            raise ValueError(f"covariances must have shape [K, D, D] = [{k}, {d}, {d}], got {tuple(covariances.shape)}")
        self.means = means.double()
        self.covariances = covariances.double().to(self.means.device)
        self.counts = (torch.ones(k, dtype=torch.int64) if counts is None else counts).to(self.means.device)
        self.present = self.counts > 0
        self.shrinkage_coef = shrinkage_coef
        # ML covariance of each class's own samples about its mean (for mean_log_density)
        self._scatter = scatter
        cov = torch.where(
            self.present[:, None, None], self.covariances, torch.eye(d, dtype=torch.float64, device=self.means.device)
        )
        chol, info = torch.linalg.cholesky_ex(cov)
        if bool((info > 0).any()):
            bad = torch.nonzero(info > 0).flatten().tolist()
            raise ValueError(f"covariances of classes {bad} are not positive definite; use shrinkage > 0 or ridge > 0")
        self.cholesky = chol
        self._logdet = 2 * torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @classmethod
    def from_statistics(
        cls, stats: StreamingCovariance, *, shrinkage: float | str = "oas", ridge: float = 1e-6
    ) -> ClassConditionalGaussian:
        """Fit from a per-class :class:`selkernels.StreamingCovariance` (``num_classes`` set)."""
        if not isinstance(stats, StreamingCovariance) or stats.num_classes is None:
            raise TypeError("stats must be a StreamingCovariance with num_classes")
        shrinkage = _check_shrinkage(shrinkage)
        ridge = _check_ridge(ridge)
        counts = stats.count
        n = counts.double()
        d = stats.dim
        ddof = 0 if shrinkage == "oas" else 1
        ok = counts > ddof
        present = counts > 0
        eye = torch.eye(d, dtype=torch.float64, device=stats.device)
        scatter = stats.M2 / n.clamp_min(1)[:, None, None]
        base = stats.M2 / (n - ddof).clamp_min(1)[:, None, None]
        mu = torch.diagonal(base, dim1=-2, dim2=-1).sum(-1) / d  # tr(S_k) / D
        pooled = mu[ok].mean() if bool(ok.any()) else torch.tensor(1.0, dtype=torch.float64, device=stats.device)
        if not bool(pooled > 0):
            pooled = torch.ones_like(pooled)
        base = torch.where(ok[:, None, None], base, pooled * eye)
        mu = torch.where(ok, mu, pooled)
        if shrinkage == "oas":
            alpha = (base * base).mean((-2, -1))  # tr(S^2) / D^2
            num = alpha + mu * mu
            den = (n + 1) * (alpha - mu * mu / d)
            coef = torch.where(
                den > 0, (num / den.where(den > 0, torch.ones_like(den))).clamp(max=1.0), torch.ones_like(den)
            )
            coef = torch.where(ok, coef, torch.ones_like(coef)) if d > 1 else torch.zeros_like(coef)
        else:
            coef = torch.full_like(mu, shrinkage)
        cov = (1 - coef)[:, None, None] * base + (coef * mu)[:, None, None] * eye + ridge * pooled * eye
        means = torch.where(present[:, None], stats.mean, torch.zeros_like(stats.mean))
        return cls(means, cov, counts, scatter=scatter, shrinkage_coef=coef)

    def to(self, device: torch.device | str) -> ClassConditionalGaussian:
        """A copy with all parameters on ``device``."""
        out = ClassConditionalGaussian.__new__(ClassConditionalGaussian)
        for k, v in vars(self).items():
            setattr(out, k, v.to(device) if isinstance(v, torch.Tensor) else v)
        return out

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Class-conditional log-densities log N(z_i; mu_k, Sigma_k), float64 [N, K].

        z [N, D] (any float dtype, moved to the model's device). One batched triangular solve over
        all classes: maha_k = |L_k^{-1} (z - mu_k)|^2 with Sigma_k = L_k L_k^T. Absent classes give -inf.
        """
        if not isinstance(z, torch.Tensor) or not z.dtype.is_floating_point:
            raise TypeError(f"z must be a floating-point torch.Tensor, got {getattr(z, 'dtype', type(z).__name__)}")
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"z must have shape [N, D={self.dim}], got {tuple(z.shape)}")
        z = z.to(device=self.means.device, dtype=torch.float64)
        diff = (z[None, :, :] - self.means[:, None, :]).transpose(1, 2)  # [K, D, N]
        sol = torch.linalg.solve_triangular(self.cholesky, diff, upper=False)
        maha = (sol * sol).sum(1)  # [K, N]
        lp = -0.5 * (self.dim * _LOG_2PI + self._logdet[:, None] + maha)
        lp = torch.where(self.present[:, None], lp, torch.full_like(lp, -math.inf))
        return lp.t()

    def mean_log_density(self) -> torch.Tensor:
        """Mean log-density of each class's own (fitting) samples under its model, float64 [K].

        Exact from the moments, no second pass: with S_ml the ML covariance of class k about its
        mean mu_k, mean_i log N(z_i; mu_k, Sigma_k) = -1/2 (D log 2 pi + log|Sigma_k| + tr(Sigma_k^{-1} S_ml)).
        NaN for absent classes; requires a model built by :meth:`from_statistics`.
        """
        if self._scatter is None:
            raise RuntimeError("mean_log_density needs a model fitted with from_statistics")
        tr = torch.diagonal(torch.cholesky_solve(self._scatter, self.cholesky), dim1=-2, dim2=-1).sum(-1)
        out = -0.5 * (self.dim * _LOG_2PI + self._logdet + tr)
        return torch.where(self.present, out, torch.full_like(out, math.nan))


@dataclass
class Projection:
    """z -> (z - mean) @ components: the top-k principal directions (columns of components [D, k])."""

    mean: torch.Tensor
    components: torch.Tensor
    explained: float  # fraction of the total variance kept

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return (z.double() - self.mean) @ self.components

    @classmethod
    def from_statistics(cls, stats: StreamingCovariance, k: int) -> Projection:
        vals, vecs = spectrum.eigenvalues(stats.covariance(), eigenvectors=True)
        total = float(vals.sum())
        return cls(
            stats.mean.clone(), vecs[:, :k].contiguous(), float(vals[:k].sum()) / total if total > 0 else math.nan
        )


@dataclass
class TwoModeSplit:
    """Split of per-class values at their largest gap (see :func:`two_mode_split`)."""

    order: list[int]  # classes with a finite value, sorted by value ascending
    values: list[float]  # their values, ascending
    low: list[int]  # classes below the gap
    high: list[int]  # classes above the gap
    threshold: float  # midpoint of the gap
    gap: float  # the largest gap between consecutive sorted values
    gap_ratio: float  # gap / median of the other gaps (inf if that median is 0)


def two_mode_split(values: torch.Tensor | Sequence[float]) -> TwoModeSplit:
    """Sort per-class values and split them at the largest gap between consecutive values.

    values: [K] (tensor or sequence); NaN entries (absent classes) are left out. Needs at least two
    finite values. ``gap_ratio`` (largest gap over the median of the remaining gaps) says how clearly
    the split stands out: about 1 for evenly spread values, large for two well separated groups.
    """
    v = torch.as_tensor(values, dtype=torch.float64).flatten().cpu()
    idx = torch.nonzero(torch.isfinite(v)).flatten()
    if idx.numel() < 2:
        raise ValueError(f"values must hold at least two finite entries, got {idx.numel()}")
    sv, perm = v[idx].sort()
    order = idx[perm]
    gaps = sv[1:] - sv[:-1]
    j = int(gaps.argmax())
    others = torch.cat([gaps[:j], gaps[j + 1 :]])
    med = float(others.median()) if others.numel() else 0.0
    gap = float(gaps[j])
    ratio = gap / med if med > 0 else (math.inf if gap > 0 else math.nan)
    return TwoModeSplit(
        order.tolist(),
        sv.tolist(),
        order[: j + 1].tolist(),
        order[j + 1 :].tolist(),
        float(sv[j] + sv[j + 1]) / 2,
        gap,
        ratio,
    )


class DPMixtureModels:
    """Per-class Dirichlet-process Gaussian mixtures (see :func:`fit_dp_mixture`).

    ``models[k]`` is the fitted ``sklearn.mixture.BayesianGaussianMixture`` of class k, or None for a
    class with fewer than 2 samples; ``mean_log_density`` [K] holds each class's mean log-density of
    its own samples (NaN for None); ``active_components`` [K] the number of components with weight
    above 1% (the effective mixture size the DP prior settles on).
    """

    def __init__(self, models: list, mean_log_density: torch.Tensor, active_components: list[int]) -> None:
        self.models = models
        self.mean_log_density = mean_log_density
        self.active_components = active_components

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Per-class log-densities, float64 [N, K] (-inf for classes without a model)."""
        import numpy as np

        z = z.detach().double().cpu().numpy() if isinstance(z, torch.Tensor) else np.asarray(z, dtype=np.float64)
        cols = [m.score_samples(z) if m is not None else np.full(len(z), -np.inf) for m in self.models]
        return torch.from_numpy(np.stack(cols, 1))


def fit_dp_mixture(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int | None = None,
    *,
    n_components: int = 10,
    weight_concentration_prior: float | None = None,
    covariance_type: str = "full",
    max_iter: int = 500,
    reg_covar: float = 1e-6,
    random_state: int = 0,
    **kwargs: Any,
) -> DPMixtureModels:
    """Fit one Dirichlet-process Gaussian mixture per class, as Jamroz & Kurdziel do.

    features [N, D] (tensor or array; typically projected to 16-64 dims), labels [N] ints in
    [0, num_classes) (default: max label + 1). Each class is fitted by
    ``BayesianGaussianMixture(weight_concentration_prior_type="dirichlet_process",
    n_components=min(n_components, n_k), ...)``, truncated variational inference whose stick-breaking
    prior switches off components the data do not need; extra keyword arguments go to it.
    """
    import numpy as np
    from sklearn.mixture import BayesianGaussianMixture

    x = (
        features.detach().double().cpu().numpy()
        if isinstance(features, torch.Tensor)
        else np.asarray(features, np.float64)
    )
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if x.ndim != 2:
        raise ValueError(f"features must have shape [N, D], got {x.shape}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape [N] = [{len(x)}], got {y.dtype} {y.shape}")
    if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
        raise ValueError(f"n_components must be a positive int, got {n_components!r}")
    k = int(y.max()) + 1 if num_classes is None else num_classes
    if len(y) and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"labels must lie in [0, num_classes={k})")
    models, mld, active = [], [], []
    for c in range(k):
        xc = x[y == c]
        if len(xc) < 2:
            models.append(None)
            mld.append(math.nan)
            active.append(0)
            continue
        m = BayesianGaussianMixture(
            n_components=min(n_components, len(xc)),
            weight_concentration_prior_type="dirichlet_process",
            weight_concentration_prior=weight_concentration_prior,
            covariance_type=covariance_type,
            max_iter=max_iter,
            reg_covar=reg_covar,
            random_state=random_state,
            **kwargs,
        ).fit(xc)
        models.append(m)
        mld.append(float(m.score_samples(xc).mean()))
        active.append(int((m.weights_ > 0.01).sum()))
    return DPMixtureModels(models, torch.tensor(mld, dtype=torch.float64), active)


class ClassDensityReport:
    """Per-layer class-conditional density models and the two-mode summary.

    Attributes:
        layers: layer names.
        models: {layer: ClassConditionalGaussian} in the (projected) feature space.
        projections: {layer: Projection or None}.
        statistics: {layer: per-class StreamingCovariance of the (projected) features}.
        mean_log_density: {layer: float64 [K]} of each class's own samples (Gaussian model).
        splits: {layer: TwoModeSplit} of mean_log_density.
        dp_models: {layer: DPMixtureModels} if DP mixtures were fitted, else {}.
        dp_splits: {layer: TwoModeSplit} of the DP mixtures' mean log-densities.
    """

    def __init__(
        self,
        layers: list[str],
        models: dict[str, ClassConditionalGaussian],
        projections: dict[str, Projection | None],
        statistics: dict[str, StreamingCovariance],
        dp_models: dict[str, DPMixtureModels],
    ) -> None:
        self.layers = layers
        self.models = models
        self.projections = projections
        self.statistics = statistics
        self.mean_log_density = {n: models[n].mean_log_density().cpu() for n in layers}
        self.splits = {n: two_mode_split(self.mean_log_density[n]) for n in layers}
        self.dp_models = dp_models
        self.dp_splits = {n: two_mode_split(m.mean_log_density) for n, m in dp_models.items()}

    def log_prob(self, layer: str, features: torch.Tensor) -> torch.Tensor:
        """log N(features; class k) [N, K] for pooled features [N, C] of ``layer`` (projected here)."""
        proj = self.projections[layer]
        return self.models[layer].log_prob(proj(features) if proj is not None else features)

    def to_rows(self) -> list[dict]:
        """One dict per layer: layer, dim, classes, the low/high group sizes, the split threshold,
        gap and gap ratio, and the mean of each group (Gaussian model); DP-mixture columns if fitted."""
        rows = []
        for n in self.layers:
            s = self.splits[n]
            mld = self.mean_log_density[n]
            row = {
                "layer": n,
                "dim": self.models[n].dim,
                "classes": len(s.order),
                "n_low": len(s.low),
                "n_high": len(s.high),
                "mean_low": float(mld[s.low].mean()),
                "mean_high": float(mld[s.high].mean()),
                "threshold": s.threshold,
                "gap": s.gap,
                "gap_ratio": s.gap_ratio,
            }
            if n in self.dp_splits:
                d = self.dp_splits[n]
                row.update({"dp_n_low": len(d.low), "dp_n_high": len(d.high), "dp_gap_ratio": d.gap_ratio})
            rows.append(row)
        return rows

    def __str__(self) -> str:
        return format_table(
            self.to_rows(),
            "Class-conditional density: per-class mean log-density of own samples, split at the largest gap",
        )

    def to_csv(self, path: str | os.PathLike) -> None:
        write_csv(self.to_rows(), path)

    def plot(self, path: str | os.PathLike) -> None:
        """Sorted per-class mean log-densities per layer with the two-mode split marked."""
        from .plots import plot_class_density

        plot_class_density(self, path)


def _project_dims(project_dim, names: list[str]) -> dict[str, int | None]:
    if project_dim is None or isinstance(project_dim, int) and not isinstance(project_dim, bool):
        out = {n: project_dim for n in names}
    elif isinstance(project_dim, Mapping):
        unknown = set(project_dim) - set(names)
        if unknown:
            raise ValueError(f"project_dim names unknown layers {sorted(unknown)}")
        out = {n: project_dim.get(n) for n in names}
    else:
        raise TypeError(f"project_dim must be None, an int or a mapping layer -> int, got {type(project_dim).__name__}")
    for n, k in out.items():
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"project_dim must be a positive int, got {k!r} for layer {n!r}")
    return out


def class_density(
    model: torch.nn.Module,
    layers: Sequence[str | torch.nn.Module] | Mapping[str, torch.nn.Module],
    loader: Iterable,
    num_classes: int,
    *,
    project_dim: int | Mapping[str, int] | None = None,
    shrinkage: float | str = "oas",
    ridge: float = 1e-6,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    dp_mixture: None | bool | dict = None,
) -> ClassDensityReport:
    """Class-conditional Gaussian density models of pooled layer features, with the two-mode summary.

    Args:
        model: the network (run in eval mode; its flag is restored).
        layers: names or modules of ``model`` (or a mapping name -> module).
        loader: iterable of (x, y) batches; read twice when projecting (once otherwise), so it must
            be re-iterable (a DataLoader is).
        num_classes: K; labels must lie in [0, K).
        project_dim: None (no projection), an int k for every layer, or {layer: k} (the paper uses 16
            for early stages and 64 for late ones). The projection onto the top-k principal
            directions is fitted from a first streaming pass (overall covariance); k >= D keeps all
            D dims (a rotation).
        shrinkage, ridge: see :class:`ClassConditionalGaussian` (default Oracle Approximating
            Shrinkage per class).
        device: where the model runs and statistics live (default: the model's device).
        max_batches: read at most this many batches per pass.
        dp_mixture: if True or a dict of :func:`fit_dp_mixture` keyword arguments, also collect the
            (projected) features on the CPU and fit the per-class DP Gaussian mixtures of the paper.

    Features are the global-average-pooled layer outputs (per-channel spatial mean; [N, D] outputs
    as they are). Returns a :class:`ClassDensityReport`.
    """
    named = resolve_layers(model, layers)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    shrinkage = _check_shrinkage(shrinkage)
    ridge = _check_ridge(ridge)
    dims = _project_dims(project_dim, list(named))
    if dp_mixture is not None and not isinstance(dp_mixture, (bool, dict)):
        raise TypeError(
            f"dp_mixture must be None, a bool or a dict of fit_dp_mixture arguments, got {type(dp_mixture).__name__}"
        )
    device = model_device(model, device)

    was_training = model.training
    model.eval()
    recorder = Recorder(named, "mean")
    try:
        projections: dict[str, Projection | None] = {n: None for n in named}
        if any(k is not None for k in dims.values()):
            overall: dict[str, StreamingCovariance] = {}
            with torch.no_grad():
                for x, _ in batches(loader, device, max_batches):
                    for n, f in recorder.run(model, x).items():
                        if dims[n] is not None:
                            overall.setdefault(n, StreamingCovariance(f.shape[1], device=device)).update(f)
            if not overall:
                raise ValueError("loader yielded no batches")
            for n, st in overall.items():
                projections[n] = Projection.from_statistics(st, min(dims[n], st.dim))
        stats: dict[str, StreamingCovariance] = {}
        collected: dict[str, list[torch.Tensor]] = {n: [] for n in named}
        labels_seen: list[torch.Tensor] = []
        with torch.no_grad():
            for x, y in batches(loader, device, max_batches):
                if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
                    raise ValueError(f"loader labels must be integer class indices [N], got {y.dtype} {tuple(y.shape)}")
                if y.numel() and bool(((y < 0) | (y >= num_classes)).any()):
                    raise ValueError(f"loader labels must lie in [0, num_classes={num_classes})")
                for n, f in recorder.run(model, x).items():
                    z = projections[n](f) if projections[n] is not None else f
                    stats.setdefault(n, StreamingCovariance(z.shape[1], num_classes=num_classes, device=device))
                    stats[n].update(z, y)
                    if dp_mixture:
                        collected[n].append(z.double().cpu())
                if dp_mixture:
                    labels_seen.append(y.cpu())
    finally:
        recorder.remove()
        model.train(was_training)
    if not stats:
        raise ValueError("loader yielded no batches")
    models = {n: ClassConditionalGaussian.from_statistics(stats[n], shrinkage=shrinkage, ridge=ridge) for n in named}
    dp_models = {}
    if dp_mixture:
        kw = dp_mixture if isinstance(dp_mixture, dict) else {}
        labels = torch.cat(labels_seen)
        dp_models = {n: fit_dp_mixture(torch.cat(collected[n]), labels, num_classes, **kw) for n in named}
    return ClassDensityReport(list(named), models, projections, stats, dp_models)
