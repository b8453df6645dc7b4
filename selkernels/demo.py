"""``selkernels demo``: class-selectivity regularization end to end, on a laptop CPU in minutes.

Trains a small CNN on scikit-learn's digits (8x8 grey images, 10 classes; ships with scikit-learn,
nothing to download) with :class:`selkernels.SelectivityRegularizer` on the post-ReLU output of
each of its three conv blocks, for several regularization strengths alpha and seeds:

    loss = cross_entropy + reg.penalty(labels),   penalty = -alpha * mean SI over units and layers

so alpha < 0 pushes class selectivity down and alpha > 0 pushes it up (Leavitt & Morcos, ICLR 2021).
After training, each block's mean SI over units is measured on the held-out test set from class
means accumulated over the whole test set (:func:`selkernels.class_means` per batch, merged, then
:func:`selkernels.selectivity_from_means`), not averaged over batches. Reported per alpha: mean SI
per block and test accuracy, mean +- standard deviation over seeds.
"""
from __future__ import annotations

import csv
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ._table import render
from .ops import class_means, selectivity_from_means
from .regularizers import SelectivityRegularizer

__all__ = ["DemoConfig", "SmallCNN", "load_digits_split", "train_one", "run_demo", "format_table", "main"]

NUM_CLASSES = 10


@dataclass
class DemoConfig:
    alphas: Tuple[float, ...] = (-10.0, -1.0, 0.0, 1.0, 10.0)
    seeds: Tuple[int, ...] = (0, 1, 2)
    epochs: int = 15
    batch_size: int = 64
    lr: float = 3e-3
    width: int = 16
    threads: int = 0  # 0: torch's current setting
    train_subset: int = 0  # 0: the whole training split (the quick run uses a few hundred samples)


class SmallCNN(nn.Module):
    """Three conv blocks (conv, batch norm, ReLU), global average pooling, a linear classifier.

    ``blocks`` are the modules the regularizer hooks: their outputs are post-ReLU, non-negative as
    the selectivity index assumes.
    """

    def __init__(self, width: int = 16, num_classes: int = NUM_CLASSES):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.blocks = nn.ModuleList([block(1, width), block(width, 2 * width), block(2 * width, 4 * width)])
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.blocks[0](x)  # 8x8
        x = F.max_pool2d(self.blocks[1](x), 2)  # 4x4
        x = self.blocks[2](x)
        return self.head(x.mean((2, 3)))


def load_digits_split(test_fraction: float = 0.25, split_seed: int = 0):
    """(x_train, y_train, x_test, y_test): digits scaled to [0, 1] as [N, 1, 8, 8]; one stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=test_fraction, random_state=split_seed,
                                           stratify=y.numpy())
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


@torch.no_grad()
def evaluate(model: SmallCNN, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> Tuple[float, List[float]]:
    """(test accuracy, mean SI over units of each block) on the whole set.

    Class means are merged across batches (sum of mean * count), so the SI is that of the whole
    test set, as if it were one batch.
    """
    model.eval()
    outputs: Dict[int, torch.Tensor] = {}
    handles = [b.register_forward_hook(lambda m, i, o, j=j: outputs.__setitem__(j, o))
               for j, b in enumerate(model.blocks)]
    sums: List[Optional[torch.Tensor]] = [None] * len(model.blocks)
    counts = torch.zeros(NUM_CLASSES, dtype=torch.long)
    correct = 0
    try:
        for start in range(0, len(y), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            correct += int((model(xb).argmax(1) == yb).sum())
            for j in range(len(model.blocks)):
                means, cnt = class_means(outputs[j], yb, NUM_CLASSES)
                part = means * cnt.unsqueeze(1)
                sums[j] = part if sums[j] is None else sums[j] + part
            counts += cnt
    finally:
        for h in handles:
            h.remove()
    merged = [s / counts.clamp_min(1).unsqueeze(1) for s in sums]
    layer_si = [float(selectivity_from_means(m, counts).mean()) for m in merged]
    return correct / len(y), layer_si


def train_one(alpha: float, seed: int, data, cfg: DemoConfig) -> Tuple[float, List[float]]:
    """Train one model; return (test accuracy, test mean SI per block)."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = SmallCNN(cfg.width)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps = cfg.epochs * -(-len(y_train) // cfg.batch_size)
    # Annealing to zero leaves each model at a settled point, so seeds differ less at the end.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(seed)
    with SelectivityRegularizer(list(model.blocks), alpha=alpha, num_classes=NUM_CLASSES) as reg:
        for _ in range(cfg.epochs):
            model.train()
            order = torch.randperm(len(y_train), generator=gen)
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                xb, yb = x_train[idx], y_train[idx]
                loss = F.cross_entropy(model(xb), yb) + reg.penalty(yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return evaluate(model, x_test, y_test)


@dataclass
class RunResult:
    alpha: float
    seed: int
    accuracy: float
    layer_si: List[float]


def run_demo(cfg: DemoConfig, *, progress: bool = True) -> List[RunResult]:
    from tqdm.auto import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_digits_split()
    if cfg.train_subset:
        data = (data[0][:cfg.train_subset], data[1][:cfg.train_subset]) + data[2:]
    runs = [(a, s) for a in cfg.alphas for s in cfg.seeds]
    results = []
    bar = tqdm(runs, desc="selkernels demo", unit="model", disable=not progress, dynamic_ncols=True)
    for alpha, seed in bar:
        bar.set_postfix_str(f"alpha={alpha:g} seed={seed}", refresh=True)
        acc, layer_si = train_one(alpha, seed, data, cfg)
        results.append(RunResult(alpha, seed, acc, layer_si))
    return results


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: Sequence[RunResult]) -> List[dict]:
    """One row per alpha: mean and std over seeds of the accuracy and of every block's mean SI."""
    rows = []
    for alpha in dict.fromkeys(r.alpha for r in results):
        sel = [r for r in results if r.alpha == alpha]
        row = dict(alpha=alpha, seeds=len(sel))
        row["accuracy_mean"], row["accuracy_std"] = _mean_std([r.accuracy for r in sel])
        for j in range(len(sel[0].layer_si)):
            row[f"si_block{j + 1}_mean"], row[f"si_block{j + 1}_std"] = _mean_std([r.layer_si[j] for r in sel])
        row["si_all_mean"], row["si_all_std"] = _mean_std([statistics.fmean(r.layer_si) for r in sel])
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict]) -> str:
    blocks = sorted({k.split("_")[1] for k in rows[0] if k.startswith("si_block")})
    header = ["alpha", "test accuracy"] + [f"SI {b}" for b in blocks] + ["SI mean of blocks"]
    body = [[f"{r['alpha']:g}", f"{100 * r['accuracy_mean']:.1f} ± {100 * r['accuracy_std']:.1f} %"]
            + [f"{r[f'si_{b}_mean']:.3f} ± {r[f'si_{b}_std']:.3f}" for b in blocks]
            + [f"{r['si_all_mean']:.3f} ± {r['si_all_std']:.3f}"] for r in rows]
    return render(header, body)


def plot(rows: Sequence[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [r["alpha"] for r in rows]
    xs = range(len(alphas))
    blocks = sorted({k.split("_")[1] for k in rows[0] if k.startswith("si_block")})
    fig, (ax_si, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for b in blocks:
        ax_si.errorbar(xs, [r[f"si_{b}_mean"] for r in rows], [r[f"si_{b}_std"] for r in rows], marker="o",
                       capsize=3, label=b)
    ax_si.set_ylabel("test-set mean class selectivity")
    ax_si.legend()
    ax_acc.errorbar(xs, [100 * r["accuracy_mean"] for r in rows], [100 * r["accuracy_std"] for r in rows],
                    marker="o", capsize=3, color="k")
    ax_acc.set_ylabel("test accuracy (%)")
    for ax in (ax_si, ax_acc):
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"{a:g}" for a in alphas])
        ax.set_xlabel("alpha (regularization strength; < 0 lowers selectivity)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"SelectivityRegularizer on digits, mean ± std over {rows[0]['seeds']} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out_dir: str, cfg: DemoConfig, results: Sequence[RunResult], rows: Sequence[dict],
                  table: str) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, v) for k, v in dict(csv="demo.csv", json="demo.json", table="demo.txt",
                                                           plot="demo.png").items()}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    with open(paths["json"], "w") as f:
        json.dump(dict(config=asdict(cfg), torch=torch.__version__, runs=[asdict(r) for r in results],
                       summary=list(rows)), f, indent=1)
    with open(paths["table"], "w") as f:
        f.write(table + "\n")
    plot(rows, paths["plot"])
    return paths


def add_arguments(parser) -> None:
    parser.add_argument("--alphas", type=float, nargs="+", default=None, help="default: -10 -1 0 1 10")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    parser.add_argument("--epochs", type=int, default=None, help="default 15")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's current setting)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (few samples, one epoch)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", default=None, help="directory for demo.csv, demo.json, demo.txt and demo.png")


def main(argv: Optional[Sequence[str]] = None, *, args=None) -> int:
    if args is None:
        import argparse

        parser = argparse.ArgumentParser(prog="selkernels demo")
        add_arguments(parser)
        args = parser.parse_args(argv)
    cfg = DemoConfig(threads=args.threads)
    if args.quick:
        cfg.alphas, cfg.seeds, cfg.epochs, cfg.train_subset, cfg.width = (-10.0, 0.0, 10.0), (0, 1), 1, 256, 8
    if args.alphas:
        cfg.alphas = tuple(args.alphas)
    if args.seeds:
        cfg.seeds = tuple(range(args.seeds))
    if args.epochs:
        cfg.epochs = args.epochs
    t0 = time.perf_counter()
    results = run_demo(cfg, progress=not args.no_progress)
    rows = summarize(results)
    table = format_table(rows)
    print(f"\nselkernels demo: digits, SmallCNN(width={cfg.width}), {cfg.epochs} epochs, {len(cfg.seeds)} seeds, "
          f"torch {torch.__version__}, {time.perf_counter() - t0:.0f} s")
    print(table)
    print("SI: test-set mean class selectivity of each block's post-ReLU units (class means over the whole "
          "test set); mean ± std over seeds.")
    if args.out:
        paths = write_outputs(args.out, cfg, results, rows, table)
        print("wrote " + ", ".join(paths.values()))
    return 0
