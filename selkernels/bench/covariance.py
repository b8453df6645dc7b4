"""The covariance suite of ``selkernels bench`` (``--family covariance``):

  * StreamingCovariance.update vs a bare ``z.T @ z`` of the same shape and vs ``torch.cov``;
  * the per-class update (one fused op) vs a Python loop over the classes;
  * spectral_penalty forward and forward+backward vs spectral_penalty_reference.

Each group is a list of (name, callable) pairs, the first being the fused op and the rest its
baselines; ``benchmarks/test_bench_covariance.py`` times the same groups with pytest-benchmark.
"""
from __future__ import annotations

from typing import Callable, List, Tuple

import torch

from ..covariance import StreamingCovariance
from ..reference import spectral_penalty_reference
from ..spectral_ops import spectral_penalty
from .core import DTYPES, BenchConfig, Case, cases_from_groups, register_suite

Variant = Tuple[str, Callable[[], object]]


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def update_variants(n: int = 1024, d: int = 256, *, dtype=torch.float32, device="cpu", seed: int = 0) -> List[Variant]:
    """StreamingCovariance.update vs bare z.T @ z vs torch.cov, on one [n, d] batch."""
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    z = (torch.randn(n, d, generator=g) + 3).to(device=device, dtype=dtype)
    stats = StreamingCovariance(d, device=device)
    sync = _sync(device)

    def update():
        stats.update(z)
        sync()

    def gram():
        z.T @ z
        sync()

    def cov():
        torch.cov(z.T)
        sync()

    return [("StreamingCovariance.update", update), ("z.T @ z", gram), ("torch.cov", cov)]


def class_update_variants(n: int = 1024, d: int = 256, k: int = 10, *, dtype=torch.float32, device="cpu",
                          seed: int = 0) -> List[Variant]:
    """Per-class update (one fused op) vs a Python loop of per-class updates, and a bare z.T @ z."""
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    z = (torch.randn(n, d, generator=g) + 3).to(device=device, dtype=dtype)
    labels = torch.randint(0, k, (n,), generator=g).to(device)
    fused = StreamingCovariance(d, num_classes=k, device=device)
    loop = [StreamingCovariance(d, device=device) for _ in range(k)]
    sync = _sync(device)

    def update_fused():
        fused.update(z, labels)
        sync()

    def update_loop():
        for c in range(k):
            loop[c].update(z[labels == c])
        sync()

    def gram():
        z.T @ z
        sync()

    return [(f"per-class update (K={k}, fused)", update_fused), (f"Python loop over {k} classes", update_loop),
            ("z.T @ z", gram)]


def spectral_variants(n: int = 256, d: int = 256, *, dtype=torch.float32, device="cpu", backward: bool = False,
                      tau: int = 10, seed: int = 0) -> List[Variant]:
    """spectral_penalty vs spectral_penalty_reference, forward only or forward + backward."""
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    V = V.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    sync = _sync(device)
    if backward:
        h = h.requires_grad_()

    def run(fn):
        def call():
            out = fn(h, V, tau=tau)
            if backward:
                out.backward()
            sync()
        return call

    tag = "fwd+bwd" if backward else "fwd"
    return [(f"spectral_penalty {tag}", run(spectral_penalty)),
            (f"spectral_penalty_reference {tag}", run(spectral_penalty_reference))]


def benchmark_groups(n: int = 1024, d: int = 256, ks=(10, 100), spectral_n: int = 256, *, dtype=torch.float32,
                     device="cpu") -> List[Tuple[str, List[Variant]]]:
    """Every group of the suite, as (title, variants)."""
    groups = [(f"streaming covariance, one batch [{n}, {d}]", update_variants(n, d, dtype=dtype, device=device))]
    for k in ks:
        groups.append((f"per-class covariance, [{n}, {d}], K={k}",
                       class_update_variants(n, d, k, dtype=dtype, device=device)))
    for backward in (False, True):
        groups.append((f"spectral penalty, h [{spectral_n}, {d}]",
                       spectral_variants(spectral_n, d, dtype=dtype, device=device, backward=backward)))
    return groups


@register_suite("covariance")
def covariance_cases(cfg: BenchConfig) -> List[Case]:
    n, d, ks, spectral_n = (64, 16, (4,), 32) if cfg.quick else (1024, 256, (10, 100), 256)
    return [case for dtype_name in cfg.dtypes if dtype_name == "float32"  # float32 keeps the default run short
            for case in cases_from_groups("covariance", benchmark_groups(n, d, ks, spectral_n, dtype=DTYPES[dtype_name],
                                                                         device=cfg.device), dtype=dtype_name)]
