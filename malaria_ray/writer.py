"""The part writer of a scoring run: prediction rows into
``predictions/scored_date=YYYY-MM-DD/<run_id>.partNNNNN.parquet``, each part written in ``_staging/``
(beside predictions/, never inside it) and published whole, in one step.

Layout of the output root: ``malaria_ray.outputs``; the commit protocol the writer serves:
``malaria_ray.scoringrun``. Pure: imports neither Ray nor TF.
"""

from __future__ import annotations

import os
import posixpath
import time

import pyarrow as pa
import pyarrow.compute as pc

from malaria_ray import outputs, storage
from malaria_ray.schema import PREDICTIONS_SCHEMA

# Rows the writer holds before it writes a row group: bounds the driver's memory (the rows of a
# run are never all held) while keeping row groups large enough for readers to scan quickly.
ROW_GROUP_ROWS = outputs.ROW_GROUP_ROWS


class PredictionWriter:
    """Streams a run's prediction batches into parts; each part is published whole, in one step,
    once it holds ``part_rows`` rows or has been open ``part_seconds`` (and the last at ``commit``).

    A run killed at any point keeps every published part: readers see whole files only, and the
    next ``--skip-scored`` run skips what they hold. ``on_part(writer)`` runs after each publish
    (the run's manifest records the parts). Without ``commit``, the open part stays in staging.
    ``scored_date``: the partition of every part of the run (``outputs.scored_date``; today, UTC,
    when None), so that one run's parts share one.
    """

    def __init__(self, root: str, run_id: str, part_rows: int = 100_000, part_seconds: float = 600.0,
                 on_part=None, scored_date: str | None = None) -> None:
        self.root, self.run_id = root, run_id
        self.partition = outputs.partition_name(scored_date or outputs.scored_date())
        self.part_rows, self.part_seconds, self.on_part = part_rows, part_seconds, on_part
        self.parts: list[str] = []  # URIs of the published parts, in order
        self.rows = 0  # rows written, published or not
        # The part in hand: open (rows go into it), then closed (whole in staging, not yet
        # published), then published by ``commit`` (or dropped by ``abort``).
        self.staging_uri: str | None = None
        self.final_uri: str | None = None
        self._fs = self._path = self._file = self._writer = None
        self._open = self._closed_part = False
        self._pending: list[pa.Table] = []
        self._pending_rows = self._part_rows = 0
        self._started = 0.0

    def _start(self) -> None:
        name = outputs.part_name(self.run_id, len(self.parts) + 1)
        self.staging_uri = storage.join(outputs.staging_uri(self.root), name)
        self.final_uri = storage.join(outputs.predictions_uri(self.root), self.partition, name)
        self._fs, self._path = storage.filesystem(self.staging_uri)
        self._fs.makedirs(posixpath.dirname(self._path), exist_ok=True)
        self._file = self._fs.open(self._path, "wb")
        self._writer = storage.parquet_writer(self._file, PREDICTIONS_SCHEMA)
        self._pending = []
        self._pending_rows = self._part_rows = 0
        self._started = time.monotonic()
        self._open = True

    def write(self, table: pa.Table) -> None:
        """Rows in ``PREDICTIONS_SCHEMA`` (others are ``normalize``d first)."""
        if not self._open:
            self._start()
        if not table.schema.equals(PREDICTIONS_SCHEMA):
            table = normalize(table)
        table = table.combine_chunks()  # own buffers, not slices of Ray's larger blocks
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
            if self._closed_part:
                self._fs.rm(self._path)
                self._closed_part = False
        except Exception:  # noqa: BLE001 - already failing; the staging file is harmless
            pass

    def commit(self) -> None:
        """Publish the closed part: ``predictions/scored_date=.../<run_id>.partNNNNN.parquet``
        appears whole, in one step."""
        if not self._closed_part:
            return
        fs, final = storage.filesystem(self.final_uri)
        if storage.is_remote(self.final_uri):
            fs.copy(self._path, final)  # server-side CopyObject: the object appears whole
            fs.rm(self._path)
        else:
            os.makedirs(os.path.dirname(final), exist_ok=True)
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
        elif (pa.types.is_floating(f.type) or pa.types.is_integer(f.type)) and pa.types.is_floating(col.type):
            col = pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col)  # a field's box on an error row
        cols.append(col.cast(f.type))
    return pa.Table.from_arrays(cols, schema=PREDICTIONS_SCHEMA)
