"""The Parquet layout of a scoring output root without Ray: the ``scored_date=`` partitions and
what reading one night or one model opens, the migration of roots written in the flat layout of
earlier versions (locally and on a real S3 server), and the one codec and schema version of
every Parquet file the project writes."""

from __future__ import annotations

import json
import os
import pathlib
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from malaria_ray import manifests, migrate, outputs, schema, storage
from malaria_ray.lease import LEASE_FILE
from malaria_ray.writer import PredictionWriter
from test_outputs import _pipeline_batch, prediction_table

REPO = pathlib.Path(__file__).resolve().parents[1]
NIGHTS = {"20250101T230000Z-aaaaaa": "2025-01-01", "20250102T230000Z-bbbbbb": "2025-01-02"}


def assert_project_parquet(path) -> None:
    """One Parquet file as the project writes them: every column chunk in the project's codec and
    the schema version in the key-value metadata."""
    pf = pq.ParquetFile(path)
    codecs = {pf.metadata.row_group(g).column(c).compression
              for g in range(pf.metadata.num_row_groups) for c in range(pf.metadata.num_columns)}
    assert codecs <= {storage.PARQUET_CODEC.upper()}, (path, codecs)
    assert storage.schema_version(pf.schema_arrow) == str(storage.SCHEMA_VERSION), path


def publish(root: str, run_id: str, n: int, date: str, model: str = "m", parts: int = 1) -> None:
    w = PredictionWriter(root, run_id, scored_date=date)
    for _ in range(parts):
        t = prediction_table(run_id, n)
        w.write(t.set_column(t.schema.get_field_index(schema.COL_MODEL_ID), schema.COL_MODEL_ID, pa.array([model] * n)))
        w.close()
        w.commit()


def spoil(path: pathlib.Path, footer_too: bool) -> None:
    """Overwrite a Parquet file's data pages with zeros (its footer kept: the file is listed and its
    statistics read, but reading a row group fails), or the whole file with junk."""
    data = path.read_bytes()
    if footer_too:
        path.write_bytes(b"not parquet")
        return
    footer = int.from_bytes(data[-8:-4], "little")
    path.write_bytes(data[:4] + bytes(len(data) - 12 - footer) + data[-8 - footer:])


def test_reading_one_night_opens_that_nights_files_only(tmp_path):
    """pandas, pyarrow and DuckDB read the partitions as one dataset with a ``scored_date``
    column; filtered to one night, they read it even when every file of the other night is junk."""
    import duckdb
    import pandas as pd
    import pyarrow.dataset as pads

    assert outputs.PARTITION_KEY not in schema.PREDICTIONS_SCHEMA.names  # no clash with a column of the files
    root, pred = str(tmp_path), tmp_path / outputs.PREDICTIONS_DIR
    for (run_id, date), n in zip(NIGHTS.items(), (3, 5)):
        publish(root, run_id, n, date, parts=2)
    assert [rel.split("/")[0] for _, rel in outputs.committed_files(root)] == \
        ["scored_date=2025-01-01"] * 2 + ["scored_date=2025-01-02"] * 2
    whole = pd.read_parquet(pred)
    assert len(whole) == 16 and whole.groupby("scored_date", observed=True).size().to_dict() == \
        {"2025-01-01": 6, "2025-01-02": 10}
    night = pads.dataset(pred, format="parquet", partitioning="hive")
    one = pads.field("scored_date") == "2025-01-01"
    assert len(list(night.get_fragments())) == 4 and len(list(night.get_fragments(filter=one))) == 2
    con = duckdb.connect()
    sql = f"select count(*), min(scored_date)::varchar from read_parquet('{pred}/*/*.parquet', hive_partitioning=true)"
    assert con.execute(sql).fetchall() == [(16, "2025-01-01")]

    for f in (pred / "scored_date=2025-01-02").iterdir():
        spoil(f, footer_too=True)
    assert len(pd.read_parquet(pred, filters=[("scored_date", "==", "2025-01-01")])) == 6
    assert night.to_table(filter=one).num_rows == 6
    assert con.execute(f"{sql} where scored_date = '2025-01-01'").fetchall() == [(6, "2025-01-01")]
    with pytest.raises(duckdb.InvalidInputException):  # the junk is real: a read of every night meets it
        con.execute(sql).fetchall()


def test_other_models_parts_are_not_read_past_their_footers(tmp_path):
    """--skip-scored and the roll-ups of one model skip the row groups whose ``model_id``
    statistics exclude it: a part of another model whose data pages are zeros is never read."""
    root = str(tmp_path)
    publish(root, "20250101T230000Z-aaaaaa", 4, "2025-01-01", model="old-model")
    publish(root, "20250102T230000Z-bbbbbb", 3, "2025-01-02", model="m")
    (_, other), _ = outputs.committed_files(root)
    spoil(tmp_path / outputs.PREDICTIONS_DIR / other, footer_too=False)
    assert outputs.scored_ids(root, "m").tolist() == [b"id0", b"id1", b"id2"]
    assert [r[schema.COL_N_CELLS] for r in outputs.rebuild_slides(root, "m").to_pylist()] == [3, 3]
    with pytest.raises(OSError):  # the zeros are real: that model's rows cannot be read
        outputs.scored_ids(root, "old-model")


def test_a_part_lacking_a_needed_column_is_named_by_every_reader(tmp_path):
    """--skip-scored, the annotations' evaluation (``run_table``) and the overlay stop at a part
    that lacks a column they read, naming the file, the column and its schema version."""
    from malaria_ray import overlay

    root, run_id = str(tmp_path), "20250101T230000Z-aaaaaa"
    publish(root, run_id, 2, "2025-01-01")
    (_, rel), = outputs.committed_files(root)
    path = tmp_path / outputs.PREDICTIONS_DIR / rel
    other = pq.read_table(path).drop_columns([schema.COL_URI, schema.COL_CELL]).replace_schema_metadata(None)
    pq.write_table(other, path)  # another program's file
    for read in (lambda: outputs.scored_sources(root, "m"), lambda: outputs.run_table(root, run_id, [schema.COL_URI]),
                 lambda: overlay.newest_cells(root, "/x/0.png")):
        with pytest.raises(storage.StorageError, match=rf"{re.escape(rel)} lacks column\(s\) uri.* \(schema version 0;"):
            read()


def old_root(root: pathlib.Path) -> dict[str, int]:
    """A root as the flat-layout version left it: parts in predictions/ written with that
    version's writer calls (no schema version), manifests listing them by name, a leftover in
    predictions/_staging. Three runs: one with ``started_at`` in its manifest (a date other than
    its id's), one default id without manifest, one custom id without manifest (file time)."""
    import datetime as dt

    pred = root / outputs.PREDICTIONS_DIR
    (pred / outputs.STAGING_DIR).mkdir(parents=True)
    (pred / outputs.STAGING_DIR / "20250103T000000Z-dead.part00001.parquet").write_bytes(b"partial")
    rows = {"20250101T230000Z-aaaaaa": 3, "20250102T120000Z-bbbbbb": 4, "nightly-custom": 2}
    for run_id, n in rows.items():
        for p in (1, 2):
            pq.write_table(prediction_table(run_id, n), pred / outputs.part_name(run_id, p), compression="zstd")
    manifests.write_manifest(str(root), "20250101T230000Z-aaaaaa", {
        "run_id": "20250101T230000Z-aaaaaa", "finished": True, "started_at": "2025-01-02T00:30:00+01:00",
        "parts": [outputs.part_name("20250101T230000Z-aaaaaa", p) for p in (1, 2)]})
    when = dt.datetime(2025, 1, 4, 23, 59, tzinfo=dt.timezone.utc).timestamp()
    for p in (1, 2):
        os.utime(pred / outputs.part_name("nightly-custom", p), (when, when))
    return rows


def test_a_root_in_the_flat_layout_is_refused_until_migrated(tmp_path):
    import duckdb
    import pandas as pd

    root = tmp_path / "old"
    rows = old_root(root)
    for read in (lambda: outputs.committed_runs(str(root)), lambda: outputs.scored_ids(str(root), "m")):
        with pytest.raises(storage.StorageError, match=rf"^{root}/predictions holds 6 part\(s\) in the flat layout.*"
                                                       rf"`malaria-ray migrate {root}`"):
            read()
    # A migration stopped after publishing one part in its partition, before dropping the old copy.
    first = outputs.part_name("20250101T230000Z-aaaaaa", 1)
    (root / "predictions" / "scored_date=2025-01-01").mkdir()
    (root / "predictions" / "scored_date=2025-01-01" / first).write_bytes((root / "predictions" / first).read_bytes())

    done = migrate.migrate(str(root))
    assert done.runs == {"20250101T230000Z-aaaaaa": "scored_date=2025-01-01",  # 00:30 at +01:00 is the 1st, UTC
                         "20250102T120000Z-bbbbbb": "scored_date=2025-01-02", "nightly-custom": "scored_date=2025-01-04"}
    assert done.moved == 6 and done.staging_removed == 1 and "moved 6 part(s) of 3 run(s)" in done.summary()
    assert sorted(p.name for p in (root / "predictions").iterdir()) == \
        ["scored_date=2025-01-01", "scored_date=2025-01-02", "scored_date=2025-01-04"]
    assert outputs.committed_runs(str(root)) == sorted(rows)
    assert len(outputs.committed_files(str(root))) == 6 and len(outputs.scored_ids(str(root), "m")) == 4
    m = manifests.read_manifest(str(root), "20250101T230000Z-aaaaaa")
    assert m["partition"] == "scored_date=2025-01-01" and m["parts"] == [first, outputs.part_name(m["run_id"], 2)]
    total = 2 * sum(rows.values())
    assert len(pd.read_parquet(root / "predictions")) == total
    assert duckdb.connect().execute(f"select count(*) from read_parquet('{root}/predictions/**/*.parquet', "
                                    "hive_partitioning=true)").fetchall() == [(total,)]
    assert migrate.migrate(str(root)).summary().endswith("already in the partitioned layout: nothing to move")
    assert not (root / LEASE_FILE).exists()


def test_a_root_on_s3_is_migrated_and_scored_into_partitions(moto_s3, tmp_path):
    """The same on a real S3 server: the flat parts are copied server-side into their partitions
    and deleted; a run then publishes into its own partition, staged outside predictions/."""
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="layout")
    local = tmp_path / "old"
    rows = old_root(local)
    for f in local.rglob("*"):
        if f.is_file():
            s3.upload_file(str(f), "layout", f"root/{f.relative_to(local).as_posix()}")
    root = "s3://layout/root"
    with pytest.raises(storage.StorageError, match="malaria-ray migrate s3://layout/root"):
        outputs.committed_files(root)
    done = migrate.migrate(root)
    assert done.moved == 6 and done.staging_removed == 1
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="layout", Prefix="root/predictions/")["Contents"])
    assert len(keys) == 6 and all(re.match(r"root/predictions/scored_date=\d{4}-\d\d-\d\d/[^/]+\.part0000[12]\.parquet$",
                                           k) for k in keys), keys
    assert {k.split("/")[2] for k in keys if "-aaaaaa" in k or "-bbbbbb" in k} == \
        {"scored_date=2025-01-01", "scored_date=2025-01-02"}  # the custom id's: its object's time (the upload)
    w = PredictionWriter(root, "20250105T010000Z-cccccc", scored_date="2025-01-05")
    w.write(prediction_table("20250105T010000Z-cccccc", 2))
    w.close()
    assert w.staging_uri.startswith(f"{root}/_staging/")
    w.commit()
    assert outputs.committed_runs(root) == sorted([*rows, "20250105T010000Z-cccccc"])
    assert w.parts == [f"{root}/predictions/scored_date=2025-01-05/20250105T010000Z-cccccc.part00001.parquet"]


def test_a_part_another_process_publishes_into_a_listed_partition_opens(moto_s3):
    """A long-lived reader (the report, a soak's checks, a driver) lists the parts, another process
    publishes one more into the same partition, and the reader lists and opens them all: no cached
    folder listing of a partition hides the new part (s3fs answered "not found" before)."""
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="relist")
    root = "s3://relist/root"
    for n, run in enumerate(("20250105T010000Z-a", "20250105T020000Z-b")):
        if n:  # another process's publish: straight to the store, past this process's filesystem object
            s3.put_object(Bucket="relist", Key=f"root/predictions/scored_date=2025-01-05/{run}.part00001.parquet",
                          Body=storage.table_bytes(prediction_table(run, 2)))
        else:
            w = PredictionWriter(root, run, scored_date="2025-01-05")
            w.write(prediction_table(run, 2))
            w.close()
            w.commit()
        listed = outputs.committed_files(root)
        assert len(listed) == n + 1
        assert outputs.run_table(root, run, ["run_id"]).num_rows == 2  # opens the part just listed


def test_every_parquet_file_of_a_scoring_run_has_the_codec_and_schema_version(tmp_path):
    """A run's parts share the partition of its start date (also recorded in its manifest), and
    every Parquet file under the root is zstd with the schema version."""
    from malaria_ray import sources
    from malaria_ray.config import ScoreConfig
    from malaria_ray.scoringrun import ScoringRun

    root, run_id = str(tmp_path / "root"), "night"
    cfg = ScoreConfig(input=str(tmp_path / "in"), model="m.keras", output=root, threshold=0.5, commit_every_rows=4)
    listing = sources.Units(pa.table({"kind": ["image"] * 5, "uri": [f"/x/{i}.png" for i in range(5)]}))
    with ScoringRun(root, run_id) as run:
        run.begin(cfg, "m", 32, listing, identity_rows=0, unfinished=[], unchanged=0)
        for _ in range(3):
            run.write(run.tally(_pipeline_batch(run_id, 3, [schema.STATUS_OK, schema.STATUS_OK, schema.STATUS_ERROR])))
        run.close()
        run.finish(1.0, fp_rate=0.1)
    m = json.loads((tmp_path / "root" / "runs" / run_id / "manifest.json").read_text())
    assert m["partition"] == f"scored_date={m['started_at'][:10]}" and len(m["parts"]) == 2
    assert [rel for _, rel in outputs.committed_files(root)] == [f"{m['partition']}/{p}" for p in m["parts"]]
    files = sorted((tmp_path / "root").rglob("*.parquet"))
    names = {f.name for f in files}
    assert {outputs.METRICS_FILE, outputs.SLIDES_FILE, *m["parts"]} <= names and len(files) == 2 + 3
    for f in files:
        assert_project_parquet(f)


WRITES = r"\bpq\.write_table\(|parquet\.write_table\(|ParquetWriter\(|\.to_parquet\(|\.write_parquet\("


def test_every_parquet_write_in_the_code_goes_through_storage():
    """One codec everywhere: Parquet is written by ``storage.table_bytes`` and
    ``storage.parquet_writer`` only; Ray Data's writer is told the codec."""
    found = []
    for path in [*REPO.glob("malaria_ray/*.py"), *REPO.glob("jobs/**/*.py"), *REPO.glob("bench/**/*.py")]:
        if path.name == "storage.py":
            continue
        text = path.read_text()
        for m in re.finditer(WRITES, text):
            statement = text[m.start():text.find("\n\n", m.start())]
            if m.group() == ".write_parquet(" and "compression=storage.PARQUET_CODEC" in statement:
                continue
            found.append(f"{path.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}")
    assert not found, f"Parquet written around storage.table_bytes/parquet_writer: {found}"
    assert storage.PARQUET_CODEC == "zstd"


def test_training_and_evaluation_writers_use_the_codec_and_version(tmp_path):
    """The files a training run and a checkpoint write, through the same helpers."""
    from malaria_ray import checkpoint

    checkpoint.save_val_predictions(str(tmp_path), 0, ["a.png"], ["id"], [1], [0.5])
    assert_project_parquet(next(tmp_path.glob(f"{checkpoint.VAL_PREDICTIONS_PREFIX}*.parquet")))
    assert checkpoint.read_val_predictions(str(tmp_path)).num_rows == 1
    pq.write_table(pa.table({schema.COL_URI: ["a.png"]}), tmp_path / f"{checkpoint.VAL_PREDICTIONS_PREFIX}001.parquet")
    with pytest.raises(storage.StorageError, match=r"val.*001\.parquet lacks column\(s\) image_id"):
        checkpoint.read_val_predictions(str(tmp_path))
