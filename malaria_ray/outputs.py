"""The scoring output contract under one output root that nightly runs share, and its commit.

Layout (``ROOT`` = ``--output``, local or ``s3://``)::

    ROOT/predictions/<run_id>.partNNNNN.parquet   the run's rows, one file per published part
    ROOT/predictions/_staging/...                 the part being written; ``_`` makes every reader skip it
    ROOT/metrics.parquet                          one row per finished run
    ROOT/slides.parquet                           per slide and per patient, current model
    ROOT/runs/<run_id>/config.json, manifest.json, metrics.parquet, plots/confusion_matrix.png

Commit protocol: a run writes ``runs/<run_id>/config.json`` and a manifest that says
``"finished": false``, then streams its rows into a part in ``predictions/_staging/``. When a
part is full (``--commit-every-rows`` rows or ``--commit-every-minutes``), it is published in one
atomic step (a POSIX rename locally; on S3 one server-side copy, which creates the object whole or
not at all) and the manifest lists it. At the end the last part is published and the manifest
says ``"finished": true`` with the run's counts, beside its metrics row. A run killed at any point
leaves whole published parts (readers and ``--skip-scored`` count them) and at most one ``_staging``
file that none counts (a later run deletes those older than a day: ``remove_stale_staging``).
``metrics.parquet`` and ``slides.parquet`` are derived views rebuilt at the end of a run from
published files only and replaced in one write (temp + rename locally; a single PUT on S3), so a
crash before the rebuild heals on the next run.

Readers: ``pandas.read_parquet(ROOT/predictions)``, ``pyarrow.dataset.dataset(ROOT/predictions)``
and DuckDB ``read_parquet('ROOT/predictions/*.parquet')``. Pure: imports neither Ray nor TF.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import re
import time
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from malaria_ray import metrics, storage
from malaria_ray.ingest import NO_IDS
from malaria_ray.schema import (
    COL_ERROR, COL_IMAGE_ID, COL_LABEL, COL_MODEL_ID, COL_PATIENT, COL_PRED, COL_PROB, COL_SLIDE, COL_SOURCE_VERSION,
    COL_URI, METRIC_RATES, METRICS_COLUMNS, PREDICTIONS_SCHEMA,
)

PREDICTIONS_DIR, STAGING_DIR, RUNS_DIR = "predictions", "_staging", "runs"
METRICS_FILE, SLIDES_FILE = "metrics.parquet", "slides.parquet"
# Rows the writer holds before it writes a row group: bounds the driver's memory (the rows of a
# run are never all held) while keeping row groups large enough for readers to scan quickly.
ROW_GROUP_ROWS = 8_192


def predictions_uri(root: str) -> str:
    return storage.join(root, PREDICTIONS_DIR)


def run_uri(root: str, run_id: str) -> str:
    return storage.join(root, RUNS_DIR, run_id)


PART_SUFFIX = re.compile(r"^(?P<run>.+)\.part(?P<part>\d{5})$")


def part_name(run_id: str, part: int) -> str:
    return f"{run_id}.part{part:05d}.parquet"


class PredictionWriter:
    """Streams a run's prediction batches into parts; each part is published whole, in one step,
    once it holds ``part_rows`` rows or has been open ``part_seconds`` (and the last at ``commit``).

    A run killed at any point keeps every published part: readers see whole files only, and the
    next ``--skip-scored`` run skips what they hold. ``on_part(writer)`` runs after each publish
    (the run's manifest records the parts). Without ``commit``, the open part stays in staging.
    """

    def __init__(self, root: str, run_id: str, part_rows: int = 100_000, part_seconds: float = 600.0,
                 on_part=None) -> None:
        self.root, self.run_id = root, run_id
        self.part_rows, self.part_seconds, self.on_part = part_rows, part_seconds, on_part
        self.parts: list[str] = []  # URIs of the published parts, in order
        self.rows = 0  # rows written, published or not
        self.staging_uri: str | None = None
        self._open = False

    def _start(self) -> None:
        name = part_name(self.run_id, len(self.parts) + 1)
        self.staging_uri = storage.join(predictions_uri(self.root), STAGING_DIR, name)
        self.final_uri = storage.join(predictions_uri(self.root), name)
        self._fs, self._path = storage.filesystem(self.staging_uri)
        self._fs.makedirs(posixpath.dirname(self._path), exist_ok=True)
        self._file = self._fs.open(self._path, "wb")
        self._writer = pq.ParquetWriter(self._file, PREDICTIONS_SCHEMA, compression="zstd")
        self._pending: list[pa.Table] = []
        self._pending_rows = self._part_rows = 0
        self._started = time.monotonic()
        self._open = True

    def write(self, table: pa.Table) -> None:
        if not self._open:
            self._start()
        table = normalize(table).combine_chunks()  # own buffers, not slices of Ray's larger blocks
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self._part_rows += table.num_rows
        self.rows += table.num_rows
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush()
        if self._part_rows >= self.part_rows or time.monotonic() - self._started >= self.part_seconds:
            self.close()
            self.commit()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.concat_tables(self._pending), row_group_size=ROW_GROUP_ROWS)
        self._pending, self._pending_rows = [], 0

    def close(self) -> None:
        """Finish the open part's file in staging (not yet visible)."""
        if self._open:
            self._flush()
            self._writer.close()
            self._file.close()
            self._open = False
            self._closed_part = True

    def abort(self) -> None:
        """Drop the unpublished part (best effort: a leftover is invisible to readers anyway);
        published parts stay: they hold finished work."""
        try:
            self.close()
            if getattr(self, "_closed_part", False):
                self._fs.rm(self._path)
                self._closed_part = False
        except Exception:  # noqa: BLE001 - already failing; the staging file is harmless
            pass

    def commit(self) -> None:
        """Publish the closed part: ``predictions/<run_id>.partNNNNN.parquet`` appears whole, in one step."""
        if not getattr(self, "_closed_part", False):
            return
        fs, final = storage.filesystem(self.final_uri)
        if storage.is_remote(self.final_uri):
            fs.copy(self._path, final)  # server-side CopyObject: the object appears whole
            fs.rm(self._path)
        else:
            os.replace(self._path, final)
        self._closed_part = False
        self.parts.append(self.final_uri)
        if self.on_part is not None:
            self.on_part(self)


def normalize(table: pa.Table) -> pa.Table:
    """Prediction rows in ``PREDICTIONS_SCHEMA``: null where a value is missing.

    Ray Data turns an all-None object column of a block into doubles (NaN), and a row that was not
    scored carries NaN as its probability; both become proper nulls here, as does a column the
    producer does not have (``source_version`` outside loose files).
    """

    cols = []
    for f in PREDICTIONS_SCHEMA:
        if f.name not in table.column_names:
            cols.append(pa.nulls(table.num_rows, f.type))
            continue
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


def committed_files(root: str) -> list[tuple[str, str]]:
    """(run id, file name) of every published predictions file, oldest run and first part first."""
    fs, path = storage.filesystem(predictions_uri(root))
    fs.invalidate_cache(path)  # other runs write here: never trust a cached listing
    if not fs.exists(path):
        return []
    found = []
    for name in (posixpath.basename(p) for p in fs.ls(path, detail=False)):
        if not name.endswith(".parquet") or name.startswith(("_", ".")):
            continue
        stem = name[: -len(".parquet")]
        m = PART_SUFFIX.match(stem)  # a whole-run file of earlier versions has no part suffix
        found.append((m.group("run") if m else stem, int(m.group("part")) if m else 0, name))
    return [(run, name) for run, _, name in sorted(found)]


def committed_runs(root: str) -> list[str]:
    """Run ids with at least one published predictions file, oldest name first."""
    return list(dict.fromkeys(run for run, _ in committed_files(root)))


def _model_batches(root: str, model_id: str, columns: list[str], ok_only: bool = False) -> Iterator[pa.RecordBatch]:
    """``columns`` of the committed predictions of ``model_id`` (error rows dropped when
    ``ok_only``), newest run first, one file and one row group at a time on this thread.

    Not ``pyarrow.dataset``: its scanner reads ahead on Arrow's thread pools, and the driver's
    memory then grew with the store (docs/benchmarks.md, driver memory).
    """
    fs, pred_path = storage.filesystem(predictions_uri(root))
    read = list(dict.fromkeys([*columns, COL_MODEL_ID, COL_ERROR]))
    for _run_id, name in reversed(committed_files(root)):
        with fs.open(posixpath.join(pred_path, name), "rb") as f:
            pf = pq.ParquetFile(f)
            if not set(read) <= set(pf.schema_arrow.names):  # a file of an earlier version lacks a column
                continue
            for batch in pf.iter_batches(batch_size=ROW_GROUP_ROWS, columns=read, use_threads=False):
                keep = pc.equal(batch.column(COL_MODEL_ID), model_id)
                if ok_only:
                    keep = pc.and_(keep, pc.is_null(batch.column(COL_ERROR)))
                batch = batch.filter(keep).select(columns)
                if batch.num_rows:
                    yield batch


def scored_ids(root: str, model_id: str) -> np.ndarray:
    """Sorted image ids this model already scored under ``root`` (ids only; for --skip-scored).

    Fixed-width ASCII (``S64`` for sha256 hex), not Python strings: half the memory, and one
    buffer that every decode task maps from Ray's object store instead of unpickling.
    """
    chunks = [pc.drop_null(batch.column(0)).to_numpy(zero_copy_only=False)
              for batch in _model_batches(root, model_id, [COL_IMAGE_ID])]
    return np.unique(np.concatenate(chunks).astype(np.bytes_)) if chunks else NO_IDS


def source_key(uri: str, version: str) -> int:
    """64-bit key of a loose file's (uri, listing version)."""
    return int.from_bytes(hashlib.blake2b(f"{uri}\0{version}".encode(), digest_size=8).digest(), "little")


def scored_sources(root: str, model_id: str) -> np.ndarray:
    """Sorted ``source_key`` of every loose file this model scored under ``root`` with a listing
    version (size and mtime, or size and ETag): a listed file with the same key has the same bytes
    and need not be read again (--skip-scored). 8 bytes per file in the driver."""
    keys = [np.fromiter((source_key(u, v) for u, v in zip(b.column(0).to_pylist(), b.column(1).to_pylist())
                         if v is not None), dtype=np.uint64)
            for b in _model_batches(root, model_id, [COL_URI, COL_SOURCE_VERSION])]
    return np.unique(np.concatenate(keys)) if keys else np.array([], dtype=np.uint64)


MANIFEST_FILE = "manifest.json"


def write_manifest(root: str, run_id: str, manifest: dict) -> None:
    """``runs/<run_id>/manifest.json``, replaced whole (readers never see half of it)."""
    storage.replace_file(storage.join(run_uri(root, run_id), MANIFEST_FILE),
                         json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())


def read_manifest(root: str, run_id: str) -> dict | None:
    uri = storage.join(run_uri(root, run_id), MANIFEST_FILE)
    try:
        return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None
    except ValueError:
        return None


def unfinished_runs(root: str) -> list[str]:
    """Runs that published rows but never finished (killed), and that no later run completed yet."""
    out = []
    for run_id in committed_runs(root):
        m = read_manifest(root, run_id)
        if m is None or (not m.get("finished") and not m.get("completed_by")):
            out.append(run_id)
    return out


def mark_completed(root: str, run_id: str, by: str) -> None:
    """Record in an unfinished run's manifest which later run completed it."""
    m = read_manifest(root, run_id) or {"run_id": run_id, "finished": False}
    write_manifest(root, run_id, {**m, "completed_by": by})


def write_run_metrics(root: str, run_id: str, row: dict) -> None:
    """The run's metrics row; a rate it cannot compute (an unlabelled archive) is null, not NaN."""
    row = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
    table = pa.Table.from_pylist([row]).select(list(METRICS_COLUMNS))
    table = table.cast(pa.schema([pa.field(f.name, pa.float64()) if f.name in METRIC_RATES else f for f in table.schema]))
    storage.write_bytes(storage.join(run_uri(root, run_id), METRICS_FILE), storage.table_bytes(table))


def finished_runs(root: str) -> list[str]:
    """Runs whose manifest says they finished (a night with nothing new to score publishes no
    predictions file, and still finished), oldest name first; runs of earlier versions, whose
    manifest has no ``finished``, count when their predictions file is published."""
    fs, path = storage.filesystem(storage.join(root, RUNS_DIR))
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    published = set(committed_runs(root))
    out = []
    for run_id in sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)):
        m = read_manifest(root, run_id) or {}
        if m.get("finished") or ("finished" not in m and run_id in published):
            out.append(run_id)
    return out


def rebuild_metrics(root: str) -> pa.Table:
    """``metrics.parquet`` = the metrics rows of finished runs (small: one row per run)."""
    tables = []
    for run_id in finished_runs(root):
        uri = storage.join(run_uri(root, run_id), METRICS_FILE)
        if storage.exists(uri):
            fs, path = storage.filesystem(uri)
            with fs.open(path, "rb") as f:
                tables.append(pq.read_table(f))
    table = pa.concat_tables(tables, promote_options="default") if tables else pa.table({})
    storage.replace_file(storage.join(root, METRICS_FILE), storage.table_bytes(table))
    return table


def rebuild_slides(root: str, model_id: str, fp_rate: float | None = None) -> pa.Table:
    """Per-slide and per-patient roll-up (``metrics.evidence``) of the current model's committed
    predictions.

    Streams the predictions batch by batch and sums each batch per (slide, patient)
    (``metrics.evidence_sums``), so memory grows with the number of slides, not of rows. An input
    (same bytes at the same uri) scored by this model in several runs (no --skip-scored) counts
    once, from its newest run: ``_SeenInputs`` keeps 8 bytes per input for that. ``fp_rate``: the
    model's false-positive rate per cell at its operating point, for the slide and patient calls
    (``metrics.CALL_RULE``).
    """
    cols = [COL_IMAGE_ID, COL_URI, COL_SLIDE, COL_PATIENT, COL_LABEL, COL_PROB, COL_PRED, COL_ERROR]
    seen, parts = _SeenInputs(), []
    for batch in _model_batches(root, model_id, cols, ok_only=True):  # newest run first: its rows win
        fresh = seen.first_time(batch.column(COL_IMAGE_ID).to_pylist(), batch.column(COL_URI).to_pylist())
        if fresh.any():
            parts.append(metrics.evidence_sums(pa.Table.from_batches([batch]).filter(pa.array(fresh))))
        if len(parts) > 64:
            parts = [metrics.merge_evidence_sums(parts)]
    sums = (metrics.merge_evidence_sums(parts) if parts else
            metrics.evidence_sums(pa.table({c: pa.array([], PREDICTIONS_SCHEMA.field(c).type) for c in cols})))
    table = metrics.evidence(sums, fp_rate, model_id)
    storage.replace_file(storage.join(root, SLIDES_FILE), storage.table_bytes(table))
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


LEASE_FILE = "_lease.json"  # under ROOT; "_": no reader takes it for output
LEASE_SECONDS = 15 * 60
LEASE_SETTLE_SECONDS = 1.0


class LeaseHeld(RuntimeError):
    """Another run is writing under the same output root; the message says which and until when."""


def _dead_here(held: dict) -> bool:
    """Whether the lease holder ran on this host and its process is gone (killed, OOM): its lease
    need not be waited out."""
    import socket

    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class Lease:
    """One scoring run at a time per output root: a lease file with an expiry.

    ``acquire`` takes the lease when there is none, it expired (a crashed run's lease lapses
    ``seconds`` after its last renewal), or its holder ran on this host and its process is gone;
    it writes the lease, waits ``LEASE_SETTLE_SECONDS`` and reads it back: of two runs that start
    at once, the one whose write landed last holds it and the other refuses
    (object stores offer no compare-and-swap through fsspec; the settle time covers the gap
    between one run's check and its write). ``renew`` extends it as the run goes; ``release``
    deletes it if this run still holds it.
    """

    def __init__(self, root: str, run_id: str, seconds: float = LEASE_SECONDS) -> None:
        self.uri, self.run_id, self.seconds = storage.join(root, LEASE_FILE), run_id, seconds
        self._renewed = 0.0

    def _read(self) -> dict | None:
        try:
            return json.loads(storage.read_bytes(self.uri)) if storage.exists(self.uri) else None
        except (OSError, ValueError):
            return None

    def _write(self) -> None:
        import socket

        now = time.time()
        storage.replace_file(self.uri, json.dumps({
            "run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
            "renewed_at": now, "expires_at": now + self.seconds}).encode())
        self._renewed = time.monotonic()

    def _refuse_if_held(self) -> None:
        held = self._read()
        if held and held.get("run_id") != self.run_id and held.get("expires_at", 0) > time.time() \
                and not _dead_here(held):
            until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(held["expires_at"]))
            raise LeaseHeld(f"another scoring run ({held.get('run_id')} on {held.get('host')}, pid {held.get('pid')}) "
                            f"is writing under this output root; its lease runs until {until} unless renewed. "
                            f"If that run is dead, wait for the lease to expire or delete {self.uri}")

    def acquire(self) -> None:
        self._refuse_if_held()
        self._write()
        time.sleep(LEASE_SETTLE_SECONDS)
        self._refuse_if_held()

    def renew(self) -> None:
        """Extend the lease; cheap to call often (it writes at most every third of its length)."""
        if time.monotonic() - self._renewed >= self.seconds / 3:
            self._write()

    def release(self) -> None:
        held = self._read()
        if held and held.get("run_id") == self.run_id:
            fs, path = storage.filesystem(self.uri)
            fs.rm(path)
