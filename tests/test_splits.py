"""Split strategies on hand-made (y, groups) tensors."""

from __future__ import annotations

import pytest
import torch

from metafair_opt import ByGroup, ByGroupAndLabel, Proportion, RoundRobin

#            row:   0  1  2  3  4  5  6  7  8  9
GROUPS = torch.tensor([1, 0, 1, 0, 0, 1, 0, 0, 1, 0])
LABELS = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 0])


def rows(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).flatten().tolist()


def test_by_group_and_its_swap() -> None:
    support, query = ByGroup(support_group=1)(LABELS, GROUPS)
    assert rows(support) == [0, 2, 5, 8]
    assert rows(query) == [1, 3, 4, 6, 7, 9]
    swapped_support, swapped_query = ByGroup(support_group=0)(LABELS, GROUPS)
    assert torch.equal(swapped_support, query) and torch.equal(swapped_query, support)


def test_by_group_accepts_column_vectors_and_float_targets() -> None:
    support, _ = ByGroup(1)(LABELS.float().unsqueeze(1), GROUPS.unsqueeze(1))
    assert rows(support) == [0, 2, 5, 8]


def test_by_group_and_label_config_2() -> None:
    # support = protected negatives (1, 0) and unprotected positives (0, 1)
    support, query = ByGroupAndLabel(support_cells=[(1, 0), (0, 1)])(LABELS.float(), GROUPS)
    assert rows(support) == [0, 1, 4, 5, 7]
    assert rows(query) == [2, 3, 6, 8, 9]
    assert not (support & query).any() and bool((support | query).all())


def test_by_group_and_label_rejects_malformed_cells() -> None:
    with pytest.raises(ValueError, match=r"support_cells must be a non-empty list of \(group, "
                                         r"label\) pairs"):
        ByGroupAndLabel(support_cells=[(1, 0, 2)])


def test_proportion_takes_the_fraction_from_the_support_group_only() -> None:
    groups = torch.tensor([1] * 6 + [0] * 14)
    split = Proportion(support_fraction=0.2, support_group=1, seed=0)
    support, query = split(torch.zeros(20), groups)
    assert int(support.sum()) == 4  # 20 % of 20 rows
    assert bool((groups[support] == 1).all())
    assert int((query & (groups == 1)).sum()) == 2  # the rest of group 1 is in X_q
    assert int((query & (groups == 0)).sum()) == 14
    assert not (support & query).any()


def test_proportion_is_seeded_and_varies_between_calls() -> None:
    groups = torch.tensor([1] * 10 + [0] * 10)
    a, b = Proportion(0.25, seed=7), Proportion(0.25, seed=7)
    first_a, first_b = a(torch.zeros(20), groups)[0], b(torch.zeros(20), groups)[0]
    assert torch.equal(first_a, first_b)
    draws = {tuple(rows(a(torch.zeros(20), groups)[0])) for _ in range(10)}
    assert len(draws) > 1


def test_proportion_state_round_trip() -> None:
    groups = torch.tensor([1] * 10 + [0] * 10)
    a = Proportion(0.25, seed=1)
    a(torch.zeros(20), groups)
    saved = a.state_dict()
    expected = a(torch.zeros(20), groups)[0]
    b = Proportion(0.25, seed=99)
    b.load_state_dict(saved)
    assert torch.equal(b(torch.zeros(20), groups)[0], expected)


def test_proportion_larger_than_the_group_is_a_clear_error() -> None:
    groups = torch.tensor([1] * 3 + [0] * 17)
    with pytest.raises(ValueError, match=(
        r"Proportion\(support_fraction=0.5\) needs 10 of the 20 rows from group 1, but the "
        r"batch holds only 3 such rows. Lower support_fraction \(at most 0.150 here\)"
    )):
        Proportion(0.5, seed=0)(torch.zeros(20), groups)
    lenient = Proportion(0.5, seed=0, strict=False)
    relaxed, _ = lenient(torch.zeros(20), groups)
    assert rows(relaxed) == [0, 1, 2] and lenient.clipped == 1
    with pytest.raises(ValueError, match="support_fraction must lie strictly between 0 and 1"):
        Proportion(1.5)


def test_round_robin_cycles_through_groups_and_checkpoints() -> None:
    groups = torch.tensor([0, 1, 2, 0, 1, 2])
    split = RoundRobin(groups=[0, 1, 2])
    supports = [rows(split(torch.zeros(6), groups)[0]) for _ in range(4)]
    assert supports == [[0, 3], [1, 4], [2, 5], [0, 3]]
    resumed = RoundRobin(groups=[0, 1, 2])
    resumed.load_state_dict(split.state_dict())
    assert rows(resumed(torch.zeros(6), groups)[0]) == [1, 4]
    with pytest.raises(ValueError, match="RoundRobin needs at least two groups"):
        RoundRobin(groups=[1])


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"groups must hold one value per row, shape \(batch,\) "
                                         r"or \(batch, 1\); got shape \(2, 5\)"):
        ByGroup()(LABELS, GROUPS.reshape(2, 5))
    with pytest.raises(ValueError, match=r"y and groups have different batch sizes"):
        ByGroup()(LABELS[:4], GROUPS)
