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


# ---------------------------------------------------------------- operating point, intervals, calibration
Z95 = 1.959963984540054  # two-sided 95% normal quantile


def threshold_for_sensitivity(y_true: np.ndarray, prob: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity (``prob >= t`` among positives) is at least ``target``.

    Highest, because every lower threshold with the same sensitivity only loses specificity. It is
    the ``ceil(target * n_pos)``-th largest positive probability; NaN without positives.
    """
    pos = np.sort(np.asarray(prob, dtype=np.float64)[np.asarray(y_true, dtype=bool)])[::-1]
    if not len(pos):
        return math.nan
    k = max(1, math.ceil(round(target * len(pos), 9)))
    return float(pos[min(k, len(pos)) - 1])


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (NaN, NaN for n = 0)."""
    if n <= 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def rogan_gladen(k: int, n: int, sensitivity: float, specificity: float, n_positive: int | None = None,
                 n_negative: int | None = None, z: float = Z95) -> tuple[float, float, float]:
    """The prevalence corrected for the classifier's known error (Rogan and Gladen, 1978), with a
    95% interval; each clipped to [0, 1]. ``k`` of ``n`` cells were called Parasitized; the
    classifier's per-cell ``sensitivity`` and ``specificity`` were measured on ``n_positive`` and
    ``n_negative`` validation cells of the same kind. The estimate is (k/n + Sp - 1) / (Se + Sp - 1).

    The interval is the delta method's (Reiczigel, Foeldi and Ozsvari, 2010), which carries the
    sampling error of k/n and, where their denominators are given, of Se and Sp; without them the
    rates count as exact. NaN for all three when ``n`` is 0 or Se + Sp <= 1 (a classifier no better
    than chance cannot be corrected for). When the false-positive rate 1 - Sp is near k/n the
    estimate sits at 0 and the interval is wide: the raw fraction is then mostly false positives.
    """
    youden = sensitivity + specificity - 1
    if n <= 0 or not youden > 0:
        return math.nan, math.nan, math.nan
    observed = k / n
    raw = (observed + specificity - 1) / youden
    var = observed * (1 - observed) / n
    if n_positive:
        var += raw * raw * sensitivity * (1 - sensitivity) / n_positive
    if n_negative:
        var += (1 - raw) ** 2 * specificity * (1 - specificity) / n_negative
    # The binomial part of a proportion at 0 or 1 has no variance: use Wilson's width there.
    low_obs, high_obs = wilson_interval(k, n, z)
    half = z * math.sqrt(var) / youden
    low = min(raw - half, (low_obs + specificity - 1) / youden)
    high = max(raw + half, (high_obs + specificity - 1) / youden)
    clip = lambda v: min(1.0, max(0.0, v))
    return clip(raw), clip(low), clip(high)


BOOTSTRAP_METRICS = ("accuracy", "sensitivity", "specificity", "roc_auc")


def patient_bootstrap(y_true: np.ndarray, prob: np.ndarray, groups: np.ndarray, threshold: float,
                      n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile intervals of ``BOOTSTRAP_METRICS`` from a bootstrap that resamples **groups**
    (patients), with replacement, keeping each drawn patient's cells together: cells of one
    patient are not independent, and a cell bootstrap would give intervals that are too narrow."""
    y = np.asarray(y_true, dtype=bool)
    p = np.asarray(prob, dtype=np.float64)
    keys, inverse = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(keys))]
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in BOOTSTRAP_METRICS}
    for _ in range(n_boot):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(keys), len(keys))])
        c = counts(y[idx], p[idx], threshold)
        r = rates(**c)
        for k in ("accuracy", "sensitivity", "specificity"):
            draws[k].append(r[k])
        draws["roc_auc"].append(roc_auc(y[idx], p[idx]))
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {}
    for k, v in draws.items():
        v = np.asarray(v, dtype=np.float64)
        v = v[~np.isnan(v)]
        out[k] = (float(np.percentile(v, lo)), float(np.percentile(v, hi))) if len(v) else (math.nan, math.nan)
    return out


def brier(y_true: np.ndarray, prob: np.ndarray) -> float:
    """Mean squared error of P(Parasitized) against the 0/1 label (lower is better)."""
    y = np.asarray(y_true, dtype=np.float64)
    return float(np.mean((np.asarray(prob, dtype=np.float64) - y) ** 2)) if len(y) else math.nan


def reliability(y_true: np.ndarray, prob: np.ndarray, bins: int = 10) -> list[dict]:
    """Per probability bin: count, mean predicted probability, observed fraction positive."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(prob, dtype=np.float64)
    which = np.clip((p * bins).astype(int), 0, bins - 1)
    return [{"bin": b, "n": int((which == b).sum()),
             "mean_prob": float(p[which == b].mean()) if (which == b).any() else math.nan,
             "frac_positive": float(y[which == b].mean()) if (which == b).any() else math.nan}
            for b in range(bins)]


# ---------------------------------------------------------------- evidence by slide and patient
CALL_RULE = ("Parasitized when the Wilson 95% lower bound of the slide's (patient's) fraction of cells "
             "called Parasitized exceeds the model's false-positive rate per cell (1 - validation "
             "specificity at the operating point): more positive cells than false positives alone explain.")


def group_evidence(slides: list, patients: list, labels: list, called_pos: np.ndarray,
                   fp_rate: float) -> list[dict]:
    """One row per slide (level "slide") and per patient (level "patient"): cells, cells called
    Parasitized, parasitemia estimate with its Wilson 95% interval, the call by ``CALL_RULE``, and,
    where cells carry labels, whether the group is infected (any cell labelled Parasitized)."""
    rows = []
    for level, keys in (("slide", list(zip(slides, patients))), ("patient", [(None, p) for p in patients])):
        index: dict[tuple, list[int]] = {}
        for i, k in enumerate(keys):
            index.setdefault(k, []).append(i)
        for (slide, patient), idx in sorted(index.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
            n, k = len(idx), int(np.sum(called_pos[idx]))
            low, high = wilson_interval(k, n)
            labelled = [labels[i] for i in idx if labels[i] in CLASS_NAMES]
            rows.append({"level": level, "slide_id": slide, "patient_id": patient, "n_cells": n,
                         "n_pred_parasitized": k, "parasitemia": k / n, "parasitemia_ci_low": low,
                         "parasitemia_ci_high": high, "call_parasitized": bool(low > fp_rate),
                         "infected": (POSITIVE_CLASS in labelled) if labelled else None})
    return rows


def group_rates(rows: list[dict], level: str) -> dict[str, float]:
    """Sensitivity and specificity of the calls of one level against ``infected`` (labelled groups)."""
    known = [r for r in rows if r["level"] == level and r["infected"] is not None]
    c = {"tp": sum(r["call_parasitized"] and r["infected"] for r in known),
         "fn": sum(not r["call_parasitized"] and r["infected"] for r in known),
         "fp": sum(r["call_parasitized"] and not r["infected"] for r in known),
         "tn": sum(not r["call_parasitized"] and not r["infected"] for r in known)}
    r = rates(**c)
    return {f"{level}_sensitivity": r["sensitivity"], f"{level}_specificity": r["specificity"],
            f"{level}_n": len(known)}
