"""Pure-PyTorch oracles for every fused op: the papers' definitions, written for clarity.

Two kinds live here:
* ``paper_*``: the selectivity regularizer as the published training scripts compute it (a
  Python loop over the classes present in the batch with boolean masks). This is the code users
  run today and the baseline the benchmarks compare against. It returns NaN when fewer than two
  classes are present (division by P - 1 = 0), as those scripts do.
* ``published_*``: the dataset analysis and training regularizer of Ranadive et al. (2023) as their
  published scripts compute them: per-sample unit means (optionally made absolute, as their ViT
  analysis does for GELU outputs) accumulated into per-class SUMS in a dict, SI from those sums
  over the classes seen, and layers averaged within groups (ResNet stages) and then over groups.
* ``*_reference``: vectorized definitions (index_add + masked reductions) used as test oracles in
  float64 and as the "best eager composition" in the benchmarks. They follow the library's
  conventions (absent classes skipped, SI = 0 when fewer than two classes are present).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "spatial_mean",
    "paper_class_selectivity",
    "paper_selectivity_penalty",
    "published_dataset_selectivity",
    "published_grouped_penalty",
    "class_means_reference",
    "selectivity_from_means_reference",
    "selectivity_index_reference",
    "spectral_penalty_reference",
]


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """[N, C, *spatial] -> [N, C]: each unit's mean over spatial positions."""
    return x.flatten(2).mean(-1) if x.dim() > 2 else x


def paper_class_selectivity(x: torch.Tensor, labels: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """SI of every unit as the published scripts compute it: a loop over the present classes."""
    act = spatial_mean(x)
    class_means = torch.stack([act[labels == k].mean(0) for k in torch.unique(labels)])
    mu_max = class_means.max(0)[0]
    mu_rest = (class_means.sum(0) - mu_max) / (class_means.shape[0] - 1)
    return (mu_max - mu_rest) / (mu_max + mu_rest + eps)


def paper_selectivity_penalty(
    activations: Sequence[torch.Tensor], labels: torch.Tensor, alpha: float, eps: float = 1e-7
) -> torch.Tensor:
    """-alpha * mean over layers of the mean SI over units (so loss = CE + penalty)."""
    layer_si = torch.stack([paper_class_selectivity(a, labels, eps).mean() for a in activations])
    return -alpha * layer_si.mean()


def _published_unit_means(x: torch.Tensor) -> torch.Tensor:
    """[N, U, ...] -> [N, U]: the mean over everything after dim 1 (for [N, tokens, D] the units
    are the tokens, as in the published ViT analysis)."""
    return x.reshape(x.shape[0], x.shape[1], -1).mean(2)


def _published_si_from_sums(class_sums: dict, eps: float) -> torch.Tensor:
    """SI per unit from {class: sum [U]} over the classes present, as the published scripts do."""
    acts = torch.stack([class_sums[k] for k in sorted(class_sums)]).t()  # [U, P]
    u_max = acts.max(1)[0]
    u_rest = (acts.sum(1) - u_max) / (acts.shape[1] - 1)
    return (u_max - u_rest) / (u_max + u_rest + eps)


def published_dataset_selectivity(batches, transform=None, eps: float = 1e-6) -> torch.Tensor:
    """Dataset-level SI of one layer as Ranadive et al.'s analysis scripts compute it.

    ``batches`` yields ``(activation [N, U, ...], labels [N])``. Every sample's unit means are
    (with ``transform="abs"`` / ``"relu"``) transformed, then added one sample at a time into a dict
    of per-class sums; SI comes from those sums (not means) over the classes seen. NaN when only one
    class was seen.
    """
    class_sums: dict = {}
    for x, labels in batches:
        act = _published_unit_means(x)
        for i in range(act.shape[0]):
            a = act[i]
            if transform == "abs":
                a = torch.abs(a)
            elif transform == "relu":
                a = torch.relu(a)
            k = int(labels[i])
            class_sums[k] = a.clone() if k not in class_sums else class_sums[k] + a
    return _published_si_from_sums(class_sums, eps)


def published_grouped_penalty(
    activations: Sequence[torch.Tensor], labels: torch.Tensor, groups, alpha: float, eps: float = 1e-6
) -> torch.Tensor:
    """The published training regularizer: -alpha * mean over groups of the mean over all units of
    the group's layers of the batch SI from per-class sums (loss = CE + this). Differentiable."""
    layer_si = []
    for x in activations:
        act = _published_unit_means(x)
        class_sums: dict = {}
        for i in range(act.shape[0]):
            k = int(labels[i])
            class_sums[k] = act[i] if k not in class_sums else class_sums[k] + act[i]
        layer_si.append(_published_si_from_sums(class_sums, eps))
    group_si = []
    for g in groups:
        pooled = [u for i in g for u in layer_si[i]]
        group_si.append(sum(pooled) / len(pooled))
    return -alpha * (sum(group_si) / len(group_si))


def class_means_reference(
    x: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorized class means [K, C] and counts [K], computed in x's dtype (float32 for half types)."""
    act = spatial_mean(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x)
    keep = labels != ignore_index
    act, lab = act[keep], labels[keep].long()
    sums = act.new_zeros((num_classes, act.shape[1])).index_add(0, lab, act)
    counts = torch.bincount(lab, minlength=num_classes)
    means = sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)
    return means, counts


def selectivity_from_means_reference(means: torch.Tensor, counts: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Vectorized SI over the present classes; 0 where fewer than two are present."""
    present = (counts > 0).unsqueeze(1)
    num_present = present.sum(0).to(means.dtype)
    mu_max = torch.where(present, means, torch.full_like(means, float("-inf"))).max(0)[0]
    total = torch.where(present, means, torch.zeros_like(means)).sum(0)
    enough = num_present >= 2
    mu_max = torch.where(enough, mu_max, torch.zeros_like(mu_max))
    mu_rest = (total - mu_max) / (num_present - 1).clamp_min(1)
    si = (mu_max - mu_rest) / (mu_max + mu_rest + eps)
    return torch.where(enough, si, torch.zeros_like(si))


def selectivity_index_reference(
    x: torch.Tensor, labels: torch.Tensor, num_classes: int, eps: float = 1e-7, ignore_index: int = -100
) -> torch.Tensor:
    means, counts = class_means_reference(x, labels, num_classes, ignore_index)
    return selectivity_from_means_reference(means, counts, eps)


def spectral_penalty_reference(h: torch.Tensor, V: torch.Tensor, slope: float = 1.0, tau: int = 10) -> torch.Tensor:
    """1/n spectral penalty (Nassar et al., NeurIPS 2020), literally from its definition.

    Centre h [N, D] on its batch mean, form the batch covariance C_b = X^T X / (N - 1), project it on
    the eigenbasis V (diag(V^T C_b V)), sort descending; anchor b = lambda_hat[tau] (tau + 1)^slope
    (detached), target gamma_n = b / (n + 1)^slope (0-based n), and sum over n > tau with
    lambda_hat_n > 0 of (lambda_hat_n / gamma_n - 1)^2 + relu(lambda_hat_n / gamma_n - 1), over D.
    Returns 0 when N < 2 or D <= tau + 1 (no variance, or no rank above the anchor).

    "lambda_hat_n > 0" is tested against the rounding floor D * eps * lambda_hat_0: in a
    rank-deficient batch (N - 1 < D, or a low-rank layer) the variances that are exactly zero come
    out of V^T C_b V as rounding noise of either sign, and counting the positive ones would add an
    arbitrary multiple of 1 / D to the loss (differently on CPU and GPU).
    """
    n_samples, dim = h.shape
    if n_samples < 2 or dim <= tau + 1:
        return (h.sum() * 0).to(torch.float64 if h.dtype == torch.float64 else torch.float32)
    x = h.to(V.dtype)
    x = x - x.mean(0, keepdim=True)
    cov = x.t() @ x / (n_samples - 1)
    lam = torch.diagonal(V.t() @ cov @ V)
    lam, _ = torch.sort(lam, descending=True, stable=True)
    anchor = (lam[tau] * (tau + 1) ** slope).detach()
    ranks = torch.arange(dim, device=h.device, dtype=lam.dtype)
    gamma = anchor / (ranks + 1) ** slope
    floor = dim * torch.finfo(lam.dtype).eps * lam[0]
    keep = (ranks > tau) & (lam > floor) & (lam > 0)
    ratio = torch.where(keep, lam / torch.where(keep, gamma, torch.ones_like(gamma)), torch.ones_like(lam))
    terms = (ratio - 1) ** 2 + torch.relu(ratio - 1)
    return torch.where(keep, terms, torch.zeros_like(terms)).sum() / dim
