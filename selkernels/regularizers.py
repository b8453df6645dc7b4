"""Training-time regularizers built on the fused ops."""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Union

import torch
from torch import nn

from .ops import _check_eps, _check_num_classes, selectivity_index

__all__ = ["SelectivityRegularizer"]


def _as_module_list(modules) -> List[nn.Module]:
    if isinstance(modules, nn.Module):
        return [modules]
    if isinstance(modules, dict):
        modules = list(modules.values())
    modules = list(modules)
    if not modules or not all(isinstance(m, nn.Module) for m in modules):
        raise TypeError("modules must be an nn.Module or a non-empty iterable (or dict) of nn.Modules")
    return modules


class SelectivityRegularizer:
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

    Use as a context manager, or call ``remove()``, to take the hooks off.
    """

    def __init__(self, modules: Union[nn.Module, Iterable[nn.Module], Dict[str, nn.Module]], alpha: float,
                 num_classes: int, *, eps: float = 1e-7, ignore_index: int = -100):
        self.modules = _as_module_list(modules)
        self.alpha = float(alpha)
        self.num_classes = _check_num_classes(num_classes)
        self.eps = _check_eps(eps)
        self.ignore_index = ignore_index
        self.last_layer_si: Optional[torch.Tensor] = None
        self._outputs: List[Optional[torch.Tensor]] = [None] * len(self.modules)
        self._handles = [m.register_forward_hook(self._make_hook(i)) for i, m in enumerate(self.modules)]

    def _make_hook(self, index: int):
        def hook(module, inputs, output):
            if isinstance(output, (tuple, list)):
                output = output[0]
            self._outputs[index] = output

        return hook

    def layer_selectivity(self, labels: torch.Tensor) -> torch.Tensor:
        """Mean SI over units for each hooked module's latest output: a differentiable [L] tensor."""
        missing = [i for i, out in enumerate(self._outputs) if out is None]
        if missing:
            raise RuntimeError(f"modules {missing} produced no output since the last penalty(): run the model's "
                               "forward pass on this batch first")
        si = [selectivity_index(out, labels, self.num_classes, eps=self.eps, ignore_index=self.ignore_index).mean()
              for out in self._outputs]
        self._outputs = [None] * len(self.modules)
        return torch.stack(si)

    def penalty(self, labels: torch.Tensor) -> torch.Tensor:
        """-alpha * mean SI over units and layers, for the batch of the latest forward pass."""
        layer_si = self.layer_selectivity(labels)
        self.last_layer_si = layer_si.detach()
        return -self.alpha * layer_si.mean()

    __call__ = penalty

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._outputs = [None] * len(self.modules)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
