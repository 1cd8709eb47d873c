"""Confusion matrix, rates and ROC AUC; positive class Parasitized. Pure numpy.

``binary_metrics`` works on whole arrays (training's validation split); ``MetricsAccumulator``
gives the same numbers batch by batch in constant memory (a scoring run of any size). Both derive
the rates from the four counts with ``rates``.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from malaria_ray.config import CLASS_NAMES, DEFAULT_THRESHOLD, POSITIVE_CLASS
from malaria_ray.schema import COL_N_ERRORS, COL_N_IMAGES, COL_N_LABELLED, COL_THRESHOLD, METRIC_COUNTS
AUC_BINS = 1 << 16  # streaming ROC AUC: ties within 1/65536 of probability count as ties


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else math.nan


def rates(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """Every rate of ``METRIC_RATES`` but the AUC, from the confusion counts (NaN where undefined)."""
    return {
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


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


def counts(y_true: np.ndarray, prob: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> dict[str, int]:
    """tp/fp/fn/tn of ``prob >= threshold`` against ``y_true`` (1 = Parasitized)."""
    y = np.asarray(y_true, dtype=bool)
    pred = np.asarray(prob, dtype=np.float64) >= threshold
    return {"tp": int(np.sum(pred & y)), "fp": int(np.sum(pred & ~y)),
            "fn": int(np.sum(~pred & y)), "tn": int(np.sum(~pred & ~y))}


def binary_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float | int]:
    """``y_true`` 1 = Parasitized; ``prob`` = P(Parasitized). Counts, rates and AUC in one dict."""
    c = counts(y_true, prob, threshold)
    return {**c, **rates(**c), "roc_auc": roc_auc(y_true, prob)}


def confusion_of(c: dict[str, int]) -> np.ndarray:
    """2x2 counts, rows = true, cols = predicted, order (Parasitized, Uninfected) as the notebook."""
    return np.array([[c["tp"], c["fn"]], [c["fp"], c["tn"]]], dtype=np.int64)


def confusion_matrix(y_true: np.ndarray, prob: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    return confusion_of(counts(y_true, prob, threshold))


class MetricsAccumulator:
    """Confusion counts and a probability histogram per class, updated batch by batch.

    Memory is constant in the number of images: the AUC comes from 2^16 probability bins (pairs
    inside one bin count as ties), so it matches the exact AUC to within that resolution.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.n_images = self.n_errors = 0
        self.counts = dict.fromkeys(METRIC_COUNTS, 0)
        self.hist = np.zeros((2, AUC_BINS), dtype=np.int64)  # row 0 Parasitized, row 1 Uninfected

    def update(self, label: Iterable, prob: np.ndarray, error: Iterable) -> None:
        label = np.asarray(list(label), dtype=object)
        error = np.asarray(list(error), dtype=object)
        prob = np.asarray(prob, dtype=np.float64)
        ok = np.array([e is None for e in error], dtype=bool)
        self.n_images += len(error)
        self.n_errors += int((~ok).sum())
        known = ok & np.isin(label, CLASS_NAMES)
        if not known.any():
            return
        y, p = label[known] == POSITIVE_CLASS, prob[known]
        for k, v in counts(y, p, self.threshold).items():
            self.counts[k] += v
        bins = np.clip((p * AUC_BINS).astype(np.int64), 0, AUC_BINS - 1)
        np.add.at(self.hist[0], bins[y], 1)
        np.add.at(self.hist[1], bins[~y], 1)

    @property
    def metrics_known(self) -> bool:
        return sum(self.counts.values()) > 0

    def confusion(self) -> np.ndarray:
        return confusion_of(self.counts)

    def auc(self) -> float:
        pos, neg = self.hist
        n_pos, n_neg = pos.sum(), neg.sum()
        if not n_pos or not n_neg:
            return math.nan
        neg_below = np.cumsum(neg) - neg  # negatives in strictly lower bins
        return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))

    def row(self) -> dict:
        """Threshold, image/error/labelled counts, confusion counts and rates of everything seen."""
        c = self.counts
        return {COL_THRESHOLD: float(self.threshold), COL_N_IMAGES: self.n_images, COL_N_ERRORS: self.n_errors,
                COL_N_LABELLED: sum(c.values()), **c, **rates(**c), "roc_auc": self.auc()}
