"""The layout of a scoring output root that nightly runs share, and what is committed there.

Layout (``ROOT`` = ``--output``, local or ``s3://``)::

    ROOT/predictions/<run_id>.partNNNNN.parquet   the run's rows, one file per published part
    ROOT/predictions/_staging/...                 the part being written; ``_`` makes every reader skip it
    ROOT/metrics.parquet                          one row per finished run
    ROOT/slides.parquet                           per slide and per patient, current model
    ROOT/runs/<run_id>/config.json, manifest.json, metrics.parquet, plots/confusion_matrix.png
    ROOT/_lease.json                              the running run's lease (``malaria_ray.lease``)
    ROOT/_lease.lock                              local roots: the lock its compare-and-swap takes

Who writes what: the commit protocol is ``malaria_ray.scoringrun.ScoringRun``; the parts are
written by ``malaria_ray.writer.PredictionWriter``; the manifests and metrics rows are
``malaria_ray.manifests``. This module reads the committed parts back: which runs and parts are
published, the ids and loose-file keys a model already scored (``--skip-scored``), and the
``slides.parquet`` view rebuilt from them (``metrics.evidence``).

Readers: ``pandas.read_parquet(ROOT/predictions)``, ``pyarrow.dataset.dataset(ROOT/predictions)``
and DuckDB ``read_parquet('ROOT/predictions/*.parquet')``. Pure: imports neither Ray nor TF.
"""

from __future__ import annotations

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
    COL_ERROR, COL_IMAGE_ID, COL_LABEL, COL_MODEL_ID, COL_PATIENT, COL_PRED, COL_PROB, COL_SLIDE, COL_SOURCE_VERSION,
    COL_URI, PREDICTIONS_SCHEMA,
)

log = logs.get("score")
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
        m = PART_SUFFIX.match(name[: -len(".parquet")])
        if m is None:
            log.warning(f"{predictions_uri(root)}/{name} is not a published part (<run_id>.partNNNNN.parquet): "
                        "left out of --skip-scored and the roll-ups")
            continue
        found.append((m.group("run"), int(m.group("part")), name))
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
            missing = sorted(set(read) - set(pf.schema_arrow.names))
            if missing:
                raise storage.StorageError(f"{predictions_uri(root)}/{name} lacks column(s) {', '.join(missing)}: "
                                           "not a predictions part of this version; move it out of the output root")
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
