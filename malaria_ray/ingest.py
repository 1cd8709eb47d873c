"""Listed units -> decoded rows: the one ingestion path of training and scoring.

A Ray Data task expands its units into raw rows (``sources.expand_unit``: loose files, tar/zip
members, Parquet rows), then ``prepare_batch`` gives each row its image id (sha256 of the bytes),
label and identity (``corpus.identify``: what a training listing or a scoring ``--manifest``
decided, else ``corpus.describe``; once per image) and ``image_size`` pixels. A row that cannot be
read or decoded keeps ``status == "error"`` and the reason in ``error`` (None otherwise); it is
never fatal. Imports neither Ray nor TensorFlow.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np

from malaria_ray import corpus, sources
from malaria_ray.preprocess import DecodeError, decode_image
from malaria_ray.schema import (
    COL_DATA, COL_ERROR, COL_ERROR_KIND, COL_IMAGE_ID, COL_KIND, COL_LABEL, COL_LABEL_HINT, COL_PATIENT,
    COL_PATIENT_HINT, COL_PIXELS, COL_SLIDE, COL_SLIDE_HINT, COL_SOURCE_VERSION, COL_STATUS, COL_URI, COL_VERSION,
    ERROR_PERMANENT, KIND_IMAGE, RESIZE_DEFAULT, STATUS_ALREADY, STATUS_ERROR, STATUS_OK,
)

READ_THREADS = 16  # loose files in flight per read task (object-store latency, not CPU, bounds them)

NO_IDS = np.array([], dtype="S64")  # an empty skip list (read-only: never appended to in place)
NO_IDS.flags.writeable = False


def image_id_of(data: bytes | None, uri: str) -> str:
    """sha256 of the bytes; an input with no bytes (unreadable member) hashes its uri instead."""
    return hashlib.sha256(data).hexdigest() if data is not None else hashlib.sha256(b"uri:" + uri.encode()).hexdigest()


def prepare_batch(batch: dict[str, np.ndarray], image_size: int, skip_ids: np.ndarray = NO_IDS,
                  known: corpus.Identities | None = None, resize_method: str = RESIZE_DEFAULT) -> dict[str, np.ndarray]:
    """Raw rows -> ids, identity, label and ``image_size`` pixels; bad bytes become error rows.

    Identity and label are decided here, once per image (``corpus.identify``): ``known`` (a
    training listing, a scoring ``--manifest``) wins over what the input and its names say.
    ``resize_method``: the model contract's (``preprocess.RESIZE_FILTERS``).
    Rows whose image id is in ``skip_ids`` (sorted) become ``already_scored`` and are not decoded.
    """
    n = len(batch[COL_URI])
    pixels = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    cols = {k: np.empty(n, dtype=object) for k in (COL_IMAGE_ID, COL_SLIDE, COL_PATIENT, COL_LABEL, COL_ERROR,
                                                   COL_ERROR_KIND)}
    kinds = batch.get(COL_ERROR_KIND, [None] * n)  # transient or permanent, for the read's error rows
    status = np.asarray(batch[COL_STATUS], dtype=object).copy()
    for i in range(n):
        uri, data, err = batch[COL_URI][i], batch[COL_DATA][i], batch[COL_ERROR][i]
        if status[i] not in (STATUS_OK, STATUS_ERROR):
            continue  # non-images and empty archives travel on only to be counted
        cols[COL_LABEL][i], cols[COL_SLIDE][i], cols[COL_PATIENT][i] = corpus.identify(
            uri, known, batch[COL_LABEL_HINT][i], batch[COL_SLIDE_HINT][i], batch[COL_PATIENT_HINT][i])
        cols[COL_IMAGE_ID][i] = image_id_of(data if status[i] == STATUS_OK else None, uri)
        if in_sorted(skip_ids, cols[COL_IMAGE_ID][i]):
            status[i] = STATUS_ALREADY
            continue
        if status[i] == STATUS_ERROR:
            cols[COL_ERROR][i], cols[COL_ERROR_KIND][i] = err, kinds[i] or ERROR_PERMANENT
            continue
        try:
            pixels[i] = decode_image(bytes(data), image_size, resize_method)
        except DecodeError as exc:  # the bytes are what they are: another try decodes them no better
            status[i], cols[COL_ERROR][i], cols[COL_ERROR_KIND][i] = STATUS_ERROR, str(exc), ERROR_PERMANENT
    return {COL_URI: np.asarray(batch[COL_URI], dtype=object), COL_STATUS: status, COL_PIXELS: pixels,
            COL_SOURCE_VERSION: np.asarray(batch.get(COL_SOURCE_VERSION, [None] * n), dtype=object), **cols}


def read_and_prepare(units: dict[str, np.ndarray], image_size: int, skip_ids: np.ndarray, batch_size: int,
                     limits: sources.Limits = sources.DEFAULT_LIMITS,
                     known: corpus.Identities | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Listed units -> prepared batches of ``batch_size`` rows, read and decoded in one CPU task
    (training: its corpus is many files, and decoded once per run). An archive streams member by
    member, so a task holds at most one batch of bytes, however large the archive."""
    for rows in _raw_rows(units, batch_size, limits):
        yield prepare_batch(sources.rows_to_batch(rows), image_size, skip_ids, known)


def read_raw(units: dict[str, np.ndarray], batch_size: int, limits: sources.Limits = sources.DEFAULT_LIMITS,
             threads: int = READ_THREADS) -> Iterator:
    """Listed units -> Arrow tables of ``batch_size`` raw rows (``sources.RAW_SCHEMA``: encoded bytes,
    status, hints), not decoded: scoring's read stage. Decoding is a stage of its own
    (``prepare_batch`` in tasks of ``batch_size`` images), so one 20,000-image tar, zip or Parquet
    file is read by one task and decoded on every CPU. Loose files are fetched ``threads`` at a
    time, in listing order: an object store's latency per request is paid in parallel."""
    for rows in _raw_rows(units, batch_size, limits, threads):
        yield sources.rows_to_table(rows)


def _raw_rows(units: dict[str, np.ndarray], batch_size: int, limits: sources.Limits,
              threads: int = 1) -> Iterator[list[dict]]:
    """Lists of ``batch_size`` raw rows (the last may be shorter) from the units, in order."""
    rows: list[dict] = []
    for row in _unit_rows(units, limits, threads):
        rows.append(row)
        if len(rows) == batch_size:
            yield rows
            rows = []
    if rows:
        yield rows


def _unit_rows(units: dict[str, np.ndarray], limits: sources.Limits, threads: int) -> Iterator[dict]:
    versions = units[COL_VERSION] if COL_VERSION in units else [None] * len(units[COL_URI])
    listed = list(zip(units[COL_KIND], units[COL_URI], versions))
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        i = 0
        while i < len(listed):
            kind, uri, version = listed[i]
            if kind != KIND_IMAGE:
                yield from sources.expand_unit({COL_KIND: kind, COL_URI: uri, COL_VERSION: version}, limits=limits)
                i += 1
                continue
            j = i  # a run of loose files, fetched concurrently (at most 4 x threads in flight)
            while j < len(listed) and j - i < 4 * threads and listed[j][0] == KIND_IMAGE:
                j += 1
            run = listed[i:j]
            read = lambda unit: list(sources.expand_unit({COL_KIND: unit[0], COL_URI: unit[1], COL_VERSION: unit[2]},
                                                         limits=limits))
            for (_, _, version), unit_rows in zip(run, pool.map(read, run) if pool else map(read, run)):
                for row in unit_rows:
                    row[COL_SOURCE_VERSION] = version  # a loose file: its listing version names its bytes
                    yield row
            i = j
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def in_sorted(sorted_keys: np.ndarray, key: str) -> bool:
    """Whether ``key`` is in the sorted array ``sorted_keys`` (str, or fixed-width ASCII bytes)."""
    if not len(sorted_keys):
        return False
    if sorted_keys.dtype.kind == "S":  # ``outputs.scored_ids``: fixed-width ASCII
        key = key.encode("ascii")
    i = int(np.searchsorted(sorted_keys, key))
    return i < len(sorted_keys) and sorted_keys[i] == key


def slices(table, n: int, multiple: int = 1) -> list:
    """``table`` cut into at most ``n`` near-equal blocks, one read task each; with ``multiple``,
    every block but the last holds a multiple of that many rows, so a read task that yields
    batches of ``multiple`` rows leaves no short remainder batch behind (loose files)."""
    n = max(1, min(n, table.num_rows))
    if multiple > 1 and table.num_rows:
        per = -(-table.num_rows // (n * multiple)) * multiple
        bounds = list(range(0, table.num_rows, per)) + [table.num_rows]
    else:
        bounds = [round(i * table.num_rows / n) for i in range(n + 1)]
    return [table.slice(a, b - a) for a, b in zip(bounds, bounds[1:])]
