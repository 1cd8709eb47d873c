"""The scoring output contract under one output root that nightly runs share, and its commit.

Layout (``ROOT`` = ``--output``, local or ``s3://``)::

    ROOT/predictions/<run_id>.parquet         one file per committed run (all rows of the run)
    ROOT/predictions/_staging/<run_id>.parquet  being written; ``_`` makes every reader skip it
    ROOT/metrics.parquet                        one row per committed run
    ROOT/slides.parquet                         per slide and per patient, current model
    ROOT/runs/<run_id>/config.json, manifest.json, metrics.parquet, plots/confusion_matrix.png

Commit protocol: a run streams its rows into ``predictions/_staging/<run_id>.parquet``; when the
stream is complete it writes ``runs/<run_id>/`` (config, manifest, its metrics row) and then makes
``predictions/<run_id>.parquet`` appear in one atomic step (a POSIX rename locally; on S3 one
server-side copy, which creates the object whole or not at all). That step is the commit: a crash
before it leaves only ``_staging`` files that no reader or later run counts (a later run deletes
those older than a day: ``remove_stale_staging``). ``metrics.parquet``
and ``slides.parquet`` are derived views rebuilt after the commit from committed runs only and
replaced in one write (temp + rename locally; a single PUT on S3), so a crash between the commit
and the rebuild heals on the next run.

Readers: ``pandas.read_parquet(ROOT/predictions)``, ``pyarrow.dataset.dataset(ROOT/predictions)``
and DuckDB ``read_parquet('ROOT/predictions/*.parquet')``. Pure: imports neither Ray nor TF.
"""

from __future__ import annotations

import io
import json
import math
import os
import posixpath
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from malaria_ray import storage
from malaria_ray.config import CLASS_NAMES, POSITIVE_CLASS
from malaria_ray.metrics import METRIC_COUNTS, METRIC_RATES, binary_metrics

# predictions columns (DESIGN.md); shared by writer, readers and tests.
COL_IMAGE_ID = "image_id"
COL_URI = "uri"
COL_SLIDE = "slide_id"
COL_PATIENT = "patient_id"
COL_LABEL = "label"
COL_PROB = "prob_parasitized"
COL_PRED = "pred_label"
COL_THRESHOLD = "threshold"
COL_MODEL_ID = "model_id"
COL_RUN_ID = "run_id"
COL_SCORED_AT = "scored_at"
COL_ERROR = "error"

PREDICTIONS_SCHEMA = pa.schema([
    (COL_IMAGE_ID, pa.string()), (COL_URI, pa.string()), (COL_SLIDE, pa.string()),
    (COL_PATIENT, pa.string()), (COL_LABEL, pa.string()), (COL_PROB, pa.float32()),
    (COL_PRED, pa.string()), (COL_THRESHOLD, pa.float64()), (COL_MODEL_ID, pa.string()),
    (COL_RUN_ID, pa.string()), (COL_SCORED_AT, pa.timestamp("us", tz="UTC")), (COL_ERROR, pa.string()),
])

# metrics.parquet columns beyond metrics.METRIC_COUNTS / METRIC_RATES.
COL_N_IMAGES, COL_N_ERRORS, COL_N_LABELLED = "n_images", "n_errors", "n_labelled"
METRICS_COLUMNS = (COL_RUN_ID, COL_MODEL_ID, COL_THRESHOLD, COL_N_IMAGES, COL_N_ERRORS, COL_N_LABELLED,
                   *METRIC_COUNTS, *METRIC_RATES)

# slides.parquet columns: one row per slide (level "slide") and per patient (level "patient").
COL_LEVEL, COL_N_CELLS, COL_N_PRED_POS = "level", "n_cells", "n_pred_parasitized"
COL_FRAC_POS, COL_MEAN_PROB = "frac_parasitized", "mean_prob"
COL_N_LABEL_POS, COL_N_LABEL_NEG = "n_label_parasitized", "n_label_uninfected"

PREDICTIONS_DIR, STAGING_DIR, RUNS_DIR = "predictions", "_staging", "runs"
METRICS_FILE, SLIDES_FILE = "metrics.parquet", "slides.parquet"
# Rows the writer holds before it writes a row group: bounds the driver's memory (the rows of a
# run are never all held) while keeping row groups large enough for readers to scan quickly.
ROW_GROUP_ROWS = 8_192
AUC_BINS = 1 << 16  # streaming ROC AUC: ties within 1/65536 of probability count as ties


def predictions_uri(root: str) -> str:
    return storage.join(root, PREDICTIONS_DIR)


def run_uri(root: str, run_id: str) -> str:
    return storage.join(root, RUNS_DIR, run_id)


class PredictionWriter:
    """Streams prediction batches into the run's staging file; ``commit`` publishes it atomically."""

    def __init__(self, root: str, run_id: str) -> None:
        self.root, self.run_id = root, run_id
        self.staging_uri = storage.join(predictions_uri(root), STAGING_DIR, f"{run_id}.parquet")
        self.final_uri = storage.join(predictions_uri(root), f"{run_id}.parquet")
        self._fs, self._path = storage.filesystem(self.staging_uri)
        self._fs.makedirs(posixpath.dirname(self._path), exist_ok=True)
        self._file = self._fs.open(self._path, "wb")
        self._writer = pq.ParquetWriter(self._file, PREDICTIONS_SCHEMA, compression="zstd")
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        table = normalize(table).combine_chunks()  # own buffers, not slices of Ray's larger blocks
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.concat_tables(self._pending), row_group_size=ROW_GROUP_ROWS)
        self._pending, self._pending_rows = [], 0

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._file.close()

    def abort(self) -> None:
        """Drop the staging file (best effort: a leftover is invisible to readers anyway)."""
        try:
            self._writer.close()
            self._file.close()
            self._fs.rm(self._path)
        except Exception:  # noqa: BLE001 - already failing; the staging file is harmless
            pass

    def commit(self) -> None:
        """The commit point: ``predictions/<run_id>.parquet`` appears whole, in one step."""
        fs, final = storage.filesystem(self.final_uri)
        if storage.is_remote(self.final_uri):
            fs.copy(self._path, final)  # server-side CopyObject: the object appears whole
            fs.rm(self._path)
        else:
            os.replace(self._path, final)


def normalize(table: pa.Table) -> pa.Table:
    """Prediction rows in ``PREDICTIONS_SCHEMA``: null where a value is missing.

    Ray Data turns an all-None object column of a block into doubles (NaN), and a row that was not
    scored carries NaN as its probability; both become proper nulls here.
    """

    cols = []
    for f in PREDICTIONS_SCHEMA:
        col = table.column(f.name)
        if pa.types.is_string(f.type) and not pa.types.is_string(col.type):
            col = pa.array([x if isinstance(x, str) else None for x in col.to_pylist()], pa.string())
        elif pa.types.is_floating(f.type) and pa.types.is_floating(col.type):
            col = pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col)
        cols.append(col.cast(f.type))
    return pa.Table.from_arrays(cols, schema=PREDICTIONS_SCHEMA)


STALE_STAGING_SECONDS = 24 * 3600  # older staging files belong to crashed runs, not running ones


def remove_stale_staging(root: str, max_age_s: float = STALE_STAGING_SECONDS) -> list[str]:
    """Delete staging files that crashed runs left behind (older than ``max_age_s``); their names.

    Readers never see staging files; this only returns their space. A staging file younger than
    the limit may belong to a run still writing under the same root, so it is left alone.
    """
    import datetime as dt

    fs, path = storage.filesystem(storage.join(predictions_uri(root), STAGING_DIR))
    fs.invalidate_cache(path)  # other processes write here: never trust a cached listing
    if not fs.exists(path):
        return []
    now, removed = dt.datetime.now(dt.timezone.utc), []
    for info in fs.ls(path, detail=True):
        modified = fs.modified(info["name"])
        if modified.tzinfo is None:  # local filesystems report naive UTC
            modified = modified.replace(tzinfo=dt.timezone.utc)
        if (now - modified).total_seconds() > max_age_s:
            fs.rm(info["name"])
            removed.append(posixpath.basename(info["name"]))
    return removed


def committed_runs(root: str) -> list[str]:
    """Run ids whose predictions file is committed, oldest name first."""
    fs, path = storage.filesystem(predictions_uri(root))
    if not fs.exists(path):
        return []
    names = [posixpath.basename(p) for p in fs.ls(path, detail=False)]
    return sorted(n[: -len(".parquet")] for n in names if n.endswith(".parquet") and not n.startswith(("_", ".")))


def _model_batches(root: str, model_id: str, columns: list[str], ok_only: bool = False) -> Iterator[pa.RecordBatch]:
    """``columns`` of the committed predictions of ``model_id`` (error rows dropped when
    ``ok_only``), newest run first, one file and one row group at a time on this thread.

    Not ``pyarrow.dataset``: its scanner reads ahead over files and row groups on Arrow's thread
    pools, and in the driver, a long-lived process, the allocator then kept tens of MiB that grew
    with the store (+49 MiB at 2,000 rows, +78 at 20,000; this way +15 and +31).
    """
    fs, pred_path = storage.filesystem(predictions_uri(root))
    read = list(dict.fromkeys([*columns, COL_MODEL_ID, COL_ERROR]))
    for run_id in reversed(committed_runs(root)):
        with fs.open(posixpath.join(pred_path, f"{run_id}.parquet"), "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=ROW_GROUP_ROWS, columns=read, use_threads=False):
                keep = pc.equal(batch.column(COL_MODEL_ID), model_id)
                if ok_only:
                    keep = pc.and_(keep, pc.is_null(batch.column(COL_ERROR)))
                batch = batch.filter(keep).select(columns)
                if batch.num_rows:
                    yield batch


NO_IDS = np.array([], dtype="S64")  # an empty skip list (read-only: never appended to in place)
NO_IDS.flags.writeable = False


def scored_ids(root: str, model_id: str) -> np.ndarray:
    """Sorted image ids this model already scored under ``root`` (ids only; for --skip-scored).

    Fixed-width ASCII (``S64`` for sha256 hex), not Python strings: half the memory, and one
    buffer that every decode task maps from Ray's object store instead of unpickling.
    """
    chunks = [pc.drop_null(batch.column(0)).to_numpy(zero_copy_only=False)
              for batch in _model_batches(root, model_id, [COL_IMAGE_ID])]
    return np.unique(np.concatenate(chunks).astype(np.bytes_)) if chunks else NO_IDS


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
        m = binary_metrics(y, p, self.threshold)
        for k in METRIC_COUNTS:
            self.counts[k] += m[k]
        bins = np.clip((p * AUC_BINS).astype(np.int64), 0, AUC_BINS - 1)
        np.add.at(self.hist[0], bins[y], 1)
        np.add.at(self.hist[1], bins[~y], 1)

    @property
    def metrics_known(self) -> bool:
        return sum(self.counts.values()) > 0

    def confusion(self) -> np.ndarray:
        c = self.counts
        return np.array([[c["tp"], c["fn"]], [c["fp"], c["tn"]]], dtype=np.int64)

    def auc(self) -> float:
        pos, neg = self.hist
        n_pos, n_neg = pos.sum(), neg.sum()
        if not n_pos or not n_neg:
            return math.nan
        neg_below = np.cumsum(neg) - neg  # negatives in strictly lower bins
        return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))

    def row(self, run_id: str, model_id: str) -> dict:
        c = self.counts
        n = sum(c.values())
        rate = lambda a, b: float(a / b) if b else math.nan  # noqa: E731
        return {
            COL_RUN_ID: run_id, COL_MODEL_ID: model_id, COL_THRESHOLD: float(self.threshold),
            COL_N_IMAGES: self.n_images, COL_N_ERRORS: self.n_errors, COL_N_LABELLED: n, **c,
            "accuracy": rate(c["tp"] + c["tn"], n), "sensitivity": rate(c["tp"], c["tp"] + c["fn"]),
            "specificity": rate(c["tn"], c["tn"] + c["fp"]), "precision": rate(c["tp"], c["tp"] + c["fp"]),
            "f1": rate(2 * c["tp"], 2 * c["tp"] + c["fp"] + c["fn"]), "roc_auc": self.auc(),
        }


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def replace_file(uri: str, data: bytes) -> None:
    """Replace ``uri`` in one step: rename locally, a single PUT (whole object) on S3."""
    if storage.is_remote(uri):
        storage.write_bytes(uri, data)
        return
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_run_metrics(root: str, run_id: str, row: dict) -> None:
    table = pa.Table.from_pylist([row]).select(list(METRICS_COLUMNS))
    storage.write_bytes(storage.join(run_uri(root, run_id), METRICS_FILE), table_bytes(table))


def rebuild_metrics(root: str) -> pa.Table:
    """``metrics.parquet`` = the metrics rows of committed runs (small: one row per run)."""
    tables = []
    for run_id in committed_runs(root):
        uri = storage.join(run_uri(root, run_id), METRICS_FILE)
        if storage.exists(uri):
            fs, path = storage.filesystem(uri)
            with fs.open(path, "rb") as f:
                tables.append(pq.read_table(f))
    table = pa.concat_tables(tables, promote_options="default") if tables else pa.table({})
    replace_file(storage.join(root, METRICS_FILE), table_bytes(table))
    return table


SLIDES_SCHEMA = pa.schema([(COL_LEVEL, pa.string()), (COL_SLIDE, pa.string()), (COL_PATIENT, pa.string()),
                           (COL_N_CELLS, pa.int64()), (COL_N_PRED_POS, pa.int64()), (COL_FRAC_POS, pa.float64()),
                           (COL_MEAN_PROB, pa.float64()), (COL_N_LABEL_POS, pa.int64()),
                           (COL_N_LABEL_NEG, pa.int64()), (COL_MODEL_ID, pa.string())])
_SUMS = (COL_N_CELLS, COL_N_PRED_POS, "sum_prob", COL_N_LABEL_POS, COL_N_LABEL_NEG)


def rebuild_slides(root: str, model_id: str) -> pa.Table:
    """Per-slide and per-patient roll-up of the current model's committed predictions.

    Streams the predictions batch by batch and sums each batch per (slide, patient) with Arrow's
    group-by, so memory grows with the number of slides, not of rows. An input (same bytes at the
    same uri) scored by this model in several runs (no --skip-scored) counts once, from its newest
    run: ``_SeenInputs`` keeps 8 bytes per input for that.
    """
    cols = [COL_IMAGE_ID, COL_URI, COL_SLIDE, COL_PATIENT, COL_LABEL, COL_PROB, COL_PRED]
    seen, parts = _SeenInputs(), []
    for batch in _model_batches(root, model_id, cols, ok_only=True):  # newest run first: its rows win
        fresh = seen.first_time(batch.column(COL_IMAGE_ID).to_pylist(), batch.column(COL_URI).to_pylist())
        if fresh.any():
            parts.append(_slide_sums(pa.Table.from_batches([batch]).filter(pa.array(fresh))))
        if len(parts) > 64:
            parts = [_merge_sums(parts)]
    per_slide = _merge_sums(parts) if parts else _slide_sums(pa.table({c: pa.array([], PREDICTIONS_SCHEMA.field(c).type)
                                                                        for c in cols}))
    no_slide = pa.nulls(len(per_slide), pa.string())
    per_patient = _merge_sums([per_slide.set_column(per_slide.schema.get_field_index(COL_SLIDE), COL_SLIDE, no_slide)])
    table = pa.concat_tables([_finish(per_patient, "patient", model_id), _finish(per_slide, "slide", model_id)])
    replace_file(storage.join(root, SLIDES_FILE), table_bytes(table))
    return table


class _SeenInputs:
    """64-bit keys of (image_id, uri) pairs seen so far, as one sorted numpy array."""

    def __init__(self) -> None:
        self.keys = np.array([], dtype=np.uint64)

    def first_time(self, image_ids: list[str], uris: list[str]) -> np.ndarray:
        keys = np.fromiter((hash(pair) & 0xFFFFFFFFFFFFFFFF for pair in zip(image_ids, uris)),
                           dtype=np.uint64, count=len(image_ids))
        fresh = ~np.isin(keys, self.keys)
        _, first = np.unique(keys, return_index=True)  # within the batch too
        fresh &= np.isin(np.arange(len(keys)), first)
        self.keys = np.union1d(self.keys, keys[fresh])
        return fresh


def _slide_sums(t: pa.Table) -> pa.Table:
    """One row per (slide_id, patient_id) of ``t`` with the counts and the sum of probabilities."""

    t = pa.table({
        COL_SLIDE: t.column(COL_SLIDE), COL_PATIENT: t.column(COL_PATIENT),
        COL_N_CELLS: pa.array(np.ones(len(t), dtype=np.int64)),
        COL_N_PRED_POS: pc.cast(pc.equal(t.column(COL_PRED), POSITIVE_CLASS), pa.int64()),
        "sum_prob": pc.cast(t.column(COL_PROB), pa.float64()),
        COL_N_LABEL_POS: pc.cast(pc.fill_null(pc.equal(t.column(COL_LABEL), POSITIVE_CLASS), False), pa.int64()),
        COL_N_LABEL_NEG: pc.cast(pc.fill_null(pc.equal(t.column(COL_LABEL), CLASS_NAMES[1]), False), pa.int64()),
    })
    return _merge_sums([t])


def _merge_sums(parts: list[pa.Table]) -> pa.Table:
    t = pa.concat_tables(parts).group_by([COL_SLIDE, COL_PATIENT], use_threads=False)
    t = t.aggregate([(c, "sum") for c in _SUMS])
    return t.rename_columns([c.removesuffix("_sum") for c in t.column_names])


def _finish(t: pa.Table, level: str, model_id: str) -> pa.Table:
    """The slides.parquet rows of one level, sorted by (slide_id, patient_id) with nulls first."""
    rows = sorted(t.to_pylist(), key=lambda r: (str(r[COL_SLIDE]), str(r[COL_PATIENT])))
    return pa.Table.from_pylist([{
        COL_LEVEL: level, COL_SLIDE: r[COL_SLIDE], COL_PATIENT: r[COL_PATIENT], COL_N_CELLS: r[COL_N_CELLS],
        COL_N_PRED_POS: r[COL_N_PRED_POS], COL_FRAC_POS: r[COL_N_PRED_POS] / r[COL_N_CELLS],
        COL_MEAN_PROB: r["sum_prob"] / r[COL_N_CELLS], COL_N_LABEL_POS: r[COL_N_LABEL_POS],
        COL_N_LABEL_NEG: r[COL_N_LABEL_NEG], COL_MODEL_ID: model_id} for r in rows], schema=SLIDES_SCHEMA)


def write_json(uri: str, obj: dict) -> None:
    storage.write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str))
