"""Shared plumbing of the analyses: layer resolution, forward-hook feature capture, batches, tables."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from .._hooks import LayerOutputHooks
from .._table import format_number, render

FEATURES = ("mean", "flatten")


def resolve_layers(model: torch.nn.Module, layers) -> dict[str, torch.nn.Module]:
    """{name: module} from a mapping name -> module, or a sequence of names or modules of ``model``.

    Names are those of ``model.named_modules()``; a module given directly is named by its path in
    the model (it must belong to the model).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = dict(model.named_modules())
    if isinstance(layers, Mapping):
        out = {}
        for name, mod in layers.items():
            if not isinstance(name, str) or not isinstance(mod, torch.nn.Module):
                raise TypeError("layers as a mapping must map str names to torch.nn.Module")
            out[name] = mod
    elif isinstance(layers, (str, torch.nn.Module)) or not isinstance(layers, Sequence):
        raise TypeError(
            "layers must be a sequence of module names or modules, or a mapping name -> module, "
            f"got {type(layers).__name__}"
        )
    else:
        by_id = {id(m): n for n, m in named.items()}
        out = {}
        for item in layers:
            if isinstance(item, str):
                if item not in named:
                    raise ValueError(f"layers: model has no submodule named {item!r}")
                out[item] = named[item]
            elif isinstance(item, torch.nn.Module):
                if id(item) not in by_id:
                    raise ValueError(f"layers: module {type(item).__name__} is not a submodule of model")
                out[by_id[id(item)] or "<model>"] = item
            else:
                raise TypeError(f"layers entries must be str or torch.nn.Module, got {type(item).__name__}")
    if not out:
        raise ValueError("layers must name at least one module")
    return out


def check_features(features: str) -> str:
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    return features


def to_features(out: torch.Tensor, features: str) -> torch.Tensor:
    """Layer output [N, C, *spatial] (or [N, D]) -> features [N, D].

    "mean": per-unit (channel) spatial mean, D = C; "flatten": the whole output, D = C * prod(spatial).
    """
    if out.dim() < 2:
        raise ValueError(f"layer outputs must have shape [N, C, *spatial], got {tuple(out.shape)}")
    if out.dim() == 2:
        return out
    if features == "mean":
        return out.flatten(2).mean(-1)
    return out.flatten(1)


class Recorder(LayerOutputHooks):
    """Forward hooks on the chosen layers that record their features while ``active``.

    Inactive outside :meth:`run`, so forwards made by perturbations (e.g. an attack's gradient
    steps) record nothing.
    """

    def __init__(self, layers: dict[str, torch.nn.Module], features: str):
        self.features = features
        self.active = False
        self.detach = True
        self.names = list(layers)
        super().__init__(layers)

    def _capture(self, index: int, output) -> None:
        if not self.active:
            return
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"layer {self.names[index]!r} must output a tensor, got {type(output).__name__}")
        feats = to_features(output, self.features)
        self._outputs[index] = feats.detach() if self.detach else feats

    def run(self, model: torch.nn.Module, x: torch.Tensor, *, detach: bool = True) -> dict[str, torch.Tensor]:
        self._take_outputs()
        self.active, self.detach = True, detach
        try:
            model(x)
        finally:
            self.active = False
        outputs = self._take_outputs()
        missing = [n for n, out in zip(self.names, outputs) if out is None]
        if missing:
            raise RuntimeError(f"layers {missing} did not run in the model's forward")
        return dict(zip(self.names, outputs))


def model_device(model: torch.nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def batches(
    loader: Iterable, device: torch.device, max_batches: int | None
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) pairs on ``device`` from a loader yielding (x, y, ...) tuples."""
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be None or a positive int, got {max_batches!r}")
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError("loader must yield (inputs, labels) pairs")
        x, y = batch[0], batch[1]
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError("loader must yield (inputs, labels) tensors")
        yield x.to(device), y.to(device)


def check_frac(frac) -> float:
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1 or math.isnan(frac):
        raise ValueError(f"frac must be a float in (0, 1], got {frac!r}")
    return float(frac)


def _fmt(v) -> str:
    if isinstance(v, float) and math.isfinite(v) and abs(v) >= 1e5:
        return f"{v:.4e}"
    return format_number(v, ".4g", missing="nan")


def format_table(rows: list[dict], title: str = "") -> str:
    """Right-aligned plain-text table of a list of dicts sharing their keys."""
    if not rows:
        return title
    cols = list(rows[0])
    return render(cols, [[_fmt(r[c]) for c in cols] for r in rows], title=title)


def write_csv(rows: list[dict], path) -> None:
    with open(path, "w", newline="") as f:
        if not rows:
            return
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
