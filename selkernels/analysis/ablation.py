"""Unit ablation curves (Morcos et al. 2018; Ranadive et al. 2023): accuracy as the most class-selective
(or random) units of a layer are zeroed."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .._hooks import LayerOutputHooks
from .._options import check_unit_dim
from ..metrics import ClassSelectivity
from ._common import batches, format_table, model_device, write_csv

__all__ = ["ablation_curve", "AblationCurve"]

DEFAULT_FRACTIONS = tuple(i / 10 for i in range(11))
ORDERS = ("selectivity", "random")


@dataclass
class AblationCurve:
    """Result of :func:`ablation_curve`.

    ``fractions[i]`` of the layer's units (``num_ablated[i]`` of them: the first ones of ``ranking``)
    zeroed gives test accuracy ``accuracy[i]``. ``selectivity`` is each unit's SI over the loader
    (float64 [C], NaN-free; None for ``order="random"``), ``ranking`` the ablation order (int64 [C]).
    """

    order: str
    fractions: list[float]
    num_ablated: list[int]
    accuracy: list[float]
    ranking: torch.Tensor
    selectivity: torch.Tensor | None = None
    num_units: int = 0
    rows: list[dict] = field(default_factory=list)

    def table(self) -> str:
        return format_table(self.rows, f"Unit ablation ({self.order} order, {self.num_units} units)")

    def write_csv(self, path: str | os.PathLike) -> None:
        write_csv(self.rows, path)

    def plot(self, path: str | os.PathLike, *others: AblationCurve) -> None:
        """Accuracy vs fraction ablated, this curve and ``others`` on one axis, to ``path`` (PNG)."""
        from .plots import plot_ablation

        plot_ablation([self, *others], path)


def _check_fractions(fractions) -> list[float]:
    try:
        fr = [float(f) for f in fractions]
    except (TypeError, ValueError):
        raise TypeError(f"fractions must be a sequence of floats in [0, 1], got {fractions!r}") from None
    if not fr or any(not 0.0 <= f <= 1.0 or math.isnan(f) for f in fr):
        raise ValueError(f"fractions must be a non-empty sequence of floats in [0, 1], got {fractions!r}")
    return fr


@torch.no_grad()
def _first_forward(model, module, loader, device, unit_dim: int):
    """(number of logits, number of units of module) from the first batch."""
    with LayerOutputHooks(module) as hooks:
        for x, _ in batches(loader, device, 1):
            logits = model(x)
        (out,) = hooks._take_outputs()
    if out is None:
        raise ValueError("loader yielded no batches, or module did not run in the model's forward")
    if logits.dim() != 2:
        raise ValueError(f"model must return logits [N, K], got shape {tuple(logits.shape)}")
    return int(logits.shape[1]), int(out.shape[unit_dim])


@torch.no_grad()
def _accuracy(model, loader, device, max_batches) -> float:
    correct = total = 0
    for x, y in batches(loader, device, max_batches):
        correct += int((model(x).argmax(1) == y).sum())
        total += y.numel()
    if total == 0:
        raise ValueError("loader yielded no samples")
    return correct / total


def ablation_curve(
    model: torch.nn.Module,
    module: torch.nn.Module,
    loader: Iterable,
    *,
    order: str = "selectivity",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    unit_dim: int = 1,
    num_classes: int | None = None,
    selectivity: torch.Tensor | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
) -> AblationCurve:
    """Zero growing fractions of ``module``'s output units and measure ``model``'s accuracy.

    Args:
        model: a classifier returning logits [N, K]; run in eval mode (its mode is restored).
        module: a submodule whose output [N, C, *spatial] (``unit_dim=1``) or [N, *positions, C]
            (``unit_dim=-1``) holds the units; a forward hook multiplies it by a 0/1 unit mask.
        loader: yields (inputs, labels) batches; used for the SI ranking and for every accuracy.
        order: "selectivity" ablates the most class-selective units first (SI over ``loader``
            from :class:`selkernels.ClassSelectivity`, ties by unit index), "random" a random
            permutation (``seed``).
        fractions: fractions of the C units to zero (rounded to whole units), each in [0, 1].
        num_classes: K for the SI ranking (default: the width of the model's logits).
        selectivity: precomputed SI [C] to rank by instead of measuring it.

    Cost: one pass over ``loader`` for the ranking (order="selectivity" without ``selectivity``)
    plus one per fraction; memory as the model's evaluation plus O(K * C).
    """
    if order not in ORDERS:
        raise ValueError(f'order must be "selectivity" or "random", got {order!r}')
    if not isinstance(module, torch.nn.Module) or all(m is not module for m in model.modules()):
        raise ValueError("module must be a submodule of model")
    unit_dim = check_unit_dim(unit_dim)
    fracs = _check_fractions(fractions)
    device = model_device(model, device)
    was_training = model.training
    model.eval()
    mask: torch.Tensor | None = None

    def hook(mod, inputs, output):
        if mask is None:
            return None
        shape = [1] * output.dim()
        shape[unit_dim] = -1
        return output * mask.to(output.dtype).view(shape)

    try:
        num_logits, num_units = _first_forward(model, module, loader, device, unit_dim)
        if order == "selectivity" and selectivity is None:
            with ClassSelectivity(module, num_classes or num_logits, unit_dim=unit_dim) as probe, torch.no_grad():
                for x, y in batches(loader, device, max_batches):
                    model(x)
                    probe.update(y)
                selectivity = probe.compute()[0].si
        if order == "selectivity":
            if not isinstance(selectivity, torch.Tensor) or tuple(selectivity.shape) != (num_units,):
                raise ValueError(f"selectivity must be a 1-D tensor [{num_units}] of unit SI values")
            # Stable descending sort: equal SI ablates the lower unit index first.
            ranking = torch.sort(selectivity.detach().double().cpu(), descending=True, stable=True)[1]
        else:
            ranking = torch.randperm(num_units, generator=torch.Generator().manual_seed(seed))
        handle = module.register_forward_hook(hook)
        try:
            accuracy, counts = [], []
            for f in fracs:
                k = int(round(f * num_units))
                keep = torch.ones(num_units, device=device)
                keep[ranking[:k].to(device)] = 0
                mask = keep
                accuracy.append(_accuracy(model, loader, device, max_batches))
                counts.append(k)
        finally:
            handle.remove()
            mask = None
    finally:
        model.train(was_training)
    rows = [dict(fraction=f, units_ablated=k, accuracy=a) for f, k, a in zip(fracs, counts, accuracy)]
    return AblationCurve(
        order, fracs, counts, accuracy, ranking, selectivity if order == "selectivity" else None, num_units, rows
    )
