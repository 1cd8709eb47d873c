"""Night over night: the finished scoring runs of an output root, one row each, and the one
decision of whether tonight drifted.

A night is a row of the root's ``metrics.parquet`` (``schema.METRICS_COLUMNS``). Rows written
before the night columns existed (``schema.NIGHT_COLUMNS``) still read: what their manifest
recorded (start, finish, seconds, error rows by kind, cells and fields scored) fills them in, and
what it never recorded (cells called Parasitized, slide calls) stays null and is drawn as a gap.

The drift band (docs/operations.md, "Drift band"): for tonight's predicted-Parasitized rate and
its error rate, the median of the same rate over the last ``DRIFT_NIGHTS`` finished nights before
it, plus or minus ``k`` robust standard deviations (1.4826 x the median absolute deviation), never
narrower than ``DRIFT_FLOOR`` (nights that all read alike would otherwise flag any change). Below
``DRIFT_MIN_NIGHTS`` earlier nights there is no band and nothing is flagged. The positive rate is
compared only with nights of the same model, threshold and kind of cell (a new model or threshold
moves it by design); the error rate with every night. ``drift`` is the one function that decides:
``score --alarm-drift`` exits on it and ``malaria-ray report`` shows it.

Pure: pyarrow and the project's storage; imports neither Ray nor TF.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
from dataclasses import dataclass

import pyarrow.parquet as pq

from malaria_ray import manifests, outputs, storage
from malaria_ray.config import CorpusError
from malaria_ray.schema import (
    CELLS_CROPS, CELLS_FIELDS, COL_CELLS, COL_ERROR_RATE, COL_FINISHED_AT, COL_IMAGES_PER_S, COL_MODEL_ID, COL_N_ERRORS,
    COL_N_FIELDS, COL_N_IMAGES, COL_N_PERMANENT, COL_N_SCORED, COL_N_TRANSIENT, COL_POS_RATE, COL_RUN_ID, COL_SECONDS,
    COL_STARTED_AT, COL_THRESHOLD, COUNT_FIELDS, COUNT_SCORED, ERROR_PERMANENT, ERROR_TRANSIENT, METRICS_COLUMNS,
)

DRIFT_K = 4.0  # the band's half-width in robust standard deviations (report default; --alarm-drift sets its own)
DRIFT_NIGHTS = 14  # finished nights before tonight that the band is drawn from
DRIFT_MIN_NIGHTS = 5  # fewer earlier nights: no band, no flag
MAD_SD = 1.4826  # a normal distribution's standard deviation per median absolute deviation
DRIFT_FLOOR = {COL_POS_RATE: 0.01, COL_ERROR_RATE: 0.005}  # the narrowest half-width, as a rate
DRIFT_METRICS = {COL_POS_RATE: "predicted-Parasitized rate", COL_ERROR_RATE: "error rate"}


@dataclass(frozen=True)
class Band:
    """One rate of one night against its band; ``low``/``high`` None when there is no band yet."""

    metric: str
    value: float | None
    median: float | None
    low: float | None
    high: float | None
    nights: int  # earlier nights the band was drawn from

    @property
    def flagged(self) -> bool:
        return self.value is not None and self.low is not None and not self.low <= self.value <= self.high

    def line(self) -> str:
        """One sentence for stderr and the page."""
        what = DRIFT_METRICS[self.metric]
        if self.value is None:
            return f"{what}: none tonight (nothing scored)"
        if self.low is None:
            return (f"{what} {self.value:.2%}: no band yet ({self.nights} earlier night(s); "
                    f"{DRIFT_MIN_NIGHTS} needed)")
        where = "OUTSIDE" if self.flagged else "inside"
        return (f"{what} {self.value:.2%} is {where} the band {self.low:.2%}-{self.high:.2%} "
                f"(median {self.median:.2%} of {self.nights} earlier night(s))")


def _rate(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def band(history: list[float | None], value: float | None, metric: str, k: float = DRIFT_K) -> Band:
    """``value`` against the median +- max(k x 1.4826 x MAD, floor) of ``history`` (nulls left out)."""
    seen = [v for v in (_rate(h) for h in history) if v is not None]
    value = _rate(value)
    if len(seen) < DRIFT_MIN_NIGHTS:
        return Band(metric, value, None, None, None, len(seen))
    med = statistics.median(seen)
    half = max(k * MAD_SD * statistics.median(abs(v - med) for v in seen), DRIFT_FLOOR[metric])
    return Band(metric, value, med, max(med - half, 0.0), min(med + half, 1.0), len(seen))


def _alike(a: dict, b: dict) -> bool:
    return (a.get(COL_MODEL_ID), a.get(COL_THRESHOLD), a.get(COL_CELLS)) == \
        (b.get(COL_MODEL_ID), b.get(COL_THRESHOLD), b.get(COL_CELLS))


def drift_at(rows: list[dict], i: int, k: float = DRIFT_K, nights: int = DRIFT_NIGHTS) -> dict[str, Band]:
    """Night ``rows[i]`` against the ``nights`` finished nights before it (module docstring)."""
    tonight, before = rows[i], rows[:i]
    out = {}
    for metric in DRIFT_METRICS:
        pool = [r for r in before if _alike(r, tonight)] if metric == COL_POS_RATE else before
        out[metric] = band([r.get(metric) for r in pool if _rate(r.get(metric)) is not None][-nights:],
                           tonight.get(metric), metric, k)
    return out


def drift(rows: list[dict], k: float = DRIFT_K, nights: int = DRIFT_NIGHTS) -> dict[str, Band]:
    """The latest night's bands: what ``score --alarm-drift`` exits on and the report shows."""
    return drift_at(rows, len(rows) - 1, k, nights)


def _when(value) -> dt.datetime | None:
    if value is None or isinstance(value, dt.datetime):
        return value
    try:
        return dt.datetime.fromisoformat(str(value))
    except ValueError:
        return None


def _from_manifest(row: dict, m: dict) -> dict:
    """An older row's night columns, from what its manifest recorded (module docstring)."""
    counts, kinds, fields = m.get("counts") or {}, m.get("error_kinds") or {}, bool(m.get("fields"))
    filled = {
        COL_STARTED_AT: _when(m.get("started_at")), COL_FINISHED_AT: _when(m.get("finished_at")),
        COL_SECONDS: m.get("seconds"), COL_N_SCORED: counts.get(COUNT_SCORED),
        COL_N_FIELDS: counts.get(COUNT_FIELDS) if fields else None, COL_CELLS: CELLS_FIELDS if fields else CELLS_CROPS,
        COL_N_TRANSIENT: kinds.get(ERROR_TRANSIENT), COL_N_PERMANENT: kinds.get(ERROR_PERMANENT),
    }
    row = {**row, **{k: v for k, v in filled.items() if row.get(k) is None and v is not None}}
    images, errors, seconds = row.get(COL_N_IMAGES), row.get(COL_N_ERRORS), row.get(COL_SECONDS)
    if row.get(COL_IMAGES_PER_S) is None and images is not None and seconds:
        row[COL_IMAGES_PER_S] = images / seconds
    inputs = ((row.get(COL_N_FIELDS) or 0) + (errors or 0)) if fields else images
    if row.get(COL_ERROR_RATE) is None and errors is not None and inputs:
        row[COL_ERROR_RATE] = errors / inputs
    return row


def load(root: str) -> list[dict]:
    """The finished nights of ``root``, oldest first (by start, then run id): its ``metrics.parquet``,
    older rows completed from their manifests. A root without one is a user error (exit 2)."""
    uri = storage.join(root, outputs.METRICS_FILE)
    if not storage.exists(uri):
        raise CorpusError(f"no finished scoring run under {storage.redact(root)} (no {outputs.METRICS_FILE}): "
                          "run `malaria-ray score --output` there first")
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    rows = []
    for r in table.to_pylist():
        row = {c: r.get(c) for c in METRICS_COLUMNS}
        row = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        if row.get(COL_STARTED_AT) is None:
            row = _from_manifest(row, manifests.read_manifest(root, row[COL_RUN_ID]) or {})
        rows.append(row)
    floor = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    return sorted(rows, key=lambda r: (_when(r.get(COL_STARTED_AT)) or floor, str(r.get(COL_RUN_ID))))
