"""Confusion matrix, rates and ROC AUC; positive class Parasitized; the slide and patient roll-up.
Pure numpy and pyarrow.

``binary_metrics`` works on whole arrays (training's validation split); ``MetricsAccumulator``
gives the same numbers batch by batch in constant memory (a scoring run of any size). Both derive
the rates from the four counts with ``rates``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from malaria_ray.config import DEFAULT_THRESHOLD
from malaria_ray.schema import (
    CLASS_NAMES, NEGATIVE_CLASS, POSITIVE_CLASS,
    COL_CALL, COL_ERROR, COL_FRAC_HIGH, COL_FRAC_LOW, COL_FRAC_POS, COL_LABEL, COL_LEVEL, COL_MEAN_PROB, COL_MODEL_ID,
    COL_N_CELLS, COL_N_ERRORS, COL_N_IMAGES, COL_N_LABEL_NEG, COL_N_LABEL_POS, COL_N_LABELLED, COL_N_PRED_POS,
    COL_PATIENT, COL_PRED, COL_PROB, COL_SLIDE, COL_SUM_PROB, COL_THRESHOLD, METRIC_COUNTS, SLIDES_SCHEMA,
    CELLS_CROPS, COL_CORRECTION, COL_FRAC_CORR, COL_FRAC_CORR_HIGH, COL_FRAC_CORR_LOW, KEY_THRESHOLD, KEY_VAL_CELLS,
    KEY_VAL_N_NEGATIVE, KEY_VAL_N_POSITIVE, KEY_VAL_SENSITIVITY, KEY_VAL_SPECIFICITY,
)

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
    """ROC AUC (``sklearn.metrics.roc_auc_score``: ties count half); NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true, dtype=bool)
    if y.all() or not y.any():
        return math.nan
    return float(roc_auc_score(y, np.asarray(score, dtype=np.float64)))


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


CORRECTED = "rogan-gladen: the model's validation sensitivity and specificity at its operating point"


@dataclass(frozen=True)
class Correction:
    """What a roll-up needs to correct its fraction called Parasitized for the classifier's known
    error (``rogan_gladen``), or, with ``reason``, why it does not: rates measured on another kind
    of cells (cut-out crops do not calibrate cells found in fields), another threshold than the
    one they were measured at, or none recorded. Written to the ``correction`` column."""

    sensitivity: float | None = None
    specificity: float | None = None
    n_positive: int | None = None
    n_negative: int | None = None
    reason: str | None = "no validation rates recorded with the model"

    @classmethod
    def of(cls, contract: dict, threshold: float | None, cells: str) -> "Correction":
        """From a model's ``model.json`` (``contract``) for calls at ``threshold`` on ``cells``
        (``schema.CELLS_CROPS`` or ``CELLS_FIELDS``)."""
        se, sp = contract.get(KEY_VAL_SENSITIVITY), contract.get(KEY_VAL_SPECIFICITY)
        if se is None or sp is None:
            return cls()
        measured = contract.get(KEY_VAL_CELLS, CELLS_CROPS)
        if measured != cells:
            return cls(reason=f"uncalibrated: the model's rates were measured on {measured}, these are {cells}")
        if threshold != contract.get(KEY_THRESHOLD):
            return cls(reason=f"uncalibrated: threshold {threshold} is not the model's operating point "
                              f"{contract.get(KEY_THRESHOLD)}, where its rates were measured")
        if se + sp <= 1:
            return cls(reason=f"not correctable: sensitivity {se:.3f} + specificity {sp:.3f} <= 1")
        return cls(float(se), float(sp), contract.get(KEY_VAL_N_POSITIVE), contract.get(KEY_VAL_N_NEGATIVE), None)

    def columns(self, k: int, n: int) -> dict:
        """The ``CORRECTION_COLUMNS`` of a group where ``k`` of ``n`` cells were called Parasitized."""
        if self.reason is not None or n <= 0:
            return {COL_FRAC_CORR: None, COL_FRAC_CORR_LOW: None, COL_FRAC_CORR_HIGH: None,
                    COL_CORRECTION: self.reason or CORRECTED}
        est, low, high = rogan_gladen(k, n, self.sensitivity, self.specificity, self.n_positive, self.n_negative)
        return {COL_FRAC_CORR: est, COL_FRAC_CORR_LOW: low, COL_FRAC_CORR_HIGH: high, COL_CORRECTION: CORRECTED}


BOOTSTRAP_METRICS = ("accuracy", "sensitivity", "specificity", "roc_auc")


def patient_bootstrap(y_true: np.ndarray, prob: np.ndarray, groups: np.ndarray, threshold: float,
                      n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile intervals of ``BOOTSTRAP_METRICS`` from a bootstrap that resamples **groups**
    (patients), with replacement, keeping each drawn patient's cells together: cells of one
    patient are not independent, and a cell bootstrap would give intervals that are too narrow."""
    return patient_bootstraps(y_true, prob, groups, [threshold], n_boot, seed, level)[0]


def patient_bootstraps(y_true: np.ndarray, prob: np.ndarray, groups: np.ndarray, thresholds: list[float],
                       n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> list[dict[str, tuple[float, float]]]:
    """``patient_bootstrap`` at each of ``thresholds``, over one set of resamples: the AUC (which
    no threshold changes) is computed once per resample, and each threshold's intervals are those
    ``patient_bootstrap`` gives it alone with the same ``seed``."""
    y = np.asarray(y_true, dtype=bool)
    p = np.asarray(prob, dtype=np.float64)
    keys, inverse = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(keys))]
    rng = np.random.default_rng(seed)
    draws = [{k: [] for k in BOOTSTRAP_METRICS} for _ in thresholds]
    for _ in range(n_boot):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(keys), len(keys))])
        auc = roc_auc(y[idx], p[idx])
        for t, d in zip(thresholds, draws):
            r = rates(**counts(y[idx], p[idx], t))
            for k in ("accuracy", "sensitivity", "specificity"):
                d[k].append(r[k])
            d["roc_auc"].append(auc)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = []
    for d in draws:
        intervals = {}
        for k, v in d.items():
            v = np.asarray(v, dtype=np.float64)
            v = v[~np.isnan(v)]
            intervals[k] = (float(np.percentile(v, lo)), float(np.percentile(v, hi))) if len(v) else (math.nan, math.nan)
        out.append(intervals)
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

# The roll-up of prediction rows, shared by training (``patients.parquet``) and scoring
# (``slides.parquet``): rows are summed per group of ``ROLLUP_KEYS`` (``evidence_sums``; sums of
# batches merge with ``merge_evidence_sums``, so a stream of any length rolls up in memory that grows
# with the groups, not the rows), then each level of ``ROLLUP_LEVELS`` regroups those sums by its own
# keys and turns them into evidence (``evidence``). A new kind of row or group is a new key or level.
ROLLUP_KEYS = (COL_SLIDE, COL_PATIENT)
ROLLUP_LEVELS = (("patient", (COL_PATIENT,)), ("slide", (COL_SLIDE, COL_PATIENT)))
ROLLUP_SUMS = (COL_N_CELLS, COL_N_PRED_POS, COL_SUM_PROB, COL_N_LABEL_POS, COL_N_LABEL_NEG)


def evidence_sums(predictions: pa.Table, keys: tuple[str, ...] = ROLLUP_KEYS) -> pa.Table:
    """One row per group of ``keys`` of the scored rows of ``predictions`` (error rows left out):
    cells, cells called Parasitized, the sum of P(Parasitized), and the cells labelled each way."""
    t = predictions.filter(pc.is_null(predictions.column(COL_ERROR)))
    label = t.column(COL_LABEL)
    t = pa.table({
        **{k: t.column(k) for k in keys},
        COL_N_CELLS: pa.array(np.ones(len(t), dtype=np.int64)),
        COL_N_PRED_POS: pc.cast(pc.fill_null(pc.equal(t.column(COL_PRED), POSITIVE_CLASS), False), pa.int64()),
        COL_SUM_PROB: pc.cast(t.column(COL_PROB), pa.float64()),
        COL_N_LABEL_POS: pc.cast(pc.fill_null(pc.equal(label, POSITIVE_CLASS), False), pa.int64()),
        COL_N_LABEL_NEG: pc.cast(pc.fill_null(pc.equal(label, NEGATIVE_CLASS), False), pa.int64()),
    })
    return merge_evidence_sums([t], keys)


def merge_evidence_sums(parts: list[pa.Table], keys: tuple[str, ...] = ROLLUP_KEYS) -> pa.Table:
    """The sums of ``parts`` (tables of ``evidence_sums``) per group of ``keys``."""
    t = pa.concat_tables(parts).group_by(list(keys), use_threads=False)
    t = t.aggregate([(c, "sum") for c in ROLLUP_SUMS])
    return t.rename_columns([c.removesuffix("_sum") for c in t.column_names])


def evidence(sums: pa.Table, fp_rate: float | None, model_id: str | None, correction: Correction | None = None,
             keys: tuple[str, ...] = ROLLUP_KEYS,
             levels: tuple[tuple[str, tuple[str, ...]], ...] = ROLLUP_LEVELS) -> pa.Table:
    """``SLIDES_SCHEMA`` rows of each level, each level sorted by its keys (nulls as "None"): cells,
    cells called Parasitized, the fraction called (the parasitemia estimate) with its Wilson 95%
    interval, the mean probability, the label counts, the call by ``CALL_RULE`` (null without
    ``fp_rate``, the model's false-positive rate per cell at its operating point) and the fraction
    corrected by ``correction`` (or the reason it is not)."""
    correction = correction or Correction()
    tables = []
    for level, level_keys in levels:
        t = sums
        for k in keys:
            if k not in level_keys:
                t = t.set_column(t.schema.get_field_index(k), k, pa.nulls(len(t), t.schema.field(k).type))
        rows = sorted(merge_evidence_sums([t], keys).to_pylist(), key=lambda r: tuple(str(r[k]) for k in keys))
        out = []
        for r in rows:
            n, k = r[COL_N_CELLS], r[COL_N_PRED_POS]
            low, high = wilson_interval(k, n)
            out.append({**{key: r[key] for key in keys}, COL_LEVEL: level, COL_N_CELLS: n, COL_N_PRED_POS: k,
                        COL_FRAC_POS: k / n, COL_MEAN_PROB: r[COL_SUM_PROB] / n, COL_N_LABEL_POS: r[COL_N_LABEL_POS],
                        COL_N_LABEL_NEG: r[COL_N_LABEL_NEG], COL_MODEL_ID: model_id, COL_FRAC_LOW: low,
                        COL_FRAC_HIGH: high, COL_CALL: None if fp_rate is None else bool(low > fp_rate),
                        **correction.columns(k, n)})
        tables.append(pa.Table.from_pylist(out, schema=SLIDES_SCHEMA))
    return pa.concat_tables(tables)


def roll_up(predictions: pa.Table, fp_rate: float | None, model_id: str | None,
            correction: Correction | None = None) -> pa.Table:
    """``evidence`` of a table of prediction rows held whole (a training run's validation split)."""
    return evidence(evidence_sums(predictions), fp_rate, model_id, correction)


def infected(row: dict) -> bool | None:
    """Whether a roll-up row's group is infected by its labels (any cell labelled Parasitized);
    None when none of its cells carries a label."""
    if row[COL_N_LABEL_POS] + row[COL_N_LABEL_NEG] == 0:
        return None
    return row[COL_N_LABEL_POS] > 0


def group_rates(rollup: pa.Table, level: str) -> dict[str, float]:
    """Sensitivity and specificity of the calls of one level against ``infected`` (labelled groups)."""
    known = [(r[COL_CALL], infected(r)) for r in rollup.to_pylist()
             if r[COL_LEVEL] == level and infected(r) is not None]
    c = {"tp": sum(call and inf for call, inf in known), "fn": sum(not call and inf for call, inf in known),
         "fp": sum(call and not inf for call, inf in known), "tn": sum(not call and not inf for call, inf in known)}
    r = rates(**c)
    return {f"{level}_sensitivity": r["sensitivity"], f"{level}_specificity": r["specificity"],
            f"{level}_n": len(known)}
