"""A year of nights under one output root: what reading one night or one model costs.

    python bench/predictions_layout.py --nights 365 --rows 5000

Writes ``--nights`` runs of one part of ``--rows`` rows each with the scoring writer
(``writer.PredictionWriter``: one ``scored_date=`` partition per night), every night of model
``old`` but the last, which is of model ``new`` (a model rolled out yesterday). Then, best of five,
one JSON line each (wall and CPU milliseconds): the committed-file index; ``--skip-scored``'s index of the new model
(``outputs.scored_ids``) as it runs, with the other models' row groups skipped by their
``model_id`` statistics, and with every row group read (what it did before); one night and the
whole year in DuckDB and pandas; the files a filtered pyarrow dataset opens for one night. Needs no
Ray; on S3 every skipped row group is a GET saved, so the gaps there are larger.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import pathlib
import sys
import tempfile
import time

import pyarrow as pa

REPO = pathlib.Path(__file__).resolve().parents[1]


def night_table(run_id: str, day: int, rows: int, model: str) -> pa.Table:
    from malaria_ray import schema
    from malaria_ray.writer import normalize

    return normalize(pa.table({
        schema.COL_IMAGE_ID: [f"{day:04d}{i:060d}" for i in range(rows)],
        schema.COL_URI: [f"/night/{i}.png" for i in range(rows)],
        schema.COL_PROB: pa.array([i / rows for i in range(rows)], pa.float32()), schema.COL_PRED: ["Uninfected"] * rows,
        schema.COL_THRESHOLD: [0.5] * rows, schema.COL_MODEL_ID: [model] * rows, schema.COL_RUN_ID: [run_id] * rows,
    }))


def best(fn, reps: int = 5) -> tuple[float, float, object]:
    """Best wall and CPU milliseconds of ``reps`` calls (CPU time: steadier on a shared machine)."""
    wall, cpu, out = [], [], None
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return round(min(wall) * 1000, 1), round(min(cpu) * 1000, 1), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nights", type=int, default=365)
    p.add_argument("--rows", type=int, default=5000, help="rows per night")
    p.add_argument("--root", help="output root to write (default: a temporary folder)")
    args = p.parse_args()
    import duckdb
    import pandas as pd
    import pyarrow.dataset as pads

    from malaria_ray import outputs
    from malaria_ray.writer import PredictionWriter

    root = args.root or tempfile.mkdtemp(prefix="layout-")
    days = [(dt.date(2025, 1, 1) + dt.timedelta(d)).isoformat() for d in range(args.nights)]
    for d, day in enumerate(days):
        run_id = f"{day.replace('-', '')}T230000Z-{d:06x}"
        w = PredictionWriter(root, run_id, scored_date=day)
        w.write(night_table(run_id, d, args.rows, "new" if d == args.nights - 1 else "old"))
        w.close()
        w.commit()
    pred, last = outputs.predictions_uri(root), days[-1]
    con = duckdb.connect()
    scan = f"select count(*), sum(prob_parasitized) from read_parquet('{pred}/*/*.parquet', hive_partitioning=true)"
    dataset = pads.dataset(pred, format="parquet", partitioning="hive")

    def every_row_group() -> int:
        keep = outputs.model_row_groups
        outputs.model_row_groups = lambda pf, model_id: list(range(pf.metadata.num_row_groups))
        try:
            return len(outputs.scored_ids(root, "new"))
        finally:
            outputs.model_row_groups = keep

    cases = {
        "committed_files": lambda: len(outputs.committed_files(root)),
        "scored_ids_new_model_pruned": lambda: len(outputs.scored_ids(root, "new")),
        "scored_ids_new_model_every_row_group": every_row_group,
        "duckdb_one_night": lambda: con.execute(f"{scan} where scored_date = '{last}'").fetchone()[0],
        "duckdb_year": lambda: con.execute(scan).fetchone()[0],
        "pandas_one_night": lambda: len(pd.read_parquet(pred, filters=[("scored_date", "==", last)])),
        "pyarrow_fragments_one_night": lambda: len(list(dataset.get_fragments(filter=pads.field("scored_date") == last))),
    }
    cases["pandas_year"] = lambda: len(pd.read_parquet(pred))
    for name, fn in cases.items():
        ms, cpu_ms, out = best(fn, reps=1 if name == "pandas_year" else 5)
        print(json.dumps({"case": name, "ms": ms, "cpu_ms": cpu_ms, "result": out, "nights": args.nights,
                          "rows_per_night": args.rows}), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
