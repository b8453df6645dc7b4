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
