"""Fairness meta-losses for SampleReweighter (FORML, sections 3.1, 4 and appendix 7.1).

A meta-loss maps per-sample validation losses and their group ids to one differentiable scalar:
``meta_loss(losses, groups) -> Tensor``. For class-based fairness (CIFAR in the paper) pass the
class label as the group.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "META_LOSSES",
    "MetaLoss",
    "cross_entropy",
    "group_mean_losses",
    "max_loss_discrepancy",
    "mean_loss_discrepancy",
    "resolve_meta_loss",
]

MetaLoss = Callable[[Tensor, Tensor], Tensor]


def group_mean_losses(losses: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct group ids (sorted) and the mean loss of each, differentiable in ``losses``."""
    ids, inverse, counts = torch.unique(groups, sorted=True, return_inverse=True,
                                        return_counts=True)
    sums = torch.zeros(ids.numel(), dtype=losses.dtype, device=losses.device)
    sums = sums.index_add(0, inverse.to(losses.device), losses)
    return ids, sums / counts.to(losses.device, losses.dtype)


def _max_from_means(means: Tensor, losses: Tensor) -> Tensor:
    return means.max() - means.min()


def _mean_from_means(means: Tensor, losses: Tensor) -> Tensor:
    return (means - losses.mean()).abs().mean()


def max_loss_discrepancy(losses: Tensor, groups: Tensor) -> Tensor:
    """Max over groups of the group mean loss minus the min over groups (FORML's MaxLossD)."""
    return _max_from_means(group_mean_losses(losses, groups)[1], losses)


def mean_loss_discrepancy(losses: Tensor, groups: Tensor) -> Tensor:
    """Mean over groups of |group mean loss - overall mean loss| (FORML's MeanLossD)."""
    return _mean_from_means(group_mean_losses(losses, groups)[1], losses)


def cross_entropy(losses: Tensor, groups: Tensor) -> Tensor:
    """The plain mean validation loss (appendix 7.1's "cross entropy" meta-loss ablation).

    It is the cross-entropy when the reweighter's ``loss_fn`` is a cross-entropy; ``groups`` is
    ignored, so it does not target fairness.
    """
    del groups
    return losses.mean()


#: Named meta-losses: the function, whether it needs at least two groups in the validation
#: batch, and the same function on precomputed group means (losses, groups -> means are shared
#: with the step's report, so the reweighter computes them once).
META_LOSSES: dict[str, tuple[MetaLoss, bool, Callable[[Tensor, Tensor], Tensor] | None]] = {
    "max_loss_discrepancy": (max_loss_discrepancy, True, _max_from_means),
    "mean_loss_discrepancy": (mean_loss_discrepancy, True, _mean_from_means),
    "cross_entropy": (cross_entropy, False, lambda means, losses: losses.mean()),
}


def resolve_meta_loss(
    meta_loss: str | MetaLoss,
) -> tuple[MetaLoss, bool, str, Callable[[Tensor, Tensor], Tensor] | None]:
    """The callable for ``meta_loss``, whether it needs two groups, a display name, and its
    form on group means (None for a user's callable)."""
    if callable(meta_loss):
        name = getattr(meta_loss, "__name__", type(meta_loss).__name__)
        return meta_loss, False, name, None
    if meta_loss not in META_LOSSES:
        raise ValueError(
            f"Unknown meta_loss {meta_loss!r}; use one of {sorted(META_LOSSES)} or a "
            "callable(losses, groups) -> scalar tensor."
        )
    fn, needs_groups, from_means = META_LOSSES[meta_loss]
    return fn, needs_groups, meta_loss, from_means
