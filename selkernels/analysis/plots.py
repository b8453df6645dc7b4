"""Matplotlib figures of the analysis reports, drawn with the Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import math


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_dimensionality(report, path) -> None:
    """Two panels vs layer: components for ``report.frac`` of the variance, and participation ratio;
    one line per condition (clean representations and each perturbation's change)."""
    fig = _figure(10, 4)
    axes = fig.subplots(1, 2)
    x = list(range(len(report.layers)))
    for cond in report.conditions:
        style = dict(marker="o", linestyle="-" if cond == "clean" else "--", label=cond)
        axes[0].plot(x, [report.n_components[cond][n] for n in report.layers], **style)
        axes[1].plot(x, [report.participation_ratio[cond][n] for n in report.layers], **style)
    axes[0].set_ylabel(f"components for {report.frac:.0%} variance")
    axes[1].set_ylabel("participation ratio")
    for ax in axes:
        ax.set_xticks(x, report.layers, rotation=30, ha="right")
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Dimensionality of representations and of perturbation-induced change (features={report.features})")
    fig.savefig(path, dpi=120)


def plot_class_density(report, path) -> None:
    """One panel per layer: per-class mean log-density of own samples, sorted, coloured by mode,
    with the split threshold as a dashed line."""
    n = len(report.layers)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = _figure(4.2 * cols, 3.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, name in zip(axes, report.layers):
        s = report.splits[name]
        low = set(s.low)
        colours = ["tab:blue" if c in low else "tab:red" for c in s.order]
        ax.scatter(range(len(s.values)), s.values, c=colours, s=18)
        ax.axhline(s.threshold, color="gray", linestyle="--", linewidth=1)
        ax.set_title(f"{name} (dim {report.models[name].dim}, gap ratio {s.gap_ratio:.3g})", fontsize=9)
        ax.set_xlabel("classes, sorted")
        ax.set_ylabel("mean log-density")
        ax.grid(alpha=0.3)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle("Class-conditional fit: two modes (blue: low, red: high)")
    fig.savefig(path, dpi=120)


def plot_selectivity_histograms(
    results, path, *, title: str = "Class selectivity of units, per layer", bins: int = 20
) -> None:
    """One histogram panel per layer of the units' SI (the papers' per-layer distributions), with
    each layer's mean SI as a dashed line. ``results`` is a list of
    :class:`selkernels.metrics.LayerSelectivity`, or a dict label -> such a list (one colour per
    label, e.g. one per regularization strength)."""
    import numpy as np

    runs = results if isinstance(results, dict) else {"": results}
    layers = [r.name for r in next(iter(runs.values()))]
    values = [v for rs in runs.values() for r in rs for v in r.si.tolist()]
    lo, hi = min(0.0, min(values)), max(1.0, max(values))
    edges = np.linspace(lo, hi, bins + 1)
    cols = min(len(layers), 4)
    rows = math.ceil(len(layers) / cols)
    fig = _figure(3.2 * cols, 2.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for j, (ax, name) in enumerate(zip(axes, layers)):
        for c, (label, rs) in enumerate(runs.items()):
            si = rs[j].si.cpu().numpy()
            colour = f"C{c}"
            ax.hist(si, bins=edges, histtype="stepfilled", alpha=0.35, color=colour, label=label or None)
            ax.axvline(float(si.mean()), color=colour, linestyle="--", linewidth=1)
        ax.set_title(f"{name} ({len(rs[j].si)} units)", fontsize=9)
        ax.set_xlabel("SI")
        ax.set_ylabel("units")
        ax.grid(alpha=0.3)
    for ax in axes[len(layers) :]:
        ax.set_visible(False)
    if len(runs) > 1:
        axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=90)


def plot_ablation(curves, path, *, title: str = "Unit ablation") -> None:
    """Accuracy vs fraction of units ablated, one line per :class:`AblationCurve`."""
    fig = _figure(5, 3.6)
    ax = fig.subplots()
    for curve in curves:
        ax.plot(curve.fractions, [100 * a for a in curve.accuracy], marker="o", label=f"{curve.order} order")
    ax.set_xlabel(f"fraction of the layer's {curves[0].num_units} units zeroed")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=90)
