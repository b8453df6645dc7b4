"""Representation analyses on scikit-learn's digits (8x8 images, no download), end to end.

Trains a tiny CNN for a few epochs on the CPU, then runs

* selkernels.analysis.dimensionality: components for 95% of the variance of each layer's clean
  representation and of its change under Gaussian noise, FGSM and PGD, and the input-unit gradient
  variability;
* selkernels.analysis.class_density: per-class Gaussian density models per layer and the two-mode
  split of the classes' mean log-densities (optionally with the per-class DP mixtures, --dp,
  which adds ~30 s).

Prints both tables and writes them (CSV) and their plots (PNG) to --out. Under a minute on 2 cores.

    python examples/analyze_digits.py --out digits_analysis
"""

import argparse
import os
import time
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

from selkernels.analysis import GaussianNoise, PGDAttack, class_density, dimensionality


def make_model() -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(1, 8, 3, padding=1)),
                ("relu1", nn.ReLU()),
                ("conv2", nn.Conv2d(8, 16, 3, padding=1)),
                ("relu2", nn.ReLU()),
                ("pool", nn.MaxPool2d(2)),
                ("conv3", nn.Conv2d(16, 32, 3, padding=1)),
                ("relu3", nn.ReLU()),
                ("gap", nn.AdaptiveAvgPool2d(1)),
                ("flatten", nn.Flatten()),
                ("fc", nn.Linear(32, 10)),
            ]
        )
    )


def batched(x, y, size, shuffle=False, gen=None):
    idx = torch.randperm(len(x), generator=gen) if shuffle else torch.arange(len(x))
    return [(x[idx[i : i + size]], y[idx[i : i + size]]) for i in range(0, len(x), size)]


def accuracy(model, loader, perturb=None):
    correct = total = 0
    for x, y in loader:
        if perturb is not None:
            x = perturb(x, y)
        with torch.no_grad():
            correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="digits_analysis", help="directory for the CSV tables and PNG plots")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dp", action="store_true", help="also fit the per-class Dirichlet-process mixtures")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # [1797, 1, 8, 8] in [0, 1]
    y = torch.tensor(digits.target)
    gen = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(x), generator=gen)
    train, test = perm[:1400], perm[1400:]
    test_loader = batched(x[test], y[test], 128)
    train_loader = batched(x[train], y[train], 128)

    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(args.epochs):
        model.train()
        for xb, yb in batched(x[train], y[train], 64, shuffle=True, gen=gen):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()

    noise = GaussianNoise(0.1, clamp=(0.0, 1.0), generator=torch.Generator().manual_seed(1))
    fgsm = PGDAttack.fgsm(model, eps=0.1)
    pgd = PGDAttack(model, eps=0.1, step_size=0.025, steps=10, generator=torch.Generator().manual_seed(2))
    print(
        f"trained {args.epochs} epochs in {time.time() - t0:.1f}s; test accuracy: clean "
        f"{accuracy(model, test_loader):.3f}, noise(0.1) {accuracy(model, test_loader, noise):.3f}, "
        f"fgsm(0.1) {accuracy(model, test_loader, fgsm):.3f}, pgd(0.1) {accuracy(model, test_loader, pgd):.3f}\n"
    )

    layers = ["relu1", "relu2", "relu3", "fc"]
    t1 = time.time()
    dim = dimensionality(
        model,
        layers,
        test_loader,
        {"noise": noise, "fgsm": fgsm, "pgd": pgd},
        frac=0.95,
        grad_units=16,
        grad_samples=128,
    )
    print(dim)
    print(f"({time.time() - t1:.1f}s)\n")
    dim.to_csv(os.path.join(args.out, "dimensionality.csv"))
    dim.plot(os.path.join(args.out, "dimensionality.png"))

    t1 = time.time()
    dens = class_density(
        model,
        layers,
        train_loader,
        num_classes=10,
        project_dim={"relu2": 8, "relu3": 16},
        shrinkage="oas",
        dp_mixture={"n_components": 5, "max_iter": 200} if args.dp else None,
    )
    print(dens)
    print(f"({time.time() - t1:.1f}s)\n")
    for name in layers:
        s = dens.splits[name]
        print(f"{name}: low-density classes {sorted(s.low)}, high-density classes {sorted(s.high)}")
    dens.to_csv(os.path.join(args.out, "class_density.csv"))
    dens.plot(os.path.join(args.out, "class_density.png"))
    print(
        f"\nwrote {args.out}/dimensionality.{{csv,png}} and {args.out}/class_density.{{csv,png}} "
        f"(total {time.time() - t0:.1f}s)"
    )


if __name__ == "__main__":
    main()
