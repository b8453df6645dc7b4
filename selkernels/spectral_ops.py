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


def _check_slope_tau(slope, tau):
    if isinstance(slope, bool) or not isinstance(slope, (int, float)) or not math.isfinite(slope):
        raise TypeError(f"slope must be a finite float, got {slope!r}")
    if isinstance(tau, bool) or not isinstance(tau, int):
        raise TypeError(f"tau must be an int, got {type(tau).__name__}")
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    return float(slope), tau


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
    be rounding noise, each adding an arbitrary 1 / D to the loss. Ties in lambda_hat are ordered stably (lower index first).
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
    loss, _, _ = _ops.spectral_penalty(h, V.to(_acc_dtype(h.dtype)), slope, tau)
    return loss


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
    h, V, _, _ = inputs
    _, P, grad_lam = output
    ctx.save_for_backward(h if ctx.needs_input_grad[1] else None, V, P, grad_lam)
    ctx.h_dtype = h.dtype


def _spectral_penalty_backward(ctx, grad_loss, grad_P, grad_grad_lam):
    # P and grad_lam (dL/dlam from the forward's one sort) are outputs only for the backward; the
    # wrapper never exposes them.
    h, V, P, grad_lam = ctx.saved_tensors
    grad_loss = grad_loss.contiguous()
    grad_h = grad_V = None
    if ctx.needs_input_grad[0]:
        grad_h = _ops.spectral_penalty_backward(grad_loss, P, grad_lam, V, ctx.h_dtype)
    if ctx.needs_input_grad[1]:
        grad_V = _ops.spectral_penalty_backward_basis(grad_loss, h, P, grad_lam)
    return grad_h, grad_V, None, None


torch.library.register_autograd("selkernels::spectral_penalty", _spectral_penalty_backward,
                                setup_context=_spectral_penalty_setup)
