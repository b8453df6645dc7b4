"""The covariance suite of ``selkernels bench`` (``--family covariance``): the streaming covariance and
the 1/n spectral penalty.


Groups:
  * StreamingCovariance.update vs a bare ``z.T @ z`` of the same shape (its floor) and vs ``torch.cov``;
  * the per-class update (one fused op) vs its floor (one GEMM over all rows + one read-write pass
    over the float64 [K, D, D] state), a Python loop over the classes, and ``z.T @ z``;
  * spectral_penalty forward and forward+backward vs spectral_penalty_reference.
Case builders return lists of (name, callable) pairs, the first being the fused op and the rest
its baselines, so ``benchmarks/test_bench_covariance.py`` (pytest-benchmark) times the same groups.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..covariance import StreamingCovariance
from ..reference import spectral_penalty_reference
from ..spectral_ops import spectral_penalty
from .core import DTYPES, BenchConfig, Case, cases_from_groups, register_suite

Variant = tuple[str, Callable[[], object]]


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def update_variants(n: int = 1024, d: int = 256, *, dtype=torch.float32, device="cpu", seed: int = 0) -> list[Variant]:
    """StreamingCovariance.update vs bare z.T @ z (the floor: the update's one GEMM) vs torch.cov, on one
    [n, d] batch."""
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

    return [("StreamingCovariance.update", update), ("z.T @ z (floor)", gram), ("torch.cov", cov)]


def class_update_variants(
    n: int = 1024, d: int = 256, k: int = 10, *, dtype=torch.float32, device="cpu", seed: int = 0
) -> list[Variant]:
    """Per-class update (one fused op) vs its floor, a Python loop of per-class updates, and a bare z.T @ z.

    The floor is what any per-class update must do: the per-class products add up to one GEMM over
    all rows (``z.T @ z``), plus one read-write pass over the classes' float64 [K, D, D] state.
    """
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    z = (torch.randn(n, d, generator=g) + 3).to(device=device, dtype=dtype)
    labels = torch.randint(0, k, (n,), generator=g).to(device)
    fused = StreamingCovariance(d, num_classes=k, device=device)
    loop = [StreamingCovariance(d, device=device) for _ in range(k)]
    state = torch.zeros(k, d, d, dtype=torch.float64, device=device)
    sync = _sync(device)

    def update_fused():
        fused.update(z, labels)
        sync()

    def floor():
        z.T @ z
        state.add_(1.0)
        sync()

    def update_loop():
        for c in range(k):
            loop[c].update(z[labels == c])
        sync()

    def gram():
        z.T @ z
        sync()

    return [
        (f"per-class update (K={k}, fused)", update_fused),
        ("floor: z.T @ z + one pass over [K, D, D] fp64", floor),
        (f"Python loop over {k} classes", update_loop),
        ("z.T @ z", gram),
    ]


def spectral_variants(
    n: int = 256,
    d: int = 256,
    *,
    dtype=torch.float32,
    device="cpu",
    backward: bool = False,
    tau: int = 10,
    seed: int = 0,
) -> list[Variant]:
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
    return [
        (f"spectral_penalty {tag}", run(spectral_penalty)),
        (f"spectral_penalty_reference {tag}", run(spectral_penalty_reference)),
    ]


def benchmark_groups(
    n: int = 1024, d: int = 256, ks=(10, 100), spectral_n: int = 256, *, dtype=torch.float32, device="cpu"
) -> list[tuple[str, list[Variant]]]:
    """Every group of the suite, as (title, variants). The one-set update runs
    at [n / 2, d] and [n, 2 d] ([512, 256] and [1024, 512] by default), the per-class one at [n, d]."""
    groups = [
        (f"streaming covariance, one batch [{m}, {w}]", update_variants(m, w, dtype=dtype, device=device))
        for m, w in ((n // 2, d), (n, 2 * d))
    ]
    for k in ks:
        groups.append(
            (f"per-class covariance, [{n}, {d}], K={k}", class_update_variants(n, d, k, dtype=dtype, device=device))
        )
    for backward in (False, True):
        groups.append(
            (
                f"spectral penalty, h [{spectral_n}, {d}]",
                spectral_variants(spectral_n, d, dtype=dtype, device=device, backward=backward),
            )
        )
    return groups


def run_kernels_once(device="cuda", *, seed: int = 0) -> dict[str, float]:
    """Run every streaming-moments and spectral-penalty kernel once on small inputs on ``device`` and
    return each result's largest error relative to the same computation on the CPU (float64).

    For a GPU check (parity, compute-sanitizer): the one-set update (cuBLAS GEMM + merge kernel), the
    per-class update (offsets, present classes, batch means, centring, fused tile product + merge,
    mean/count; D = 70 gives partial and off-diagonal tiles, one class absent), and the spectral
    penalty forward (split column reduction, loss kernel) and backward (w.r.t. h and V), all through
    the dispatcher. Float64 parity should be ~1e-12 or better.
    """
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    errors: dict[str, float] = {}

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.detach().cpu().double(), b.detach().cpu().double()
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))

    z = torch.randn(300, 70, generator=g, dtype=torch.float64) * 2 + 1e3
    labels = torch.randint(0, 4, (300,), generator=g)  # class 4 of 5 absent
    for k in (None, 5):
        ref, dev = StreamingCovariance(70, num_classes=k), StreamingCovariance(70, num_classes=k, device=device)
        for zc, lc in zip(z.split(97), labels.split(97)):
            ref.update(zc, None if k is None else lc)
            dev.update(zc.to(device), None if k is None else lc.to(device))
        name = "update" if k is None else "per-class update"
        errors[f"{name} M2"] = rel(dev.M2, ref.M2)
        errors[f"{name} mean"] = rel(dev.mean, ref.mean)
        errors[f"{name} count"] = float((dev.count.cpu() != ref.count).sum())
    h = torch.randn(200, 48, generator=g, dtype=torch.float64) @ torch.randn(48, 48, generator=g, dtype=torch.float64)
    V, _ = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=torch.float64))
    outs = {}
    for where in ("cpu", device):
        hh, VV = h.to(where).requires_grad_(), V.to(where).requires_grad_()
        loss = spectral_penalty(hh, VV, tau=3)
        loss.backward()
        outs[str(where)] = (loss, hh.grad, VV.grad)
    (lc, hc, vc), (ld, hd, vd) = outs["cpu"], outs[str(device)]
    errors["spectral_penalty loss"] = rel(ld, lc)
    errors["spectral_penalty grad h"] = rel(hd, hc)
    errors["spectral_penalty grad V"] = rel(vd, vc)
    _sync(device)()
    return errors


@register_suite("covariance")
def covariance_cases(cfg: BenchConfig) -> list[Case]:
    n, d, ks, spectral_n = (64, 16, (4,), 32) if cfg.quick else (1024, 256, (10, 100), 256)
    return [
        case
        for dtype_name in cfg.dtypes
        if dtype_name == "float32"  # float32 keeps the default run short
        for case in cases_from_groups(
            "covariance",
            benchmark_groups(n, d, ks, spectral_n, dtype=DTYPES[dtype_name], device=cfg.device),
            dtype=dtype_name,
        )
    ]
