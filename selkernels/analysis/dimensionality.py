"""Dimensionality of representations and of perturbation-induced change (Leavitt & Morcos 2020).

For each chosen layer, the number of principal components needed to explain a fraction ``frac`` of
the variance (and the participation ratio) of

* the clean representations rep(x), and
* for each perturbation p, the change delta_p = rep(p(x, y)) - rep(x) of paired inputs,

accumulated streaming over a data loader: one :class:`selkernels.StreamingCovariance` per layer and
condition, no activations kept. Beside it, the input-unit gradient variability of each layer
(:func:`gradient_variability` documents the definition).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Callable

import torch

from .. import spectrum
from ..covariance import StreamingCovariance
from ._common import (
    Recorder,
    batches,
    check_features,
    check_frac,
    format_table,
    model_device,
    resolve_layers,
    write_csv,
)
from .perturbations import GaussianNoise, PGDAttack

__all__ = ["dimensionality", "DimensionalityReport", "GradientVariability"]

_MAX_FLAT_DIM = 16384  # a [D, D] float64 covariance of this size already takes 2 GiB


class GradientVariability:
    """Streaming input-unit gradient variability of one layer (definition in :func:`dimensionality`).

    ``units``: indices of the sampled units. Accumulates, per unit, the sum of unit-normalised input
    gradients over samples (float64 [U, P]) and the sum over samples of the across-unit variability.
    """

    def __init__(self, units: torch.Tensor, input_numel: int, device: torch.device):
        self.units = units
        self.sum_dir = torch.zeros(len(units), input_numel, dtype=torch.float64, device=device)
        self.n_dir = torch.zeros(len(units), dtype=torch.float64, device=device)
        self.unit_var_sum = 0.0
        self.unit_var_n = 0

    def update(self, grads: torch.Tensor) -> None:
        """grads [U, n, P]: d unit_u(x_i) / d x_i for the sampled units and n samples."""
        g = grads.double()
        norm = g.norm(dim=-1, keepdim=True)
        nz = norm > 0  # a zero gradient (e.g. a dead ReLU unit) has no direction: excluded
        ghat = torch.where(nz, g / norm.clamp_min(1e-300), torch.zeros_like(g))
        self.sum_dir += ghat.sum(1)
        self.n_dir += nz[..., 0].sum(1)
        # across units, per sample: 1 - |mean_u ghat|^2 over that sample's units with a gradient
        n_units = nz[..., 0].sum(0)  # [n]
        ok = n_units >= 1
        if bool(ok.any()):
            mean_u = ghat.sum(0)[ok] / n_units[ok, None]
            self.unit_var_sum += float((1 - (mean_u * mean_u).sum(-1)).sum())
            self.unit_var_n += int(ok.sum())

    def across_samples(self) -> float:
        ok = self.n_dir > 0
        if not bool(ok.any()):
            return float("nan")
        mean = self.sum_dir[ok] / self.n_dir[ok, None]
        return float((1 - (mean * mean).sum(-1)).mean())

    def across_units(self) -> float:
        return self.unit_var_sum / self.unit_var_n if self.unit_var_n else float("nan")


class DimensionalityReport:
    """Per-layer dimensionality of clean representations and of perturbation-induced change.

    Attributes:
        layers: layer names, in the order given.
        conditions: ``["clean", "delta_<name>" for each perturbation]``.
        frac: the explained-variance fraction of the ``ncomp`` columns.
        features: "mean" or "flatten" (see :func:`dimensionality`).
        covariances: {condition: {layer: StreamingCovariance}}.
        eigenvalues: {condition: {layer: float64 [D] descending}} of covariance(ddof=1).
        n_components, participation_ratio: {condition: {layer: value}}.
        gradient_variability: {layer: (across_samples, across_units)}, empty if not computed.
    """

    def __init__(
        self,
        layers: list[str],
        covariances: dict[str, dict[str, StreamingCovariance]],
        frac: float,
        features: str,
        gradient_variability: dict[str, tuple[float, float]],
    ) -> None:
        self.layers = layers
        self.conditions = list(covariances)
        self.frac = frac
        self.features = features
        self.covariances = covariances
        self.gradient_variability = gradient_variability
        self.eigenvalues: dict[str, dict[str, torch.Tensor]] = {}
        self.n_components: dict[str, dict[str, int]] = {}
        self.participation_ratio: dict[str, dict[str, float]] = {}
        for cond, per_layer in covariances.items():
            ev = {name: spectrum.eigenvalues(st.covariance()).cpu() for name, st in per_layer.items()}
            self.eigenvalues[cond] = ev
            self.n_components[cond] = {n: int(spectrum.n_components(v, frac)) for n, v in ev.items()}
            self.participation_ratio[cond] = {n: float(spectrum.participation_ratio(v)) for n, v in ev.items()}

    def to_rows(self) -> list[dict]:
        """One dict per layer: layer, units (D), samples, then ``<cond>_ncomp`` and ``<cond>_pr`` for
        each condition, then ``gradvar_samples`` / ``gradvar_units`` if computed."""
        rows = []
        for name in self.layers:
            clean = self.covariances["clean"][name]
            row = {"layer": name, "units": clean.dim, "samples": int(clean.count)}
            for cond in self.conditions:
                row[f"{cond}_ncomp"] = self.n_components[cond][name]
                row[f"{cond}_pr"] = self.participation_ratio[cond][name]
            if name in self.gradient_variability:
                row["gradvar_samples"], row["gradvar_units"] = self.gradient_variability[name]
            rows.append(row)
        return rows

    def __str__(self) -> str:
        title = (
            f"Dimensionality ({self.frac:.0%} variance components 'ncomp', participation ratio 'pr'; "
            f"features={self.features})"
        )
        return format_table(self.to_rows(), title)

    def to_csv(self, path: str | os.PathLike) -> None:
        write_csv(self.to_rows(), path)

    def plot(self, path: str | os.PathLike) -> None:
        """Dimensionality (ncomp and participation ratio) vs layer, one line per condition."""
        from .plots import plot_dimensionality

        plot_dimensionality(self, path)


def _check_perturbations(perturbations) -> dict[str, Callable]:
    if not isinstance(perturbations, Mapping):
        raise TypeError(
            f"perturbations must be a mapping name -> callable (x, y) -> x', got {type(perturbations).__name__}"
        )
    for name, fn in perturbations.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"perturbations keys must be non-empty str, got {name!r}")
        if not callable(fn):
            raise TypeError(f"perturbations[{name!r}] must be callable (x, y) -> x'")
    return dict(perturbations)


def _check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def dimensionality(
    model: torch.nn.Module,
    layers: Sequence[str | torch.nn.Module] | Mapping[str, torch.nn.Module],
    loader: Iterable,
    perturbations: Mapping | None = None,
    *,
    frac: float = 0.95,
    features: str = "mean",
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    grad_units: int = 16,
    grad_samples: int = 256,
    seed: int = 0,
) -> DimensionalityReport:
    """Dimensionality of the representations of ``layers`` and of their change under perturbations.

    Args:
        model: the network; run in eval mode (its train/eval flag is restored afterwards).
        layers: modules whose outputs are analysed: a sequence of names (``model.named_modules()``)
            or modules, or a mapping name -> module.
        loader: iterable of (x, y) batches (e.g. a DataLoader), read once.
        perturbations: {name: callable (x, y) -> x'} (same shape as x). Default:
            ``{"noise": GaussianNoise(0.1), "pgd": PGDAttack(model, eps=8/255, step_size=2/255,
            steps=10)}``, which assumes inputs in [0, 1]; pass ``{}`` for clean statistics only.
        frac: explained-variance fraction for the number of components (default 0.95).
        features: how a layer output [N, C, *spatial] becomes a vector: ``"mean"`` (default) takes
            each unit's (channel's) spatial mean, D = C -- the representation of a unit as used for
            class selectivity, and cheap; ``"flatten"`` keeps every output element, D = C * H * W
            (at most 16384; the [D, D] float64 covariance grows quadratically). [N, D] outputs are
            used as they are.
        device: where the model runs and the statistics live (default: the model's device).
        max_batches: read at most this many batches.
        grad_units, grad_samples: units per layer (a random subset, seeded by ``seed``) and number
            of leading samples of the loader used for the gradient variability; 0 skips it.

    For each layer and condition ("clean" and "delta_<name>"), a float64 StreamingCovariance of the
    features is accumulated; the report gives the smallest number of principal components whose
    cumulative variance reaches ``frac`` of the total (``spectrum.n_components`` of the ddof=1
    covariance) and the participation ratio (sum lambda)^2 / sum lambda^2.

    Input-unit gradient variability. For a layer with features f_u (u = 1..D), a random subset U of
    units and the first S samples x_i, let g_iu = d f_u(x_i) / d x_i (flattened over the input
    elements) and ghat_iu = g_iu / |g_iu| its direction (pairs with a zero gradient, such as a dead
    ReLU unit's, are left out). Then

        across samples:  mean_{u in U} ( 1 - | mean_i ghat_iu |^2 )
        across units:    mean_i        ( 1 - | mean_{u in U} ghat_iu |^2 )

    1 - |mean of unit vectors|^2 is the total variance (summed over input elements, ddof 0) of the
    unit-normalised gradients, so each measure lies in [0, 1]: 0 when all gradients point the same
    way, near 1 when they are unrelated (for high-dimensional inputs) -- the spread of d unit /
    d input across samples and across units that Leavitt & Morcos (2020) report as larger in
    high-selectivity networks. Normalising removes the scale of units and samples so that only the
    gradient's direction, i.e. which input pattern moves the unit, counts. The per-sample gradients
    come from one backward pass per unit through the batch, which assumes samples are processed
    independently in eval mode (true for batch norm with running statistics, and for dropout off).

    Returns a :class:`DimensionalityReport`.
    """
    named = resolve_layers(model, layers)
    frac = check_frac(frac)
    features = check_features(features)
    grad_units = _check_count(grad_units, "grad_units")
    grad_samples = _check_count(grad_samples, "grad_samples")
    if perturbations is None:
        perturbations = {"noise": GaussianNoise(0.1), "pgd": PGDAttack(model, eps=8 / 255, step_size=2 / 255, steps=10)}
    perturbations = _check_perturbations(perturbations)
    device = model_device(model, device)

    conditions = ["clean"] + [f"delta_{n}" for n in perturbations]
    stats: dict[str, dict[str, StreamingCovariance]] = {c: {} for c in conditions}
    gradvar: dict[str, GradientVariability] = {}
    grad_left = grad_units and grad_samples
    gen = torch.Generator().manual_seed(seed)

    was_training = model.training
    model.eval()
    recorder = Recorder(named, features)
    try:
        for x, y in batches(loader, device, max_batches):
            with torch.no_grad():
                clean = recorder.run(model, x)
            for name, f in clean.items():
                if name not in stats["clean"]:
                    if features == "flatten" and f.shape[1] > _MAX_FLAT_DIM:
                        raise ValueError(
                            f"features='flatten' gives layer {name!r} {f.shape[1]} dims "
                            f"(> {_MAX_FLAT_DIM}); use features='mean'"
                        )
                    for c in conditions:
                        stats[c][name] = StreamingCovariance(f.shape[1], device=device)
                stats["clean"][name].update(f)
            for pname, fn in perturbations.items():
                xp = fn(x, y)
                if not isinstance(xp, torch.Tensor) or xp.shape != x.shape:
                    raise ValueError(
                        f"perturbations[{pname!r}] must return a tensor of x's shape {tuple(x.shape)}, "
                        f"got {getattr(xp, 'shape', type(xp).__name__)}"
                    )
                with torch.no_grad():
                    pert = recorder.run(model, xp.to(device=device, dtype=x.dtype))
                for name, f in pert.items():
                    stats[f"delta_{pname}"][name].update(f - clean[name])
            if grad_left:
                xs = x[:grad_left]
                _gradient_step(model, recorder, xs, gradvar, grad_units, gen, device)
                grad_left -= xs.shape[0]
    finally:
        recorder.remove()
        model.train(was_training)
    if not stats["clean"]:
        raise ValueError("loader yielded no batches")
    gv = {n: (g.across_samples(), g.across_units()) for n, g in gradvar.items()}
    return DimensionalityReport(list(named), stats, frac, features, gv)


def _gradient_step(
    model,
    recorder: Recorder,
    xs: torch.Tensor,
    gradvar: dict[str, GradientVariability],
    grad_units: int,
    gen: torch.Generator,
    device,
) -> None:
    xs = xs.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        feats = recorder.run(model, xs, detach=False)
        names = list(feats)
        for li, name in enumerate(names):
            f = feats[name]
            if name not in gradvar:
                units = torch.randperm(f.shape[1], generator=gen)[:grad_units]
                gradvar[name] = GradientVariability(units, xs[0].numel(), device)
            acc = gradvar[name]
            grads = []
            for j, u in enumerate(acc.units.tolist()):
                last = li == len(names) - 1 and j == len(acc.units) - 1
                (g,) = torch.autograd.grad(f[:, u].sum(), xs, retain_graph=not last, allow_unused=True)
                grads.append(torch.zeros_like(xs) if g is None else g)
            acc.update(torch.stack(grads).flatten(2))
