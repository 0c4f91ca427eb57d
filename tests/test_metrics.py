"""The metrics module against figures computed by hand with numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metafair_opt.metrics import BINARY_METRICS, binary_fairness_report, by_group


def hand_rates(t: np.ndarray, p: np.ndarray, g: np.ndarray) -> dict[int, dict[str, float]]:
    rates = {}
    for group in np.unique(g):
        tt, pp = t[g == group], p[g == group]
        rates[int(group)] = {
            "sel": pp.mean(),
            "tpr": pp[tt == 1].mean(),
            "fpr": pp[tt == 0].mean(),
            "fnr": 1 - pp[tt == 1].mean(),
        }
    return rates


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_report_matches_hand_computation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 3, 300)
    t = rng.integers(0, 2, 300)
    p = np.where(rng.random(300) < 0.3 + 0.2 * g, 1, 0)
    report = binary_fairness_report(torch.tensor(t), p, g)
    assert list(report) == list(BINARY_METRICS)
    rates = hand_rates(t, p, g)

    def spread(key: str) -> float:
        values = [r[key] for r in rates.values()]
        return max(values) - min(values)

    def ratio(key: str) -> float:
        values = [r[key] for r in rates.values()]
        return min(values) / max(values)

    assert report["accuracy"] == pytest.approx((t == p).mean(), abs=1e-12)
    assert report["dp_diff"] == pytest.approx(spread("sel"), abs=1e-12)
    assert report["eo_diff"] == pytest.approx(max(spread("tpr"), spread("fpr")), abs=1e-12)
    assert report["dp_ratio"] == pytest.approx(ratio("sel"), abs=1e-12)
    assert report["eo_ratio"] == pytest.approx(min(ratio("tpr"), ratio("fpr")), abs=1e-12)
    assert report["tpr_disparity"] == pytest.approx(spread("tpr"), abs=1e-12)
    assert report["fpr_disparity"] == pytest.approx(spread("fpr"), abs=1e-12)
    assert report["max_fpr"] == pytest.approx(max(r["fpr"] for r in rates.values()), abs=1e-12)
    assert report["max_fnr"] == pytest.approx(max(r["fnr"] for r in rates.values()), abs=1e-12)


def test_by_group_table() -> None:
    t = np.array([1, 1, 0, 0, 1, 0, 1, 0])
    p = np.array([1, 0, 0, 1, 1, 1, 1, 0])
    g = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    table = by_group(t, p, g)
    assert table.loc[0, "count"] == 4
    assert table.loc[0, "tpr"] == pytest.approx(0.5)
    assert table.loc[1, "fpr"] == pytest.approx(0.5)
    assert table.loc[1, "accuracy"] == pytest.approx(0.75)


def test_length_mismatch_is_reported() -> None:
    with pytest.raises(ValueError, match=r"one entry per row; got sizes \[3, 2, 3\]"):
        binary_fairness_report([0, 1, 1], [0, 1], [0, 0, 1])


def test_class_fairness_report_by_hand() -> None:
    from metafair_opt.metrics import class_fairness_report

    t = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    p = np.array([0, 0, 0, 1, 1, 0, 2, 2, 2, 2])
    # recalls: class 0 0.75, class 1 0.5, class 2 1.0
    report = class_fairness_report(t, p)
    assert report["accuracy"] == pytest.approx(0.8)
    assert report["tpr_disparity"] == pytest.approx(0.5)
    assert report["max_fnr"] == pytest.approx(0.5)
