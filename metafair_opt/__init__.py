"""metafair-opt: fairness-aware meta-optimisation for existing PyTorch training loops.

Wrap the model and optimizer you already have:

* :class:`GradientAlignmentWrapper` (FaAlGrad): each step adapts on a support subgroup and
  back-propagates the query subgroup's loss through that adaptation.
* :class:`SampleReweighter` (FORML): one learned weight per training example, updated by a
  fairness meta-loss on a group-balanced validation batch; :class:`IndexedDataset` and
  :class:`GroupBalancedBatchSampler` feed it.
* Split strategies (:mod:`metafair_opt.splits`): :class:`ByGroup`, :class:`ByGroupAndLabel`,
  :class:`Proportion`, :class:`RoundRobin`.
"""

from metafair_opt.alignment import AlignmentResult, GradientAlignmentWrapper
from metafair_opt.data import GroupBalancedBatchSampler, IndexedDataset
from metafair_opt.meta_losses import (
    cross_entropy,
    max_loss_discrepancy,
    mean_loss_discrepancy,
)
from metafair_opt.reweighting import ReweightResult, SampleReweighter
from metafair_opt.splits import ByGroup, ByGroupAndLabel, Proportion, RoundRobin, SplitStrategy

__version__ = "0.1.0"

__all__ = [
    "AlignmentResult",
    "ByGroup",
    "ByGroupAndLabel",
    "GradientAlignmentWrapper",
    "GroupBalancedBatchSampler",
    "IndexedDataset",
    "Proportion",
    "ReweightResult",
    "RoundRobin",
    "SampleReweighter",
    "SplitStrategy",
    "__version__",
    "cross_entropy",
    "max_loss_discrepancy",
    "mean_loss_discrepancy",
]
