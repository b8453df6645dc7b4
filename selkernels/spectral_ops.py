"""The 1/n spectral penalty of Nassar et al. (NeurIPS 2020) as a fused op with a closed-form backward.

Schema in csrc/ops.cpp, CPU kernels in csrc/cpu/spectral_cpu.cpp, CUDA kernels in
csrc/cuda/spectral.cu; this module holds the public wrapper (argument checks), fake kernels and
autograd. The module-level regularizer is :class:`selkernels.SpectralRegularizer`.
"""

from __future__ import annotations

import math

import torch

from . import _C  # noqa: F401  (registers torch.ops.selkernels.*)

__all__ = ["spectral_penalty"]

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_ops = torch.ops.selkernels


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_INT64_MAX = 2**63 - 1


def _check_slope_tau(slope, tau):
    # Comparisons rather than math.isfinite: under torch.compile(dynamic=True) slope may be a
    # SymFloat, which math.isfinite cannot trace (a comparison becomes a guard).
    if isinstance(slope, bool) or not isinstance(slope, (int, float, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"slope must be a finite float, got {slope!r}")
    if not -math.inf < slope < math.inf:  # also False for NaN
        raise TypeError(f"slope must be a finite float, got {slope!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, torch.SymInt)):
        raise TypeError(f"tau must be an int, got {type(tau).__name__}")
    if not 0 <= tau <= _INT64_MAX:
        raise ValueError(f"tau must be >= 0 and fit in int64 (< 2**63), got {tau}")
    return float(slope) if isinstance(slope, int) else slope, tau


def spectral_penalty(h: torch.Tensor, V: torch.Tensor, *, slope: float = 1.0, tau: int = 10) -> torch.Tensor:
    """1/n spectral penalty of a batch of representations h [N, D] in the eigenbasis V [D, D].

    With X = h - mean(h) (over the batch), lambda_hat = diag(V^T X^T X V) / (N - 1) sorted
    descending (0-based rank n), anchor b = lambda_hat[tau] (tau + 1)^slope (a constant for autograd),
    target gamma_n = b / (n + 1)^slope:

        loss = (1 / D) sum over n > tau with lambda_hat_n > 0 of (r_n - 1)^2 + relu(r_n - 1),
        r_n = lambda_hat_n / gamma_n.

    Computed as the column variances of P = X V (one N x D x D GEMM, C_b is never formed), with the
    closed-form backward dL/dh = (2 / (N - 1)) X V diag(g) V^T, g = dL/dlambda_hat, reusing P. V
    gets a gradient too, (2 / (N - 1)) X^T X V diag(g) (one more GEMM, only when V requires grad);
    the published recipe holds V fixed, so pass a detached V there.

    Args:
        h: [N, D] float64, float32, float16 or bfloat16 (half types are computed in float32).
        V: [D, D] orthonormal basis (columns are directions), any float dtype; cast to float64
            for float64 h and to float32 otherwise.
        slope: alpha of the 1/n^alpha target (1.0 in the paper).
        tau: rank of the anchor, 0-based (10 in the paper).

    Returns a 0-dim tensor, float64 for float64 h and float32 otherwise. Edge cases: N < 2 (no
    variance), D <= tau + 1 (no rank above the anchor) and an all-zero spectrum give 0 with a zero
    gradient; ranks whose projected variance is 0 contribute nothing (the ratio would be 0/0 when
    the anchor is 0 too). "Is 0" means at most the rounding floor D * eps * lambda_hat_0 (eps of the
    compute dtype): in a rank-deficient batch (N - 1 < D) the exactly-zero variances would otherwise
    be rounding noise, each adding an arbitrary 1 / D to the loss. Ties in lambda_hat are ordered
    stably (lower index first).
    Non-finite values: NaN or Inf in h or V, or projections whose summed squares overflow the
    compute dtype (float32: sum of (h - mean)^2 beyond about 3e38; pass float64 then), give a NaN
    loss and a NaN gradient, never a hidden 0.
    Zero-size h ([0, D] or [N, 0]) gives 0.

    Autocast: the op computes in float32 (float64 for float64 h) whatever the autocast state; inside
    an autocast region half-precision inputs are cast to float32 first (registered for the Autocast
    keys), so the result equals that of the same inputs outside the region.

    Double backward (``create_graph=True``) is supported: the backward is then a differentiable
    torch composition of the same closed form (the sort order and the anchor are constants, as in
    the forward). Memory: the op saves P [N, D] (compute dtype), dL/dlam [D] and h (a reference).
    """
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"h must be a torch.Tensor, got {type(h).__name__}")
    if h.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"h must be float64, float32, float16 or bfloat16, got {h.dtype}")
    if h.dim() != 2:
        raise ValueError(f"h must have shape [N, D], got shape {tuple(h.shape)}")
    if not isinstance(V, torch.Tensor):
        raise TypeError(f"V must be a torch.Tensor, got {type(V).__name__}")
    if V.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"V must be a floating-point tensor, got {V.dtype}")
    if V.shape != (h.shape[1], h.shape[1]):
        raise ValueError(f"V must have shape [D, D] = [{h.shape[1]}, {h.shape[1]}] to match h, got {tuple(V.shape)}")
    if V.device != h.device:
        raise ValueError(f"V must be on the same device as h ({h.device}), got {V.device}")
    slope, tau = _check_slope_tau(slope, tau)
    loss, P, _ = _ops.spectral_penalty(h, V.to(_acc_dtype(h.dtype)), slope, tau)
    # The kernel skips ranks whose variance is not above the rounding floor, so a NaN or an
    # overflowed variance would drop out as a 0 term; this makes the loss NaN then (one read of P,
    # no sync). The backward does the same to the gradient.
    return loss + _nan_if_not_finite(P)


def _nan_if_not_finite(P: torch.Tensor) -> torch.Tensor:
    """0 (a 0-dim tensor, no autograd) when P [N, D] is finite and its sum of squares fits the
    dtype (then no column variance can overflow), else NaN. One contiguous reduction: the norm is
    computed without overflow, and a per-column test would cost a strided pass."""
    total = torch.linalg.vector_norm(P.detach()).double()
    return torch.where(total * total <= torch.finfo(P.dtype).max, 0.0, float("nan")).to(P.dtype)


@torch.library.register_fake("selkernels::spectral_penalty")
def _spectral_penalty_fake(h, V, slope, tau):
    acc = _acc_dtype(h.dtype)
    return h.new_empty((), dtype=acc), h.new_empty(h.shape, dtype=acc), h.new_empty((h.shape[1],), dtype=acc)


@torch.library.register_fake("selkernels::spectral_penalty_backward")
def _spectral_penalty_backward_fake(grad_loss, P, grad_lam, V, out_dtype):
    return P.new_empty(P.shape, dtype=out_dtype)


@torch.library.register_fake("selkernels::spectral_penalty_backward_basis")
def _spectral_penalty_backward_basis_fake(grad_loss, h, P, grad_lam):
    return P.new_empty((P.shape[1], P.shape[1]))


def _spectral_penalty_setup(ctx, inputs, output):
    h, V, slope, tau = inputs
    _, P, grad_lam = output
    # h is kept (a reference to the input) for the V gradient and for double backward.
    ctx.save_for_backward(h, V, P, grad_lam)
    ctx.slope, ctx.tau, ctx.h_dtype = slope, tau, h.dtype


def _rank_weights(lam: torch.Tensor, slope: float, tau: int) -> torch.Tensor:
    """dL/dlam [D] (unsorted order) as a differentiable function of lam: the closed form of
    csrc/common/spectral.h, with the sort order, anchor, targets and floor constants (from lam's value)."""
    dim = lam.shape[0]
    weights = torch.zeros_like(lam)
    if dim <= tau + 1:
        return weights
    sorted_const, order = torch.sort(lam.detach(), descending=True, stable=True)
    ranks = torch.arange(dim, device=lam.device, dtype=lam.dtype)
    gamma = sorted_const[tau] * (tau + 1) ** slope / (ranks + 1) ** slope
    floor = dim * torch.finfo(lam.dtype).eps * sorted_const[0]
    keep = (ranks > tau) & (sorted_const > floor) & (sorted_const > 0)
    safe_gamma = torch.where(keep, gamma, torch.ones_like(gamma))
    err = lam[order] / safe_gamma - 1
    grad_sorted = (2 * err + (err > 0).to(lam.dtype)) / safe_gamma / dim
    return weights.index_put((order,), torch.where(keep, grad_sorted, torch.zeros_like(grad_sorted)))


def _differentiable_backward(ctx, grad_loss, h, V):
    """The backward as torch ops on h, V and grad_loss, so that autograd can differentiate it."""
    x = h.to(V.dtype)
    xc = x - x.mean(0, keepdim=True)
    P = xc @ V
    n = h.shape[0]
    if n < 2:
        return torch.zeros_like(h), torch.zeros_like(V)
    weights = _rank_weights((P * P).sum(0) / (n - 1), ctx.slope, ctx.tau)
    grad_P = P * (weights * (2 * grad_loss.to(V.dtype) / (n - 1)))
    return (grad_P @ V.t()).to(ctx.h_dtype), xc.t() @ grad_P


def _spectral_penalty_backward(ctx, grad_loss, grad_P, grad_grad_lam):
    # P and grad_lam (dL/dlam from the forward's one sort) are outputs only for the backward; the
    # wrapper never exposes them.
    h, V, P, grad_lam = ctx.saved_tensors
    # A non-finite spectrum makes the gradient NaN too (the forward's loss is NaN then).
    grad_loss = (grad_loss + _nan_if_not_finite(P)).contiguous()
    if torch.is_grad_enabled():  # create_graph=True: the fused backward ops have no derivative
        grad_h, grad_V = _differentiable_backward(ctx, grad_loss, h, V)
        return (grad_h if ctx.needs_input_grad[0] else None, grad_V if ctx.needs_input_grad[1] else None, None, None)
    grad_h = grad_V = None
    if ctx.needs_input_grad[0]:
        grad_h = _ops.spectral_penalty_backward(grad_loss, P, grad_lam, V, ctx.h_dtype)
    if ctx.needs_input_grad[1]:
        grad_V = _ops.spectral_penalty_backward_basis(grad_loss, h, P, grad_lam)
    return grad_h, grad_V, None, None


torch.library.register_autograd(
    "selkernels::spectral_penalty", _spectral_penalty_backward, setup_context=_spectral_penalty_setup
)
# Autocast policy: float32 compute. Without these, an autocast region would reach the kernel with
# autocast still on, and the GEMM inside it would run (and return) in bfloat16/float16.
for _device_type in ("cpu", "cuda"):
    torch.library.register_autocast("selkernels::spectral_penalty", _device_type, torch.float32)
