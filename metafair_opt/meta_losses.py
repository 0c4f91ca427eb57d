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
    ids, inverse = torch.unique(groups, sorted=True, return_inverse=True)
    sums = torch.zeros(ids.numel(), dtype=losses.dtype, device=losses.device)
    sums = sums.index_add(0, inverse.to(losses.device), losses)
    counts = torch.bincount(inverse, minlength=ids.numel()).to(losses.dtype).to(losses.device)
    return ids, sums / counts


def max_loss_discrepancy(losses: Tensor, groups: Tensor) -> Tensor:
    """Max over groups of the group mean loss minus the min over groups (FORML's MaxLossD)."""
    _, means = group_mean_losses(losses, groups)
    return means.max() - means.min()


def mean_loss_discrepancy(losses: Tensor, groups: Tensor) -> Tensor:
    """Mean over groups of |group mean loss - overall mean loss| (FORML's MeanLossD)."""
    _, means = group_mean_losses(losses, groups)
    return (means - losses.mean()).abs().mean()


def cross_entropy(losses: Tensor, groups: Tensor) -> Tensor:
    """The plain mean validation loss (appendix 7.1's "cross entropy" meta-loss ablation).

    It is the cross-entropy when the reweighter's ``loss_fn`` is a cross-entropy; ``groups`` is
    ignored, so it does not target fairness.
    """
    del groups
    return losses.mean()


#: Named meta-losses, and whether each needs at least two groups in the validation batch.
META_LOSSES: dict[str, tuple[MetaLoss, bool]] = {
    "max_loss_discrepancy": (max_loss_discrepancy, True),
    "mean_loss_discrepancy": (mean_loss_discrepancy, True),
    "cross_entropy": (cross_entropy, False),
}


def resolve_meta_loss(meta_loss: str | MetaLoss) -> tuple[MetaLoss, bool, str]:
    """The callable for ``meta_loss``, whether it needs two groups, and a display name."""
    if callable(meta_loss):
        return meta_loss, False, getattr(meta_loss, "__name__", type(meta_loss).__name__)
    if meta_loss not in META_LOSSES:
        raise ValueError(
            f"Unknown meta_loss {meta_loss!r}; use one of {sorted(META_LOSSES)} or a "
            "callable(losses, groups) -> scalar tensor."
        )
    fn, needs_groups = META_LOSSES[meta_loss]
    return fn, needs_groups, meta_loss
