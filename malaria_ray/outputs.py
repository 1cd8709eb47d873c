"""The layout of a scoring output root that nightly runs share, and what is committed there.

Layout (``ROOT`` = ``--output``, local or ``s3://``)::

    ROOT/predictions/scored_date=YYYY-MM-DD/<run_id>.partNNNNN.parquet
                                                  the run's rows, one file per published part, in the
                                                  partition of the run's start date (UTC)
    ROOT/_staging/<run_id>.partNNNNN.parquet      the part being written: outside predictions/, so no
                                                  reader's glob (DuckDB's ``**`` included) meets it
    ROOT/metrics.parquet                          one row per finished run
    ROOT/slides.parquet                           per slide and per patient, current model
    ROOT/fields.parquet                           per field photograph, current model (``score --fields``)
    ROOT/runs/<run_id>/config.json, manifest.json, metrics.parquet, plots/confusion_matrix.png
    ROOT/runs/<run_id>/plots/fields_overlay.png   sample fields with their boxes (``score --fields``; ``overlay``)
    ROOT/_lease.json                              the running run's lease (``malaria_ray.lease``)
    ROOT/_lease.lock                              local roots: the lock its compare-and-swap takes

Who writes what: the commit protocol is ``malaria_ray.scoringrun.ScoringRun``; the parts are
written by ``malaria_ray.writer.PredictionWriter``; the manifests and metrics rows are
``malaria_ray.manifests``. This module reads the committed parts back: which runs and parts are
published, the ids and loose-file keys a model already scored (``--skip-scored``), and the
``slides.parquet`` view rebuilt from them (``metrics.evidence``).

Partitions: Hive-style ``scored_date=YYYY-MM-DD``, the run's start date in UTC, so one run's parts
share one partition and reading one night opens that night's files only:
``pandas.read_parquet(ROOT/predictions, filters=[("scored_date", "==", "2026-12-05")])``,
``pyarrow.dataset.dataset(ROOT/predictions, partitioning="hive")``, DuckDB
``read_parquet('ROOT/predictions/*/*.parquet', hive_partitioning=true)`` and Spark
``spark.read.parquet("ROOT/predictions")`` (each adds a ``scored_date`` column: pandas as a category,
pyarrow as a string, DuckDB and Spark as a date). No second level by model: a part holds one model's
rows and ``model_id`` is also a column of the file (a partition key of the same name clashes in
every reader); a model's rows are found by the row-group statistics of ``model_id`` instead, which
``_model_batches`` reads from the footers, so the other models' rows are never read.

Roots written before the partitions (``predictions/<run_id>.partNNNNN.parquet``) are refused by
``committed_files`` with one line naming ``malaria-ray migrate ROOT`` (``malaria_ray.migrate``),
which moves them into their partitions: a flat part beside partitions trips DuckDB's and Spark's
partition discovery. Pure: imports neither Ray nor TF.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import posixpath
import re
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from malaria_ray import logs, metrics, storage
from malaria_ray.ingest import NO_IDS
from malaria_ray.schema import (
    COL_DETECTOR, COL_ERROR, COL_ERROR_KIND, COL_FIELD_FLAGS, COL_FIELD_ID, COL_FRAC_HIGH, COL_FRAC_LOW, COL_FRAC_POS,
    COL_IMAGE_ID, COL_LABEL, COL_MEAN_PROB, COL_MODEL_ID, COL_N_CELLS, COL_N_PRED_POS, COL_PATIENT, COL_PRED, COL_PROB,
    COL_RUN_ID, COL_SLIDE, COL_SOURCE_VERSION, COL_SUM_PROB, COL_URI, ERROR_TRANSIENT, FIELD_COLUMNS, FIELDS_SCHEMA,
    POSITIVE_CLASS, PREDICTIONS_SCHEMA,
)

log = logs.get("score")
PREDICTIONS_DIR, STAGING_DIR, RUNS_DIR = "predictions", "_staging", "runs"
METRICS_FILE, SLIDES_FILE, FIELDS_FILE = "metrics.parquet", "slides.parquet", "fields.parquet"
# Rows the writer holds before it writes a row group: bounds the driver's memory (the rows of a
# run are never all held) while keeping row groups large enough for readers to scan quickly.
ROW_GROUP_ROWS = 8_192
PART_KIND = "predictions part"  # what ``storage.require_columns`` calls a file it refuses
ANY_DETECTOR = "*"  # ``_model_batches``: rows of cut-out cells and of every detector's field cells


def predictions_uri(root: str) -> str:
    return storage.join(root, PREDICTIONS_DIR)


def run_uri(root: str, run_id: str) -> str:
    return storage.join(root, RUNS_DIR, run_id)


PART_SUFFIX = re.compile(r"^(?P<run>.+)\.part(?P<part>\d{5})$")
PARTITION_KEY = "scored_date"  # not a column of the files: a partition key of a column's name clashes in readers
PARTITION = re.compile(rf"^{PARTITION_KEY}=(?P<date>\d{{4}}-\d{{2}}-\d{{2}})$")


def part_name(run_id: str, part: int) -> str:
    return f"{run_id}.part{part:05d}.parquet"


def scored_date(when: dt.datetime | None = None) -> str:
    """The partition date of a run started at ``when`` (now when None): its UTC date."""
    return (when or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc).strftime("%Y-%m-%d")


def partition_name(date: str) -> str:
    """``scored_date=YYYY-MM-DD``: the folder under predictions/ of the runs started that UTC day."""
    name = f"{PARTITION_KEY}={date}"
    if PARTITION.match(name) is None:
        raise ValueError(f"a scored date is YYYY-MM-DD, not {date!r}")
    return name


def staging_uri(root: str) -> str:
    """Where parts are written before they are published: outside predictions/."""
    return storage.join(root, STAGING_DIR)


STALE_STAGING_SECONDS = 24 * 3600  # older staging files belong to crashed runs, not running ones


def remove_stale_staging(root: str, max_age_s: float = STALE_STAGING_SECONDS) -> list[str]:
    """Delete staging files that crashed runs left behind (older than ``max_age_s``); their names.
    Both ``ROOT/_staging`` and ``predictions/_staging`` (where earlier versions staged parts).

    Readers never see staging files; this only returns their space. A staging file younger than
    the limit may belong to a run still writing under the same root, so it is left alone.
    """
    now, removed = dt.datetime.now(dt.timezone.utc), []
    for where in (staging_uri(root), storage.join(predictions_uri(root), STAGING_DIR)):
        fs, path = storage.filesystem(where)
        fs.invalidate_cache(path)  # other processes write here: never trust a cached listing
        if not fs.exists(path):
            continue
        for info in fs.ls(path, detail=True):
            modified = fs.modified(info["name"])
            if modified.tzinfo is None:  # local filesystems report naive UTC
                modified = modified.replace(tzinfo=dt.timezone.utc)
            if (now - modified).total_seconds() > max_age_s:
                fs.rm(info["name"])
                removed.append(posixpath.basename(info["name"]))
    return removed


def list_parts(root: str) -> tuple[list[tuple[str, int, str]], list[tuple[str, int, str]]]:
    """(run id, part number, path under predictions/) of the published parts, and of the parts in
    the flat layout of earlier versions (the path is then the file name), each sorted by run and
    part. One recursive listing (on S3, one paginated LIST for a year of nights). Files under
    ``_``/``.`` folders are skipped, as every reader skips them; other files are named and left out."""
    fs, path = storage.filesystem(predictions_uri(root))
    storage.forget_listings(fs, path)  # other runs write here, partitions included: never trust a cached listing
    if not fs.exists(path):
        return [], []
    base, parts, flat = path.rstrip("/") + "/", [], []
    for full in sorted(fs.find(path)):
        rel = full[len(base):] if full.startswith(base) else posixpath.basename(full)
        segments = rel.split("/")
        if any(s.startswith(("_", ".")) for s in segments) or not rel.endswith(".parquet"):
            continue
        m = PART_SUFFIX.match(segments[-1][: -len(".parquet")])
        if m is not None and len(segments) == 2 and PARTITION.match(segments[0]):
            parts.append((m.group("run"), int(m.group("part")), rel))
        elif m is not None and len(segments) == 1:
            flat.append((m.group("run"), int(m.group("part")), rel))
        else:
            log.warning(f"{predictions_uri(root)}/{rel} is not a published part "
                        f"({PARTITION_KEY}=YYYY-MM-DD/<run_id>.partNNNNN.parquet): left out of --skip-scored and "
                        "the roll-ups")
    return sorted(parts), sorted(flat)


def committed_files(root: str) -> list[tuple[str, str]]:
    """(run id, path under predictions/) of every published predictions file, oldest run and first
    part first. Raises ``StorageError`` on a root that still holds parts in the flat layout."""
    parts, flat = list_parts(root)
    if flat:
        raise storage.StorageError(
            f"{predictions_uri(root)} holds {len(flat)} part(s) in the flat layout of earlier versions "
            f"(e.g. {flat[0][2]}): run `malaria-ray migrate {root}` once to move them into "
            f"{PARTITION_KEY}=YYYY-MM-DD/ partitions")
    return [(run, rel) for run, _, rel in parts]


def committed_runs(root: str) -> list[str]:
    """Run ids with at least one published predictions file, oldest name first."""
    return list(dict.fromkeys(run for run, _ in committed_files(root)))


def run_table(root: str, run_id: str, columns: list[str]) -> pa.Table:
    """``columns`` of one run's committed rows, whole (an evaluation against annotations: a set of
    annotated fields, not a year of nights)."""
    fs, pred_path = storage.filesystem(predictions_uri(root))
    tables = []
    for run, name in committed_files(root):
        if run == run_id:
            with fs.open(posixpath.join(pred_path, name), "rb") as f:
                pf = pq.ParquetFile(f)
                storage.require_columns(pf.schema_arrow, columns, f"{predictions_uri(root)}/{name}", PART_KIND)
                tables.append(pf.read(columns=columns, use_threads=False))
    return pa.concat_tables(tables) if tables else PREDICTIONS_SCHEMA.empty_table().select(columns)


def _model_batches(root: str, model_id: str, columns: list[str], ok_only: bool = False,
                   detector: str | None = ANY_DETECTOR, settled: bool = False) -> Iterator[pa.RecordBatch]:
    """``columns`` of the committed predictions of ``model_id`` (error rows dropped when
    ``ok_only``; transient error rows dropped when ``settled``: they are to be read again; with
    ``detector``, only the rows of that detector key, or of cut-out cells when it is None), newest
    run first, one file and one row group at a time on this thread. Parts written before field
    photographs were scored lack the field columns: read as nulls (cut-out cells). Parts written
    before error rows had a kind have no ``error_kind`` column: their error rows count as permanent.
    A part lacking another column stops the reader with its name (``storage.require_columns``).
    Row groups whose ``model_id`` statistics exclude ``model_id`` are not read: the other models'
    parts cost their footers only.

    Not ``pyarrow.dataset``: its scanner reads ahead on Arrow's thread pools, and the driver's
    memory then grew with the store (docs/benchmarks.md, driver memory).
    """
    fs, pred_path = storage.filesystem(predictions_uri(root))
    read = list(dict.fromkeys([*columns, COL_MODEL_ID, COL_ERROR, *([COL_DETECTOR] if detector != ANY_DETECTOR else [])]))
    for _run_id, name in reversed(committed_files(root)):
        with fs.open(posixpath.join(pred_path, name), "rb") as f:
            pf = pq.ParquetFile(f)
            storage.require_columns(pf.schema_arrow, [c for c in read if c not in FIELD_COLUMNS],
                                    f"{predictions_uri(root)}/{name}", PART_KIND)
            groups = model_row_groups(pf, model_id)
            if not groups:
                continue
            present = [c for c in read if c in pf.schema_arrow.names]
            kinds = settled and COL_ERROR_KIND in pf.schema_arrow.names
            for batch in pf.iter_batches(batch_size=ROW_GROUP_ROWS, row_groups=groups,
                                         columns=present + [COL_ERROR_KIND] * kinds, use_threads=False):
                for c in read:
                    if c not in present:  # an older part: cut-out cells only
                        batch = batch.append_column(PREDICTIONS_SCHEMA.field(c), pa.nulls(batch.num_rows,
                                                                                         PREDICTIONS_SCHEMA.field(c).type))
                keep = pc.equal(batch.column(COL_MODEL_ID), model_id)
                if ok_only:
                    keep = pc.and_(keep, pc.is_null(batch.column(COL_ERROR)))
                if kinds:
                    keep = pc.and_(keep, pc.fill_null(pc.not_equal(batch.column(COL_ERROR_KIND), ERROR_TRANSIENT), True))
                if detector != ANY_DETECTOR:
                    kind = batch.column(COL_DETECTOR)
                    keep = pc.and_(keep, pc.is_null(kind) if detector is None else pc.fill_null(pc.equal(kind, detector),
                                                                                                False))
                batch = batch.filter(keep).select(columns)
                if batch.num_rows:
                    yield batch


def model_row_groups(pf: pq.ParquetFile, model_id: str) -> list[int]:
    """The row groups of ``pf`` that may hold rows of ``model_id``, by the ``model_id`` column's
    min/max statistics in the footer (a row group without them is kept)."""
    meta = pf.metadata
    col = next((i for i in range(meta.num_columns) if meta.schema.column(i).path == COL_MODEL_ID), None)
    keep = []
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(col).statistics if col is not None else None
        if stats is None or not stats.has_min_max:
            keep.append(g)
            continue
        low, high = (v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in (stats.min, stats.max))
        if low <= model_id <= high:
            keep.append(g)
    return keep


def scored_ids(root: str, model_id: str) -> np.ndarray:
    """Sorted image ids this model already scored under ``root`` (ids only; for --skip-scored),
    transient error rows left out: what failed for a passing reason is read again.

    Fixed-width ASCII (``S64`` for sha256 hex), not Python strings: half the memory, and one
    buffer that every decode task maps from Ray's object store instead of unpickling.
    """
    chunks = [pc.drop_null(batch.column(0)).to_numpy(zero_copy_only=False)
              for batch in _model_batches(root, model_id, [COL_IMAGE_ID], settled=True)]
    return np.unique(np.concatenate(chunks).astype(np.bytes_)) if chunks else NO_IDS


def source_key(uri: str, version: str) -> int:
    """64-bit key of a loose file's (uri, listing version)."""
    return int.from_bytes(hashlib.blake2b(f"{uri}\0{version}".encode(), digest_size=8).digest(), "little")


def scored_sources(root: str, model_id: str, detector: str | None = None) -> np.ndarray:
    """Sorted ``source_key`` of every loose file this model scored under ``root`` with a listing
    version (size and mtime, or size and ETag): a listed file with the same key has the same bytes
    and need not be read again (--skip-scored). A transient error row does not count: an unchanged
    file whose read timed out is read again. 8 bytes per file in the driver. ``detector``: the cell
    detector's key of a ``--fields`` run (its rows only); None: cut-out cells' rows only."""
    keys = [np.fromiter((source_key(u, v) for u, v in zip(b.column(0).to_pylist(), b.column(1).to_pylist())
                         if v is not None), dtype=np.uint64)
            for b in _model_batches(root, model_id, [COL_URI, COL_SOURCE_VERSION], detector=detector, settled=True)]
    return np.unique(np.concatenate(keys)) if keys else np.array([], dtype=np.uint64)


def scored_fields(root: str, model_id: str, detector: str) -> np.ndarray:
    """Sorted ids of the field photographs this model scored with this detector (``--skip-scored``
    of ``--fields``: a field is skipped whole or rescored whole), as ``scored_ids``."""
    chunks = [pc.drop_null(batch.column(0)).to_numpy(zero_copy_only=False)
              for batch in _model_batches(root, model_id, [COL_FIELD_ID], detector=detector, settled=True)]
    return np.unique(np.concatenate(chunks).astype(np.bytes_)) if chunks else NO_IDS


def rebuild_slides(root: str, model_id: str, fp_rate: float | None = None,
                   correction: metrics.Correction | None = None) -> pa.Table:
    """Per-slide and per-patient roll-up (``metrics.evidence``) of the current model's committed
    predictions.

    Streams the predictions batch by batch and sums each batch per (slide, patient)
    (``metrics.evidence_sums``), so memory grows with the number of slides, not of rows. An input
    (same bytes at the same uri) scored by this model in several runs (no --skip-scored) counts
    once, from its newest run: ``_SeenInputs`` keeps 8 bytes per input for that. ``fp_rate``: the
    model's false-positive rate per cell at its operating point, for the slide and patient calls
    (``metrics.CALL_RULE``); ``correction``: the corrected fraction's rates, or why there is none.
    """
    cols = [COL_IMAGE_ID, COL_URI, COL_SLIDE, COL_PATIENT, COL_LABEL, COL_PROB, COL_PRED, COL_ERROR, COL_FIELD_ID,
            COL_RUN_ID]
    seen, fields, parts = _SeenInputs(), _NewestFields(), []
    for batch in _model_batches(root, model_id, cols, ok_only=True):  # newest run first: its rows win
        fresh = seen.first_time(batch.column(COL_IMAGE_ID).to_pylist(), batch.column(COL_URI).to_pylist())
        fresh &= fields.newest(batch)
        if fresh.any():
            parts.append(metrics.evidence_sums(pa.Table.from_batches([batch]).filter(pa.array(fresh))))
        if len(parts) > 64:
            parts = [metrics.merge_evidence_sums(parts)]
    sums = (metrics.merge_evidence_sums(parts) if parts else
            metrics.evidence_sums(pa.table({c: pa.array([], PREDICTIONS_SCHEMA.field(c).type) for c in cols})))
    table = metrics.evidence(sums, fp_rate, model_id, correction)
    storage.replace_file(storage.join(root, SLIDES_FILE), storage.table_bytes(table))
    return table


def rebuild_fields(root: str, model_id: str, correction: metrics.Correction | None = None) -> pa.Table:
    """``fields.parquet``: one row per field photograph the current model scored (``FIELDS_SCHEMA``),
    from its newest run: cells found, called Parasitized, the fraction with its Wilson interval,
    the mean probability, detection's flags, or the error that left it unscored, and the fraction
    corrected by ``correction`` (or why not). Streams like ``rebuild_slides``; memory grows with
    the fields, not the cells."""
    correction = correction or metrics.Correction()
    keys = [COL_URI, COL_FIELD_ID, COL_RUN_ID, COL_SLIDE, COL_PATIENT, COL_DETECTOR]
    cols = [*keys, COL_PROB, COL_PRED, COL_ERROR, COL_FIELD_FLAGS]
    parts = []
    for batch in _model_batches(root, model_id, cols):
        batch = batch.filter(pc.is_valid(batch.column(COL_FIELD_ID)))
        if batch.num_rows:
            parts.append(_field_sums(pa.Table.from_batches([batch]), keys))
        if len(parts) > 64:
            parts = [_merge_field_sums(parts, keys)]
    rows = _merge_field_sums(parts, keys).to_pylist() if parts else []
    newest: dict[tuple, dict] = {}
    for r in sorted(rows, key=lambda r: r[COL_RUN_ID], reverse=True):  # run ids sort by start time
        newest.setdefault((r[COL_URI], r[COL_FIELD_ID]), r)
    out = []
    for r in sorted(newest.values(), key=lambda r: r[COL_URI]):
        n, k = r[COL_N_CELLS], r[COL_N_PRED_POS]
        low, high = metrics.wilson_interval(k, n) if n else (None, None)
        out.append({**{c: r[c] for c in keys}, COL_N_CELLS: n, COL_N_PRED_POS: k, COL_FRAC_POS: k / n if n else None,
                    COL_FRAC_LOW: low, COL_FRAC_HIGH: high, COL_MEAN_PROB: r[COL_SUM_PROB] / n if n else None,
                    COL_FIELD_FLAGS: r[COL_FIELD_FLAGS], COL_ERROR: r[COL_ERROR], COL_MODEL_ID: model_id,
                    **correction.columns(k, n)})
    table = pa.Table.from_pylist(out, schema=FIELDS_SCHEMA)
    storage.replace_file(storage.join(root, FIELDS_FILE), storage.table_bytes(table))
    return table


def _field_sums(t: pa.Table, keys: list[str]) -> pa.Table:
    scored = pc.is_null(t.column(COL_ERROR))
    t = pa.table({**{k: t.column(k) for k in keys},
                  COL_N_CELLS: pc.cast(scored, pa.int64()),
                  COL_N_PRED_POS: pc.cast(pc.fill_null(pc.equal(t.column(COL_PRED), POSITIVE_CLASS), False), pa.int64()),
                  COL_SUM_PROB: pc.fill_null(pc.cast(t.column(COL_PROB), pa.float64()), 0.0),
                  COL_FIELD_FLAGS: t.column(COL_FIELD_FLAGS), COL_ERROR: t.column(COL_ERROR)})
    return _merge_field_sums([t], keys)


def _merge_field_sums(parts: list[pa.Table], keys: list[str]) -> pa.Table:
    t = pa.concat_tables(parts).group_by(keys, use_threads=False).aggregate(
        [(c, "sum") for c in (COL_N_CELLS, COL_N_PRED_POS, COL_SUM_PROB)] +
        [(c, "max") for c in (COL_FIELD_FLAGS, COL_ERROR)])
    return t.rename_columns([c.removesuffix("_sum").removesuffix("_max") for c in t.column_names])


class _NewestFields:
    """The field photographs seen in newer runs, so that the cells of an older run's scoring of the
    same field (another detector finds other boxes, so other cell ids) do not count twice. Batches
    arrive newest run first, each run's files together."""

    def __init__(self) -> None:
        self.done = np.array([], dtype=np.uint64)
        self.this_run: set[int] = set()
        self.run: str | None = None

    def newest(self, batch: pa.RecordBatch) -> np.ndarray:
        """Whether each row is a cut-out cell or a cell of a field no newer run scored."""
        run = batch.column(COL_RUN_ID)[0].as_py() if batch.num_rows else self.run
        if run != self.run:
            self.done = np.union1d(self.done, np.fromiter(self.this_run, np.uint64, count=len(self.this_run)))
            self.this_run, self.run = set(), run
        ids = batch.column(COL_FIELD_ID).to_pylist()
        keys = np.fromiter((hash((f, u)) & 0xFFFFFFFFFFFFFFFF if f is not None else 0
                            for f, u in zip(ids, batch.column(COL_URI).to_pylist())), np.uint64, count=len(ids))
        keep = (keys == 0) | ~np.isin(keys, self.done)
        self.this_run.update(int(k) for k in keys[keep & (keys != 0)])
        return keep


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
