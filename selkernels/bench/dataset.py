"""The dataset-pass suite of ``selkernels bench`` (``--family dataset``): dataset-level SI of a
layer over many batches with :class:`selkernels.ClassSelectivity`, against the hand-rolled fused
pass, ``x.sum()`` of every batch (the bandwidth reference) and the published per-class loop."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..metrics import ClassSelectivity
from ..ops import class_means, selectivity_from_means
from .core import DTYPES, FUSED, BenchConfig, Case, Workload, register_suite

DATASET_SHAPES = [("tinyimagenet test pass", 40, 128, 256, (8, 8), 200)]  # batches, N, C, spatial, K
DATASET_QUICK_SHAPES = [("tiny pass", 4, 16, 8, (4, 4), 20)]


def published_dataset_pass(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], num_classes: int):
    """What the published analysis scripts run: per batch, a Python loop over the classes with a
    boolean mask, adding each class's summed unit means into float64 running sums."""
    sums = [None] * num_classes
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for x, y in zip(xs, ys):
        act = x.reshape(x.shape[0], x.shape[1], -1).mean(-1)
        counts += torch.bincount(y, minlength=num_classes).cpu()
        for k in range(num_classes):
            part = act[y == k].sum(0).double()
            sums[k] = part if sums[k] is None else sums[k] + part
    return torch.stack(sums), counts


def _build_dataset_pass(batches: int, n: int, c: int, spatial: tuple[int, ...], k: int, dtype: torch.dtype):
    def build(cfg: BenchConfig) -> Workload:
        gen = torch.Generator().manual_seed(0)
        xs = [
            torch.rand((n, c) + tuple(spatial), generator=gen).to(device=cfg.device, dtype=dtype)
            for _ in range(batches)
        ]
        ys = [torch.randint(0, k, (n,), generator=gen).to(cfg.device) for _ in range(batches)]
        sync = torch.cuda.synchronize if cfg.device.startswith("cuda") else (lambda: None)

        def metric_pass():
            metric = ClassSelectivity(None, k)
            for x, y in zip(xs, ys):
                metric.update_from(x, y)
            out = metric.compute()
            sync()
            return out

        def hand_rolled():  # what the demo did before ClassSelectivity: sum of means * counts
            sums, counts = None, None
            for x, y in zip(xs, ys):
                means, cnt = class_means(x, y, k)
                part = means * cnt.unsqueeze(1)
                sums, counts = (part, cnt) if sums is None else (sums + part, counts + cnt)
            out = selectivity_from_means(sums / counts.clamp_min(1).unsqueeze(1), counts)
            sync()
            return out

        def sums_only():  # the bandwidth reference: read every batch once
            out = [x.sum() for x in xs]
            sync()
            return out

        def published():
            out = published_dataset_pass(xs, ys, k)
            sync()
            return out

        return Workload(
            forward={
                FUSED: metric_pass,
                "hand-rolled": hand_rolled,
                "x.sum() of each batch": sums_only,
                "published loop": published,
            }
        )

    return build


@register_suite("dataset")
def dataset_cases(cfg: BenchConfig) -> list[Case]:
    shapes = DATASET_QUICK_SHAPES if cfg.quick else DATASET_SHAPES
    return [
        Case(
            "dataset",
            name,
            dtype_name,
            f"{b} x [{n}, {c}, {'x'.join(map(str, sp))}] K={k}",
            _build_dataset_pass(b, n, c, sp, k, DTYPES[dtype_name]),
        )
        for dtype_name in cfg.dtypes
        if dtype_name == "float32"
        for name, b, n, c, sp, k in shapes
    ]
