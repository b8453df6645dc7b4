"""``selkernels demo``: class-selectivity regularization end to end, on a laptop CPU in minutes.

Trains two small models on scikit-learn's digits (8x8 grey images, 10 classes; ships with
scikit-learn, nothing to download) with :class:`selkernels.SelectivityRegularizer`, for several
regularization strengths alpha and seeds:

* a CNN, regularizing the post-ReLU output of each of its three conv blocks ([N, C, H, W] units:
  channels);
* a small ViT (2x2-pixel patch tokens, two pre-norm transformer blocks), regularizing the hidden
  units of each block's MLP ([N, tokens, D] with ``unit_dim=-1``: the units are the D hidden
  neurons, averaged over tokens);

    loss = cross_entropy + reg.penalty(labels),   penalty = -alpha * mean SI over units and layers

so alpha < 0 pushes class selectivity down and alpha > 0 pushes it up (Leavitt & Morcos, ICLR 2021).
After training, each layer's SI is measured on the held-out test set with
:class:`selkernels.ClassSelectivity` (class sums over the whole test set, not an average over
batches). Reported per model and alpha: mean SI per layer and test accuracy, mean +- standard
deviation over seeds. ``--figures DIR`` also draws the per-layer SI histograms of the seed-0 models
and unit-ablation curves (:func:`selkernels.analysis.ablation_curve`).
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ._table import render
from .metrics import ClassSelectivity, LayerSelectivity
from .regularizers import SelectivityRegularizer

__all__ = ["DemoConfig", "SmallCNN", "SmallViT", "load_digits_split", "train_one", "run_demo", "format_table", "main"]

NUM_CLASSES = 10


@dataclass
class DemoConfig:
    alphas: tuple[float, ...] = (-10.0, -1.0, 0.0, 1.0, 10.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 15
    batch_size: int = 64
    lr: float = 3e-3
    width: int = 16
    threads: int = 0  # 0: torch's current setting
    train_subset: int = 0  # 0: the whole training split (the quick run uses a few hundred samples)
    models: tuple[str, ...] = ("cnn", "vit")
    vit_dim: int = 32


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

    unit_dim = 1
    layer_prefix = "block"
    clip_grad_norm = None

    def forward(self, x):
        x = self.blocks[0](x)  # 8x8
        x = F.max_pool2d(self.blocks[1](x), 2)  # 4x4
        x = self.blocks[2](x)
        return self.head(x.mean((2, 3)))

    def hooked(self) -> list[nn.Module]:
        return list(self.blocks)


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        # ReLU hidden units: non-negative, as the selectivity index assumes (for GELU MLPs measure
        # with ClassSelectivity(..., transform="abs"), as Ranadive et al. do).
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class SmallViT(nn.Module):
    """A small vision transformer for 8x8 digits: 16 tokens of 2x2 patches, two pre-norm blocks
    (4 heads, MLP of 2 * dim hidden ReLU units), mean-pooled tokens, a linear classifier.

    The modules the regularizer hooks are the MLP activations, outputs [N, 16, 2 * dim]: their units
    are on the last dim (``unit_dim=-1``).
    """

    unit_dim = -1
    layer_prefix = "mlp"
    # The SI gradient grows as 1 / (mu_max + mu_rest): nearly silent ReLU units of an MLP (no batch
    # norm before them) give rare huge steps; clipping, standard for transformers, absorbs them.
    clip_grad_norm = 1.0

    def __init__(self, dim: int = 32, num_classes: int = NUM_CLASSES, patch: int = 2, depth: int = 2):
        super().__init__()
        self.patch = patch
        tokens = (8 // patch) ** 2
        self.embed = nn.Linear(patch * patch, dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList([_ViTBlock(dim, 4, 2 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        p = self.patch
        patches = x.unfold(2, p, p).unfold(3, p, p).reshape(x.shape[0], -1, p * p)  # [N, tokens, p*p]
        h = self.embed(patches) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))

    def hooked(self) -> list[nn.Module]:
        return [block.mlp[1] for block in self.blocks]


def make_model(name: str, cfg: DemoConfig) -> nn.Module:
    if name == "cnn":
        return SmallCNN(cfg.width)
    if name == "vit":
        return SmallViT(cfg.vit_dim)
    raise ValueError(f'model must be "cnn" or "vit", got {name!r}')


def load_digits_split(test_fraction: float = 0.25, split_seed: int = 0):
    """(x_train, y_train, x_test, y_test): digits scaled to [0, 1] as [N, 1, 8, 8]; one stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        range(len(y)), test_size=test_fraction, random_state=split_seed, stratify=y.numpy()
    )
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256
) -> tuple[float, list[LayerSelectivity]]:
    """(test accuracy, per-layer selectivity of the hooked layers) on the whole set, streamed in
    batches through :class:`selkernels.ClassSelectivity` (the SI of the whole set, as if it were
    one batch)."""
    model.eval()
    names = {f"{model.layer_prefix}{j + 1}": m for j, m in enumerate(model.hooked())}
    correct = 0
    with ClassSelectivity(names, NUM_CLASSES, unit_dim=model.unit_dim) as metric:
        for start in range(0, len(y), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            correct += int((model(xb).argmax(1) == yb).sum())
            metric.update(yb)
        return correct / len(y), metric.compute()


def train_one(alpha: float, seed: int, data, cfg: DemoConfig, model_name: str = "cnn"):
    """Train one model; return (test accuracy, test selectivity per hooked layer, the model)."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = make_model(model_name, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps = cfg.epochs * -(-len(y_train) // cfg.batch_size)
    # Annealing to zero leaves each model at a settled point, so seeds differ less at the end.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(seed)
    with SelectivityRegularizer(model.hooked(), alpha=alpha, num_classes=NUM_CLASSES, unit_dim=model.unit_dim) as reg:
        for _ in range(cfg.epochs):
            model.train()
            order = torch.randperm(len(y_train), generator=gen)
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                xb, yb = x_train[idx], y_train[idx]
                loss = F.cross_entropy(model(xb), yb) + reg.penalty(yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if model.clip_grad_norm is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), model.clip_grad_norm)
                opt.step()
                sched.step()
    accuracy, layers = evaluate(model, x_test, y_test)
    return accuracy, layers, model


@dataclass
class RunResult:
    model: str
    alpha: float
    seed: int
    accuracy: float
    layer_si: list[float]


def run_demo(cfg: DemoConfig, *, progress: bool = True, keep: dict | None = None) -> list[RunResult]:
    """Train every (model, alpha, seed). ``keep``, if given, receives {(model, alpha): (trained
    model, per-layer LayerSelectivity)} of the first seed, for the figures."""
    from tqdm.auto import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_digits_split()
    if cfg.train_subset:
        data = (data[0][: cfg.train_subset], data[1][: cfg.train_subset]) + data[2:]
    runs = [(m, a, s) for m in cfg.models for a in cfg.alphas for s in cfg.seeds]
    results = []
    bar = tqdm(runs, desc="selkernels demo", unit="model", disable=not progress, dynamic_ncols=True)
    for name, alpha, seed in bar:
        bar.set_postfix_str(f"{name} alpha={alpha:g} seed={seed}", refresh=True)
        acc, layers, model = train_one(alpha, seed, data, cfg, name)
        results.append(RunResult(name, alpha, seed, acc, [r.mean_si for r in layers]))
        if keep is not None and seed == cfg.seeds[0]:
            keep[(name, alpha)] = (model, layers)
    return results


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: Sequence[RunResult]) -> dict[str, list[dict]]:
    """Per model, one row per alpha: mean and std over seeds of the accuracy and of every hooked
    layer's mean SI."""
    tables = {}
    for name in dict.fromkeys(r.model for r in results):
        prefix = SmallCNN.layer_prefix if name == "cnn" else SmallViT.layer_prefix
        rows = []
        for alpha in dict.fromkeys(r.alpha for r in results if r.model == name):
            sel = [r for r in results if r.model == name and r.alpha == alpha]
            row = dict(alpha=alpha, seeds=len(sel))
            row["accuracy_mean"], row["accuracy_std"] = _mean_std([r.accuracy for r in sel])
            for j in range(len(sel[0].layer_si)):
                row[f"si_{prefix}{j + 1}_mean"], row[f"si_{prefix}{j + 1}_std"] = _mean_std(
                    [r.layer_si[j] for r in sel]
                )
            row["si_all_mean"], row["si_all_std"] = _mean_std([statistics.fmean(r.layer_si) for r in sel])
            rows.append(row)
        tables[name] = rows
    return tables


def _layers_of(rows: Sequence[dict]) -> list[str]:
    return [k[3:-5] for k in rows[0] if k.startswith("si_") and k.endswith("_mean") and k != "si_all_mean"]


def format_tables(tables: dict[str, list[dict]]) -> str:
    titles = dict(cnn="SmallCNN (conv blocks, units = channels)", vit="SmallViT (MLP hidden units, unit_dim=-1)")
    return "\n\n".join(f"{titles.get(name, name)}\n{format_table(rows)}" for name, rows in tables.items())


def format_table(rows: Sequence[dict]) -> str:
    blocks = _layers_of(rows)
    header = ["alpha", "test accuracy"] + [f"SI {b}" for b in blocks] + ["SI mean of layers"]
    body = [
        [f"{r['alpha']:g}", f"{100 * r['accuracy_mean']:.1f} ± {100 * r['accuracy_std']:.1f} %"]
        + [f"{r[f'si_{b}_mean']:.3f} ± {r[f'si_{b}_std']:.3f}" for b in blocks]
        + [f"{r['si_all_mean']:.3f} ± {r['si_all_std']:.3f}"]
        for r in rows
    ]
    return render(header, body)


def plot(tables: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tables), 2, figsize=(10, 4 * len(tables)), squeeze=False)
    for (name, rows), (ax_si, ax_acc) in zip(tables.items(), axes):
        _plot_model(name, rows, ax_si, ax_acc)
    fig.suptitle(f"SelectivityRegularizer on digits, mean ± std over {next(iter(tables.values()))[0]['seeds']} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_model(name: str, rows: Sequence[dict], ax_si, ax_acc) -> None:
    alphas = [r["alpha"] for r in rows]
    xs = range(len(alphas))
    blocks = _layers_of(rows)
    for b in blocks:
        ax_si.errorbar(
            xs, [r[f"si_{b}_mean"] for r in rows], [r[f"si_{b}_std"] for r in rows], marker="o", capsize=3, label=b
        )
    ax_si.set_ylabel(f"{name}: test-set mean class selectivity")
    ax_si.legend()
    ax_acc.errorbar(
        xs,
        [100 * r["accuracy_mean"] for r in rows],
        [100 * r["accuracy_std"] for r in rows],
        marker="o",
        capsize=3,
        color="k",
    )
    ax_acc.set_ylabel(f"{name}: test accuracy (%)")
    for ax in (ax_si, ax_acc):
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"{a:g}" for a in alphas])
        ax.set_xlabel("alpha (regularization strength; < 0 lowers selectivity)")
        ax.grid(alpha=0.3)


def write_outputs(
    out_dir: str, cfg: DemoConfig, results: Sequence[RunResult], tables: dict[str, list[dict]], table: str
) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        k: os.path.join(out_dir, v)
        for k, v in dict(csv="demo.csv", json="demo.json", table="demo.txt", plot="demo.png").items()
    }
    rows = [dict(model=name, **row) for name, model_rows in tables.items() for row in model_rows]
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        w.writeheader()
        w.writerows(rows)
    with open(paths["json"], "w") as f:
        json.dump(
            dict(config=asdict(cfg), torch=torch.__version__, runs=[asdict(r) for r in results], summary=tables),
            f,
            indent=1,
        )
    with open(paths["table"], "w") as f:
        f.write(table + "\n")
    plot(tables, paths["plot"])
    return paths


def write_figures(out_dir: str, kept: dict, cfg: DemoConfig) -> dict[str, str]:
    """Per-layer SI histograms of every model (one colour per alpha, seed 0), and unit-ablation
    curves (most selective first vs random) of each model's last hooked layer at alpha = 0 (or the
    alpha closest to it). Small PNGs, for the README."""
    from .analysis import ablation_curve
    from .analysis.plots import plot_ablation, plot_selectivity_histograms

    os.makedirs(out_dir, exist_ok=True)
    _, _, x_test, y_test = load_digits_split()
    loader = [(x_test[i : i + 256], y_test[i : i + 256]) for i in range(0, len(y_test), 256)]
    paths = {}
    for name in cfg.models:
        runs = {f"alpha={a:g}": kept[(name, a)][1] for a in cfg.alphas}
        paths[f"si_{name}"] = os.path.join(out_dir, f"si_histograms_{name}.png")
        plot_selectivity_histograms(
            runs, paths[f"si_{name}"], title=f"{name}: test-set class selectivity of units per layer (seed 0)"
        )
        alpha = min(cfg.alphas, key=abs)
        model = kept[(name, alpha)][0]
        layer = model.hooked()[-1]
        curves = [
            ablation_curve(model, layer, loader, order=order, unit_dim=model.unit_dim)
            for order in ("selectivity", "random")
        ]
        paths[f"ablation_{name}"] = os.path.join(out_dir, f"ablation_{name}.png")
        plot_ablation(
            curves,
            paths[f"ablation_{name}"],
            title=f"{name}, last hooked layer, alpha={alpha:g}:\nmost selective units zeroed first vs random",
        )
        for curve in curves:
            print(curve.table())
    return paths


def add_arguments(parser) -> None:
    parser.add_argument("--alphas", type=float, nargs="+", default=None, help="default: -10 -1 0 1 10")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    parser.add_argument("--epochs", type=int, default=None, help="default 15")
    parser.add_argument("--models", nargs="+", choices=("cnn", "vit"), default=None, help="default: cnn vit")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's current setting)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (few samples, one epoch)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", default=None, help="directory for demo.csv, demo.json, demo.txt and demo.png")
    parser.add_argument(
        "--figures",
        default=None,
        help="directory for the per-layer SI histograms and the unit-ablation curves of the seed-0 models (PNG)",
    )


def main(argv: Sequence[str] | None = None, *, args=None) -> int:
    if args is None:
        import argparse

        parser = argparse.ArgumentParser(prog="selkernels demo")
        add_arguments(parser)
        args = parser.parse_args(argv)
    cfg = DemoConfig(threads=args.threads)
    if args.quick:
        cfg.alphas, cfg.seeds, cfg.epochs, cfg.train_subset, cfg.width = (-10.0, 0.0, 10.0), (0, 1), 1, 256, 8
        cfg.vit_dim = 16
    if args.alphas:
        cfg.alphas = tuple(args.alphas)
    if args.seeds:
        cfg.seeds = tuple(range(args.seeds))
    if args.epochs:
        cfg.epochs = args.epochs
    if args.models:
        cfg.models = tuple(args.models)
    t0 = time.perf_counter()
    kept: dict = {}
    results = run_demo(cfg, progress=not args.no_progress, keep=kept if args.figures else None)
    tables = summarize(results)
    table = format_tables(tables)
    print(
        f"\nselkernels demo: digits, SmallCNN(width={cfg.width}) and SmallViT(dim={cfg.vit_dim}), {cfg.epochs} "
        f"epochs, {len(cfg.seeds)} seeds, torch {torch.__version__}, {time.perf_counter() - t0:.0f} s"
    )
    print(table)
    print(
        "SI: test-set mean class selectivity of each hooked layer's units (CNN: post-ReLU channels; ViT: MLP "
        "hidden ReLU units averaged over tokens), from class means over the whole test set "
        "(selkernels.ClassSelectivity); mean ± std over seeds."
    )
    if args.out:
        paths = write_outputs(args.out, cfg, results, tables, table)
        print("wrote " + ", ".join(paths.values()))
    if args.figures:
        paths = write_figures(args.figures, kept, cfg)
        print("wrote " + ", ".join(paths.values()))
    return 0
