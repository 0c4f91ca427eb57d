"""How a batch is split into a support set X_s and a query set X_q (FaAlGrad, sections 4, 5.4-5.6).

Each strategy is a small callable object: ``strategy(y, groups) -> (support_mask, query_mask)``,
two boolean tensors of shape ``(batch,)`` that never overlap. ``y`` is the batch's targets (any
shape with one row per example; ``ByGroupAndLabel`` needs one label per row, ``(B,)`` or
``(B, 1)``); ``groups`` one integer group id per row. Strategies that carry state between calls
(a random generator, a position in a rotation) have ``state_dict``/``load_state_dict`` so a
checkpointed run resumes exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from metafair_opt._functional import batch_size, describe_shape
from metafair_opt._random import seeded_generator

__all__ = [
    "ByGroup",
    "ByGroupAndLabel",
    "Proportion",
    "RoundRobin",
    "SplitStrategy",
    "as_row_vector",
]


@runtime_checkable
class SplitStrategy(Protocol):
    """Anything that maps ``(y, groups)`` to non-overlapping boolean ``(support, query)`` masks."""

    def __call__(self, y: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]: ...


def as_row_vector(values: Any, name: str, rows: int | None = None) -> Tensor:
    """``values`` as a 1-D tensor with one entry per row; accepts ``(B,)`` or ``(B, 1)``."""
    t = torch.as_tensor(values)
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 1:
        raise ValueError(
            f"{name} must hold one value per row, shape (batch,) or (batch, 1); got shape "
            f"{tuple(t.shape)}."
        )
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} has {t.shape[0]} rows but the batch has {rows}.")
    return t


def _checked_groups(y: Any, groups: Tensor) -> Tensor:
    """``groups`` as a row vector, after checking that ``y`` (any batch) has as many rows."""
    g = as_row_vector(groups, "groups")
    rows = batch_size(y, "y")
    if rows != g.shape[0]:
        raise ValueError(
            f"y and groups have different batch sizes: y has shape {describe_shape(y)} and "
            f"groups has shape {tuple(g.shape)}."
        )
    return g


def _checked(y: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """One label per row (on the groups' device) and the group ids."""
    g = _checked_groups(y, groups)
    return as_row_vector(y, "y").to(g.device), g


@dataclass
class ByGroup:
    """Config 1 of the paper: X_s = rows of ``support_group``, X_q = every other row.

    ``ByGroup(support_group=1)`` puts the protected group in the inner loop; passing the other
    group gives the swapped variant of section 5.6.
    """

    support_group: int = 1

    def __call__(self, y: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
        g = _checked_groups(y, groups)
        support = g == self.support_group
        return support, ~support


@dataclass
class ByGroupAndLabel:
    """Config 2 of the paper: X_s = the listed ``(group, label)`` cells, X_q = all other rows."""

    support_cells: Sequence[tuple[int, int]] = ((1, 0), (0, 1))

    def __post_init__(self) -> None:
        cells = [tuple(c) for c in self.support_cells]
        if not cells or any(len(c) != 2 for c in cells):
            raise ValueError(
                "support_cells must be a non-empty list of (group, label) pairs, e.g. "
                f"[(1, 0), (0, 1)]; got {self.support_cells!r}."
            )
        self.support_cells = [(int(g), int(lab)) for g, lab in cells]

    def __call__(self, y: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
        labels, g = _checked(y, groups)
        support = torch.zeros(g.shape[0], dtype=torch.bool, device=g.device)
        for group, label in self.support_cells:
            support |= (g == group) & (labels == label)
        return support, ~support


@dataclass
class Proportion:
    """Section 5.5: X_s is ``support_fraction`` of the batch, drawn from ``support_group`` only.

    X_q holds the remaining rows of the support group and every other row. The paper's X_q:X_s
    ratios 80:20 ... 50:50 are ``support_fraction`` 0.2 ... 0.5. The draw is random and seeded.
    A batch whose support group is too small for the fraction raises a ValueError, unless
    ``strict=False``: then X_s takes every row of the support group that the batch has, and
    ``clipped`` counts those batches.
    """

    support_fraction: float
    support_group: int = 1
    seed: int | None = None
    strict: bool = True
    clipped: int = field(default=0, init=False, compare=False)
    _generator: torch.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.support_fraction < 1.0:
            raise ValueError(
                f"support_fraction must lie strictly between 0 and 1; got {self.support_fraction}."
            )
        self._generator = seeded_generator(self.seed)

    def __call__(self, y: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
        g = _checked_groups(y, groups)
        n_support = round(self.support_fraction * g.shape[0])
        candidates = torch.nonzero(g == self.support_group).flatten()
        if n_support > candidates.numel() and not self.strict:
            n_support = candidates.numel()
            self.clipped += 1
        if n_support > candidates.numel():
            raise ValueError(
                f"Proportion(support_fraction={self.support_fraction}) needs {n_support} of the "
                f"{g.shape[0]} rows from group {self.support_group}, but the batch holds only "
                f"{candidates.numel()} such rows. Lower support_fraction (at most "
                f"{candidates.numel() / max(g.shape[0], 1):.3f} here) or sample batches with more "
                f"rows of group {self.support_group}."
            )
        order = torch.randperm(candidates.numel(), generator=self._generator)
        chosen = candidates[order[:n_support].to(candidates.device)]
        support = torch.zeros(g.shape[0], dtype=torch.bool, device=g.device)
        support[chosen] = True
        return support, ~support

    def state_dict(self) -> dict[str, Any]:
        """The random generator's state, so a resumed run draws the same splits."""
        return {"generator": self._generator.get_state(), "clipped": self.clipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the generator state saved by :meth:`state_dict`."""
        self._generator.set_state(state["generator"])
        self.clipped = int(state.get("clipped", 0))


@dataclass
class RoundRobin:
    """Beyond the paper: each call uses the next group of ``groups`` as X_s and the rest as X_q.

    Works with any number of groups, including intersectional group ids.
    """

    groups: Sequence[int]
    position: int = 0

    def __post_init__(self) -> None:
        self.groups = [int(g) for g in self.groups]
        if len(self.groups) < 2:
            raise ValueError(
                f"RoundRobin needs at least two groups to rotate through; got {self.groups}."
            )

    def __call__(self, y: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
        g = _checked_groups(y, groups)
        current = self.groups[self.position % len(self.groups)]
        self.position = (self.position + 1) % len(self.groups)
        support = g == current
        return support, ~support

    def state_dict(self) -> dict[str, Any]:
        """The position in the rotation."""
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position saved by :meth:`state_dict`."""
        self.position = int(state["position"])
