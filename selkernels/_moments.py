"""The one merge of running moments (Chan, Golub & LeVeque 1979), for StreamingCovariance.merge and
distributed.all_reduce_moments (the fused update kernels use the same formula: csrc/common/moments.h).

Sets r of n_r samples with means mu_r and M2_r (sums of outer products of deviations) pool to

    N = sum_r n_r,   mu = sum_r n_r mu_r / N,   M2 = sum_r (M2_r + n_r (mu_r - mu)(mu_r - mu)^T),

computed as written, so no large terms cancel. ``pool`` sums its argument over the sets: a sum
over two local states, or an all-reduce across ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import torch

Pool = Callable[[torch.Tensor], torch.Tensor]


def pooled_mean(
    counts: Sequence[torch.Tensor], means: Sequence[torch.Tensor], pool: Pool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, mu): N = sum_r n_r [*B] and mu = sum_r n_r mu_r / N [*B, D] (0 where N = 0), for counts
    [*B] (floating) and means [*B, D]. One pooled buffer holds both: one collective across ranks."""
    d = means[0].shape[-1]
    parts = [torch.cat([n.reshape(-1, 1), (n[..., None] * m).reshape(-1, d)], dim=1) for n, m in zip(counts, means)]
    total = pool(torch.stack(parts) if len(parts) > 1 else parts[0])
    n_total = total[:, :1]
    mean = torch.where(
        n_total > 0,
        total[:, 1:] / torch.where(n_total > 0, n_total, torch.ones_like(n_total)),
        torch.zeros_like(total[:, 1:]),
    )
    return n_total.reshape(counts[0].shape), mean.reshape(means[0].shape)


def add_deviation(m2: torch.Tensor, count: torch.Tensor, mean: torch.Tensor, pooled: torch.Tensor) -> None:
    """m2 += n (mu - mu_pooled)(mu - mu_pooled)^T in place, batched over the leading dims, with no
    [*B, D, D] temporary (m2 [*B, D, D], count [*B], mean and pooled [*B, D])."""
    d = mean.shape[-1]
    delta = (mean - pooled).reshape(-1, d)
    m2.view(-1, d, d).baddbmm_((delta * count.reshape(-1, 1).to(delta.dtype)).unsqueeze(2), delta.unsqueeze(1))


def merge_into(
    a: tuple[torch.Tensor, torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> None:
    """Pool the moment set b = (count, mean, M2) into a, in place (no state-sized temporary)."""
    (n_a, mean_a, m2_a), (n_b, mean_b, m2_b) = a, b
    fa, fb = n_a.to(mean_a.dtype), n_b.to(mean_a.dtype)
    _, mean = pooled_mean([fa, fb], [mean_a, mean_b], lambda t: t.sum(0))
    m2_a.add_(m2_b)
    add_deviation(m2_a, fa, mean_a, mean)
    add_deviation(m2_a, fb, mean_b, mean)
    mean_a.copy_(mean)
    n_a.add_(n_b)
