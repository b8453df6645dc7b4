"""The selectivity op suite of ``selkernels bench``: the fused op against the published loop, the
best eager torch composition and its torch.compile, at block-output shapes of real networks."""

from __future__ import annotations

import time
from typing import Callable

import torch

from .. import reference
from ..ops import selectivity_index
from .core import DTYPES, FUSED, BenchConfig, Case, Workload, register_suite


def torch_selectivity(x: torch.Tensor, labels: torch.Tensor, num_classes: int, eps: float = 1e-7) -> torch.Tensor:
    """The best eager composition we found: spatial mean, index_add into class sums, SI in torch ops.

    Same result as :func:`selkernels.selectivity_index` (no ignored labels). Written without
    data-dependent shapes so torch.compile can capture it in one graph.
    """
    n, c = x.shape[0], x.shape[1]
    act = x.reshape(n, c, -1).sum(-1, dtype=torch.float32 if x.dtype != torch.float64 else x.dtype)
    act = act / (x.numel() // max(n * c, 1))
    sums = act.new_zeros((num_classes, c)).index_add(0, labels, act)
    counts = act.new_zeros((num_classes,)).index_add(0, labels, act.new_ones((n,)))
    present = counts > 0
    means = sums / counts.clamp_min(1).unsqueeze(1)
    num_present = present.sum()
    mu_max = means.masked_fill(~present.unsqueeze(1), float("-inf")).amax(0)
    mu_rest = (means.sum(0) - mu_max) / (num_present - 1).clamp_min(1)
    si = (mu_max - mu_rest) / (mu_max + mu_rest + eps)
    return torch.where(num_present >= 2, si, torch.zeros_like(si))


# (name, N, C, spatial, K): block outputs of networks the regularizer is used on.
SELECTIVITY_SHAPES = [
    ("resnet20-cifar10 stage1", 128, 16, (32, 32), 10),
    ("resnet20-cifar10 stage2", 128, 32, (16, 16), 10),
    ("resnet20-cifar10 stage3", 128, 64, (8, 8), 10),
    ("resnet18-tinyimagenet", 256, 256, (8, 8), 200),
    ("resnet50-imagenet (scaled)", 128, 512, (4, 4), 1000),
]
# bf16 on the shapes with the most distinct regimes, to keep the default run short.
SELECTIVITY_BF16 = {"resnet20-cifar10 stage1", "resnet18-tinyimagenet", "resnet50-imagenet (scaled)"}
SELECTIVITY_QUICK_SHAPES = [
    ("tiny K=10", 16, 4, (4, 4), 10),
    ("tiny K=50", 32, 8, (2, 2), 50),
]


def _fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], object]:
    return lambda: torch.autograd.grad(fn(x).sum(), x)


def _build_selectivity(n: int, c: int, spatial: tuple[int, ...], k: int, dtype: torch.dtype):
    def build(cfg: BenchConfig) -> Workload:
        gen = torch.Generator().manual_seed(0)
        # Post-ReLU activations: non-negative, as the SI assumes.
        x = torch.rand((n, c) + tuple(spatial), generator=gen).to(device=cfg.device, dtype=dtype)
        labels = torch.randint(0, k, (n,), generator=gen).to(cfg.device)
        xg = x.clone().requires_grad_(True)
        ops = {
            FUSED: lambda t: selectivity_index(t, labels, k),
            "paper": lambda t: reference.paper_class_selectivity(t, labels),
            "eager": lambda t: torch_selectivity(t, labels, k),
        }
        work = Workload(
            forward={v: (lambda f=f: f(x)) for v, f in ops.items()},
            forward_backward={v: _fwd_bwd(f, xg) for v, f in ops.items()},
            bandwidth_input=x,
        )
        if cfg.compile:
            try:
                torch._dynamo.reset()  # a fresh cache per case: static shapes, no recompile limit
                compiled = torch.compile(torch_selectivity, dynamic=False)
                fwd = lambda: compiled(x, labels, k)  # noqa: E731
                fwd_bwd = lambda: torch.autograd.grad(compiled(xg, labels, k).sum(), xg)  # noqa: E731
                t0 = time.perf_counter()
                fwd(), fwd_bwd()  # compile both graphs now, outside the timed region
                work.notes["compiled"] = f"compiled in {time.perf_counter() - t0:.1f} s (excluded from timings)"
                work.forward["compiled"] = fwd
                work.forward_backward["compiled"] = fwd_bwd
            except Exception as err:  # noqa: BLE001 - report any compiler failure as n/a
                work.notes["compiled"] = f"torch.compile failed: {type(err).__name__}: {str(err)[:200]}"
        return work

    return build


@register_suite("selectivity")
def selectivity_cases(cfg: BenchConfig) -> list[Case]:
    shapes = SELECTIVITY_QUICK_SHAPES if cfg.quick else SELECTIVITY_SHAPES
    cases = []
    for dtype_name in cfg.dtypes:
        for name, n, c, spatial, k in shapes:
            if dtype_name == "bfloat16" and not cfg.quick and name not in SELECTIVITY_BF16:
                continue
            shape = f"N={n} C={c} {'x'.join(map(str, spatial))} K={k}"
            cases.append(
                Case("selectivity", name, dtype_name, shape, _build_selectivity(n, c, spatial, k, DTYPES[dtype_name]))
            )
    return cases
