"""The one forward-hook capture helper: keep the latest output of each hooked module.

Used by the regularizers and :class:`~selkernels.ClassSelectivity` (as is), by the analyses'
feature recorder and by the step benchmark's baselines (each overriding :meth:`LayerOutputHooks._capture`).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["LayerOutputHooks", "as_module_list"]


def as_module_list(modules: nn.Module | Iterable[nn.Module] | dict[str, nn.Module]) -> list[nn.Module]:
    if isinstance(modules, nn.Module):
        return [modules]
    if isinstance(modules, dict):
        modules = list(modules.values())
    modules = list(modules)
    if not modules or not all(isinstance(m, nn.Module) for m in modules):
        raise TypeError("modules must be an nn.Module or a non-empty iterable (or dict) of nn.Modules")
    return modules


class _OutputHook:
    """Forward hook that hands a module's output to its owner's ``_capture(index, output)``.

    The owner is held weakly: an owner dropped without ``remove()`` is collected (and its hooks
    removed), never kept alive by the model. A copy of the hook, made when the hooked model is
    copied (``copy.deepcopy``, ``pickle``, ``torch.save``), is inert: it has no owner and does
    nothing, so a copy of the model (an EMA or teacher) never writes into the original's state.
    """

    __slots__ = ("_owner", "index")

    def __init__(self, owner: LayerOutputHooks | None, index: int):
        self._owner = None if owner is None else weakref.ref(owner)
        self.index = index

    def __call__(self, module, inputs, output):
        owner = None if self._owner is None else self._owner()
        if owner is not None:
            owner._capture(self.index, output)

    def __deepcopy__(self, memo):
        return _OutputHook(None, self.index)

    def __reduce__(self):
        return _OutputHook, (None, self.index)


def _remove_handles(handles) -> None:
    for handle in handles:
        handle.remove()


class LayerOutputHooks:
    """Forward hooks that keep the latest output of each hooked module in ``_outputs[i]``.

    Only the latest output per module is held; the consumer takes them (:meth:`_take_outputs`)
    and releases them. Use as a context manager, or call ``remove()``, to take the hooks off.
    ``LayerOutputHooks(modules)`` hooks at once; subclasses that check their arguments first set
    ``self.modules`` and call :meth:`_hook` themselves, and change what is kept by overriding
    :meth:`_capture`.

    Copies. Copying the hooked model (``copy.deepcopy(model)`` for an EMA or teacher,
    ``pickle``/``torch.save(model)``) gives the copy inert hooks: running the copy changes nothing
    here, and this object keeps reading the original model. To hook the copy, build another one on
    it. Copying this object (``copy.deepcopy``, ``pickle``) copies its configuration and its
    modules, drops the held outputs (they belong to one forward pass) and hooks the copied modules:
    ``copy.deepcopy((model, reg))`` gives a regularizer bound to the model copy, and a pickled
    ``(model, reg)`` loads as a working pair.
    """

    def __init__(self, modules: nn.Module | Iterable[nn.Module] | dict[str, nn.Module]) -> None:
        self.modules = as_module_list(modules)
        self._hook(self.modules)

    def _hook(self, modules: list[nn.Module]) -> None:
        self._outputs: list[torch.Tensor | None] = [None] * len(modules)
        self._handles = [m.register_forward_hook(_OutputHook(self, i)) for i, m in enumerate(modules)]
        weakref.finalize(self, _remove_handles, list(self._handles))

    def _capture(self, index: int, output) -> None:
        """Keep the first tensor of a module's output (a tuple's or list's first element)."""
        if isinstance(output, (tuple, list)):
            output = output[0]
        if isinstance(output, torch.Tensor) and output.requires_grad:
            # The penalty reads a view made now, before the layers after this one use the output:
            # its autograd node is older than theirs, so the backward delivers the penalty's gradient
            # after the dense one, which autograd then adds into in place (SelectivityRegularizer's
            # docstring: cost in a training step).
            output = output.view_as(output)
        self._outputs[index] = output

    def _take_outputs(self) -> list:
        """The held outputs, released (every slot back to None)."""
        # Emptied in place: under torch.compile a list whose slots were written in the graph is
        # restored after it, so a replaced list would carry its tensors out of the graph (graph
        # outputs, whose gradients the backward then materialises as zeros and adds).
        outputs = list(self._outputs)
        for i in range(len(self._outputs)):
            self._outputs[i] = None
        return outputs

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_outputs"] = [None] * len(self._outputs)
        state["_handles"] = bool(self._handles)  # whether to hook the (copied) modules again
        return state

    def __setstate__(self, state):
        hooked = state.pop("_handles")
        self.__dict__.update(state)
        self._handles = []
        if hooked:
            self._hook(self.modules)

    def _check_outputs(self) -> None:
        missing = [i for i, out in enumerate(self._outputs) if out is None]
        if missing:
            raise RuntimeError(
                f"modules {missing} produced no output since the last penalty(): run the model's "
                "forward pass on this batch first"
            )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._outputs = [None] * len(self._outputs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
