"""Confusion-matrix metrics against scikit-learn (pure)."""

import math

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

from malaria_ray import metrics


def test_binary_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.random(500) < 0.4
    p = np.clip(y * 0.3 + rng.random(500) * 0.7, 0, 1).round(2)  # ties on purpose
    m = metrics.binary_metrics(y, p, threshold=0.5)
    tn, fp, fn, tp = confusion_matrix(y, p >= 0.5).ravel()
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (tp, fp, fn, tn)
    assert m["tp"] + m["fp"] + m["fn"] + m["tn"] == 500
    assert math.isclose(m["f1"], f1_score(y, p >= 0.5))
    assert math.isclose(m["roc_auc"], roc_auc_score(y, p))
    assert math.isclose(m["sensitivity"], tp / (tp + fn))
    assert math.isclose(m["specificity"], tn / (tn + fp))


def test_single_class_auc_is_nan_and_matrix_layout():
    assert math.isnan(metrics.roc_auc(np.ones(3, bool), np.array([0.1, 0.5, 0.9])))
    cm = metrics.confusion_matrix(np.array([1, 1, 0, 0]), np.array([0.9, 0.1, 0.8, 0.2]))
    assert cm.tolist() == [[1, 1], [1, 1]]
