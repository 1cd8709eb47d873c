"""The scoring output root without Ray: the part writer and its commit, the committed-file
index, staging clean-up, the slide roll-up over committed parts, the lease, and the commit protocol
of one run (``scoringrun.ScoringRun``) driven with hand-made batches."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from malaria_ray import outputs, schema
from malaria_ray.lease import LEASE_FILE, Lease, LeaseHeld
from malaria_ray.writer import PredictionWriter


def prediction_table(run_id: str, n: int) -> pa.Table:
    return pa.table({
        schema.COL_IMAGE_ID: [f"id{i}" for i in range(n)], schema.COL_URI: [f"/x/{i}.png" for i in range(n)],
        schema.COL_SLIDE: ["C1P1thinF"] * n, schema.COL_PATIENT: ["P1"] * n, schema.COL_LABEL: [None] * n,
        schema.COL_PROB: np.linspace(0, 1, n).astype(np.float32), schema.COL_PRED: ["Uninfected"] * n,
        schema.COL_THRESHOLD: [0.5] * n, schema.COL_MODEL_ID: ["m"] * n, schema.COL_RUN_ID: [run_id] * n,
        schema.COL_SCORED_AT: np.full(n, np.datetime64("2025-01-01T00:00:00", "us")), schema.COL_ERROR: [None] * n,
        schema.COL_SOURCE_VERSION: pa.nulls(n, pa.string()),
        **{c: pa.nulls(n, schema.PREDICTIONS_SCHEMA.field(c).type) for c in schema.FIELD_COLUMNS},
    })


def test_parts_written_before_field_columns_read_as_cut_out_cells(tmp_path):
    """An output root of an earlier version (flat parts without the field columns, as that
    version's writer left them) is refused until ``migrate`` moves it into its partition; then
    --skip-scored and the roll-ups read its rows as cut-out cells, and a field run skips none."""
    import pyarrow.parquet as pq

    from malaria_ray import migrate, storage

    root = str(tmp_path)
    old = prediction_table("20250101T000000Z-aaaaaa", 4).drop_columns(list(schema.FIELD_COLUMNS))
    old = old.set_column(old.schema.get_field_index(schema.COL_SOURCE_VERSION), schema.COL_SOURCE_VERSION,
                         pa.array(["1:1"] * 4))
    os.makedirs(os.path.join(root, "predictions"))
    pq.write_table(old, os.path.join(root, "predictions", outputs.part_name("20250101T000000Z-aaaaaa", 0)))
    with pytest.raises(storage.StorageError, match=r"flat layout.*malaria-ray migrate"):
        outputs.scored_ids(root, "m")
    assert migrate.migrate(root).runs == {"20250101T000000Z-aaaaaa": "scored_date=2025-01-01"}
    assert len(outputs.scored_ids(root, "m")) == 4
    assert len(outputs.scored_sources(root, "m")) == 4, "cut-out cells' rows: detector None"
    assert len(outputs.scored_sources(root, "m", "abc")) == 0 and len(outputs.scored_fields(root, "m", "abc")) == 0
    assert outputs.rebuild_slides(root, "m").column(schema.COL_N_CELLS).to_pylist() == [4, 4]
    assert outputs.rebuild_fields(root, "m").num_rows == 0


def test_uncommitted_run_is_invisible_to_every_reader(tmp_path):
    import duckdb
    import pandas as pd
    import pyarrow.dataset as pads

    root = str(tmp_path)
    done = PredictionWriter(root, "20250101T000000Z-aaaaaa")
    done.write(prediction_table("20250101T000000Z-aaaaaa", 5))
    done.close()
    done.commit()
    crashed = PredictionWriter(root, "20250102T000000Z-bbbbbb")  # a crash: closed, never committed
    crashed.write(prediction_table("20250102T000000Z-bbbbbb", 7))
    crashed.close()
    pred = os.path.join(root, "predictions")
    assert os.path.exists(crashed.staging_uri) and not crashed.staging_uri.startswith(pred)
    assert len(pd.read_parquet(pred)) == 5
    assert pads.dataset(pred, format="parquet", partitioning="hive").count_rows() == 5
    for glob in ("*/*.parquet", "**/*.parquet"):
        assert duckdb.connect().execute(f"select count(*) from read_parquet('{pred}/{glob}', hive_partitioning=true)"
                                        ).fetchall() == [(5,)]
    assert outputs.committed_runs(root) == ["20250101T000000Z-aaaaaa"]
    assert outputs.scored_ids(root, "m").tolist() == [f"id{i}".encode() for i in range(5)]
    assert pd.read_parquet(pred).dtypes[schema.COL_PROB] == np.float32
    slides = outputs.rebuild_slides(root, "m").to_pylist()
    assert [(s["level"], s["n_cells"]) for s in slides] == [("patient", 5), ("slide", 5)]


def test_stale_staging_files_of_crashed_runs_are_removed(tmp_path):
    import time

    staging = tmp_path / "root" / outputs.STAGING_DIR
    earlier = tmp_path / "root" / outputs.PREDICTIONS_DIR / outputs.STAGING_DIR  # where earlier versions staged
    old = time.time() - outputs.STALE_STAGING_SECONDS - 60
    for where, tag in ((staging, ""), (earlier, "earlier-")):
        where.mkdir(parents=True)
        for name in ("old.parquet", "fresh.parquet"):
            (where / f"{tag}{name}").write_bytes(b"partial")
        os.utime(where / f"{tag}old.parquet", (old, old))
    assert outputs.remove_stale_staging(str(tmp_path / "root")) == ["old.parquet", "earlier-old.parquet"]
    assert [p.name for p in staging.iterdir()] == ["fresh.parquet"]
    assert [p.name for p in earlier.iterdir()] == ["earlier-fresh.parquet"]
    assert outputs.remove_stale_staging(str(tmp_path / "empty-root")) == []


def test_slide_rollup_counts_each_input_once_from_its_newest_run(tmp_path):
    """Three runs of one model (no --skip-scored) over overlapping inputs, plus rows the roll-up must
    ignore (another model, error rows): checked against pandas over the same committed rows."""
    import pandas as pd

    rng = np.random.default_rng(0)
    root, n = str(tmp_path), 3000
    slides = [(f"C{i}P{i % 9}thinF", f"P{i % 9}") for i in range(30)] + [(None, None), ("C5NthinF", None)]
    ids = [f"{rng.integers(2**62):016x}" * 4 for _ in range(n)]
    runs = ["20250101T000000Z-aaaaaa", "20250102T000000Z-bbbbbb", "20250103T000000Z-cccccc"]
    for r, run in enumerate(runs):
        idx = np.arange(n) if r < 2 else np.arange(0, n, 3)
        t = prediction_table(run, len(idx)).to_pandas()
        t[schema.COL_IMAGE_ID] = [ids[i] for i in idx]
        t[schema.COL_URI] = [f"/x/{i % 2500}.png" for i in idx]  # same bytes at two uris: two inputs
        t[schema.COL_SLIDE] = [slides[i % len(slides)][0] for i in idx]
        t[schema.COL_PATIENT] = [slides[i % len(slides)][1] for i in idx]
        t[schema.COL_LABEL] = rng.choice(np.array(["Parasitized", "Uninfected", None], dtype=object), len(idx))
        t[schema.COL_PROB] = rng.random(len(idx)).astype(np.float32)
        t[schema.COL_PRED] = np.where(t[schema.COL_PROB] >= 0.5, "Parasitized", "Uninfected")
        t[schema.COL_MODEL_ID] = np.where(idx % 7 == 0, "other", "m")
        t[schema.COL_ERROR] = np.where(idx % 11 == 0, "bad bytes", None)
        t[schema.COL_ERROR_KIND] = np.where(idx % 11 == 0, schema.ERROR_PERMANENT, None)
        w = PredictionWriter(root, run)
        w.write(pa.Table.from_pandas(t, schema=schema.PREDICTIONS_SCHEMA, preserve_index=False))
        w.close()
        w.commit()

    got = outputs.rebuild_slides(root, "m").to_pandas()
    rows = pd.read_parquet(os.path.join(root, "predictions"))
    rows = rows[(rows[schema.COL_MODEL_ID] == "m") & rows[schema.COL_ERROR].isna()]
    rows = rows.sort_values(schema.COL_RUN_ID, ascending=False).drop_duplicates([schema.COL_IMAGE_ID, schema.COL_URI])
    assert len(rows) < 2 * n  # the overlap is real
    for level, keys in (("slide", [schema.COL_SLIDE, schema.COL_PATIENT]), ("patient", [schema.COL_PATIENT])):
        want = rows.fillna({schema.COL_SLIDE: "~", schema.COL_PATIENT: "~"}).groupby(keys).agg(
            n=(schema.COL_URI, "size"), pos=(schema.COL_PRED, lambda s: (s == "Parasitized").sum()),
            prob=(schema.COL_PROB, "mean"), lab=(schema.COL_LABEL, lambda s: (s == "Parasitized").sum()))
        mine = got[got[schema.COL_LEVEL] == level].fillna({schema.COL_SLIDE: "~", schema.COL_PATIENT: "~"})
        mine = mine.set_index(keys).loc[want.index]
        assert len(mine) == len(want)
        assert (mine[schema.COL_N_CELLS].to_numpy() == want["n"].to_numpy()).all()
        assert (mine[schema.COL_N_PRED_POS].to_numpy() == want["pos"].to_numpy()).all()
        assert (mine[schema.COL_N_LABEL_POS].to_numpy() == want["lab"].to_numpy()).all()
        assert np.allclose(mine[schema.COL_MEAN_PROB].to_numpy(), want["prob"].to_numpy(), atol=1e-6)
    assert got[schema.COL_LEVEL].tolist()[0] == "patient" and got[schema.COL_LEVEL].tolist()[-1] == "slide"


def test_a_lease_whose_holder_died_on_this_host_is_taken_over(tmp_path):
    """A killed run's lease need not be waited out when it ran here and its process is gone."""
    import json
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease = Lease(str(tmp_path), "killed-night")
    lease.acquire()
    held = json.loads((tmp_path / LEASE_FILE).read_text())
    (tmp_path / LEASE_FILE).write_text(json.dumps({**held, "pid": int(dead.stdout)}))
    Lease(str(tmp_path), "next-night").acquire()  # no LeaseHeld
    assert json.loads((tmp_path / LEASE_FILE).read_text())["run_id"] == "next-night"
    with pytest.raises(LeaseHeld, match="next-night"):
        Lease(str(tmp_path), "third").acquire()  # the holder (this process) is alive


def _pipeline_batch(run_id: str, n: int, statuses: list[str]) -> pa.Table:
    """What the scoring pipeline hands the driver: prediction columns plus the row status, the
    probability NaN where a row was not scored and the reason on error rows (as ``score.Scorer``)."""
    t = prediction_table(run_id, n)
    prob = t.column(schema.COL_PROB).to_numpy().copy()
    prob[[s != schema.STATUS_OK for s in statuses]] = np.nan
    error = ["bad bytes" if s == schema.STATUS_ERROR else None for s in statuses]
    t = t.set_column(t.schema.get_field_index(schema.COL_PROB), schema.COL_PROB, pa.array(prob, pa.float32()))
    t = t.set_column(t.schema.get_field_index(schema.COL_ERROR), schema.COL_ERROR, pa.array(error, pa.string()))
    return t.append_column(schema.COL_STATUS, pa.array(statuses, pa.string()))


def test_a_scoring_run_commits_part_by_part_and_finishes_once(tmp_path):
    """The commit protocol without Ray: the manifest lists each published part as it appears, the
    finished run has its metrics row, the root's views are rebuilt, and the lease is gone."""
    import json

    from malaria_ray import manifests, sources
    from malaria_ray.config import ScoreConfig
    from malaria_ray.scoringrun import ScoringRun

    root, run_id = str(tmp_path / "root"), "20250101T000000Z-aaaaaa"
    cfg = ScoreConfig(input=str(tmp_path / "in"), model="m.keras", output=root, threshold=0.5, commit_every_rows=8)
    listing = sources.Units(pa.table({"kind": ["image"] * 9, "uri": [f"/x/{i}.png" for i in range(9)]}), ["a.txt"])
    with ScoringRun(root, run_id) as run:
        assert json.loads((tmp_path / "root" / LEASE_FILE).read_text())["run_id"] == run_id
        run.begin(cfg, "m", 32, listing, identity_rows=0, unfinished=[], unchanged=0)
        assert manifests.read_manifest(root, run_id)["finished"] is False
        statuses = [schema.STATUS_OK] * 4 + [schema.STATUS_ERROR, schema.STATUS_NON_IMAGE]
        for _ in range(3):  # 5 rows each: a part of 10 rows published on the way, the last 5 at the end
            rows = run.tally(_pipeline_batch(run_id, 6, statuses))
            assert rows.schema.equals(schema.PREDICTIONS_SCHEMA) and rows.num_rows == 5
            run.write(rows)
        assert manifests.read_manifest(root, run_id)["parts"] == [outputs.part_name(run_id, 1)]
        assert run.tally(_pipeline_batch(run_id, 1, [schema.STATUS_HIDDEN])) is None
        run.close()
        result = run.finish(1.0, fp_rate=0.1)
    assert not (tmp_path / "root" / LEASE_FILE).exists()
    m = manifests.read_manifest(root, run_id)
    assert m["finished"] and m["parts"] == result.parts == [outputs.part_name(run_id, p) for p in (1, 2)]
    assert m["rows_committed"] == result.rows == 15 and m["counts"]["errors"] == 3
    assert m["counts"][schema.STATUS_NON_IMAGE] == 1 + 3 and m["counts"][schema.STATUS_HIDDEN] == 1
    assert m["entries"] == 15 + 4 + 1 and m["units"]["image"] == 9
    assert result.error_fraction == 0.2 and result.metrics[schema.COL_N_ERRORS] == 3
    night = result.metrics  # the night columns of its metrics row
    assert night[schema.COL_SECONDS] == 1.0 and night[schema.COL_IMAGES_PER_S] == 15.0
    assert night[schema.COL_STARTED_AT] < night[schema.COL_FINISHED_AT] and night[schema.COL_CELLS] == schema.CELLS_CROPS
    assert (night[schema.COL_N_SCORED], night[schema.COL_N_FIELDS], night[schema.COL_ERROR_RATE]) == (12, None, 0.2)
    assert (night[schema.COL_N_TRANSIENT], night[schema.COL_N_PERMANENT]) == (0, 0)  # the test rows carry no kind
    assert (night[schema.COL_N_PRED_POS], night[schema.COL_POS_RATE]) == (0, 0.0)
    assert (night[schema.COL_N_SLIDES], night[schema.COL_N_SLIDES_POS]) == (1, 0)  # slide C1P1thinF, no cell called
    assert manifests.finished_runs(root) == [run_id]
    assert manifests.rebuild_metrics(root).column(schema.COL_RUN_ID).to_pylist() == [run_id]
    slides = outputs.rebuild_slides(root, "m", 0.1)
    # every batch holds the same 4 scored inputs (ids id0..id3): each counts once; error rows are not cells
    assert [r[schema.COL_N_CELLS] for r in slides.to_pylist()] == [4, 4]
    assert (tmp_path / "root" / "slides.parquet").exists()


def test_a_failed_scoring_run_says_why_and_publishes_nothing_more(tmp_path):
    from malaria_ray import manifests, sources
    from malaria_ray.config import CorpusError, ScoreConfig
    from malaria_ray.scoringrun import ScoringRun

    root, run_id = str(tmp_path), "20250101T000000Z-bbbbbb"
    cfg = ScoreConfig(input=str(tmp_path / "in"), model="m.keras", output=root, threshold=0.5)
    listing = sources.Units(pa.table({"kind": ["image"], "uri": ["/x/0.png"]}))
    with ScoringRun(root, run_id) as run:
        run.begin(cfg, "m", 32, listing, identity_rows=0, unfinished=[], unchanged=0)
        run.write(run.tally(_pipeline_batch(run_id, 3, [schema.STATUS_OK] * 3)))
        run.fail(RuntimeError("the model did not load"))
    m = manifests.read_manifest(root, run_id)
    assert m["failed"] == "RuntimeError: the model did not load" and not m["finished"]
    assert outputs.committed_runs(root) == [] and not os.listdir(outputs.staging_uri(root))
    with ScoringRun(root, "20250101T000000Z-cccccc") as run:  # nothing to score at all: a user error
        run.begin(cfg, "m", 32, listing, identity_rows=0, unfinished=[], unchanged=0)
        run.close()
        with pytest.raises(CorpusError, match="no images found"):
            run.finish(0.0, fp_rate=None)


def test_files_that_are_not_parts_of_this_version_are_named_not_read(tmp_path, caplog):
    """A file in predictions/ that is not a published part is left out with a warning; a part
    lacking a column the readers need stops them with its name; a run whose manifest does not
    say it finished is not a finished run."""
    import pyarrow.parquet as pq

    from malaria_ray import manifests, storage

    root = str(tmp_path)
    w = PredictionWriter(root, "20250101T000000Z-aaaaaa")
    w.write(prediction_table("20250101T000000Z-aaaaaa", 3))
    w.close()
    w.commit()
    pred = tmp_path / outputs.PREDICTIONS_DIR
    pq.write_table(prediction_table("x", 2), pred / "compacted.parquet")
    with caplog.at_level("WARNING"):
        assert outputs.committed_runs(root) == ["20250101T000000Z-aaaaaa"]
    assert "compacted.parquet is not a published part" in caplog.text
    assert len(outputs.scored_ids(root, "m")) == 3
    pq.write_table(prediction_table("20250102T000000Z-bbbbbb", 2).drop_columns([schema.COL_SOURCE_VERSION]),
                   pred / w.partition / outputs.part_name("20250102T000000Z-bbbbbb", 1))
    with pytest.raises(storage.StorageError, match=r"lacks column\(s\) source_version \(schema version 0"):
        outputs.scored_sources(root, "m")
    manifests.write_manifest(root, "20250101T000000Z-aaaaaa", {"run_id": "20250101T000000Z-aaaaaa"})
    assert manifests.finished_runs(root) == []
