"""Dataset-level class selectivity of trained models: :class:`ClassSelectivity`.

The number selectivity papers report is each layer's class selectivity index (SI) over a whole
evaluation set: its distribution over units, its mean by depth, each unit's preferred class. SI is a
function of the class means over ALL samples, so it cannot be averaged over batches; it is computed
here from per-class activation SUMS and class COUNTS accumulated batch by batch (float64, O(K * C)
per layer), which add exactly across batches, metric objects and ranks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import distributed as _dist
from ._hooks import LayerOutputHooks, as_module_list
from ._options import check_layer_groups, check_statistic, check_transform, check_unit_dim, grouped_mean
from .ops import (
    _FLOAT_DTYPES,
    _check_class_memory,
    _check_eps,
    _check_num_classes,
    _for_kernel,
    segment_labels,
    selectivity_from_means,
)

__all__ = ["ClassSelectivity", "LayerSelectivity", "grouped_mean"]


def _unit_means(x: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """[N, C, *spatial] (unit_dim=1) or [N, *positions, D] (unit_dim=-1) -> [N, units], accumulated
    in float32 (float64 for float64 x)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dims = tuple(range(2, x.dim())) if unit_dim == 1 else tuple(range(1, x.dim() - 1))
    return x.mean(dims, dtype=acc) if dims else x.to(acc)


def _check_activation(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float64, float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(
            f"{name} must have at least 2 dims ([N, C, *spatial] or [N, *positions, D]), got shape {tuple(x.shape)}"
        )


def accumulate_batch(sums: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], seg, *, unit_dim: int, transform):
    """sums[l][k, c] += the sum over the batch's class-k samples of layer l's (transformed) unit
    means, in place: one fused call for all layers (labels segmented once, ``seg``, a
    :class:`selkernels.LabelSegments`), float64 accumulation in the kernel that reduces the
    classes. Checks are the caller's. Not differentiable."""
    with torch.no_grad():
        xs = [x.detach() for x in xs]
        if transform is not None:
            # The transform acts on each sample's unit mean, so positions are averaged first.
            xs = [_unit_means(x, unit_dim) for x in xs]
            xs = [x.relu_() if transform == "relu" else x.abs_() for x in xs]
        elif unit_dim == -1:
            xs = [x.movedim(-1, 1) for x in xs]
        torch.ops.selkernels.class_sums_accumulate_(_for_kernel(xs), *seg, list(sums))


def _segment(labels, x: torch.Tensor, num_classes: int, ignore_index: int):
    """segment_labels after the checks that name the argument (shape, device)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels must have shape [N] = [{x.shape[0]}], got {tuple(labels.shape)}")
    if labels.device != x.device:
        raise ValueError(f"labels must be on the device of the activations ({x.device}), got {labels.device}")
    return segment_labels(labels, num_classes, ignore_index=ignore_index)


@dataclass
class LayerSelectivity:
    """Dataset-level selectivity of one layer (the result of :meth:`ClassSelectivity.compute`).

    Attributes:
        name: the module's name (dict key given to ClassSelectivity, else its index as a string).
        si: float64 [C], class selectivity index of each unit (see ClassSelectivity for the
            definition per ``statistic`` and ``transform``).
        preferred_class: int64 [C], the class of mu_max (first one on ties); -1 when no class has
            samples.
        class_means: float64 [K, C], mean (transformed) unit activation per class; 0 for classes
            without samples.
        class_sums: float64 [K, C], the per-class sums the means come from.
        counts: int64 [K], samples per class.
        mean_si: float, mean of ``si`` over units (NaN for a layer without units).
    """

    name: str
    si: torch.Tensor
    preferred_class: torch.Tensor
    class_means: torch.Tensor
    class_sums: torch.Tensor
    counts: torch.Tensor
    mean_si: float


def layer_result(name: str, sums: torch.Tensor, counts: torch.Tensor, *, statistic: str, eps: float):
    """(LayerSelectivity, number of units with a negative class mean and mu_max + mu_rest <= eps)
    from running state."""
    means = sums / counts.clamp_min(1).to(sums.dtype)[:, None]
    values = means if statistic == "mean" else sums
    si = selectivity_from_means(values, counts, eps)
    present = (counts > 0)[:, None]
    num_present = int(present.sum())
    mu_max, preferred = torch.where(present, values, torch.full_like(values, -math.inf)).max(0)
    if num_present == 0:
        preferred = torch.full_like(preferred, -1)
    vanishing = 0
    if num_present >= 2:
        mu_rest = (torch.where(present, values, torch.zeros_like(values)).sum(0) - mu_max) / (num_present - 1)
        signed = torch.where(present, values, torch.zeros_like(values)).amin(0) < 0
        # Dead units (all class means 0) also have a vanishing denominator, but their SI is a clean 0.
        vanishing = int(((mu_max + mu_rest <= eps) & signed).sum())
    mean_si = float(si.mean()) if si.numel() else math.nan
    return LayerSelectivity(name, si, preferred, means, sums, counts.clone(), mean_si), vanishing


class ClassSelectivity(LayerOutputHooks):
    """Class selectivity of every unit of the hooked layers over a whole dataset, streamed.

    ``ClassSelectivity(modules, num_classes)`` registers forward hooks on ``modules`` (an nn.Module,
    a list, or a dict name -> module; ``None`` for none: feed activations with
    :meth:`update_from`). After each forward pass call ``update(labels)`` (no grad needed, run it
    under ``torch.no_grad()``); at the end ``compute()`` gives one :class:`LayerSelectivity` per
    module, in order. Conventions follow torchmetrics: ``update`` / ``compute`` / ``reset`` /
    ``merge`` / ``state_dict``; a thin ``torchmetrics.Metric`` adapter is in
    ``selkernels.torchmetrics_adapter`` (needs torchmetrics).

    Definition. A sample's activation of a unit is its mean over the positions: spatial positions
    for ``unit_dim=1`` ([N, C, *spatial], CNNs), tokens/positions for ``unit_dim=-1``
    ([N, *positions, D], transformers: units are the D features, e.g. MLP hidden neurons). With
    ``transform`` ("relu" or "abs") that per-sample unit mean is rectified / made absolute, as the
    published ViT analysis of Ranadive et al. does for GELU outputs (after averaging over positions,
    before class statistics). Per unit, over the P classes with samples,

        SI = (mu_max - mu_rest) / (mu_max + mu_rest + eps)

    with mu_k the class MEAN of the activation (``statistic="mean"``, Leavitt & Morcos) or the class
    SUM (``statistic="sum"``, what Ranadive et al.'s published scripts compute; on imbalanced data it
    weights classes by their size), mu_max the largest and mu_rest the mean of the other P - 1.
    With ``transform``, SI lies in [0, 1]. Without it, negative class means are legal input: SI then
    compares signed means and is unbounded where mu_max + mu_rest is near 0 or below (it is > 1 or
    negative there); a warning is given once per layer when some unit with a negative class mean has
    mu_max + mu_rest <= eps (dead units, all class means 0, get SI = 0 and no warning).
    Edge cases: fewer than two classes with samples gives SI = 0 for every unit (the published
    scripts give NaN).

    ``layer_groups`` (a partition of the module indices, e.g. the blocks of each ResNet stage) only
    changes :meth:`mean_si`: the mean within each group over all its units, then over groups.

    Memory: a float64 [K, C_l] sum per layer plus an int64 [K] count, on the device of the first
    activations; only the latest output of each hooked module is held between forward and update.
    Each update reads the activations once and adds each class's sum into the float64 state in the
    same pass (:func:`selkernels.ops.accumulate_class_sums`, all layers in one call).

    Distributed: ``all_reduce()`` sums the state of all ranks of ``process_group`` in place (one
    collective of ``K * sum_l C_l + K`` float64 numbers), so every rank
    holds the statistics of the joined data (two tiny collectives first agree on the layer count
    and widths, so ranks that saw no data take part). ``compute()`` does this on a copy when ``sync`` is
    "global", or is None while torch.distributed is initialized with more than one rank (every
    rank must call it then); ``sync="local"`` computes each rank's own data.
    """

    def __init__(
        self,
        modules: None | nn.Module | Iterable[nn.Module] | dict[str, nn.Module],
        num_classes: int,
        *,
        unit_dim: int = 1,
        statistic: str = "mean",
        transform: str | None = None,
        eps: float = 1e-7,
        ignore_index: int = -100,
        sync: str | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
        layer_groups: Sequence[Sequence[int]] | None = None,
    ) -> None:
        if sync not in (None, "global", "local"):
            raise ValueError(f'sync must be "global", "local" or None, got {sync!r}')
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        self.num_classes = _check_num_classes(num_classes)
        self.unit_dim = check_unit_dim(unit_dim)
        self.statistic = check_statistic(statistic)
        self.transform = check_transform(transform)
        self.eps = _check_eps(eps)
        self.ignore_index = ignore_index
        self.sync = sync
        self.process_group = process_group
        if modules is None:
            self.modules: list[nn.Module] = []
            self.names: list[str] = []
        else:
            self.names = [str(k) for k in modules] if isinstance(modules, dict) else []
            self.modules = as_module_list(modules)
            self.names = self.names or [str(i) for i in range(len(self.modules))]
        self._layer_groups_arg = layer_groups
        self.layer_groups = check_layer_groups(layer_groups, len(self.modules)) if self.modules else None
        self._hook(self.modules)
        self._warned: set = set()
        self.reset()

    # -- state ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget all accumulated data (the hooks stay)."""
        self._sums: list[torch.Tensor | None] = [None] * len(self.modules)
        self._counts: torch.Tensor | None = None
        self._invalid: torch.Tensor | None = None
        self._reduced = False

    @property
    def num_layers(self) -> int:
        return len(self._sums)

    def _init_layers(self, num_layers: int) -> None:
        """Without hooks the layer count is set by the first update_from / load_state_dict / reduction."""
        if self.modules or self._counts is not None or any(s is not None for s in self._sums):
            return
        self._sums = [None] * num_layers
        self.names = [str(i) for i in range(num_layers)]
        self.layer_groups = check_layer_groups(self._layer_groups_arg, num_layers)

    def _check_batch(self, xs: Sequence[torch.Tensor]) -> None:
        if len(xs) != self.num_layers:
            raise ValueError(f"activations must hold {self.num_layers} tensors (one per layer), got {len(xs)}")
        for i, x in enumerate(xs):
            _check_activation(x, f"activations[{i}]")
            width = x.shape[self.unit_dim]
            known = self._sums[i]
            if known is not None and known.shape[1] != width:
                raise ValueError(
                    f"activations[{i}] has {width} units on dim {self.unit_dim}, but earlier "
                    f"batches of this layer had {known.shape[1]}"
                )
            if known is not None and known.device != x.device:
                raise ValueError(f"activations[{i}] is on {x.device}, but the state is on {known.device}")
            if x.shape[0] != xs[0].shape[0]:
                raise ValueError(f"activations[{i}] has {x.shape[0]} samples, activations[0] {xs[0].shape[0]}")

    def update_from(self, activations: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor) -> None:
        """Add a batch: one activation tensor per layer (a list, or one tensor for one layer) and
        the labels [N]. All checks run before the state changes."""
        xs = [activations] if isinstance(activations, torch.Tensor) else list(activations)
        self._init_layers(len(xs))
        self._check_batch(xs)
        if self._reduced:
            raise RuntimeError(
                "the state holds the sum over ranks after all_reduce(): call reset() before adding more data"
            )
        if not xs:
            return
        seg = _segment(labels, xs[0], self.num_classes, self.ignore_index)
        _check_class_memory(self.num_classes, xs, xs[0].device)
        for i, x in enumerate(xs):
            if self._sums[i] is None:
                self._sums[i] = torch.zeros(
                    self.num_classes, x.shape[self.unit_dim], dtype=torch.float64, device=x.device
                )
        accumulate_batch(self._sums, xs, seg, unit_dim=self.unit_dim, transform=self.transform)
        self._counts = seg.counts.clone() if self._counts is None else self._counts.add_(seg.counts)
        # CUDA does not sync on bad labels: they are counted here and reported by compute().
        self._invalid = seg.invalid.clone() if self._invalid is None else self._invalid.add_(seg.invalid)

    def update(self, labels: torch.Tensor) -> None:
        """Add the batch of the latest forward pass of the hooked modules (labels [N])."""
        if not self.modules:
            raise RuntimeError("no modules are hooked: use update_from(activations, labels)")
        self._check_outputs()
        outputs, self._outputs = self._outputs, [None] * len(self.modules)
        self.update_from(outputs, labels)

    def merge(self, other: ClassSelectivity) -> ClassSelectivity:
        """Add ``other``'s data to this metric's (same configuration); returns self."""
        if not isinstance(other, ClassSelectivity):
            raise TypeError(f"other must be a ClassSelectivity, got {type(other).__name__}")
        self._check_config(other._config(), "other")
        if other._counts is None:
            return self
        self._init_layers(other.num_layers)
        if other.num_layers != self.num_layers:
            raise ValueError(f"other has {other.num_layers} layers, this metric {self.num_layers}")
        for i, (mine, theirs) in enumerate(zip(self._sums, other._sums)):
            if mine is not None and mine.shape != theirs.shape:
                raise ValueError(f"layer {i}: other has {theirs.shape[1]} units, this metric {mine.shape[1]}")
        device = self._device() or other._device()
        self._sums = [
            t.to(device).clone() if m is None else m.add_(t.to(device)) for m, t in zip(self._sums, other._sums)
        ]
        c = other._counts.to(device)
        self._counts = c.clone() if self._counts is None else self._counts.add_(c)
        bad = other._invalid.to(device)
        self._invalid = bad.clone() if self._invalid is None else self._invalid.add_(bad)
        return self

    def _device(self) -> torch.device | None:
        return None if self._counts is None else self._counts.device

    def _config(self) -> dict:
        return dict(
            num_classes=self.num_classes, unit_dim=self.unit_dim, statistic=self.statistic, transform=self.transform
        )

    def _check_config(self, config: dict, what: str) -> None:
        for key, mine in self._config().items():
            if key not in config or config[key] != mine:
                raise ValueError(f"{what} has {key}={config.get(key)!r}, this metric {key}={mine!r}")

    def state_dict(self) -> dict:
        """The accumulated data and the configuration it depends on (tensors are copies)."""
        return dict(
            self._config(),
            num_layers=self.num_layers,
            counts=None if self._counts is None else self._counts.clone(),
            sums=[None if s is None else s.clone() for s in self._sums],
            reduced=self._reduced,
        )

    def load_state_dict(self, state: dict) -> None:
        """Replace the accumulated data by ``state`` (from :meth:`state_dict`), after checking it:
        same configuration and layer count, counts int64 [K] >= 0, sums float64 [K, C_l] finite."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        missing = {"num_layers", "counts", "sums", "reduced", *self._config()} - set(state)
        if missing:
            raise ValueError(f"state lacks the keys {sorted(missing)}")
        self._check_config(state, "state")
        sums, counts, k = state["sums"], state["counts"], self.num_classes
        if not isinstance(sums, (list, tuple)) or len(sums) != state["num_layers"]:
            raise ValueError("state['sums'] must be a list with one entry per layer")
        if self.modules and len(sums) != len(self.modules):
            raise ValueError(f"state has {len(sums)} layers, this metric hooks {len(self.modules)} modules")
        if counts is None:
            if any(s is not None for s in sums):
                raise ValueError("state has sums but no counts")
        else:
            if (
                not isinstance(counts, torch.Tensor)
                or counts.dtype != torch.int64
                or tuple(counts.shape) != (k,)
                or bool((counts < 0).any())
            ):
                raise ValueError(f"state['counts'] must be an int64 tensor [{k}] of counts >= 0")
            for i, s in enumerate(sums):
                if (
                    not isinstance(s, torch.Tensor)
                    or s.dtype != torch.float64
                    or s.dim() != 2
                    or s.shape[0] != k
                    or s.device != counts.device
                    or not bool(torch.isfinite(s).all())
                ):
                    raise ValueError(
                        f"state['sums'][{i}] must be a finite float64 tensor [{k}, C] on the device of the counts"
                    )
        device = self._device()
        self.reset()
        self._init_layers(len(sums))
        if counts is not None:
            self._counts = counts.clone() if device is None else counts.to(device, copy=True)
            self._sums = [s.to(self._counts.device, copy=True) for s in sums]
        self._reduced = bool(state["reduced"])

    # -- distributed ---------------------------------------------------------------------------
    def _reduced_state(self):
        """(sums, counts) summed over the ranks of the process group; new tensors."""
        group = self.process_group
        device = self._device()
        backend_device = device if device is not None else torch.device("cpu")
        if _dist.dist.get_backend(group) == "nccl" and backend_device.type == "cpu":
            backend_device = torch.device("cuda", torch.cuda.current_device())
        # Ranks without data (uneven sharding) learn the layer count and widths from the others.
        num_layers = torch.tensor([self.num_layers], dtype=torch.int64, device=backend_device)
        _dist.dist.all_reduce(num_layers, op=_dist.dist.ReduceOp.MAX, group=group)
        self._init_layers(int(num_layers))
        if int(num_layers) != self.num_layers:
            raise ValueError(f"this rank has {self.num_layers} layers, another {int(num_layers)}")
        widths = torch.tensor([-1 if s is None else s.shape[1] for s in self._sums], dtype=torch.int64)
        g_widths = widths.to(backend_device)
        _dist.dist.all_reduce(g_widths, op=_dist.dist.ReduceOp.MAX, group=group)
        g_widths = g_widths.cpu()
        for i, (w, g) in enumerate(zip(widths.tolist(), g_widths.tolist())):
            if w not in (-1, g):
                raise ValueError(f"layer {i} has {w} units on this rank but {g} on another")
        if bool((g_widths < 0).any()):
            return None, None  # no rank has data
        k = self.num_classes
        sums = [
            torch.zeros(k, w, dtype=torch.float64, device=backend_device) if s is None else s.to(backend_device)
            for s, w in zip(self._sums, g_widths.tolist())
        ]
        counts = (
            torch.zeros(k, dtype=torch.int64, device=backend_device)
            if self._counts is None
            else self._counts.to(backend_device)
        )
        # Counts travel exactly in float64 (below 2**53 samples per class).
        buf = torch.cat([s.reshape(-1) for s in sums] + [counts.to(torch.float64)])
        _dist.dist.all_reduce(buf, op=_dist.dist.ReduceOp.SUM, group=group)
        parts = torch.split(buf, [k * w for w in g_widths.tolist()] + [k])
        out_device = device if device is not None else backend_device
        g_sums = [p.view(k, w).to(out_device) for p, w in zip(parts[:-1], g_widths.tolist())]
        return g_sums, torch.round(parts[-1]).to(torch.int64).to(out_device)

    def all_reduce(self) -> None:
        """Replace this rank's state by the sum over the ranks of ``process_group`` (every rank
        must call it). Afterwards ``update`` is refused until ``reset()``, so no data is counted
        twice. Without an initialized process group (or with one rank) nothing changes."""
        if _dist.world_size(self.process_group) == 1 or self._reduced:
            return
        sums, counts = self._reduced_state()
        if counts is not None:
            self._sums, self._counts = sums, counts
        self._reduced = True

    def _is_global(self) -> bool:
        if self.sync == "local" or not _dist.is_distributed():
            if self.sync == "global":
                raise RuntimeError('sync="global" but the torch.distributed process group is not initialized')
            return False
        return _dist.world_size(self.process_group) > 1

    # -- results -------------------------------------------------------------------------------
    def compute(self) -> list[LayerSelectivity]:
        """One :class:`LayerSelectivity` per layer, in order (float64 results, on the state's
        device). Raises if no data was added (on any rank, under global sync)."""
        if self._invalid is not None and int(self._invalid) > 0:
            raise ValueError(
                f"{int(self._invalid)} labels given to update() were outside [0, num_classes="
                f"{self.num_classes}) and not ignore_index={self.ignore_index}; the state is invalid, "
                "call reset()"
            )
        sums, counts = self._sums, self._counts
        if self._is_global() and not self._reduced:
            sums, counts = self._reduced_state()
        if counts is None:
            raise RuntimeError("no data: call update() (or update_from()) before compute()")
        results = []
        for i, (name, s) in enumerate(zip(self.names, sums)):
            result, vanishing = layer_result(name, s, counts, statistic=self.statistic, eps=self.eps)
            if vanishing and self.transform is None and i not in self._warned:
                self._warned.add(i)
                warnings.warn(
                    f"ClassSelectivity layer {name!r}: {vanishing} of {s.shape[1]} units have "
                    f"mu_max + mu_rest <= eps={self.eps:g} (signed activations); their SI is not "
                    'bounded by 1. Use transform="relu" or "abs" for activations that can be '
                    "negative (GELU, SiLU, pre-activation).",
                    RuntimeWarning,
                    stacklevel=2,
                )
            results.append(result)
        return results

    def mean_si(self, results: list[LayerSelectivity] | None = None) -> float:
        """Mean SI of the model: per ``layer_groups`` (mean over each group's units, then over
        groups), else the mean over layers of each layer's mean over units."""
        results = self.compute() if results is None else results
        return float(grouped_mean([r.si for r in results], self.layer_groups))
