"""Input perturbations for the dimensionality analysis: callables ``(x, y) -> x'`` of x's shape.

Any callable with that signature can be passed to :func:`selkernels.analysis.dimensionality`; two
are shipped, one per regime studied by Leavitt & Morcos (2020):

* :class:`GaussianNoise` -- additive i.i.d. Gaussian noise, an average-case (naturalistic)
  corruption;
* :class:`PGDAttack` -- the L-inf projected-gradient-descent attack of Madry et al. (2018) on the
  model's cross-entropy, a worst-case (white-box adversarial) perturbation; FGSM (Goodfellow et al.
  2015) is its one-step special case, :meth:`PGDAttack.fgsm`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["GaussianNoise", "PGDAttack"]


def _check_nonneg(value, name: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")
    return float(value)


def _check_range(clamp) -> tuple[float, float] | None:
    if clamp is None:
        return None
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
        raise ValueError(f"clamp must be None or a (min, max) pair, got {clamp!r}")
    lo, hi = clamp
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"clamp must hold two finite numbers, got {clamp!r}")
    if not lo < hi:
        raise ValueError(f"clamp must satisfy min < max, got {clamp!r}")
    return float(lo), float(hi)


def _check_input(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    return x


class GaussianNoise:
    """x' = x + std * N(0, I), optionally clamped to the input range.

    Args:
        std: noise standard deviation (>= 0; 0 returns a copy of x).
        clamp: None (default: no clamping, so the noise stays exactly isotropic) or (min, max).
        generator: optional ``torch.Generator`` on x's device for reproducible noise.
    """

    def __init__(
        self, std: float, *, clamp: tuple[float, float] | None = None, generator: torch.Generator | None = None
    ) -> None:
        self.std = _check_nonneg(std, "std")
        self.clamp = _check_range(clamp)
        self.generator = generator

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = _check_input(x).detach()
        noise = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=self.generator)
        out = x + self.std * noise
        return out.clamp(*self.clamp) if self.clamp is not None else out

    def __repr__(self) -> str:
        return f"GaussianNoise(std={self.std}, clamp={self.clamp})"


class PGDAttack:
    """L-inf projected gradient ascent on the cross-entropy of ``model`` (untargeted).

    With ``random_start`` the start is x + U(-eps, eps) (clamped to the input range), else x.
    Each of ``steps`` iterations takes ``x' <- x' + step_size * sign(grad_x' CE(model(x'), y))``,
    then projects onto the eps ball ``|x' - x|_inf <= eps`` and clamps to ``clamp = (min, max)``,
    the range the inputs are assumed to live in (e.g. (0, 1) for images scaled to [0, 1]; the
    clean x is assumed to lie in it). FGSM is ``steps=1, step_size=eps, random_start=False``
    (:meth:`fgsm`). The loss is summed over the batch, so each sample's step depends only on its own
    gradient (sign is scale-free). The returned x' satisfies ``|x' - x|_inf <= eps`` and lies in
    [min, max].

    The model runs in eval mode during the attack (its train/eval flag is restored afterwards) and
    gradients are taken with ``torch.autograd.grad`` with respect to the input only: no ``.grad`` of
    the model's parameters is created or accumulated. The attack works inside ``torch.no_grad()``
    callers too (it enables grad locally). The model must map x to logits [N, K] and y must hold
    class indices [N].

    Args:
        model: the classifier under attack.
        eps: L-inf radius (> 0).
        step_size: step per iteration (> 0); a common choice is 2.5 * eps / steps.
        steps: number of iterations (>= 1).
        random_start: start from a uniform random point of the eps ball.
        clamp: (min, max) input range (default (0, 1)); None disables the range clamp.
        generator: optional ``torch.Generator`` for the random start.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        eps: float,
        step_size: float,
        steps: int,
        *,
        random_start: bool = True,
        clamp: tuple[float, float] | None = (0.0, 1.0),
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.eps = _check_nonneg(eps, "eps", positive=True)
        self.step_size = _check_nonneg(step_size, "step_size", positive=True)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.steps = steps
        if not isinstance(random_start, bool):
            raise TypeError(f"random_start must be a bool, got {type(random_start).__name__}")
        self.random_start = random_start
        self.clamp = _check_range(clamp)
        self.generator = generator

    @classmethod
    def fgsm(cls, model: torch.nn.Module, eps: float, *, clamp: tuple[float, float] | None = (0.0, 1.0)) -> PGDAttack:
        """The fast gradient sign method: one step of size eps from x, no random start."""
        return cls(model, eps, eps, 1, random_start=False, clamp=clamp)

    def _project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x_adv = torch.minimum(torch.maximum(x_adv, x - self.eps), x + self.eps)
        return x_adv.clamp(*self.clamp) if self.clamp is not None else x_adv

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = _check_input(x).detach()
        if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise TypeError(f"y must be an integer tensor of class indices, got {getattr(y, 'dtype', type(y))}")
        if y.shape != x.shape[:1]:
            raise ValueError(f"y must have shape [N] = [{x.shape[0]}], got {tuple(y.shape)}")
        was_training = self.model.training
        self.model.eval()
        try:
            x_adv = x.clone()
            if self.random_start:
                u = torch.rand(x.shape, dtype=x.dtype, device=x.device, generator=self.generator)
                x_adv = self._project(x + (2 * u - 1) * self.eps, x)
            with torch.enable_grad():
                for _ in range(self.steps):
                    x_adv.requires_grad_(True)
                    loss = F.cross_entropy(self.model(x_adv), y, reduction="sum")
                    (grad,) = torch.autograd.grad(loss, x_adv)
                    x_adv = self._project(x_adv.detach() + self.step_size * grad.sign(), x)
        finally:
            self.model.train(was_training)
        return x_adv.detach()

    def __repr__(self) -> str:
        return (
            f"PGDAttack(eps={self.eps}, step_size={self.step_size}, steps={self.steps}, "
            f"random_start={self.random_start}, clamp={self.clamp})"
        )
