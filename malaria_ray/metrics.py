"""Confusion matrix, rates and ROC AUC on arrays; positive class Parasitized. Pure numpy."""

from __future__ import annotations

import math

import numpy as np

# Column names of metrics.parquet; shared by writer, reader and tests.
METRIC_COUNTS = ("tp", "fp", "fn", "tn")
METRIC_RATES = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc")


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else math.nan


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUC with midranks for ties; NaN when only one class is present."""
    y = np.asarray(y_true, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # midranks: each run of equal scores gets the mean of its 1-based positions
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(s)]])
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict[str, float | int]:
    """``y_true`` 1 = Parasitized; ``prob`` = P(Parasitized). Counts, rates and AUC in one dict."""
    y = np.asarray(y_true, dtype=bool)
    pred = np.asarray(prob, dtype=np.float64) >= threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    tn = int(np.sum(~pred & ~y))
    precision = _ratio(tp, tp + fp)
    sensitivity = _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "sensitivity": sensitivity,
        "specificity": _ratio(tn, tn + fp),
        "precision": precision,
        "f1": f1,
        "roc_auc": roc_auc(y, prob),
    }


def confusion_matrix(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """2x2 counts, rows = true, cols = predicted, order (Parasitized, Uninfected) as the notebook."""
    m = binary_metrics(y_true, prob, threshold)
    return np.array([[m["tp"], m["fn"]], [m["fp"], m["tn"]]], dtype=np.int64)
