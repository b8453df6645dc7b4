"""Training-time regularizers built on the fused ops."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from . import distributed as _dist
from ._hooks import LayerOutputHooks, as_module_list
from ._options import check_layer_groups, check_statistic, check_unit_dim, grouped_mean
from .ops import _check_eps, _check_num_classes, class_means, selectivity_from_means, selectivity_index

__all__ = ["SelectivityRegularizer", "SpectralRegularizer"]

_REGULARIZER_IDS = itertools.count()


class SelectivityRegularizer(LayerOutputHooks):
    """Class-selectivity regularizer of Leavitt & Morcos (ICLR 2021), fused.

    Registers forward hooks on ``modules`` (e.g. every residual block, as the paper does) and keeps
    each one's latest output. ``penalty(labels)`` returns

        -alpha * mean over layers (mean over units of SI)

    so that ``loss = cross_entropy + reg.penalty(labels)``: alpha < 0 lowers class selectivity,
    alpha > 0 raises it (the paper's sign). The per-layer mean SI of the last call is kept in
    ``last_layer_si`` (detached) for logging.

    Edge cases follow :func:`selkernels.selectivity_index`: a batch with fewer than two classes
    present contributes SI = 0 (the published scripts give NaN). Only the latest output of each
    module is held, and ``penalty()`` releases it, so evaluation loops that never call it hold at
    most one batch of activations.

    Distributed training (DistributedDataParallel, torchrun): ``sync="global"`` computes SI on the
    batch joined over all ranks of ``process_group`` (default: the default group), so that with
    8 ranks of 32 samples the statistic is that of the 256-sample batch, not of each rank's slice.
    Each rank's per-class activation sums and counts of all hooked layers travel in ONE all-reduce
    forward (``(K * sum_l C_l + K)`` floats, float32 or float64) and one of the same size backward;
    activations never leave the rank. Every rank gets the same penalty, and the gradients DDP
    averages over ranks equal the single-process gradient of the penalty on the joined batch.
    ``sync="local"`` is the published behaviour (each rank's own slice). The default ``sync=None``
    means global when torch.distributed is initialized, else local; with a single rank both are
    the local computation exactly. Under global sync every rank must call ``penalty()`` each step
    and backpropagate through it (collectives must match across ranks).

    ``unit_dim=-1`` takes each output as [N, *positions, D] (transformer tokens: the units are the
    D features, averaged over positions as spatial positions are). ``statistic="sum"`` computes SI
    from per-class SUMS of the per-sample unit means instead of class means, as Ranadive et al.'s
    published training regularizer does (they differ on imbalanced batches). ``layer_groups`` (a
    partition of the module indices, e.g. the blocks of each ResNet stage) averages SI over all
    units of each group first, then over groups, as that code does; ``last_layer_si`` stays per
    module.

    Copies: a copy of the hooked model (``copy.deepcopy`` for an EMA or teacher, ``pickle``,
    ``torch.save``) carries inert hooks and never writes into this regularizer; copying the model
    and the regularizer together (``copy.deepcopy((model, reg))``) binds the copy to the copy.

    Ranks that disagree on ``num_classes`` or on the hooked layers' widths get the same
    ``ValueError`` naming every rank's layout, on every rank, at the first ``penalty()`` (a tiny
    exchange of the layout before the first all-reduce of each layout; see
    :func:`selkernels.distributed.global_class_means`). Global sync traces under
    ``torch.compile(fullgraph=True)``.

    Cost in a training step. Beyond the forward's one read of every hooked output, the SI gradient
    (an [N, C] tensor broadcast over the spatial positions) must be added into the dense gradient
    each output receives from the layers after it: a read and a write of the output's size. That
    add is the floor of any regularizer of block outputs, and autograd does it. Autograd adds in
    place only into a gradient it solely owns that arrives first; it runs the newest nodes first,
    so a penalty computed after the forward (the newest node) would deliver its broadcast first and
    every layer would pay an out-of-place add, a fresh output-sized tensor per layer and step
    (measured with torch 2.13 by profiling a ResNet-20 step: 9 ``aten::add`` of the block outputs'
    sizes). The hooks therefore hand the SI a view of each output made at hook time, before the
    later layers use it: the view's node is older than theirs, the SI gradient arrives last, and
    autograd adds it in place (``aten::add_``); the step then pays the floor.
    ``selkernels bench --family step`` measures the overhead against that floor.

    Use as a context manager, or call ``remove()``, to take the hooks off.
    """

    def __init__(
        self,
        modules: nn.Module | Iterable[nn.Module] | dict[str, nn.Module],
        alpha: float,
        num_classes: int,
        *,
        eps: float = 1e-7,
        ignore_index: int = -100,
        sync: str | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
        unit_dim: int = 1,
        statistic: str = "mean",
        layer_groups: Sequence[Sequence[int]] | None = None,
    ) -> None:
        if sync not in (None, "global", "local"):
            raise ValueError(f'sync must be "global", "local" or None, got {sync!r}')
        self.sync = sync
        self.process_group = process_group
        self.modules = as_module_list(modules)
        self.alpha = float(alpha)
        self.num_classes = _check_num_classes(num_classes)
        self.eps = _check_eps(eps)
        self.ignore_index = ignore_index
        self.unit_dim = check_unit_dim(unit_dim)
        self.statistic = check_statistic(statistic)
        self.layer_groups = check_layer_groups(layer_groups, len(self.modules))
        self.last_layer_si: torch.Tensor | None = None
        # Under global sync the ranks check once per layout that they all-reduce the same layout.
        self._layout_key = f"SelectivityRegularizer-{next(_REGULARIZER_IDS)}"
        self._hook(self.modules)

    def unit_selectivity(self, labels: torch.Tensor) -> list[torch.Tensor]:
        """SI of every unit of each hooked module's latest output: a list of differentiable [C_l]
        tensors (over the global batch under global sync, see the class docstring)."""
        self._check_outputs()
        use_global = self._is_global()
        outputs = self._take_outputs()
        if self.statistic == "sum":
            return self._sum_selectivity(outputs, labels, use_global)
        if use_global:
            return _dist.global_selectivity_index(
                outputs,
                labels,
                self.num_classes,
                eps=self.eps,
                ignore_index=self.ignore_index,
                group=self.process_group,
                unit_dim=self.unit_dim,
                layout_key=self._layout_key,
            )
        return selectivity_index(
            outputs, labels, self.num_classes, eps=self.eps, ignore_index=self.ignore_index, unit_dim=self.unit_dim
        )

    def _sum_selectivity(self, outputs, labels, use_global: bool) -> list[torch.Tensor]:
        """SI from class sums (= class means * counts, so the fused means and their backward serve)."""
        if use_global:
            means, counts = _dist.global_class_means(
                outputs,
                labels,
                self.num_classes,
                ignore_index=self.ignore_index,
                group=self.process_group,
                unit_dim=self.unit_dim,
                layout_key=self._layout_key,
            )
        else:
            local = class_means(
                outputs, labels, self.num_classes, ignore_index=self.ignore_index, unit_dim=self.unit_dim
            )
            means, counts = [m for m, _ in local], local[0][1]
        return [selectivity_from_means(m * counts.to(m.dtype)[:, None], counts, self.eps) for m in means]

    def layer_selectivity(self, labels: torch.Tensor) -> torch.Tensor:
        """Mean SI over units for each hooked module's latest output: a differentiable [L] tensor."""
        return torch.stack([s.mean() for s in self.unit_selectivity(labels)])

    def _is_global(self) -> bool:
        """Whether this step joins the ranks' batches: decided per call, so a regularizer built
        before init_process_group follows it; one rank is the local computation."""
        if self.sync == "local" or not _dist.is_distributed():
            if self.sync == "global":
                raise RuntimeError('sync="global" but the torch.distributed process group is not initialized')
            return False
        return _dist.world_size(self.process_group) > 1

    def penalty(self, labels: torch.Tensor) -> torch.Tensor:
        """-alpha * mean SI over units and layers (or layer groups), for the latest forward pass."""
        unit_si = self.unit_selectivity(labels)
        layer_si = torch.stack([s.mean() for s in unit_si])
        self.last_layer_si = layer_si.detach()
        return -self.alpha * (
            layer_si.mean() if self.layer_groups is None else grouped_mean(unit_si, self.layer_groups)
        )

    __call__ = penalty


class SpectralRegularizer(LayerOutputHooks):
    """1/n spectral regularizer of Nassar et al. (NeurIPS 2020), fused.

    Registers forward hooks on ``modules`` and keeps each one's latest output (flattened to
    [N, D]: conv outputs [N, C, *spatial] are flattened per sample, D = C * prod(spatial), as the
    paper regularizes whole-layer representations). ``penalty()`` returns

        beta * sum over layers of spectral_penalty(h_layer, V_layer, slope=slope, tau=tau)

    so that ``loss = cross_entropy + reg.penalty()``. The eigenbases V (float64 eigh of each layer's
    covariance over the whole training set, descending) are recomputed by
    ``refresh_basis(model, loader)``, once per epoch in the paper; they are constants for autograd.
    ``penalty()`` releases the held outputs. Copies behave as for :class:`SelectivityRegularizer`
    (a copied model's hooks are inert). Use as a context manager, or call ``remove()``.
    """

    def __init__(
        self,
        modules: nn.Module | Iterable[nn.Module] | dict[str, nn.Module],
        beta: float,
        *,
        slope: float = 1.0,
        tau: int = 10,
    ) -> None:
        from .spectral_ops import _check_slope_tau

        self.modules = as_module_list(modules)
        self.beta = float(beta)
        self.slope, self.tau = _check_slope_tau(slope, tau)
        self.bases: list[torch.Tensor | None] = [None] * len(self.modules)
        self._hook(self.modules)

    @torch.no_grad()
    def refresh_basis(self, model: nn.Module, loader: Iterable) -> list[torch.Tensor]:
        """Stream every hooked layer's covariance over ``loader`` (eval mode, no grad) and set V.

        ``loader`` yields batches whose first element (or the batch itself) is the model input; a
        tensor input is moved to the device of the model's first parameter. The model's training
        mode is restored afterwards. Returns the new bases (float64 [D, D], columns in descending
        eigenvalue order, on the layers' devices).
        """
        from .covariance import StreamingCovariance
        from .spectrum import eigenvalues

        was_training = model.training
        model.eval()
        stats: list[StreamingCovariance | None] = [None] * len(self.modules)
        try:
            for batch in loader:
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                param = next(model.parameters(), None)
                if isinstance(inputs, torch.Tensor) and param is not None:
                    inputs = inputs.to(param.device)
                model(inputs)
                for i, out in enumerate(self._outputs):
                    if out is None:
                        raise RuntimeError(f"module {i} produced no output during refresh_basis")
                    flat = out.detach().flatten(1)
                    if stats[i] is None:
                        stats[i] = StreamingCovariance(flat.shape[1], device=flat.device)
                    stats[i].update(flat)
                self._outputs = [None] * len(self.modules)
        finally:
            model.train(was_training)
            self._outputs = [None] * len(self.modules)
        if any(s is None for s in stats):
            raise ValueError("loader yielded no batches")
        self.bases = [eigenvalues(s.covariance(), eigenvectors=True)[1] for s in stats]
        return self.bases

    def layer_penalties(self) -> torch.Tensor:
        """spectral_penalty of each hooked module's latest output: a differentiable [L] tensor."""
        from .spectral_ops import spectral_penalty

        if any(v is None for v in self.bases):
            raise RuntimeError("no eigenbasis yet: call refresh_basis(model, loader) first")
        self._check_outputs()
        terms = []
        for out, V in zip(self._outputs, self.bases):
            h = out.flatten(1)
            terms.append(spectral_penalty(h, V.to(h.device), slope=self.slope, tau=self.tau))
        self._outputs = [None] * len(self.modules)
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in terms) else torch.float32
        return torch.stack([t.to(dtype) for t in terms])

    def penalty(self) -> torch.Tensor:
        """beta * sum over layers of the spectral penalty of the latest forward pass."""
        return self.beta * self.layer_penalties().sum()

    __call__ = penalty
