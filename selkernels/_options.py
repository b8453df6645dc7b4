"""Options shared by the selectivity regularizer and metric: unit layout, statistic, transform,
layer groups (checks, and the grouped mean over layers)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

STATISTICS = ("mean", "sum")
TRANSFORMS = (None, "relu", "abs")


def check_unit_dim(unit_dim) -> int:
    if isinstance(unit_dim, bool) or unit_dim not in (1, -1):
        raise ValueError(f"unit_dim must be 1 ([N, C, *spatial]) or -1 ([N, *positions, D]), got {unit_dim!r}")
    return int(unit_dim)


def check_statistic(statistic) -> str:
    if statistic not in STATISTICS:
        raise ValueError(f'statistic must be "mean" or "sum", got {statistic!r}')
    return statistic


def check_transform(transform) -> str | None:
    if transform not in TRANSFORMS:
        raise ValueError(f'transform must be None, "relu" or "abs", got {transform!r}')
    return transform


def check_layer_groups(layer_groups, num_layers: int) -> list[list[int]] | None:
    """None, or a partition of range(num_layers) into non-empty groups of layer indices."""
    if layer_groups is None:
        return None
    try:
        groups = [list(g) for g in layer_groups]
    except TypeError:
        raise TypeError("layer_groups must be a sequence of sequences of layer indices") from None
    flat = [i for g in groups for i in g]
    if (
        not groups
        or any(not g for g in groups)
        or any(isinstance(i, bool) or not isinstance(i, int) for i in flat)
        or sorted(flat) != list(range(num_layers))
    ):
        raise ValueError(
            f"layer_groups must split the {num_layers} hooked modules' indices 0..{num_layers - 1} "
            f"into non-empty groups, each index in exactly one group; got {layer_groups!r}"
        )
    return groups


def grouped_mean(unit_si: Sequence[torch.Tensor], layer_groups: Sequence[Sequence[int]] | None) -> torch.Tensor:
    """Mean SI over groups of layers, each group's SI the mean over all units of its layers.

    This is how Ranadive et al.'s published training and analysis code averages a ResNet: the SI
    values of all bottlenecks of a stage are pooled, averaged, and the stage averages are averaged.
    (Pooling weights layers by their width; with equal widths it is the mean of the layer means.)
    ``layer_groups=None`` is one group per layer: the mean over layers of the mean over units.
    Differentiable.
    """
    if layer_groups is None:
        return torch.stack([s.mean() for s in unit_si]).mean()
    return torch.stack([torch.cat([unit_si[i] for i in g]).mean() for g in layer_groups]).mean()
