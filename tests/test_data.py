"""IndexedDataset and GroupBalancedBatchSampler."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from metafair_opt import GroupBalancedBatchSampler, IndexedDataset


def test_indexed_dataset_with_group_items() -> None:
    x, y, g = torch.randn(6, 2), torch.arange(6), torch.tensor([0, 1, 0, 1, 1, 0])
    ds = IndexedDataset(TensorDataset(x, y, g))
    xi, yi, gi, index = ds[4]
    assert torch.equal(xi, x[4]) and int(yi) == 4 and int(gi) == 1 and index == 4
    assert ds.groups.tolist() == g.tolist()
    xb, _, gb, ib = next(iter(DataLoader(ds, batch_size=6, shuffle=False)))
    assert torch.equal(xb, x)
    assert ib.tolist() == list(range(6)) and torch.equal(gb, g)


def test_indexed_dataset_with_separate_groups() -> None:
    ds = IndexedDataset(TensorDataset(torch.randn(4, 2), torch.arange(4)), groups=[1, 0, 0, 1])
    assert ds[3][2:] == (torch.tensor(1), 3)
    with pytest.raises(ValueError, match="groups has 3 entries but the dataset has 4 items"):
        IndexedDataset(TensorDataset(torch.randn(4, 2), torch.arange(4)), groups=[1, 0, 0])
    bare = IndexedDataset(TensorDataset(torch.randn(4, 2), torch.arange(4)))
    with pytest.raises(ValueError, match=r"yields \(x, y\) items, so IndexedDataset needs groups="):
        bare[0]


def test_balanced_sampler_guarantees_every_group_in_every_batch() -> None:
    groups = torch.tensor([0] * 90 + [1] * 7 + [2] * 3)
    sampler = GroupBalancedBatchSampler(groups, batch_size=16, min_per_group=2, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 7  # ceil(100 / 16)
    for batch in batches:
        assert len(batch) == 16 and len(set(batch)) == 16
        counts = Counter(int(groups[i]) for i in batch)
        assert all(counts[g] >= 2 for g in (0, 1, 2))
    # every member of the small groups is visited (each group is walked in shuffled passes)
    seen = {i for batch in batches for i in batch}
    assert set(range(90, 100)) <= seen


def test_balanced_sampler_is_seeded() -> None:
    groups = torch.tensor([0, 1] * 20)
    a = list(GroupBalancedBatchSampler(groups, batch_size=8, min_per_group=3, seed=5))
    b = list(GroupBalancedBatchSampler(groups, batch_size=8, min_per_group=3, seed=5))
    c = list(GroupBalancedBatchSampler(groups, batch_size=8, min_per_group=3, seed=6))
    assert a == b and a != c


def test_balanced_sampler_with_a_dataloader_and_num_batches() -> None:
    groups = torch.tensor([0] * 30 + [1] * 5)
    ds = TensorDataset(torch.randn(35, 3), torch.zeros(35), groups)
    loader = DataLoader(ds, batch_sampler=GroupBalancedBatchSampler(groups, 10, 4, num_batches=3,
                                                                    seed=1))
    batches = [g for _, _, g in loader]
    assert len(batches) == 3
    assert all(int((g == 1).sum()) >= 4 for g in batches)


def test_balanced_sampler_errors() -> None:
    groups = torch.tensor([0] * 20 + [1] * 3)
    with pytest.raises(ValueError, match=r"min_per_group=5, but these groups have fewer items in "
                                         r"total \(group: items\): \{1: 3\}"):
        GroupBalancedBatchSampler(groups, batch_size=12, min_per_group=5)
    with pytest.raises(ValueError, match=r"2 groups x min_per_group=3 rows do not fit in "
                                         r"batch_size=5"):
        GroupBalancedBatchSampler(groups, batch_size=5, min_per_group=3)
    with pytest.raises(ValueError, match="batch_size=30 exceeds the data set's 23 items"):
        GroupBalancedBatchSampler(groups, batch_size=30)


def test_group_balanced_sampler_shards_across_ranks_with_every_group_on_every_rank() -> None:
    groups = torch.tensor([0] * 30 + [1] * 9 + [2] * 21)
    seen = []
    for rank in range(3):
        sampler = GroupBalancedBatchSampler(groups, batch_size=8, min_per_group=2,
                                            num_batches=25, seed=5, rank=rank, world_size=3)
        items: set[int] = set()
        for batch in sampler:
            assert len(batch) == len(set(batch)) == 8
            for g in (0, 1, 2):
                assert int((groups[batch] == g).sum()) >= 2
            items.update(batch)
        seen.append(items)
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert set().union(*seen) == set(range(60))  # 25 batches of 8 cover each rank's 20 items


def test_group_balanced_sampler_refuses_groups_too_small_for_the_world_size() -> None:
    groups = torch.tensor([0] * 30 + [1] * 5)
    with pytest.raises(ValueError, match=r"With 3 processes every rank needs min_per_group=2 "
                                         r"items of each group, but these groups have too few "
                                         r"in total \(group: items\): \{1: 5\}"):
        GroupBalancedBatchSampler(groups, batch_size=8, min_per_group=2, rank=0, world_size=3)
    with pytest.raises(ValueError, match=r"rank must lie in \[0, world_size=2\); got 2"):
        GroupBalancedBatchSampler(groups, batch_size=8, rank=2, world_size=2)


def test_group_balanced_sampler_ranks_agree_on_length_when_shares_are_uneven() -> None:
    groups = torch.tensor([0] * 5 + [1] * 5)  # shares of 6 and 4 items
    lengths = {len(GroupBalancedBatchSampler(groups, batch_size=2, rank=r, world_size=2))
               for r in range(2)}
    assert lengths == {2}  # from the smallest share, so no rank steps alone
    assert GroupBalancedBatchSampler.smallest_share(groups, 2) == 4
    for rank in range(2):  # both ranks refuse a batch the smallest share cannot fill
        with pytest.raises(ValueError, match=r"batch_size=5 exceeds the data set's 4 items "
                                             r"\(the smallest rank's share\)"):
            GroupBalancedBatchSampler(groups, batch_size=5, rank=rank, world_size=2)
