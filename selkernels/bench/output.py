"""Summaries and output files of ``selkernels bench``: one table per op family, CSV, JSON, a plot."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import asdict

from .._table import format_number, render
from .core import BenchConfig, Result, environment


def summarize(results: Sequence[Result]) -> list[dict]:
    """One row per (case, dtype, mode): medians, speed-ups of the first variant (the fused op) over
    each other one, bandwidth fraction and peak memory. ``variants`` lists the row's variants in order.
    """
    keyed: dict[tuple, dict[str, Result]] = {}
    xsum: dict[tuple, float] = {}
    for r in results:
        case_key = (r.family, r.case, r.dtype, r.shape)
        if r.mode == "x.sum":
            xsum[case_key] = r.median_ms
        else:
            keyed.setdefault(case_key + (r.mode,), {})[r.variant] = r
    rows = []
    for key, by in keyed.items():
        family, case, dtype, shape, mode = key
        variants = list(by)
        first = by[variants[0]]
        row = dict(family=family, case=case, dtype=dtype, shape=shape, mode=mode, variants=variants)
        for v in variants:
            row[f"{v}_ms"] = by[v].median_ms
        for v in variants[1:]:
            row[f"speedup_vs_{v}"] = by[v].median_ms / first.median_ms
        torch_baselines = [by[v].median_ms for v in ("eager", "compiled") if v in by]
        if torch_baselines:
            row["speedup_vs_best_torch"] = min(torch_baselines) / first.median_ms
        if key[:4] in xsum:
            row["xsum_ms"] = xsum[key[:4]]
            if mode == "fwd":
                row["bandwidth_vs_xsum"] = xsum[key[:4]] / first.median_ms
        for v in variants:
            if by[v].peak_extra_mb is not None:
                row[f"{v}_peak_mb"] = by[v].peak_extra_mb
        rows.append(row)
    return rows


def _family_table(rows: Sequence[dict]) -> list[str]:
    variants = rows[0]["variants"]
    if all(r["variants"] == variants for r in rows) or rows[0]["family"] == "selectivity":
        variants = list(dict.fromkeys(v for r in rows for v in r["variants"]))
        baselines = variants[1:]
        has_best = any("speedup_vs_best_torch" in r for r in rows)
        has_bw = any("xsum_ms" in r for r in rows)
        has_mem = any(f"{v}_peak_mb" in r for r in rows for v in variants)
        header = (
            ["case", "dtype", "shape", "mode"]
            + [f"{v} ms" for v in variants]
            + (["x.sum ms"] if has_bw else [])
            + [f"x vs {v}" for v in baselines]
            + (["x vs best"] if has_best else [])
            + (["bw/x.sum"] if has_bw else [])
            + ([f"{v} MB" for v in variants] if has_mem else [])
        )
        body = []
        for r in rows:
            fwd = r["mode"] == "fwd"
            body.append(
                [r["case"], r["dtype"], r["shape"], r["mode"]]
                + [format_number(r.get(f"{v}_ms"), ".3f") for v in variants]
                + ([format_number(r.get("xsum_ms"), ".3f") if fwd else ""] if has_bw else [])
                + [format_number(r.get(f"speedup_vs_{v}"), ".1f") for v in baselines]
                + ([format_number(r.get("speedup_vs_best_torch"), ".2f")] if has_best else [])
                + ([format_number(r.get("bandwidth_vs_xsum"), ".0%") if fwd else ""] if has_bw else [])
                + (
                    [format_number(r.get(f"{v}_peak_mb"), ".2f") if not fwd else "" for v in variants]
                    if has_mem
                    else []
                )
            )
        return render(header, body, left=4).splitlines()
    # Cases with different variant sets: one line per variant, speed-up of the case's first variant.
    header = ["case", "dtype", "variant", "ms", "first vs this"]
    body = [
        [
            r["case"],
            r["dtype"],
            v,
            format_number(r[f"{v}_ms"], ".3f"),
            "(first)" if i == 0 else format_number(r[f"speedup_vs_{v}"], ".1f"),
        ]
        for r in rows
        for i, v in enumerate(r["variants"])
    ]
    return render(header, body, left=3).splitlines()


def format_table(rows: Sequence[dict]) -> str:
    """One table per op family."""
    if not rows:
        return "(no cases)"
    out: list[str] = []
    for family in dict.fromkeys(r["family"] for r in rows):
        if out:
            out.append("")
        out.append(f"[{family}]")
        out += _family_table([r for r in rows if r["family"] == family])
    return "\n".join(out)


def write_outputs(
    out_dir: str, cfg: BenchConfig, results: Sequence[Result], rows: Sequence[dict], notes: dict[str, str], table: str
) -> dict[str, str]:
    """results.csv (every measurement), summary.csv (one row per case and mode), results.json, speedups.png."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        k: os.path.join(out_dir, v)
        for k, v in dict(
            results_csv="results.csv",
            summary_csv="summary.csv",
            json="results.json",
            table="table.txt",
            plot="speedups.png",
        ).items()
    }
    with open(paths["results_csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(results[0]).keys()) if results else ["case"])
        w.writeheader()
        for r in results:
            w.writerow(asdict(r))
    with open(paths["summary_csv"], "w", newline="") as f:
        fields = list(dict.fromkeys(k for r in rows for k in r)) or ["case"]
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows([dict(r, variants=" ".join(r["variants"])) for r in rows])
    with open(paths["json"], "w") as f:
        json.dump(
            dict(
                config=asdict(cfg),
                environment=environment(cfg),
                notes=notes,
                results=[asdict(r) for r in results],
                summary=list(rows),
            ),
            f,
            indent=1,
        )
    with open(paths["table"], "w") as f:
        f.write(table + "\n")
    plot_speedups(rows, paths["plot"])
    return paths


def plot_speedups(rows: Sequence[dict], path: str) -> None:
    """Speed-up of each case's first variant (the fused op) over every other one: a panel per family and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["family"], r["mode"]) for r in rows)) or [("", "fwd")]
    cols = 2
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(13, 5 * nrows), squeeze=False)
    for ax, (family, mode) in zip(axes.flat, panels):
        sel = [r for r in rows if (r["family"], r["mode"]) == (family, mode)]
        baselines = list(dict.fromkeys(v for r in sel for v in r["variants"][1:]))
        width = 0.8 / max(len(baselines), 1)
        for i, b in enumerate(baselines):
            vals = [r.get(f"speedup_vs_{b}", float("nan")) for r in sel]
            ax.bar([j + i * width for j in range(len(sel))], vals, width, label=f"vs {b}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{family} {mode}: speed-up of the fused op (higher is better)", fontsize=10)
        ax.set_xticks([j + width * (len(baselines) - 1) / 2 for j in range(len(sel))])
        ax.set_xticklabels([f"{r['case']}\n{r['dtype']}" for r in sel], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("time(baseline) / time(fused)")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
