"""Application metrics for Ray's Prometheus endpoint and Grafana, through ``ray.util.metrics``.

Counted where the work happens, once per batch or per task (never per row): the model actors
(``score.Scorer``) count the rows they score and the error rows that pass through them and time
each model call; the field detection tasks count the photographs in which they found cells and
how many. Each process reports to its node's metrics agent, which serves them with Ray's own on
``http://NODE:METRICS_EXPORT_PORT/metrics`` (docs/operations.md, "Prometheus metrics"). Ray adds
its ``ray_`` prefix and, to counters, ``_total``:

=======================================  =========  ===================================================
Prometheus name                          type       tags
=======================================  =========  ===================================================
ray_malaria_images_scored_total          counter    run_id, model_id, input (cells | fields)
ray_malaria_error_rows_total             counter    run_id, model_id, input, error_kind
ray_malaria_predict_seconds              histogram  run_id, model_id (one model call per batch)
ray_malaria_fields_detected_total        counter    run_id
ray_malaria_cells_found_total            counter    run_id
ray_malaria_cells_per_field              histogram  run_id
=======================================  =========  ===================================================

``input``: ``cells`` for cut-out cell images, ``fields`` for the cells found in field photographs
(``--fields``; there an error row is a photograph). ``error_kind``: ``transient`` or ``permanent``
as in the predictions, ``model`` for the rows of an actor whose model did not load. The actor pool
itself (alive, busy and idle actors, batches in flight, blocks queued in front of it) is in Ray
Data's own ``ray_data_*`` metrics, tagged with the operator ``MapBatches(Scorer)``: not counted
again here.

These are counts of work done: a batch retried after an actor died is counted again, as it is
scored again. The run's manifest is the ledger; the metrics are for watching. Recording is never
allowed to fail a run: if a metric cannot be made or recorded in a process (no Ray, an old or
minimal install), that process logs one warning and records nothing more.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

from malaria_ray import logs, schema

log = logs.get("telemetry")

IMAGES_SCORED = "malaria_images_scored"
ERROR_ROWS = "malaria_error_rows"
PREDICT_SECONDS = "malaria_predict_seconds"
FIELDS_DETECTED = "malaria_fields_detected"
CELLS_FOUND = "malaria_cells_found"
CELLS_PER_FIELD = "malaria_cells_per_field"
PROMETHEUS_PREFIX = "ray_"  # what Ray puts in front of every metric it exports

INPUT_CELLS, INPUT_FIELDS = "cells", "fields"
ERROR_MODEL = "model"  # error_kind of a model actor's rows when its model did not load
# A model call on a batch: ~0.01 s (a GPU, small batches) to a minute (a CPU, batches of 512).
PREDICT_BOUNDS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
# Red cells in one field photograph: ~150 in a thin film; tens at the edge of a smear.
CELLS_BOUNDS = [5, 10, 25, 50, 100, 150, 200, 300, 500, 1000]


class _Meters:
    """This process's metric objects (made once: each ``ray.util.metrics`` object registers)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Histogram

        rows = ("run_id", "model_id", "input")
        self.images = Counter(IMAGES_SCORED, "Rows scored by the model (cells), per run", tag_keys=rows)
        self.errors = Counter(ERROR_ROWS, "Error rows (unreadable inputs, fields without cells, a model that did not "
                              "load) that reached the model actors, per run", tag_keys=(*rows, schema.COL_ERROR_KIND))
        self.predict = Histogram(PREDICT_SECONDS, "Seconds of one model call on one batch in a model actor",
                                 boundaries=PREDICT_BOUNDS_S, tag_keys=("run_id", "model_id"))
        self.fields = Counter(FIELDS_DETECTED, "Field photographs in which detection found red cells",
                              tag_keys=("run_id",))
        # Exact, beside the histogram: Ray 2.60 exports a histogram's _sum as bucket midpoints x counts
        # (its OpenTelemetry recorder keeps no sum), so two fields of 28 and 30 cells show _sum 75.
        self.found = Counter(CELLS_FOUND, "Red cells found in field photographs", tag_keys=("run_id",))
        self.cells = Histogram(CELLS_PER_FIELD, "Red cells found per field photograph", boundaries=CELLS_BOUNDS,
                               tag_keys=("run_id",))


_meters: _Meters | None = None
_disabled = False


def _record(what: str, fn: Callable[[_Meters], None]) -> None:
    """``fn(meters)``, or nothing once this process found it cannot record (one warning)."""
    global _meters, _disabled
    if _disabled:
        return
    try:
        if _meters is None:
            _meters = _Meters()
        fn(_meters)
    except Exception as exc:  # a metric is never worth a failed batch
        _disabled = True
        log.warning(f"application metrics are off in this process ({what} failed: {type(exc).__name__}: {exc}); "
                    "scoring goes on")


def count_rows(status, error_kind, run_id: str, model_id: str, input_: str, model_failed: bool = False) -> None:
    """A model actor's batch: ``status`` and ``error_kind`` are its (pyarrow) columns. Rows whose
    status is ``ok`` were scored; ``error`` rows are counted by their ``error_kind`` (the decode
    and detection tasks give every error row one; a row without one, or a batch without the column
    (None), counts as permanent); with ``model_failed`` every row is an error row of kind
    ``model``. Other statuses (already scored, non-images, ...) are not work and are not counted."""
    import pyarrow as pa
    import pyarrow.compute as pc

    tags = {"run_id": run_id, "model_id": model_id, "input": input_}
    if model_failed:
        if len(status):
            _record("count_rows", lambda m: m.errors.inc(len(status), tags={**tags, schema.COL_ERROR_KIND: ERROR_MODEL}))
        return
    n_ok = int(pc.sum(pc.equal(status, schema.STATUS_OK)).as_py() or 0)
    errors = pc.fill_null(pc.equal(status, schema.STATUS_ERROR), False)
    by_kind: dict[str, int] = {}
    if pc.any(errors).as_py():
        kinds = (pc.fill_null(error_kind.cast(pa.string()).filter(errors), schema.ERROR_PERMANENT)
                 if error_kind is not None else pa.array([schema.ERROR_PERMANENT] * int(pc.sum(errors).as_py())))
        by_kind = {k["values"]: k["counts"] for k in pc.value_counts(kinds).to_pylist()}

    def inc(m: _Meters) -> None:
        if n_ok:
            m.images.inc(n_ok, tags=tags)
        for k, n in by_kind.items():
            m.errors.inc(n, tags={**tags, schema.COL_ERROR_KIND: k})

    _record("count_rows", inc)


def observe_predict(seconds: float, run_id: str, model_id: str) -> None:
    """One model call on one batch took ``seconds``."""
    _record("observe_predict", lambda m: m.predict.observe(seconds, tags={"run_id": run_id, "model_id": model_id}))


def count_fields(out: dict[str, np.ndarray], run_id: str) -> None:
    """A detection task's output (``fields.prepare_fields``: one row per cell found, cell rows
    carry their ``cell`` number): the fields it found cells in, and how many in each."""
    cell = np.asarray(out[schema.COL_CELL], dtype=np.float64)
    found = ~np.isnan(cell)
    if not found.any():
        return
    _, per_field = np.unique(out[schema.COL_FIELD_ID][found].astype(str), return_counts=True)

    def inc(m: _Meters) -> None:
        m.fields.inc(len(per_field), tags={"run_id": run_id})
        m.found.inc(int(per_field.sum()), tags={"run_id": run_id})
        for n in per_field:
            m.cells.observe(int(n), tags={"run_id": run_id})

    _record("count_fields", inc)


def counting_fields(detect: Callable, run_id: str) -> Callable:
    """``detect`` (``fields.prepare_fields``) that also counts what it found (``count_fields``);
    it keeps its name, so Ray Data's operator (and its ``ray_data_*`` metrics) is still
    ``MapBatches(prepare_fields)``."""
    @functools.wraps(detect)
    def counted(batch, **kwargs):
        out = detect(batch, **kwargs)
        count_fields(out, run_id)
        return out

    return counted

