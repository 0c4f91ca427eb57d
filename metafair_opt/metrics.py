"""Fairness and accuracy metrics, computed with fairlearn (one metrics module for the project).

Every figure in our result tables comes from here, so reports agree with fairlearn's
``MetricFrame`` to the last digit. Binary tasks: ``y_true`` and ``y_pred`` hold 0/1 labels and
``groups`` one sensitive-group id per row.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from fairlearn.metrics import (
    MetricFrame,
    count,
    demographic_parity_difference,
    demographic_parity_ratio,
    equalized_odds_difference,
    equalized_odds_ratio,
    false_negative_rate,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from sklearn.metrics import accuracy_score

__all__ = ["BINARY_METRICS", "binary_fairness_report", "by_group", "class_fairness_report"]

#: The columns of :func:`binary_fairness_report`, in order, with what each means.
BINARY_METRICS: dict[str, str] = {
    "accuracy": "fraction of correct predictions",
    "dp_diff": "demographic parity difference (max - min selection rate over groups)",
    "eo_diff": "equalized odds difference (larger of the TPR and FPR differences)",
    "dp_ratio": "demographic parity ratio (min / max selection rate)",
    "eo_ratio": "equalized odds ratio (smaller of the TPR and FPR ratios)",
    "tpr_disparity": "max - min true positive rate over groups (equal opportunity gap)",
    "fpr_disparity": "max - min false positive rate over groups",
    "max_fpr": "largest false positive rate over groups",
    "max_fnr": "largest false negative rate over groups",
}


def _arrays(y_true: Any, y_pred: Any, groups: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arrays = [np.asarray(getattr(a, "cpu", lambda a=a: a)()).reshape(-1)
              for a in (y_true, y_pred, groups)]
    sizes = {a.shape[0] for a in arrays}
    if len(sizes) != 1:
        raise ValueError(
            f"y_true, y_pred and groups must have one entry per row; got sizes "
            f"{[a.shape[0] for a in arrays]}."
        )
    return arrays[0].astype(int), arrays[1].astype(int), arrays[2]


def by_group(y_true: Any, y_pred: Any, groups: Any) -> pd.DataFrame:
    """fairlearn's ``MetricFrame.by_group``: count, selection rate, accuracy, TPR, FPR, FNR."""
    t, p, g = _arrays(y_true, y_pred, groups)
    frame = MetricFrame(
        metrics={
            "count": count,
            "selection_rate": selection_rate,
            "accuracy": accuracy_score,
            "tpr": true_positive_rate,
            "fpr": false_positive_rate,
            "fnr": false_negative_rate,
        },
        y_true=t,
        y_pred=p,
        sensitive_features=g,
    )
    return frame.by_group


def binary_fairness_report(y_true: Any, y_pred: Any, groups: Any) -> dict[str, float]:
    """Accuracy and group-fairness figures of binary predictions (keys: :data:`BINARY_METRICS`)."""
    t, p, g = _arrays(y_true, y_pred, groups)
    rates = MetricFrame(
        metrics={"tpr": true_positive_rate, "fpr": false_positive_rate,
                 "fnr": false_negative_rate},
        y_true=t,
        y_pred=p,
        sensitive_features=g,
    )
    differences = rates.difference(method="between_groups")
    highest = rates.group_max()
    return {
        "accuracy": float(accuracy_score(t, p)),
        "dp_diff": float(demographic_parity_difference(t, p, sensitive_features=g)),
        "eo_diff": float(equalized_odds_difference(t, p, sensitive_features=g)),
        "dp_ratio": float(demographic_parity_ratio(t, p, sensitive_features=g)),
        "eo_ratio": float(equalized_odds_ratio(t, p, sensitive_features=g)),
        "tpr_disparity": float(differences["tpr"]),
        "fpr_disparity": float(differences["fpr"]),
        "max_fpr": float(highest["fpr"]),
        "max_fnr": float(highest["fnr"]),
    }


def class_fairness_report(y_true: Any, y_pred: Any) -> dict[str, float]:
    """Class-based fairness of multi-class predictions (FORML's CIFAR setting).

    The group of a row is its true class, so the TPR of a group is that class's recall:
    ``tpr_disparity`` is max - min recall over classes and ``max_fnr`` is 1 - min recall.
    """
    t, p, _ = _arrays(y_true, y_pred, y_true)
    recall = MetricFrame(metrics=accuracy_score, y_true=t, y_pred=p, sensitive_features=t)
    return {
        "accuracy": float(accuracy_score(t, p)),
        "tpr_disparity": float(recall.difference(method="between_groups")),
        "max_fnr": float(1.0 - recall.group_min()),
    }
