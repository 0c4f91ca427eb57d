"""Post-processing and reference methods for the tabular comparison.

* :func:`group_threshold`: the FaAlGrad paper's threshold adjustment (section 5.2): the
  protected group's decision threshold on the predicted probability is chosen from 0.1 ... 1.0
  (step 0.1) to minimise the validation demographic-parity difference; the other group keeps 0.5.
  It needs the sensitive attribute at prediction time.
* :func:`threshold_optimizer`: fairlearn's ``ThresholdOptimizer`` (demographic parity) on the
  same scores, fitted on the validation split; also needs the attribute at prediction time.
* :func:`exponentiated_gradient`: fairlearn's ``ExponentiatedGradient`` reduction with a
  logistic regression under a demographic-parity constraint; predicts without the attribute.
"""

from __future__ import annotations

import numpy as np
from fairlearn.postprocessing import ThresholdOptimizer
from fairlearn.reductions import DemographicParity, ExponentiatedGradient
from metafair_opt.integrations.tabular.training import Splits
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression

from metafair_opt.metrics import binary_fairness_report

__all__ = [
    "THRESHOLDS",
    "exponentiated_gradient",
    "group_threshold",
    "probabilities",
    "threshold_optimizer",
    "threshold_predictions",
]

THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(1, 11))


def probabilities(scores: np.ndarray) -> np.ndarray:
    """Logit scores to probabilities."""
    return 1.0 / (1.0 + np.exp(-scores))


def threshold_predictions(prob: np.ndarray, group: np.ndarray, protected_threshold: float,
                           protected: int = 1) -> np.ndarray:
    """1 where ``prob`` reaches the row's threshold: ``protected_threshold`` for the protected
    group, 0.5 for everyone else."""
    threshold = np.where(group == protected, protected_threshold, 0.5)
    return (prob >= threshold).astype(int)


def group_threshold(val_scores: np.ndarray, test_scores: np.ndarray, data: Splits
                    ) -> tuple[np.ndarray, float]:
    """Test predictions with the protected group's threshold that minimises validation DP diff.

    Ties are broken towards higher validation accuracy. Returns the predictions and the chosen
    threshold.
    """
    y_val, g_val = data.y["val"].numpy(), data.group["val"].numpy()
    prob_val = probabilities(val_scores)
    best: tuple[float, float, float] | None = None
    for t in THRESHOLDS:
        report = binary_fairness_report(y_val, threshold_predictions(prob_val, g_val, t), g_val)
        key = (report["dp_diff"], -report["accuracy"], t)
        if best is None or key < best:
            best = key
    assert best is not None
    chosen = best[2]
    test_groups = data.group["test"].numpy()
    return threshold_predictions(probabilities(test_scores), test_groups, chosen), chosen


class _ScoreColumn(ClassifierMixin, BaseEstimator):
    """A fitted 'estimator' whose input is already its score: lets ThresholdOptimizer use our
    network's scores without refitting anything."""

    def __init__(self) -> None:
        self.fitted_ = True

    def fit(self, X, y, **kwargs):  # pragma: no cover - prefit, never called
        return self

    def decision_function(self, X) -> np.ndarray:
        return np.asarray(X)[:, 0]

    def predict(self, X) -> np.ndarray:
        return (np.asarray(X)[:, 0] > 0).astype(int)


def threshold_optimizer(val_scores: np.ndarray, test_scores: np.ndarray, data: Splits,
                        seed: int) -> np.ndarray:
    """fairlearn ``ThresholdOptimizer`` (demographic parity, accuracy objective) predictions."""
    optimizer = ThresholdOptimizer(estimator=_ScoreColumn(), constraints="demographic_parity",
                                   prefit=True, predict_method="decision_function")
    optimizer.fit(val_scores[:, None].astype(np.float64), data.y["val"].numpy(),
                  sensitive_features=data.group["val"].numpy())
    return np.asarray(optimizer.predict(test_scores[:, None].astype(np.float64),
                                        sensitive_features=data.group["test"].numpy(),
                                        random_state=seed)).astype(int)


def exponentiated_gradient(data: Splits, seed: int) -> np.ndarray:
    """fairlearn ``ExponentiatedGradient`` (logistic regression, demographic parity)."""
    reduction = ExponentiatedGradient(LogisticRegression(max_iter=1000),
                                      constraints=DemographicParity(), eps=0.01)
    reduction.fit(data.x["train"].numpy(), data.y["train"].numpy(),
                  sensitive_features=data.group["train"].numpy())
    return np.asarray(reduction.predict(data.x["test"].numpy(), random_state=seed)).astype(int)
