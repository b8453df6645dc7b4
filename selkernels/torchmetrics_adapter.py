"""``torchmetrics.Metric`` form of :class:`selkernels.ClassSelectivity` (needs torchmetrics).

``ClassSelectivityMetric(num_classes, num_units, ...)`` keeps the same float64 class sums and int64
counts as torchmetrics states with ``dist_reduce_fx="sum"``, so torchmetrics' own synchronisation,
``merge_state``, ``reset``, ``state_dict`` and ``MetricCollection`` apply. The layer widths are
given up front because torchmetrics states need their shapes at construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchmetrics

from ._options import check_layer_groups, check_statistic, check_transform, check_unit_dim, grouped_mean
from .metrics import LayerSelectivity, _check_activation, _segment, accumulate_batch, layer_result
from .ops import _check_eps, _check_num_classes

__all__ = ["ClassSelectivityMetric"]


class ClassSelectivityMetric(torchmetrics.Metric):
    """Dataset-level class selectivity as a torchmetrics Metric.

    ``update(activations, labels)`` takes one activation tensor per layer (a list, or a tensor for
    one layer) with ``num_units[l]`` units on ``unit_dim``; ``compute()`` returns a list of
    :class:`selkernels.metrics.LayerSelectivity`. Definitions, options and edge cases as in
    :class:`selkernels.ClassSelectivity`.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(
        self,
        num_classes: int,
        num_units: Sequence[int],
        *,
        unit_dim: int = 1,
        statistic: str = "mean",
        transform: str | None = None,
        eps: float = 1e-7,
        ignore_index: int = -100,
        layer_groups: Sequence[Sequence[int]] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_classes = _check_num_classes(num_classes)
        widths = list(num_units)
        if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 0 for w in widths):
            raise ValueError(f"num_units must be a non-empty list of layer widths (ints >= 0), got {num_units!r}")
        self.num_units = widths
        self.unit_dim = check_unit_dim(unit_dim)
        self.statistic = check_statistic(statistic)
        self.transform = check_transform(transform)
        self.eps = _check_eps(eps)
        self.ignore_index = ignore_index
        self.layer_groups = check_layer_groups(layer_groups, len(widths))
        for i, w in enumerate(widths):
            self.add_state(f"sums_{i}", torch.zeros(self.num_classes, w, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(self.num_classes, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, activations: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor) -> None:
        xs = [activations] if isinstance(activations, torch.Tensor) else list(activations)
        if len(xs) != len(self.num_units):
            raise ValueError(f"activations must hold {len(self.num_units)} tensors (one per layer), got {len(xs)}")
        for i, (x, w) in enumerate(zip(xs, self.num_units)):
            _check_activation(x, f"activations[{i}]")
            if x.shape[self.unit_dim] != w:
                raise ValueError(
                    f"activations[{i}] has {x.shape[self.unit_dim]} units on dim {self.unit_dim}, num_units[{i}] = {w}"
                )
        seg = _segment(labels, xs[0], self.num_classes, self.ignore_index)
        states = [getattr(self, f"sums_{i}") for i in range(len(xs))]
        # The kernel adds into sums on the activations' device; a state kept elsewhere gets the batch's.
        local = [s if s.device == xs[0].device else torch.zeros_like(s, device=xs[0].device) for s in states]
        accumulate_batch(local, xs, seg, unit_dim=self.unit_dim, transform=self.transform)
        for state, part in zip(states, local):
            if part is not state:
                state.add_(part.to(state.device))
        self.counts.add_(seg.counts.to(self.counts.device))

    def compute(self) -> list[LayerSelectivity]:
        return [
            layer_result(str(i), getattr(self, f"sums_{i}"), self.counts, statistic=self.statistic, eps=self.eps)[0]
            for i in range(len(self.num_units))
        ]

    def mean_si(self) -> float:
        """Mean SI over layers, or over ``layer_groups`` (see :func:`selkernels.metrics.grouped_mean`)."""
        return float(grouped_mean([r.si for r in self.compute()], self.layer_groups))
