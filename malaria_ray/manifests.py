"""The record of each scoring run under an output root: ``runs/<run_id>/manifest.json`` (replaced
whole at every step of the commit protocol, ``malaria_ray.scoringrun``), the run's own
``metrics.parquet``, which runs finished or were left unfinished, and the root's
``metrics.parquet`` rebuilt from the finished ones. Pure: imports neither Ray nor TF.
"""

from __future__ import annotations

import json
import math
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq

from malaria_ray import storage
from malaria_ray.outputs import METRICS_FILE, RUNS_DIR, committed_runs, run_uri
from malaria_ray.schema import METRIC_RATES, METRICS_COLUMNS, NIGHT_COLUMNS

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
    """The run's metrics row; a rate it cannot compute (an unlabelled archive) is null, not NaN, and
    a night column the row lacks is a typed null (so rows of every run concatenate)."""
    row = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
    table = pa.Table.from_pylist([{k: row.get(k) for k in METRICS_COLUMNS}]).select(list(METRICS_COLUMNS))
    typed = {**{k: pa.float64() for k in METRIC_RATES}, **dict(NIGHT_COLUMNS)}  # a null stays typed
    table = table.cast(pa.schema([pa.field(f.name, typed.get(f.name, f.type)) for f in table.schema]))
    storage.write_bytes(storage.join(run_uri(root, run_id), METRICS_FILE), storage.table_bytes(table))


def finished_runs(root: str) -> list[str]:
    """Runs whose manifest says they finished (a night with nothing new to score publishes no
    predictions file, and still finished), oldest name first."""
    fs, path = storage.filesystem(storage.join(root, RUNS_DIR))
    storage.forget_listings(fs, path)  # each run's folder too: other runs write there
    if not fs.exists(path):
        return []
    return [run_id for run_id in sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
            if (read_manifest(root, run_id) or {}).get("finished")]


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
