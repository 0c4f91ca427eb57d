"""Dataset and sampler helpers that feed the meta-optimisers.

* :class:`IndexedDataset` makes every item ``(x, y, group, index)``, so a batch carries the
  dataset indices that :class:`~metafair_opt.SampleReweighter` uses to address its weight table.
* :class:`GroupBalancedBatchSampler` yields batches that hold at least ``min_per_group`` rows of
  every group: the validation batches of a discrepancy meta-loss, or training batches that never
  leave a FaAlGrad subgroup empty.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from metafair_opt._random import seeded_generator

__all__ = ["GroupBalancedBatchSampler", "IndexedDataset"]


class IndexedDataset(Dataset):
    """Wraps a map-style dataset so items become ``(x, y, group, index)``.

    ``base`` items are either ``(x, y, group)`` or ``(x, y)``; in the second case pass
    ``groups``, a sequence with one group id per item. ``index`` is the item's position in
    ``base``: the row of the reweighter's weight table that belongs to it.
    """

    def __init__(self, base: Dataset, groups: Sequence[int] | torch.Tensor | None = None) -> None:
        self.base = base
        size = len(base)  # type: ignore[arg-type]
        if groups is not None:
            groups = torch.as_tensor(groups).reshape(-1)
            if groups.numel() != size:
                raise ValueError(
                    f"groups has {groups.numel()} entries but the dataset has {size} items: "
                    "pass one group id per item."
                )
        self._groups = groups

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any, Any, int]:
        item = self.base[index]
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise TypeError(
                "IndexedDataset expects base items (x, y) or (x, y, group); item "
                f"{index} is a {type(item).__name__}"
                + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
                + "."
            )
        if len(item) == 3:
            x, y, group = item
        elif self._groups is None:
            raise ValueError(
                "The base dataset yields (x, y) items, so IndexedDataset needs groups=: one "
                "group id per item."
            )
        else:
            (x, y), group = item, self._groups[index]
        return x, y, group, index

    @property
    def groups(self) -> torch.Tensor:
        """One group id per item (read from the items once when not given)."""
        if self._groups is None:
            self._groups = torch.as_tensor(
                [int(self.base[i][2]) for i in range(len(self))]  # type: ignore[index]
            )
        return self._groups


class GroupBalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` indices holding at least ``min_per_group`` rows of every group.

    Each batch takes ``min_per_group`` rows from every group (each group is walked through in a
    fresh random order, restarting when exhausted) and fills the rest from a random pass over the
    whole data set, never repeating an index within a batch. An epoch has
    ``ceil(len(groups) / batch_size)`` batches unless ``num_batches`` says otherwise.

    Args:
        groups: one group id per dataset item.
        batch_size: rows per batch.
        min_per_group: the guaranteed rows of every group in every batch.
        num_batches: batches per iteration (default: one pass over the data).
        seed: seeds the sampler's own generator, so runs are reproducible.
        rank, world_size: under torch.distributed, this process's rank and the number of
            processes. Every group's items are dealt out to the ranks in turn (item k of a group
            goes to rank ``k % world_size``), each rank samples only its own share, and every
            rank's batches still hold ``min_per_group`` rows of every group; ``batch_size`` is
            per rank. Each rank draws from its own stream (``seed + rank``).
    """

    def __init__(
        self,
        groups: Sequence[int] | torch.Tensor,
        batch_size: int,
        min_per_group: int = 1,
        num_batches: int | None = None,
        seed: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}); got {rank}.")
        self.rank, self.world_size = int(rank), int(world_size)
        self.groups = torch.as_tensor(groups).reshape(-1).long()
        self.batch_size = int(batch_size)
        self.min_per_group = int(min_per_group)
        n = self.groups.numel()
        if self.world_size > 1:
            self._check_shards(min_per_group)
            # Every rank sizes itself by the smallest share, so all ranks agree on the number
            # of batches and on whether batch_size fits.
            n = self.smallest_share(self.groups, self.world_size)
        if self.batch_size < 1 or self.min_per_group < 1:
            raise ValueError("batch_size and min_per_group must be at least 1.")
        if n < self.batch_size:
            share = " (the smallest rank's share)" if self.world_size > 1 else ""
            raise ValueError(f"batch_size={batch_size} exceeds the data set's {n} items{share}.")
        ids, counts = torch.unique(self.groups, return_counts=True)
        self.group_ids = ids.tolist()
        small = {g: int(c) for g, c in zip(ids.tolist(), counts.tolist()) if c < min_per_group}
        if small:
            raise ValueError(
                f"min_per_group={min_per_group}, but these groups have fewer items in total "
                f"(group: items): {small}. Lower min_per_group or merge those groups."
            )
        if len(self.group_ids) * self.min_per_group > self.batch_size:
            raise ValueError(
                f"{len(self.group_ids)} groups x min_per_group={min_per_group} rows do not fit "
                f"in batch_size={batch_size}; raise batch_size or lower min_per_group."
            )
        self.members = self._shards()
        self.num_batches = num_batches if num_batches is not None else -(-n // self.batch_size)
        self.generator = seeded_generator(None if seed is None else seed + self.rank)

    @staticmethod
    def smallest_share(groups: Sequence[int] | torch.Tensor, world_size: int) -> int:
        """Items of the rank with the fewest when ``groups`` is dealt out to ``world_size``
        ranks group by group (the whole data set for one process)."""
        counts = torch.unique(torch.as_tensor(groups).reshape(-1), return_counts=True)[1]
        return int((counts // int(world_size)).sum())

    def _shards(self) -> dict[int, torch.Tensor]:
        """This rank's items of every group (all of them in a single process)."""
        return {g: torch.nonzero(self.groups == g).flatten()[self.rank::self.world_size]
                for g in torch.unique(self.groups).tolist()}

    def _check_shards(self, min_per_group: int) -> None:
        ids, counts = torch.unique(self.groups, return_counts=True)
        short = {g: int(c) for g, c in zip(ids.tolist(), counts.tolist())
                 if c // self.world_size < min_per_group}
        if short:
            raise ValueError(
                f"With {self.world_size} processes every rank needs min_per_group="
                f"{min_per_group} items of each group, but these groups have too few in total "
                f"(group: items): {short}. Lower min_per_group, use fewer processes, or merge "
                "those groups."
            )

    def __len__(self) -> int:
        return self.num_batches

    def _stream(self, members: torch.Tensor) -> Iterator[int]:
        while True:
            yield from members[torch.randperm(members.numel(), generator=self.generator)].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        per_group = {g: self._stream(m) for g, m in self.members.items()}
        everyone = self._stream(torch.arange(self.groups.numel()) if self.world_size == 1
                                else torch.sort(torch.cat(list(self.members.values())))[0])
        for _ in range(self.num_batches):
            batch: list[int] = []
            chosen: set[int] = set()
            for g in self.group_ids:
                taken = 0
                while taken < self.min_per_group:
                    i = next(per_group[g])
                    if i not in chosen:
                        chosen.add(i)
                        batch.append(i)
                        taken += 1
            while len(batch) < self.batch_size:
                i = next(everyone)
                if i not in chosen:
                    chosen.add(i)
                    batch.append(i)
            yield batch
