"""Public selectivity ops of selkernels: argument checks and fake kernels for torch.ops.selkernels.*.

Every op here is a registered custom op (schema in csrc/ops.cpp, CPU kernel in csrc/cpu, CUDA kernel
in csrc/cuda), so it works under torch.compile(fullgraph=True) and torch.library.opcheck. The labels
of a batch are segmented once (segment_labels); the layer ops take that segmentation and a list of
layers, so a training step is one call for every hooked layer, forward and backward.

Their autograd is C++ (csrc/selectivity_autograd.cpp, registered for the Autograd key): these ops run
on every training step, where Python's autograd wrapper was most of an op-level forward+backward.
Each backward is a registered op with its own autograd, so double backward is exact.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import _C  # noqa: F401  (loads the library: registers the schemas and kernels)

__all__ = [
    "LabelSegments",
    "segment_labels",
    "check_labels",
    "class_means",
    "accumulate_class_sums",
    "selectivity_index",
    "selectivity_from_means",
    "cuda_launch_plan",
]

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_ops = torch.ops.selkernels


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Argument checks: a clear Python error naming the argument, before any kernel runs.
# ----------------------------------------------------------------------------------------------
_MAX_CLASSES = 2**31 - 1  # the CUDA kernels index classes with int32


def _check_num_classes(num_classes):
    """An int (or, while compiling with dynamic shapes, a SymInt) in [1, 2**31)."""
    if isinstance(num_classes, torch.SymInt):
        torch._check(num_classes >= 1, lambda: "num_classes must be >= 1 and < 2**31")
        torch._check(num_classes <= _MAX_CLASSES, lambda: "num_classes must be >= 1 and < 2**31")
        return num_classes
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


def _check_class_memory(num_classes, xs: Sequence[torch.Tensor], device: torch.device) -> None:
    """Refuse a num_classes whose per-class buffers cannot fit, before anything is allocated.

    Per class: three int64 label-segmentation entries (counts, offsets, the counting sort's
    cursors) and, per layer [N, C, ...], the [K, C] means and their gradient in the accumulation type.
    """
    if num_classes is None:
        return  # the caller reports it
    if not isinstance(_check_num_classes(num_classes), int):
        return  # symbolic under torch.compile
    units_bytes = 0
    for x in xs:
        units = x.shape[1]
        if not isinstance(units, int):
            return
        units_bytes += 2 * units * (8 if x.dtype == torch.float64 else 4)
    needed = num_classes * (3 * 8 + units_bytes)
    if needed <= _CLASS_MEMORY_CHECK_BYTES:
        return
    total = _device_memory_bytes(device)
    if total is not None and needed > total:
        units = "+".join(str(x.shape[1]) for x in xs) or "0"
        raise ValueError(
            f"num_classes={num_classes} needs about {needed / 2**30:.1f} GiB for the per-class "
            f"statistics of C={units} units, more than the {total / 2**30:.1f} GiB of {device}"
        )


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not 0.0 <= eps < math.inf:  # also False for NaN
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    return float(eps)


def _check_activations(x, name: str = "x", unit_dim: int = 1, *, require_positions: bool = True) -> None:
    """Type, dtype and rank of an activation tensor; with ``require_positions``, also that a
    non-empty batch has at least one spatial position per unit (its mean would be 0/0)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float64, float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 2:
        layout = "[N, C, *spatial]" if unit_dim == 1 else "[N, *positions, D]"
        raise ValueError(f"{name} must have shape {layout} (at least 2 dims), got shape {tuple(x.shape)}")
    units, positions = (x.shape[1], x.shape[2:]) if unit_dim == 1 else (x.shape[-1], x.shape[1:-1])
    if require_positions and x.shape[0] > 0 and units > 0 and math.prod(positions) == 0:
        raise ValueError(
            f"{name} has no spatial positions (shape {tuple(x.shape)}): the spatial mean of a unit "
            f"is 0/0; an empty batch (N = 0) or no units (C = 0) is accepted"
        )


def _check_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{name} must fit in int64, got {value}")
    return value


def _check_counts(counts, k: int, device: torch.device) -> torch.Tensor:
    """Per-class sample counts [K]: an integer tensor (a float count has no meaning: 0.5 samples)."""
    if not isinstance(counts, torch.Tensor) or counts.dim() != 1 or counts.shape[0] != k:
        raise ValueError(
            f"counts must be a 1-D tensor [K] = [{k}] matching means, got "
            f"{tuple(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__}"
        )
    if counts.dtype.is_floating_point or counts.dtype.is_complex or counts.dtype == torch.bool:
        raise TypeError(f"counts must be an integer tensor (samples per class), got {counts.dtype}")
    if counts.device != device:
        raise ValueError(f"counts must be on the same device as means ({device}), got {counts.device}")
    return counts.long()


# ----------------------------------------------------------------------------------------------
# Label segmentation: computed once per batch, shared by every layer's forward and backward.
# ----------------------------------------------------------------------------------------------
class LabelSegments(NamedTuple):
    """The labels of one batch, segmented by class (see :func:`segment_labels`).

    A NamedTuple of tensors, so it flows through torch.compile and can be passed to every layer op
    of the batch. K = ``counts.shape[0]`` (dynamic under ``torch.compile(dynamic=True)``).
    """

    labels: torch.Tensor  #: int64 [N]: the class of each sample, -1 where ignored or invalid
    counts: torch.Tensor  #: int64 [K]: samples per class
    offsets: torch.Tensor  #: int64 [K + 1]: exclusive prefix sum of counts
    order: torch.Tensor  #: int64 [N]: samples stably sorted by class, ignored/invalid ones last
    invalid: torch.Tensor  #: int64 []: number of labels outside [0, K) that are not ignore_index


def _check_label_tensor(labels, n: int | None = None) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.dim() != 1 or (n is not None and labels.shape[0] != n):
        expected = "[N]" if n is None else f"[N] = [{n}] to match x"
        raise ValueError(f"labels must have shape {expected}, got shape {tuple(labels.shape)}")
    return labels


def segment_labels(labels: torch.Tensor, num_classes: int, *, ignore_index: int = -100) -> LabelSegments:
    """Segment a batch's labels by class, once for every layer op of the batch.

    Args:
        labels: integer class of each sample, [N] (any integer dtype). Samples labelled
            ``ignore_index`` are skipped by every op.
        num_classes: K (an int; under ``torch.compile(dynamic=True)`` it may change between calls
            without recompiling).

    Returns:
        :class:`LabelSegments`. Memory: 3 * N + 2 * K + 2 int64.

    Labels outside ``[0, K)`` that are not ``ignore_index``: on CPU, ``ValueError`` at once naming
    the first one. On CUDA no host sync is made: the segmentation counts them in ``invalid``, every
    result computed from it is NaN (never silently wrong), and :func:`check_labels` raises the
    ``ValueError`` (it syncs: call it where a sync is cheap, e.g. when logging the loss).
    """
    labels = _check_label_tensor(labels)
    num_classes = _check_num_classes(num_classes)
    _check_class_memory(num_classes, [], labels.device)
    return _segment(labels, num_classes, ignore_index)


def _segment(labels: torch.Tensor, num_classes, ignore_index: int) -> LabelSegments:
    """segment_labels for callers that have checked the labels tensor, num_classes and the class
    memory themselves (the layer ops, StreamingCovariance): those checks run once per call."""
    ignore_index = _check_int(ignore_index, "ignore_index")
    return LabelSegments(
        *_ops.segment_labels(_labels_as_int64(labels, num_classes, ignore_index), num_classes, ignore_index)
    )


def _labels_as_int64(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """int64 labels; uint64 values >= 2**63 (negative once reinterpreted) stay invalid, never
    mistaken for a negative ignore_index: refused at once on CPU, counted invalid elsewhere."""
    if labels.dtype != torch.uint64:
        return labels.long()
    wide = labels.view(torch.int64)
    huge = wide < 0
    if labels.device.type == "cpu" and not torch.compiler.is_compiling() and bool(huge.any()):
        index = int(huge.nonzero()[0, 0])
        raise ValueError(
            f"labels must lie in [0, num_classes={num_classes}) or equal ignore_index={ignore_index}; "
            f"found labels[{index}] = {int(wide[index]) + 2**64}"
        )
    out_of_range = num_classes if num_classes != ignore_index else num_classes + 1
    return torch.where(huge, out_of_range, wide)


def check_labels(seg: LabelSegments, labels: torch.Tensor | None = None, *, ignore_index: int = -100) -> None:
    """Raise ``ValueError`` if ``seg`` was made from labels outside ``[0, K)``.

    One device-to-host copy (a sync on CUDA). Pass the original ``labels`` (and the
    ``ignore_index`` used) to have the first bad value named in the message.
    """
    bad = int(seg.invalid)
    if bad == 0:
        return
    k = seg.counts.shape[0]
    found = f"{bad} such labels"
    if labels is not None:
        lab = labels.long()
        mask = (lab != ignore_index) & ((lab < 0) | (lab >= k))
        index = int(mask.nonzero()[0, 0])
        found = f"labels[{index}] = {int(lab[index])} ({bad} such labels)"
    raise ValueError(f"labels must lie in [0, num_classes={k}) or equal ignore_index; found {found}")


def _num_classes_of(labels_or_seg, num_classes):
    return labels_or_seg.counts.shape[0] if isinstance(labels_or_seg, LabelSegments) else num_classes


def _segments_for(labels_or_seg, n: int, device: torch.device, num_classes, ignore_index) -> LabelSegments:
    if isinstance(labels_or_seg, LabelSegments):
        seg = labels_or_seg
        if num_classes is not None:
            num_classes = _check_num_classes(num_classes)
            if (
                isinstance(num_classes, int)
                and isinstance(seg.counts.shape[0], int)
                and num_classes != seg.counts.shape[0]
            ):
                raise ValueError(
                    f"num_classes={num_classes} does not match the segmentation (K = {seg.counts.shape[0]})"
                )
        if seg.labels.shape[0] != n:
            raise ValueError(f"the label segmentation has N = {seg.labels.shape[0]} samples, x has {n}")
    else:
        if num_classes is None:
            raise TypeError("num_classes is required when labels is a tensor (not a LabelSegments)")
        _check_label_tensor(labels_or_seg, n)
        # The callers checked the class memory (before anything is allocated).
        seg = _segment(labels_or_seg, _check_num_classes(num_classes), ignore_index)
    if seg.labels.device != device:
        raise ValueError(f"labels must be on the same device as x ({device}), got {seg.labels.device}")
    return seg


def _layers(x_or_list, unit_dim: int) -> tuple[list[torch.Tensor], bool]:
    """The layers as [N, C, *spatial] tensors (views: unit_dim=-1 moves the unit dim, no copy)."""
    if isinstance(unit_dim, bool) or unit_dim not in (1, -1):
        raise ValueError(f"unit_dim must be 1 ([N, C, *spatial]) or -1 ([N, *positions, D]), got {unit_dim!r}")
    single = isinstance(x_or_list, torch.Tensor)
    if not single and not isinstance(x_or_list, (list, tuple)):
        raise TypeError(f"x must be a torch.Tensor or a list/tuple of them, got {type(x_or_list).__name__}")
    xs = [x_or_list] if single else list(x_or_list)
    if not xs:
        raise ValueError("x must hold at least one tensor")
    for i, x in enumerate(xs):
        _check_activations(x, "x" if single else f"x[{i}]", unit_dim)
        if x.shape[0] != xs[0].shape[0]:
            raise ValueError(
                f"every tensor of x must have the same N; x[0] has {xs[0].shape[0]}, x[{i}] has {x.shape[0]}"
            )
        if x.device != xs[0].device:
            raise ValueError(
                f"every tensor of x must be on one device; x[0] is on {xs[0].device}, x[{i}] on {x.device}"
            )
    if unit_dim == -1:
        xs = [x.movedim(-1, 1) for x in xs]
    return xs, single


def _for_kernel(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Under torch.compile, the per-sample spatial mean is plain torch (Inductor fuses it into the
    layer that produces x, and its backward's broadcast into the consumer of the gradient); the
    custom op then sees [N, C] unit means. Eager keeps the fused one-pass kernel."""
    if not torch.compiler.is_compiling():
        return xs
    # A mean over the trailing dims, not of x.flatten(2): flattening a channels-last x (the layout
    # Inductor gives conv outputs on CPU) would make Inductor store x in NCHW for the view.
    return [x if x.dim() == 2 else x.mean(tuple(range(2, x.dim())), dtype=_acc_dtype(x.dtype)) for x in xs]


# ----------------------------------------------------------------------------------------------
# class_means
# ----------------------------------------------------------------------------------------------
def class_means(
    x: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor | LabelSegments,
    num_classes: int | None = None,
    *,
    ignore_index: int = -100,
    unit_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]:
    """Class-conditional mean activation of every unit, of one layer or of several in one call.

    Args:
        x: activations [N, C, *spatial] (``unit_dim=1``, any number of spatial dims, none
            included) or [N, *positions, D] (``unit_dim=-1``, e.g. transformer tokens; positions
            are averaged like spatial positions), float64, float32, float16 or bfloat16;
            contiguous, channels_last / positions-major, or any strides (other stride patterns are
            copied once to contiguous). Or a list/tuple of such tensors with the same N (any C,
            spatial shape, layout and dtype per tensor): one label segmentation and one fused call
            for all of them.
        labels: integer class of each sample, [N], or a :class:`LabelSegments` of them (then
            ``num_classes`` may be omitted). Samples labelled ``ignore_index`` are skipped.
        num_classes: K.

    Returns:
        ``(means, counts)`` for a tensor, a list of them for a list: ``means[k, c]`` is the mean
        over samples of class k of the unit's spatial mean (float32, float64 for float64 x;
        accumulated in that type), ``counts[k]`` (int64) the number of samples of class k. Absent
        classes have count 0 and mean 0. Invalid labels: see :func:`segment_labels` (CPU:
        ValueError; CUDA: NaN means, no sync).

    Edge cases: x with zero spatial positions (e.g. [8, 4, 0, 3]) raises ValueError: a unit's
    spatial mean would be 0/0, and NaN means for every class would surface only later as a NaN
    loss with no hint of the layer; an empty batch (N = 0) or C = 0 is a valid empty result.
    Broadcast (stride-0) spatial dims are read once, never materialised. Sums are pairwise in the
    accumulation type (rounding error grows as log N and log S). Memory: ~(24 + 8 * C) bytes per
    class for fp32 (means, their gradient, the label segmentation); a ``num_classes`` that cannot
    fit on x's device raises ValueError before anything is allocated (``num_classes < 2**31``).

    Differentiable w.r.t. ``x``. The backward needs O(N*C) memory per layer: the gradient w.r.t. x
    is an [N, C] tensor broadcast over the spatial positions as a stride-0 view, materialised only
    if autograd must (e.g. when accumulating into a leaf's ``.grad``).
    """
    xs, single = _layers(x, unit_dim)
    _check_class_memory(_num_classes_of(labels, num_classes), xs, xs[0].device)
    seg = _segments_for(labels, xs[0].shape[0], xs[0].device, num_classes, ignore_index)
    means = _ops.class_means_segmented(_for_kernel(xs), *seg)
    out = [(m, seg.counts) for m in means]
    return out[0] if single else out


def accumulate_class_sums(
    x: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor | LabelSegments,
    sums: torch.Tensor | Sequence[torch.Tensor],
    num_classes: int | None = None,
    *,
    ignore_index: int = -100,
    unit_dim: int = 1,
) -> None:
    """Add each class's sum of unit means to float64 running sums, in place (dataset-level
    statistics; :class:`selkernels.ClassSelectivity` accumulates with it).

    ``sums[k, c] += sum over the samples n of class k of mean over positions of x[n, c, ...]``, for
    one layer (``x`` a tensor, ``sums`` a tensor) or several (lists of equal length, one fused call,
    labels segmented once). ``x`` and ``labels`` as for :func:`class_means`; ``sums`` float64,
    contiguous, [K, C_l], on x's device.

    Per batch the class sums are pairwise sums in the accumulation type (float32, float64 for
    float64 x) added once in float64, in the pass that reduces the classes: no [K, C] means and no
    second pass over the state. Absent classes are untouched. Invalid labels: CPU ``ValueError``
    before any state changes; CUDA no sync, every entry of every ``sums`` becomes NaN (see
    :func:`segment_labels`). Not differentiable (activations are read detached). Memory: the
    label segmentation and an [N, C] float32 buffer per layer.
    """
    xs, single = _layers(x, unit_dim)
    targets = [sums] if isinstance(sums, torch.Tensor) else list(sums) if isinstance(sums, (list, tuple)) else None
    if targets is None or (single and not isinstance(sums, torch.Tensor)):
        raise TypeError("sums must be a tensor for a tensor x, or a list/tuple of tensors for a list x")
    if len(targets) != len(xs):
        raise ValueError(f"sums must hold one tensor per layer ({len(xs)}), got {len(targets)}")
    _check_class_memory(_num_classes_of(labels, num_classes), xs, xs[0].device)
    seg = _segments_for(labels, xs[0].shape[0], xs[0].device, num_classes, ignore_index)
    k = seg.counts.shape[0]
    for i, (t, xi) in enumerate(zip(targets, xs)):
        name = "sums" if single else f"sums[{i}]"
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.float64 or t.shape != (k, xi.shape[1]) or not t.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous float64 tensor of shape [{k}, {xi.shape[1]}], "
                f"got {t.dtype} {tuple(t.shape)}{'' if t.is_contiguous() else ' (non-contiguous)'}"
            )
        if t.device != xi.device:
            raise ValueError(f"{name} must be on the device of the activations ({xi.device}), got {t.device}")
    with torch.no_grad():
        _ops.class_sums_accumulate_(_for_kernel([xi.detach() for xi in xs]), *seg, targets)


@torch.library.register_fake("selkernels::class_sums_accumulate_")
def _class_sums_accumulate_fake(xs, labels, counts, offsets, order, invalid, sums):
    return None


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
# selectivity_index: class means + SI of every layer in one op, forward and backward
# ----------------------------------------------------------------------------------------------
def selectivity_index(
    x: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor | LabelSegments,
    num_classes: int | None = None,
    *,
    eps: float = 1e-7,
    ignore_index: int = -100,
    unit_dim: int = 1,
) -> torch.Tensor | list[torch.Tensor]:
    """Class selectivity index of every unit, of one layer or of several in one fused call.

    Equivalent to ``selectivity_from_means(*class_means(x, labels, num_classes), eps)`` over the
    classes present in the batch: one read of each x forward (all layers in one parallel region on
    CPU, a fixed number of launches for all layers on CUDA), and a backward that is one
    elementwise pass (the per-unit gradient coefficients are computed in the forward). Inputs
    (``x`` a tensor or a list of tensors, ``unit_dim``, ``labels`` a tensor or a
    :class:`LabelSegments`), dtypes, layouts and edge cases as in :func:`class_means` and
    :func:`selectivity_from_means` (fewer than two classes present: SI = 0, zero gradient).

    Returns float32 [C] (float64 for float64 x), or a list of them for a list.

    Memory: forward, the [N, C] unit means per layer and, per thread, scratch over a block of at
    most 256 units: O(256 log P) values for the P classes present, the means of the classes with
    more than one sample (at most N / 2 rows), and P rows of one zero-padded tile of 16 units (8
    for float64) when the block's width is not a multiple of it. No [K, C] buffer; the class
    means are summed pairwise (error ~ log P). The backward returns the gradient w.r.t. x as a
    stride-0 broadcast of an [N, C] tensor.

    Twice differentiable: the second derivative through the class means is exact, from the
    per-unit terms mu_max and mu_rest the forward keeps; the choice of the maximal class is
    piecewise constant. x with zero spatial positions raises ValueError, as in
    :func:`class_means`.
    """
    eps = _check_eps(eps)
    xs, single = _layers(x, unit_dim)
    _check_class_memory(_num_classes_of(labels, num_classes), xs, xs[0].device)
    seg = _segments_for(labels, xs[0].shape[0], xs[0].device, num_classes, ignore_index)
    si = _ops.selectivity_index_segmented(_for_kernel(xs), *seg, eps)[0]
    return si[0] if single else list(si)


# ----------------------------------------------------------------------------------------------
# Fake kernels (shapes only) of the layer ops.
# ----------------------------------------------------------------------------------------------
@torch.library.register_fake("selkernels::segment_labels")
def _segment_labels_fake(labels, num_classes, ignore_index):
    n = labels.shape[0]
    return (
        labels.new_empty((n,), dtype=torch.int64),
        labels.new_empty((num_classes,), dtype=torch.int64),
        labels.new_empty((num_classes + 1,), dtype=torch.int64),
        labels.new_empty((n,), dtype=torch.int64),
        labels.new_empty((), dtype=torch.int64),
    )


@torch.library.register_fake("selkernels::class_means_segmented")
def _class_means_segmented_fake(xs, labels, counts, offsets, order, invalid):
    k = counts.shape[0]
    return [x.new_empty((k, x.shape[1]), dtype=_acc_dtype(x.dtype)) for x in xs]


@torch.library.register_fake("selkernels::selectivity_index_segmented")
def _selectivity_index_segmented_fake(xs, labels, counts, offsets, order, invalid, eps):
    si = [x.new_empty((x.shape[1],), dtype=_acc_dtype(x.dtype)) for x in xs]
    coeffs = [x.new_empty((4, x.shape[1]), dtype=_acc_dtype(x.dtype)) for x in xs]
    argmax = [x.new_empty((x.shape[1],), dtype=torch.int64) for x in xs]
    return si, coeffs, argmax


@torch.library.register_fake("selkernels::segmented_unit_grad")
def _segmented_unit_grad_fake(grad_si, coeffs, argmax, grad_means, labels, counts, channels, spatial_sizes, out_dtypes):
    return [labels.new_empty((labels.shape[0], c), dtype=_DTYPE_OF_CODE[d]) for c, d in zip(channels, out_dtypes)]


_DTYPE_CODES = {torch.float64: 7, torch.float32: 6, torch.float16: 5, torch.bfloat16: 15}  # c10::ScalarType
_DTYPE_OF_CODE = {v: k for k, v in _DTYPE_CODES.items()}


# ----------------------------------------------------------------------------------------------
# The CUDA launch plan of a training step (computed by the launchers' own host code).
# ----------------------------------------------------------------------------------------------
_PLAN_KERNELS = ("segment_labels_kernel", "unit_means_kernel", "class_si_kernel", "unit_grad_kernel")


def cuda_launch_plan(
    shapes: Sequence[Sequence[int]],
    num_classes: int,
    dtypes: torch.dtype | Sequence[torch.dtype] = torch.float32,
    *,
    channels_last: bool | Sequence[bool] = False,
    sm_count: int = 132,
) -> list[dict]:
    """The CUDA kernels one training step launches with the regularizer on, without a GPU.

    A step is ``segment_labels`` once, the fused ``selectivity_index`` forward over every layer and
    its backward. The grids come from the same host code (``csrc/cuda/launch_plan.h``) the CUDA
    launchers size their grids with, so the model matches what runs.

    Args:
        shapes: the activation shapes ``[N, C, *spatial]`` of the hooked layers (same N).
        num_classes: K.
        dtypes: one dtype per layer, or one for all.
        channels_last: per layer (or for all): memory ``[N, *spatial, C]`` (also what
            ``unit_dim=-1`` activations are).
        sm_count: streaming multiprocessors of the GPU (132: H100 / H200 SXM).

    Returns:
        One dict per launch, in launch order: ``kernel`` (name), ``grid`` and ``block`` (3-tuples),
        ``smem_bytes``, ``bytes_read``, ``bytes_written`` (DRAM/L2 traffic modeled from the
        kernels' access patterns), ``host_syncs`` (always 0: nothing in the step syncs). The
        autograd engine's own work (adding the broadcast [N, C] gradient into each layer's dense
        gradient) is not a selkernels launch and is not listed.
    """
    shapes = [tuple(int(d) for d in s) for s in shapes]
    if not shapes or any(len(s) < 2 for s in shapes):
        raise ValueError("shapes must be a non-empty list of [N, C, *spatial] shapes")
    n = shapes[0][0]
    if any(s[0] != n for s in shapes):
        raise ValueError("every shape must have the same N")
    num_classes = _check_num_classes(num_classes)
    dtypes = [dtypes] * len(shapes) if isinstance(dtypes, torch.dtype) else list(dtypes)
    cl = [channels_last] * len(shapes) if isinstance(channels_last, bool) else list(channels_last)
    if len(dtypes) != len(shapes) or len(cl) != len(shapes):
        raise ValueError("dtypes and channels_last must have one entry per shape (or be a single value)")
    if any(d not in _DTYPE_CODES for d in dtypes):
        raise TypeError(f"dtypes must be float64, float32, float16 or bfloat16, got {dtypes}")
    spatial = [math.prod(s[2:]) for s in shapes]
    layouts = []
    for s, d, last in zip(spatial, dtypes, cl):
        size = torch.empty((), dtype=d).element_size()
        layouts.append(0 if s == 1 else 3 if last else (2 if (s * size) % 16 == 0 else 1))
    rows = _ops.cuda_launch_plan(
        [s[1] for s in shapes], spatial, [_DTYPE_CODES[d] for d in dtypes], layouts, n, num_classes, sm_count
    ).tolist()
    return [
        {
            "kernel": _PLAN_KERNELS[r[0]],
            "grid": tuple(r[1:4]),
            "block": tuple(r[4:7]),
            "smem_bytes": r[7],
            "bytes_read": r[8],
            "bytes_written": r[9],
            "host_syncs": 0,
        }
        for r in rows
    ]
