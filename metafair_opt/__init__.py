"""metafair-opt: fairness-aware meta-optimisation for existing PyTorch training loops.

Wrap the model and optimizer you already have:

* :class:`GradientAlignmentWrapper` (FaAlGrad): each step adapts on a support subgroup and
  back-propagates the query subgroup's loss through that adaptation.
* Split strategies (:mod:`metafair_opt.splits`): :class:`ByGroup`, :class:`ByGroupAndLabel`,
  :class:`Proportion`, :class:`RoundRobin`.
"""

from metafair_opt.alignment import AlignmentResult, GradientAlignmentWrapper
from metafair_opt.splits import ByGroup, ByGroupAndLabel, Proportion, RoundRobin, SplitStrategy

__version__ = "0.1.0"

__all__ = [
    "AlignmentResult",
    "ByGroup",
    "ByGroupAndLabel",
    "GradientAlignmentWrapper",
    "Proportion",
    "RoundRobin",
    "SplitStrategy",
    "__version__",
]
