"""Listed units -> decoded rows: the one ingestion path of training and scoring.

A Ray Data task expands its units into raw rows (``sources.expand_unit``: loose files, tar/zip
members, Parquet rows), then ``prepare_batch`` gives each row its image id (sha256 of the bytes),
label and identity (``corpus.describe``) and ``image_size`` pixels. A row that cannot be read or
decoded keeps ``status == "error"`` and the reason in ``error`` (None otherwise); it is never
fatal. Imports neither Ray nor TensorFlow.
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np

from malaria_ray import corpus, sources
from malaria_ray.preprocess import DecodeError, decode_image
from malaria_ray.schema import (
    COL_DATA, COL_ERROR, COL_IMAGE_ID, COL_LABEL, COL_LABEL_HINT, COL_PATIENT, COL_PATIENT_HINT, COL_PIXELS, COL_SLIDE,
    COL_SLIDE_HINT, COL_SOURCE_VERSION, COL_STATUS, COL_URI, STATUS_ALREADY, STATUS_ERROR, STATUS_OK,
)

NO_IDS = np.array([], dtype="S64")  # an empty skip list (read-only: never appended to in place)
NO_IDS.flags.writeable = False


def image_id_of(data: bytes | None, uri: str) -> str:
    """sha256 of the bytes; an input with no bytes (unreadable member) hashes its uri instead."""
    return hashlib.sha256(data).hexdigest() if data is not None else hashlib.sha256(b"uri:" + uri.encode()).hexdigest()


def prepare_batch(batch: dict[str, np.ndarray], image_size: int, skip_ids: np.ndarray = NO_IDS) -> dict[str, np.ndarray]:
    """Raw rows -> ids, identity, label and ``image_size`` pixels; bad bytes become error rows.

    Rows whose image id is in ``skip_ids`` (sorted) become ``already_scored`` and are not decoded.
    """
    n = len(batch[COL_URI])
    pixels = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    cols = {k: np.empty(n, dtype=object) for k in (COL_IMAGE_ID, COL_SLIDE, COL_PATIENT, COL_LABEL, COL_ERROR)}
    status = np.asarray(batch[COL_STATUS], dtype=object).copy()
    for i in range(n):
        uri, data, err = batch[COL_URI][i], batch[COL_DATA][i], batch[COL_ERROR][i]
        if status[i] not in (STATUS_OK, STATUS_ERROR):
            continue  # non-images and empty archives travel on only to be counted
        cols[COL_LABEL][i], cols[COL_SLIDE][i], cols[COL_PATIENT][i] = corpus.describe(
            uri, batch[COL_LABEL_HINT][i], batch[COL_SLIDE_HINT][i], batch[COL_PATIENT_HINT][i])
        cols[COL_IMAGE_ID][i] = image_id_of(data if status[i] == STATUS_OK else None, uri)
        if in_sorted(skip_ids, cols[COL_IMAGE_ID][i]):
            status[i] = STATUS_ALREADY
            continue
        if status[i] == STATUS_ERROR:
            cols[COL_ERROR][i] = err
            continue
        try:
            pixels[i] = decode_image(bytes(data), image_size)
        except DecodeError as exc:
            status[i], cols[COL_ERROR][i] = STATUS_ERROR, str(exc)
    return {COL_URI: np.asarray(batch[COL_URI], dtype=object), COL_STATUS: status, COL_PIXELS: pixels,
            COL_SOURCE_VERSION: np.asarray(batch.get(COL_SOURCE_VERSION, [None] * n), dtype=object), **cols}


def read_and_prepare(units: dict[str, np.ndarray], image_size: int, skip_ids: np.ndarray, batch_size: int,
                     limits: sources.Limits = sources.DEFAULT_LIMITS) -> Iterator[dict[str, np.ndarray]]:
    """Listed units -> prepared batches of ``batch_size`` rows, in one CPU task.

    Reading and decoding share a task, so the raw bytes never pass through Ray's object store:
    only the decoded pixels do. An archive streams member by member, so a task holds at most one
    batch of bytes, however large the archive.
    """
    rows: list[dict] = []
    versions = units["version"] if "version" in units else [None] * len(units["uri"])
    for kind, uri, version in zip(units["kind"], units["uri"], versions):
        for row in sources.expand_unit({"kind": kind, "uri": uri}, limits=limits):
            if kind == sources.KIND_IMAGE:  # a loose file: its listing version names its bytes
                row[COL_SOURCE_VERSION] = version
            rows.append(row)
            if len(rows) == batch_size:
                yield prepare_batch(sources.rows_to_batch(rows), image_size, skip_ids)
                rows = []
    if rows:
        yield prepare_batch(sources.rows_to_batch(rows), image_size, skip_ids)


def in_sorted(sorted_keys: np.ndarray, key: str) -> bool:
    """Whether ``key`` is in the sorted array ``sorted_keys`` (str, or fixed-width ASCII bytes)."""
    if not len(sorted_keys):
        return False
    if sorted_keys.dtype.kind == "S":  # ``outputs.scored_ids``: fixed-width ASCII
        key = key.encode("ascii")
    i = int(np.searchsorted(sorted_keys, key))
    return i < len(sorted_keys) and sorted_keys[i] == key


def slices(table, n: int) -> list:
    """``table`` cut into at most ``n`` near-equal blocks, one read task each."""
    n = max(1, min(n, table.num_rows))
    bounds = [round(i * table.num_rows / n) for i in range(n + 1)]
    return [table.slice(a, b - a) for a, b in zip(bounds, bounds[1:])]
