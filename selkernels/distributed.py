"""Statistics of the global batch across the ranks of a torch.distributed process group.

Everything here is built on the fused single-device ops and plain ``torch.distributed`` collectives,
so it runs on any backend (NCCL for CUDA tensors, gloo for CPU tensors) with the same code.

* :func:`global_selectivity_index` — class selectivity of the batch joined over all ranks: every
  rank's per-class activation SUMS and COUNTS for all layers go into one flat buffer and one
  all-reduce (never the activations), then SI comes from the global class means. Differentiable:
  the backward all-reduces the buffer's gradient (one more collective of the same size), which is
  the exact gradient of the joined-batch statistic, so under DistributedDataParallel, whose
  gradient averaging over ranks divides by the world size, the averaged gradient equals the
  single-process gradient on the joined batch.
* :func:`all_reduce_moments` — exact (Chan) merge of count / mean / M2 moments across ranks.

The one op defined outside ``csrc/ops.cpp`` (where every ``selkernels::`` schema lives) is here,
``selkernels_dist::agree_bucket_layout``: a Python custom op because it has no kernel, only a
host-side exchange of Python objects between the ranks (``all_gather_object``), made an op so that
torch.compile keeps it in the graph; the collectives themselves are torch's functional collectives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.distributed_c10d import _resolve_process_group

from ._moments import add_deviation, pooled_mean
from .ops import _check_eps, _check_num_classes, class_means, selectivity_from_means, selectivity_index

__all__ = [
    "is_distributed",
    "world_size",
    "all_reduce_sum",
    "global_class_means",
    "global_selectivity_index",
    "all_reduce_moments",
]


def is_distributed() -> bool:
    """True when torch.distributed is available and its default process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of ranks in ``group`` (default: the default group); 1 when not distributed."""
    return dist.get_world_size(group) if is_distributed() else 1


def _default(group):
    return dist.group.WORLD if group is None else group


def _sum_over_ranks(tensor: torch.Tensor, group) -> torch.Tensor:
    """One sum all-reduce as a functional collective: a new tensor, and an op torch.compile traces
    (an in-place ``dist.all_reduce`` would break the graph)."""
    return funcol.wait_tensor(funcol.all_reduce(tensor.contiguous(), "sum", _default(group)))


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, with the exact backward: d(sum)/d(own input) is the sum over ranks of the
    gradients flowing into the result, i.e. an all-reduce-sum of the gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group):
        ctx.group = group
        return _sum_over_ranks(tensor, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _sum_over_ranks(grad, ctx.group), None


# (layout key, group name, signature) every rank of the group has confirmed.
_AGREED_LAYOUTS = set()


@torch.library.custom_op("selkernels_dist::agree_bucket_layout", mutates_args=())
def _agree_bucket_layout(like: torch.Tensor, signature: list[int], group_name: str, layout_key: str) -> torch.Tensor:
    """Raise the same ValueError on every rank unless all ranks of the group will all-reduce
    buckets of the same layout (``signature``: K, accumulation bits, layer widths); returns a
    0-dim zero that the bucket adds, so the check runs before the collective even when compiled.

    A custom op, so torch.compile(fullgraph=True) keeps it in the graph and it runs with the
    concrete shapes of each call. The exchange is a tiny ``all_gather_object``: on every call, or,
    with a ``layout_key``, on the first call of each layout under that key only (every rank must
    then see a new layout at the same call, as ranks sharing one model and one K do).
    """
    key = (layout_key, group_name, tuple(signature))
    if not layout_key or key not in _AGREED_LAYOUTS:
        group = _resolve_process_group(group_name)
        layouts: list[list[int] | None] = [None] * dist.get_world_size(group)
        dist.all_gather_object(layouts, list(signature), group=group)
        if any(layout != list(signature) for layout in layouts):
            described = "; ".join(
                f"rank {r}: num_classes={lay[0]}, layer widths {lay[2:]}, float{lay[1]}"
                for r, lay in enumerate(layouts)
            )
            raise ValueError(
                "global selectivity: the ranks disagree on the class statistics they all-reduce "
                f"({described}); every rank must pass the same num_classes and the same layers "
                "(widths) in the same order"
            )
        if layout_key:
            _AGREED_LAYOUTS.add(key)
    return like.new_zeros(())


@_agree_bucket_layout.register_fake
def _agree_bucket_layout_fake(like, signature, group_name, layout_key):
    return like.new_empty(())


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Differentiable sum of ``tensor`` over the ranks of ``group``; returns a new tensor.

    Every rank must call it (same shape and dtype), and, when the result is differentiated, every
    rank must run the backward too: the backward is itself an all-reduce of the gradient.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    return _AllReduceSum.apply(tensor, group)


def global_class_means(
    xs: Sequence[torch.Tensor],
    labels: torch.Tensor,
    num_classes: int,
    *,
    ignore_index: int = -100,
    group: dist.ProcessGroup | None = None,
    unit_dim: int = 1,
    layout_key: str = "",
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Class means of several activations over the batch joined across the ranks of ``group``.

    Args:
        xs: this rank's activations, each [N, C_l, *spatial] (``unit_dim=1``) or [N, *positions,
            C_l] (``unit_dim=-1``) for the same N samples.
        labels: this rank's labels [N] (ranks may hold different N, including 0, and may miss
            classes).

    Returns:
        ``(means, counts)``: ``means[l]`` [K, C_l] the global class means of ``xs[l]`` (float32, or
        float64 when any input is float64; 0 for classes absent from every rank), ``counts`` [K]
        int64 the global class counts. Identical on every rank; differentiable w.r.t. ``xs``.

    Communication: one all-reduce of ``K * sum_l C_l + K`` elements forward (the per-class sums of
    every layer and the class counts, once), and one of the same size backward when differentiated.
    Before it, the ranks exchange the bucket's layout (K, dtype, widths: a tiny
    ``all_gather_object``), so that ranks that disagree on K or on the layers all raise the same
    ``ValueError`` naming every rank's layout instead of aborting inside the collective. It runs
    on every call, or, when ``layout_key`` is a non-empty string (the same on every rank, e.g. one
    per regularizer), on the first call of each layout under that key only.

    Traceable by ``torch.compile(fullgraph=True)``: the collectives are functional collectives
    inside an autograd.Function, and the layout check is a custom op (``selkernels_dist::``) that
    runs with each call's concrete shapes.
    With one rank (or no initialized process group) it is :func:`selkernels.class_means` per layer,
    no communication.
    """
    xs = list(xs)
    if not xs:
        raise ValueError("xs must hold at least one tensor")
    num_classes = _check_num_classes(num_classes)
    # One fused call, one label segmentation for all layers.
    local = class_means(list(xs), labels, num_classes, ignore_index=ignore_index, unit_dim=unit_dim)
    # The widest accumulation type, so all layers share one buffer and one collective.
    acc = torch.float64 if any(m.dtype == torch.float64 for m, _ in local) else torch.float32
    if world_size(group) == 1:
        return [m.to(acc) for m, _ in local], local[0][1]
    counts = local[0][1]
    counts_f = counts.to(acc)
    # Sums, not means, are what add across ranks; counts are exact in the float buffer up to 2**24
    # (float32) samples of one class per step.
    sums = [(m.to(acc) * counts_f[:, None]).reshape(-1) for m, _ in local]
    widths = [m.shape[1] for m, _ in local]
    # Ranks whose buckets differ in size would abort inside the collective: agree on the layout first.
    signature = [num_classes, 64 if acc == torch.float64 else 32] + widths
    agreed = _agree_bucket_layout(counts_f, signature, _default(group).group_name, layout_key)
    buf = all_reduce_sum(torch.cat(sums + [counts_f]) + agreed, group)
    parts = torch.split(buf, [num_classes * c for c in widths] + [num_classes])
    g_counts_f = parts[-1].detach()  # counts carry no gradient
    g_counts = torch.round(g_counts_f).to(torch.int64)
    # Absent classes: sum 0 / 1 = mean 0, and selectivity_from_means skips count-0 classes.
    denom = g_counts_f.clamp_min(1)[:, None]
    means = [p.view(num_classes, c) / denom for p, c in zip(parts[:-1], widths)]
    return means, g_counts


def global_selectivity_index(
    xs: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor,
    num_classes: int,
    *,
    eps: float = 1e-7,
    ignore_index: int = -100,
    group: dist.ProcessGroup | None = None,
    unit_dim: int = 1,
    layout_key: str = "",
) -> torch.Tensor | list[torch.Tensor]:
    """Class selectivity index of every unit over the batch joined across the ranks of ``group``.

    ``xs`` is one activation tensor [N, C, *spatial] (or [N, *positions, C] with ``unit_dim=-1``)
    or a list of them (one per layer, same samples): a tensor gives SI [C], a list a list of SI
    [C_l]. All layers share ONE collective (see :func:`global_class_means`, also for
    ``layout_key``). SI follows :func:`selkernels.selectivity_from_means` on the
    global class means and counts (fewer than two classes present over all ranks: SI = 0).
    Identical on every rank; differentiable w.r.t. ``xs``, every rank must call it and (when
    differentiated) run the backward. With one rank (or no initialized process group) it is
    :func:`selkernels.selectivity_index` per layer exactly, no communication.
    """
    single = isinstance(xs, torch.Tensor)
    eps = _check_eps(eps)
    if world_size(group) == 1:
        return selectivity_index(
            xs if single else list(xs), labels, num_classes, eps=eps, ignore_index=ignore_index, unit_dim=unit_dim
        )
    means, counts = global_class_means(
        [xs] if single else xs,
        labels,
        num_classes,
        ignore_index=ignore_index,
        group=group,
        unit_dim=unit_dim,
        layout_key=layout_key,
    )
    si = [selectivity_from_means(m, counts, eps) for m in means]
    return si[0] if single else si


def _check_moments(count, mean, m2):
    for name, t in (("count", count), ("mean", mean), ("m2", m2)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if name != "count" and not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor (float64 recommended), got {t.dtype}")
    if count.dtype == torch.bool or count.dtype.is_complex:
        raise TypeError(f"count must be an integer or floating-point tensor, got {count.dtype}")
    batch = tuple(count.shape)
    if mean.dim() != count.dim() + 1 or tuple(mean.shape[:-1]) != batch:
        raise ValueError(f"mean must have shape [*B, D] with B = count.shape = {batch}, got {tuple(mean.shape)}")
    d = mean.shape[-1]
    if tuple(m2.shape) != batch + (d, d):
        raise ValueError(f"m2 must have shape [*B, D, D] = {batch + (d, d)}, got {tuple(m2.shape)}")
    if not (count.device == mean.device == m2.device):
        raise ValueError("count, mean and m2 must be on the same device")


def all_reduce_moments(
    count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact merge of running moments across the ranks of ``group`` (Chan et al.'s parallel formula).

    Each rank holds moments of its own samples: ``count`` [*B] (number of samples, integer or
    floating; returned in its dtype), ``mean``
    [*B, D], ``m2`` [*B, D, D] (sum of outer products of deviations from ``mean``). ``*B`` is any
    batch shape: ``[]`` for one stream, ``[K]`` for per-class moments. Returns new tensors
    ``(count, mean, m2)`` of the union of all ranks' samples, identical on every rank:

        N = sum_r n_r,   mu = sum_r n_r mu_r / N,
        M2 = sum_r (M2_r + n_r (mu_r - mu)(mu_r - mu)^T)

    computed as written (two all-reduces: ``B * (D + 1)`` then ``B * D * D`` elements), so no
    large terms cancel. A rank with count 0 for some entry contributes nothing there, whatever its
    mean and M2 hold; an entry with global count 0 gets mean 0 and M2 0. Use float64 (the
    arithmetic is done in the inputs' dtype). Not differentiable (running statistics). With one
    rank (or no initialized process group) the inputs are returned as copies.
    """
    _check_moments(count, mean, m2)
    if world_size(group) == 1:
        return count.clone(), mean.clone(), m2.clone()
    with torch.no_grad():
        present = count > 0  # a rank's entries of count 0 contribute nothing, whatever they hold
        n = torch.where(present, count, torch.zeros_like(count)).to(mean.dtype)
        mean = torch.where(present[..., None], mean, torch.zeros_like(mean))

        def pool(t: torch.Tensor) -> torch.Tensor:
            t = t.contiguous()
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
            return t

        g_n, g_mean = pooled_mean([n], [mean], pool)
        second = torch.where(present[..., None, None], m2, torch.zeros_like(m2))
        add_deviation(second, n, mean, g_mean)
        second = pool(second)
        if not count.dtype.is_floating_point:
            g_n = torch.round(g_n)  # integer counts travel exactly in the float buffer (< 2**53 in float64)
        return g_n.to(count.dtype), g_mean, second
