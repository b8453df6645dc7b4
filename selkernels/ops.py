"""Public selectivity ops of selkernels: argument checks and fake kernels for torch.ops.selkernels.*.

Every op here is a registered custom op (schema in csrc/ops.cpp, CPU kernel in csrc/cpu, CUDA kernel
in csrc/cuda), so it works under torch.compile(fullgraph=True) and torch.library.opcheck. Their
autograd is registered in C++ (csrc/selectivity_autograd.cpp): it calls the registered backward
ops, and costs far less per call than a Python autograd formula on the small activations of a
training step.
"""
from __future__ import annotations

import math
import os
from typing import Tuple

import torch

from . import _C  # noqa: F401  (loads the library: registers the schemas and kernels)

__all__ = ["class_means", "selectivity_index", "selectivity_from_means"]

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_ops = torch.ops.selkernels


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Argument checks: a clear Python error naming the argument, before any kernel runs.
# ----------------------------------------------------------------------------------------------
_MAX_CLASSES = 2**31 - 1  # the kernels index classes with int32 (argmax per unit)


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
    if not 1 <= num_classes <= _MAX_CLASSES:
        raise ValueError(f"num_classes must be >= 1 and < 2**31, got {num_classes}")
    return num_classes


def _device_memory_bytes(device: torch.device):
    """Total memory of the device the op allocates on; None where unknown (meta, other backends)."""
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


_CLASS_MEMORY_CHECK_BYTES = 1 << 30  # below this the device query is not worth its cost


def _check_class_memory(num_classes: int, units: int, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a num_classes whose per-class buffers cannot fit, before anything is allocated.

    Per class: the [K, C] means and their gradient in the accumulation type, plus three int64
    label-segmentation entries (counts, offsets and the counting sort's cursors).
    """
    if not isinstance(num_classes, int) or not isinstance(units, int):
        return  # symbolic sizes under torch.compile: checked when the compiled code runs eagerly
    acc_bytes = 8 if dtype == torch.float64 else 4
    needed = num_classes * (3 * 8 + 2 * units * acc_bytes)
    if needed <= _CLASS_MEMORY_CHECK_BYTES:
        return
    total = _device_memory_bytes(device)
    if total is not None and needed > total:
        raise ValueError(f"num_classes={num_classes} needs about {needed / 2**30:.1f} GiB for the per-class "
                         f"statistics of C={units} units, more than the {total / 2**30:.1f} GiB of {device}")


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not 0.0 <= eps < math.inf:  # also False for NaN
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    return float(eps)


def _check_activations(x, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float64, float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [N, C, *spatial] (at least 2 dims), got shape {tuple(x.shape)}")
    if x.shape[0] > 0 and x.shape[1] > 0 and math.prod(x.shape[2:]) == 0:
        raise ValueError(f"{name} has no spatial positions (shape {tuple(x.shape)}): the spatial mean of a unit "
                         f"is 0/0; an empty batch (N = 0) or no units (C = 0) is accepted")


def _check_labels(labels, n: int, device: torch.device, num_classes: int, ignore_index: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape [N] = [{n}] to match x, got shape {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on the same device as x ({device}), got {labels.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    # The CPU kernel checks the values while it counting-sorts the labels, before it reads x
    # (_run_checked turns its error into a ValueError). On other devices the check is a host
    # sync, skipped while compiling and on the meta device (no values); the CUDA kernels skip
    # out-of-range labels without touching memory out of bounds. Compared as int64: unsigned
    # label dtypes have no comparison kernels.
    labels = labels.long()
    if device.type not in ("cpu", "meta") and not torch.compiler.is_compiling() and labels.numel() > 0:
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
        if bool(bad.any()):
            first = int(labels[bad][0])
            raise ValueError(f"labels must lie in [0, num_classes={num_classes}) or equal "
                             f"ignore_index={ignore_index}; found {first}")
    return labels


def _check_counts(counts, k: int, device: torch.device) -> torch.Tensor:
    """Per-class sample counts [K]: an integer tensor (a float count has no meaning: 0.5 samples)."""
    if not isinstance(counts, torch.Tensor) or counts.dim() != 1 or counts.shape[0] != k:
        raise ValueError(f"counts must be a 1-D tensor [K] = [{k}] matching means, got "
                         f"{tuple(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__}")
    if counts.dtype.is_floating_point or counts.dtype.is_complex or counts.dtype == torch.bool:
        raise TypeError(f"counts must be an integer tensor (samples per class), got {counts.dtype}")
    if counts.device != device:
        raise ValueError(f"counts must be on the same device as means ({device}), got {counts.device}")
    return counts.long()


_LABEL_ERROR = "selkernels: labels must lie in"


def _run_checked(op, *args):
    try:
        return op(*args)
    except RuntimeError as err:
        message = str(err)
        if message.startswith(_LABEL_ERROR):
            raise ValueError(message[len("selkernels: "):].splitlines()[0]) from None
        raise


# ----------------------------------------------------------------------------------------------
# class_means
# ----------------------------------------------------------------------------------------------
def class_means(x: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                ignore_index: int = -100) -> Tuple[torch.Tensor, torch.Tensor]:
    """Class-conditional mean activation of every unit.

    Args:
        x: activations [N, C, *spatial] (any number of spatial dims, none included), float64,
            float32, float16 or bfloat16; contiguous, channels_last, or any strides (other stride
            patterns are copied once to contiguous).
        labels: integer class of each sample, [N]. Samples labelled ``ignore_index`` are skipped.
        num_classes: K.

    Returns:
        ``(means, counts)``: ``means[k, c]`` is the mean over samples of class k of the unit's
        spatial mean (float32, float64 for float64 x; accumulated in that type), ``counts[k]``
        (int64) the number of samples of class k. Absent classes have count 0 and mean 0.

    Edge cases: x with zero spatial positions (e.g. [8, 4, 0, 3]) raises ValueError: a unit's
    spatial mean would be 0/0, and NaN means for every class would surface only later as a NaN
    loss with no hint of the layer; an empty batch (N = 0) or C = 0 is a valid empty result.
    Broadcast (stride-0) spatial dims are read once, never materialised. Sums are pairwise in the
    accumulation type (rounding error grows as log N and log S). Memory: ~(24 + 8 * C) bytes per
    class for fp32 (means, their gradient, the label segmentation); a ``num_classes`` that cannot
    fit on x's device raises ValueError before anything is allocated (``num_classes < 2**31``).

    Differentiable w.r.t. ``x``. The backward needs O(N*C) memory: the gradient w.r.t. x is an
    [N, C] tensor broadcast over the spatial positions as a stride-0 view, materialised only if
    autograd must (e.g. when accumulating into a leaf's ``.grad``).
    """
    _check_activations(x)
    num_classes = _check_num_classes(num_classes)
    _check_class_memory(num_classes, x.shape[1], x.dtype, x.device)
    labels = _check_labels(labels, x.shape[0], x.device, num_classes, ignore_index)
    return _run_checked(_ops.class_means, x, labels, num_classes, ignore_index)


@torch.library.register_fake("selkernels::class_means")
def _class_means_fake(x, labels, num_classes, ignore_index):
    means = x.new_empty((num_classes, x.shape[1]), dtype=_acc_dtype(x.dtype))
    counts = labels.new_empty((num_classes,), dtype=torch.int64)
    return means, counts


@torch.library.register_fake("selkernels::class_means_backward")
def _class_means_backward_fake(grad_means, counts, labels, ignore_index, spatial_size, out_dtype):
    return grad_means.new_empty((labels.shape[0], grad_means.shape[1]), dtype=out_dtype)


# ----------------------------------------------------------------------------------------------
# selectivity_from_means
# ----------------------------------------------------------------------------------------------
def selectivity_from_means(means: torch.Tensor, counts: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Class selectivity index of every unit from class means [K, C] and class counts [K].

    Per unit, over the classes with ``counts > 0`` (P of them):
    ``SI = (mu_max - mu_rest) / (mu_max + mu_rest + eps)``, mu_max the largest class mean and
    mu_rest the mean of the other P - 1 class means (Leavitt & Morcos, ICLR 2021).

    Edge cases: P < 2 gives SI = 0 and a zero gradient (the published scripts return NaN there).
    A unit whose class means are all zero gives 0 for eps > 0 and NaN for eps = 0. Ties for
    mu_max send the gradient to the first maximal class, as ``torch.max`` does.

    ``counts`` must be an integer tensor (TypeError for a floating-point one: 0.5 samples would be
    truncated to an absent class). Returns float32 [C] (float64 for float64 means); differentiable
    w.r.t. ``means``.
    """
    if not isinstance(means, torch.Tensor) or means.dim() != 2:
        raise ValueError(f"means must be a 2-D tensor [K, C], got {getattr(means, 'shape', type(means).__name__)}")
    if means.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"means must be a floating-point tensor, got {means.dtype}")
    counts = _check_counts(counts, means.shape[0], means.device)
    eps = _check_eps(eps)
    return _ops.selectivity_from_means(means.to(_acc_dtype(means.dtype)), counts, eps)


@torch.library.register_fake("selkernels::selectivity_from_means")
def _selectivity_from_means_fake(means, counts, eps):
    return means.new_empty((means.shape[1],))


@torch.library.register_fake("selkernels::selectivity_from_means_backward")
def _selectivity_from_means_backward_fake(grad_si, means, counts, eps):
    return torch.empty_like(means, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------------------------
# selectivity_index: class means + SI in one op, forward and backward
# ----------------------------------------------------------------------------------------------
def selectivity_index(x: torch.Tensor, labels: torch.Tensor, num_classes: int, *, eps: float = 1e-7,
                      ignore_index: int = -100) -> torch.Tensor:
    """Class selectivity index of every unit of x [N, C, *spatial], fused.

    Equivalent to ``selectivity_from_means(*class_means(x, labels, num_classes), eps)`` over the
    classes present in the batch, in one op: one read of x forward, O(N*C + K*C) work backward.
    Inputs, dtypes, layouts and edge cases as in :func:`class_means` and
    :func:`selectivity_from_means` (fewer than two classes present: SI = 0, zero gradient).

    Returns float32 [C] (float64 for float64 x). The backward needs O(N*C + K*C) memory and
    returns the gradient w.r.t. x as a stride-0 broadcast of an [N, C] tensor.
    x with zero spatial positions raises ValueError, as in :func:`class_means`.
    """
    _check_activations(x)
    num_classes = _check_num_classes(num_classes)
    _check_class_memory(num_classes, x.shape[1], x.dtype, x.device)
    eps = _check_eps(eps)
    labels = _check_labels(labels, x.shape[0], x.device, num_classes, ignore_index)
    si, _, _ = _run_checked(_ops.selectivity_index, x, labels, num_classes, eps, ignore_index)
    return si


@torch.library.register_fake("selkernels::selectivity_index")
def _selectivity_index_fake(x, labels, num_classes, eps, ignore_index):
    acc = _acc_dtype(x.dtype)
    return (x.new_empty((x.shape[1],), dtype=acc), x.new_empty((num_classes, x.shape[1]), dtype=acc),
            labels.new_empty((num_classes,), dtype=torch.int64))


@torch.library.register_fake("selkernels::selectivity_index_backward")
def _selectivity_index_backward_fake(grad_si, grad_means, means, counts, labels, eps, ignore_index, spatial_size, out_dtype):
    return means.new_empty((labels.shape[0], means.shape[1]), dtype=out_dtype)
