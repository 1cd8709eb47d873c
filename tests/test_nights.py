"""The drift band (``nights.band``/``drift``), older metrics rows, and the page's pictures of cells:
pure, no Ray. Real nights, the report command and the browser: tests/test_night_report.py."""

from __future__ import annotations

import datetime as dt
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from malaria_ray import manifests, nightpage, nights, outputs, schema, storage


def test_band_is_the_median_plus_minus_k_robust_sds_never_narrower_than_its_floor():
    rates = [0.10, 0.12, 0.11, 0.13, 0.09, 0.11]
    b = nights.band(rates, 0.11, schema.COL_POS_RATE, k=3)
    half = 3 * nights.MAD_SD * 0.01  # median 0.11, absolute deviations 0.01, 0.01, 0, 0.02, 0.02, 0 -> MAD 0.01
    assert b.median == pytest.approx(0.11) and (b.low, b.high) == pytest.approx((0.11 - half, 0.11 + half))
    assert not b.flagged and nights.band(rates, 0.11 + half + 0.001, schema.COL_POS_RATE, k=3).flagged
    assert nights.band(rates, 0.11 - half - 0.001, schema.COL_POS_RATE, k=3).flagged
    # identical nights: MAD 0, so the floor keeps a small change from flagging
    same = nights.band([0.0] * 6, 0.004, schema.COL_ERROR_RATE)
    assert (same.low, same.high) == (0.0, nights.DRIFT_FLOOR[schema.COL_ERROR_RATE]) and not same.flagged
    assert nights.band([0.0] * 6, 0.2, schema.COL_ERROR_RATE).flagged
    # too few nights (nulls do not count): no band, no flag, however far off
    few = nights.band([0.1, None, 0.1, float("nan"), 0.1, 0.1], 0.9, schema.COL_POS_RATE)
    assert few.low is None and few.nights == 4 and not few.flagged and "no band yet" in few.line()
    assert not nights.band(rates, None, schema.COL_POS_RATE).flagged  # a night with nothing scored


def _night(i: int, rate: float, model: str = "m1", errors: float = 0.0) -> dict:
    return {schema.COL_RUN_ID: f"n{i}", schema.COL_MODEL_ID: model, schema.COL_THRESHOLD: 0.5,
            schema.COL_CELLS: schema.CELLS_CROPS, schema.COL_POS_RATE: rate, schema.COL_ERROR_RATE: errors}


def test_drift_compares_the_positive_rate_only_with_nights_of_the_same_model_and_the_last_n():
    rows = [_night(i, 0.30 + 0.01 * (i % 3)) for i in range(10)] + [_night(10, 0.80)]
    assert nights.drift(rows)[schema.COL_POS_RATE].flagged and not nights.drift(rows)[schema.COL_ERROR_RATE].flagged
    # a new model moves the rate by design: no band for it until it has nights of its own
    rows[-1] = _night(10, 0.80, model="m2")
    assert nights.drift(rows)[schema.COL_POS_RATE].low is None
    # the error rate is compared with every night, whatever the model
    rows[-1] = _night(10, 0.31, model="m2", errors=0.2)
    assert nights.drift(rows)[schema.COL_ERROR_RATE].flagged
    # only the last `nights` nights make the band: old nights at 0.8 are forgotten
    rows = [_night(i, 0.8) for i in range(10)] + [_night(10 + i, 0.3) for i in range(6)] + [_night(20, 0.8)]
    assert not nights.drift(rows, nights=16)[schema.COL_POS_RATE].flagged
    assert nights.drift(rows, nights=6)[schema.COL_POS_RATE].flagged
    assert [b.flagged for b in nights.drift_at(rows, 10).values()] == [True, False]  # the first night at 0.3


def _old_and_new_night(root: str) -> None:
    """Two finished nights under ``root``: one whose metrics row predates the night columns, one new."""
    old_row = {schema.COL_RUN_ID: "20250101T000000Z-old", schema.COL_MODEL_ID: "m1", schema.COL_THRESHOLD: 0.5,
               schema.COL_N_IMAGES: 100, schema.COL_N_ERRORS: 4, schema.COL_N_LABELLED: 0,
               **dict.fromkeys(schema.METRIC_COUNTS, 0), **dict.fromkeys(schema.METRIC_RATES, None)}
    old = pa.Table.from_pylist([old_row]).select(list(schema.METRIC_BASE_COLUMNS))
    storage.write_bytes(storage.join(outputs.run_uri(root, old_row[schema.COL_RUN_ID]), outputs.METRICS_FILE),
                        storage.table_bytes(old))  # as the writer before the night columns wrote it
    manifests.write_manifest(root, old_row[schema.COL_RUN_ID], {
        "finished": True, "started_at": "2025-01-01T00:00:00+00:00", "finished_at": "2025-01-01T00:00:50+00:00",
        "seconds": 50.0, "counts": {schema.COUNT_SCORED: 96, schema.COUNT_ERRORS: 4},
        "error_kinds": {schema.ERROR_TRANSIENT: 1, schema.ERROR_PERMANENT: 3}})
    start = dt.datetime(2025, 1, 2, tzinfo=dt.timezone.utc)
    new_row = {**old_row, schema.COL_RUN_ID: "20250102T000000Z-new", schema.COL_STARTED_AT: start,
               schema.COL_FINISHED_AT: start + dt.timedelta(seconds=10), schema.COL_SECONDS: 10.0,
               schema.COL_N_SCORED: 100, schema.COL_N_ERRORS: 0, schema.COL_POS_RATE: 0.25, schema.COL_N_PRED_POS: 25}
    manifests.write_run_metrics(root, new_row[schema.COL_RUN_ID], new_row)
    manifests.write_manifest(root, new_row[schema.COL_RUN_ID], {"finished": True})


def test_older_metrics_rows_without_the_night_columns_still_read_and_render(tmp_path):
    """A row written before the night columns existed is concatenated with new ones (nulls), filled
    from its manifest where the manifest knows, and the page renders both."""
    root = str(tmp_path / "root")
    _old_and_new_night(root)
    table = manifests.rebuild_metrics(root)
    assert table.num_rows == 2 and set(schema.METRICS_COLUMNS) <= set(table.column_names)
    first, second = nights.load(root)
    assert first[schema.COL_RUN_ID].endswith("old") and second[schema.COL_RUN_ID].endswith("new")
    assert first[schema.COL_STARTED_AT] == dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    assert (first[schema.COL_N_TRANSIENT], first[schema.COL_N_PERMANENT], first[schema.COL_N_SCORED]) == (1, 3, 96)
    assert first[schema.COL_IMAGES_PER_S] == 2.0 and first[schema.COL_ERROR_RATE] == 0.04
    assert first[schema.COL_POS_RATE] is None and second[schema.COL_POS_RATE] == 0.25
    bands, page = nightpage.render(root)
    assert "20250101T000000Z-old" in page and "no band yet" in page and not any(b.flagged for b in bands.values())
    assert pq.read_table(tmp_path / "root" / "metrics.parquet").num_rows == 2


def test_a_cell_that_cannot_be_read_is_a_note_not_a_crash(sample_dir, tmp_path):
    real = sorted((sample_dir / schema.POSITIVE_CLASS).glob("*.png"))[0]
    rows = [{schema.COL_URI: str(real), schema.COL_PROB: 0.97, schema.COL_LABEL: None},
            {schema.COL_URI: str(tmp_path / "gone.png"), schema.COL_PROB: 0.95, schema.COL_LABEL: None},
            {schema.COL_URI: str(pathlib.Path(__file__)), schema.COL_PROB: 0.9, schema.COL_LABEL: None}]
    figures, notes = nightpage._cells_html(rows, {})
    assert figures.count("<img") == 1 and "P=0.970" in figures
    assert len(notes) == 2 and "gone.png: not shown" in notes[0] and "not shown (UnidentifiedImageError" in notes[1]


def test_report_of_an_s3_root_lands_in_the_root_and_reads_cells_from_s3(moto_s3, sample_dir):
    import fsspec

    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": moto_s3})
    fs.mkdir("nights-report")
    root = "s3://nights-report/nightly"
    _old_and_new_night(root)
    manifests.rebuild_metrics(root)
    out, bands = nightpage.write(root)
    assert out == "s3://nights-report/nightly/report.html" and set(bands) == set(nights.DRIFT_METRICS)
    assert "20250102T000000Z-new" in storage.read_bytes(out).decode()
    cell = sorted((sample_dir / schema.NEGATIVE_CLASS).glob("*.png"))[0]
    storage.write_bytes("s3://nights-report/cells/c.png", cell.read_bytes())
    figures, notes = nightpage._cells_html([{schema.COL_URI: "s3://nights-report/cells/c.png", schema.COL_PROB: 0.01}], {})
    assert figures.count("<img") == 1 and not notes


def test_bad_alarm_and_report_flags_are_one_line_and_exit_2(tmp_path, capsys):
    from malaria_ray import cli
    from malaria_ray.config import ConfigError, ScoreConfig

    for bad in ({"alarm_drift": 0.0}, {"alarm_nights": 0}):
        with pytest.raises(ConfigError, match="--alarm-"):
            ScoreConfig(input="in", model="m", output="out", **bad)
    root = str(tmp_path / "root")
    _old_and_new_night(root)
    manifests.rebuild_metrics(root)
    assert cli.main(["report", root, "--nights", "0"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert cli.main(["report", root, "--nights", "1"]) == 0 and (tmp_path / "root" / "report.html").is_file()
    assert "no band yet" in capsys.readouterr().out
