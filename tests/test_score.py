"""Bulk scoring end to end on real NIH cells: real Ray Data, real TensorFlow, real Parquet.

One small randomly initialised 32 px model (``score_model``) keeps each run to seconds on 2 CPUs.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import time
import zipfile

import numpy as np
import pyarrow.dataset as pads
import pytest

from malaria_ray import cli, faults, ingest, outputs, schema, sources
from malaria_ray.config import ScoreConfig
from malaria_ray.lease import LEASE_FILE, Lease
from test_score_inputs import bad_inputs, make_mixed_input, raw_batch, real_pngs

pytestmark = [pytest.mark.ray, pytest.mark.tf]


def copy_cells(sample_dir: pathlib.Path, dest: pathlib.Path, n: int, start: int = 0) -> int:
    for cls in ("Parasitized", "Uninfected"):
        (dest / cls).mkdir(parents=True, exist_ok=True)
        for p in sorted((sample_dir / cls).glob("*.png"))[start:start + n]:
            shutil.copy(p, dest / cls / p.name)
    return 2 * n


def tasks_executed(ds, op: str) -> int:
    """How many tasks the executed dataset's ``MapBatches(op)`` stage ran (from ``ds.stats()``)."""
    return int(re.search(rf"Operator \d+ [^\n]*MapBatches\({op}\)[^\n]*: (\d+) tasks executed", ds.stats()).group(1))


def read_predictions(root: pathlib.Path):
    import pandas as pd

    return pd.read_parquet(root / "predictions")


def run_cli(*args: str) -> int:
    return cli.main(["score", *args])


def test_decode_runs_beside_the_model_not_inside_it_nor_inside_the_read(ray_session, sample_dir, tmp_path, capsys):
    """On CPU-only clusters Ray Data would fuse decode tasks and model actors with equal resources
    into one actor that decodes and predicts in turn; the actor's memory reservation keeps them
    two stages (decode tasks run while the model works). GPU actors differ by num_gpus anyway."""
    from malaria_ray.score import build_pipeline

    for gpus in (0.0, 1.0):
        cfg = ScoreConfig(input=str(sample_dir), model="unused", output=str(tmp_path), gpus_per_actor=gpus)
        ds = build_pipeline(cfg, sources.list_units(str(sample_dir / "Uninfected")), 32,
                            ingest.NO_IDS, "m", "r", {})
        capsys.readouterr()
        ds.explain()
        plan = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
        assert "ActorPoolMapOperator[MapBatches(Scorer)]" in plan, plan
        # Read, decode and model are three stages: one big archive is read by one task and
        # decoded by many (test_one_big_tar_decodes_in_many_tasks).
        assert "TaskPoolMapOperator[MapBatches(read_raw)]" in plan, plan
        assert "TaskPoolMapOperator[MapBatches(prepare_batch)]" in plan, plan
        assert "->MapBatches(" not in plan, plan  # nothing fused


def test_scorer_direct_then_in_map_batches(ray_session, sample_dir, score_model):
    from malaria_ray.ingest import prepare_batch
    from malaria_ray.score import Scorer, inspect_model

    info = inspect_model(str(score_model))
    assert info["image_size"] == 32
    rows = [sources._row(str(p), schema.STATUS_OK, data=p.read_bytes())
            for p in real_pngs(sample_dir, "Parasitized", 3)]
    rows.append(sources._row("/x/zero.png", schema.STATUS_OK, data=b""))
    batch = prepare_batch(raw_batch(rows), 32, np.array([], dtype=object))
    # The actor takes and returns pyarrow batches, as Ray Data gives them (pixels: a tensor column).
    from ray.data.block import BlockAccessor

    table = BlockAccessor.batch_to_block(batch)
    scorer = Scorer(str(score_model), info["model_id"], 0.5, "r1")
    out = {k: v.to_numpy(zero_copy_only=False) for k, v in zip(scorer(table).column_names, scorer(table).columns)}
    assert out[schema.COL_URI].tolist() == batch[schema.COL_URI].tolist()
    prob = out[schema.COL_PROB]
    # --precision bf16: the same model computing in bfloat16 (float32 softmax) gives close probabilities.
    bf16 = Scorer(str(score_model), info["model_id"], 0.5, "r1", precision="bf16")
    assert np.allclose(bf16(table).column(schema.COL_PROB).to_numpy(zero_copy_only=False)[:3], prob[:3], atol=0.02)
    # A GPU actor pads each batch to one shape: the same probabilities for the real rows.
    padded = Scorer(str(score_model), info["model_id"], 0.5, "r1", pad_to=8)(table).column(
        schema.COL_PROB).to_numpy(zero_copy_only=False)
    assert np.allclose(padded[:3], prob[:3], atol=1e-6) and np.isnan(padded[3])
    assert np.all((prob[:3] >= 0) & (prob[:3] <= 1)) and np.isnan(prob[3])
    assert out[schema.COL_PRED][3] is None and out[schema.COL_ERROR][3]
    # The same callable inside Ray Data's actor pool gives the same probabilities.
    ds = ray_session.data.from_items([{k: v[i] for k, v in batch.items()} for i in range(4)])
    got = ds.map_batches(Scorer, batch_size=4, batch_format="pyarrow",
                         compute=ray_session.data.ActorPoolStrategy(size=1),
                         fn_constructor_kwargs={"model_uri": str(score_model), "model_id": info["model_id"],
                                                "threshold": 0.5, "run_id": "r1"}).take_all()
    got_prob = {r[schema.COL_URI]: r[schema.COL_PROB] for r in got}
    for uri, p in zip(out[schema.COL_URI][:3], prob[:3]):
        assert abs(got_prob[uri] - p) < 1e-5


def test_score_folder_outputs_and_incremental_rerun(ray_session, sample_dir, score_model, tmp_path, capsys):
    import duckdb

    data, out = tmp_path / "in", tmp_path / "out"
    n = copy_cells(sample_dir, data, 20)
    bad = bad_inputs(sample_dir)
    for name, (blob, _) in bad.items():
        (data / "Uninfected" / name).write_bytes(blob)
    (data / "Thumbs.db").write_bytes(b"\x00" * 32)
    n_inputs = n + len(bad)
    n_errors = sum(1 for _, ok in bad.values() if not ok)

    assert run_cli("--input", str(data), "--model", str(score_model), "--output", str(out),  # 10% bad on purpose
                   "--batch-size", "16", "--skip-scored", "--run-id", "20250101T000000Z-first",
                   "--max-error-fraction", "0.2") == 0
    text = capsys.readouterr().out
    assert "committed" in text and "true Parasitized" in text and str(out) in text

    df = read_predictions(out)
    assert list(df.columns) == [*schema.PREDICTIONS_SCHEMA.names, outputs.PARTITION_KEY]  # the partition's column
    assert len(df) == n_inputs and df[schema.COL_URI].is_unique
    assert df[schema.COL_ERROR].notna().sum() == n_errors
    assert df.loc[df[schema.COL_ERROR].isna(), schema.COL_PROB].between(0, 1).all()
    assert df.loc[df[schema.COL_ERROR].notna(), schema.COL_PROB].isna().all()
    assert (df[schema.COL_IMAGE_ID].str.len() == 64).all()
    assert set(df[schema.COL_LABEL]) == {"Parasitized", "Uninfected"}
    assert df[schema.COL_PATIENT].notna().sum() >= n  # NIH names carry the patient

    con = duckdb.connect()
    assert con.execute(f"select count(*) from read_parquet('{out}/predictions/**/*.parquet', hive_partitioning=true)"
                       ).fetchall() == [(n_inputs,)]
    m = con.execute(f"select tp+fp+fn+tn, n_images, n_errors, accuracy from read_parquet('{out}/metrics.parquet')").fetchall()
    labelled = n_inputs - n_errors
    assert m[0][:3] == (labelled, n_inputs, n_errors) and 0 <= m[0][3] <= 1
    slides = pads.dataset(str(out / "slides.parquet")).to_table().to_pandas()
    per_slide = slides[slides[schema.COL_LEVEL] == "slide"]
    assert per_slide[schema.COL_N_CELLS].sum() == labelled
    assert (per_slide[schema.COL_N_LABEL_POS] + per_slide[schema.COL_N_LABEL_NEG]).sum() == labelled
    run_dir = out / "runs" / "20250101T000000Z-first"
    for name in ("config.json", "manifest.json", "metrics.parquet", "plots/confusion_matrix.png"):
        assert (run_dir / name).is_file(), name

    # Nightly rerun of the unchanged archive: nothing new is scored.
    assert run_cli("--input", str(data), "--model", str(score_model), "--output", str(out),
                   "--skip-scored", "--run-id", "20250102T000000Z-second") == 0
    assert f"already scored    {n_inputs:>10,}" in capsys.readouterr().out
    assert len(read_predictions(out)) == n_inputs
    # The archive grows: only the new images are scored. An actor asking for every CPU of the
    # 2-CPU test cluster would starve the read tasks and hang; it is given less, and says so.
    grown = copy_cells(sample_dir, data, 5, start=20)
    assert run_cli("--input", str(data), "--model", str(score_model), "--output", str(out),
                   "--skip-scored", "--run-id", "20250103T000000Z-third", "--cpus-per-actor", "2") == 0
    said = capsys.readouterr()  # a log line: on stderr, the summary alone on stdout
    assert "reserving 1 CPU per actor instead" in said.err and "reserving" not in said.out
    assert "images scored" in said.out and "images scored" not in said.err
    df = read_predictions(out)
    assert len(df) == n_inputs + grown
    assert (df[schema.COL_RUN_ID] == "20250103T000000Z-third").sum() == grown
    assert len(pads.dataset(str(out / "metrics.parquet")).to_table()) == 3
    slides = pads.dataset(str(out / "slides.parquet")).to_table().to_pandas()
    assert slides.loc[slides[schema.COL_LEVEL] == "slide", schema.COL_N_CELLS].sum() == labelled + grown


def test_mixed_archives_one_row_per_image(ray_session, sample_dir, score_model, tmp_path, capsys):
    data, out = tmp_path / "in", tmp_path / "out"
    data.mkdir()
    expected = make_mixed_input(sample_dir, data)
    assert run_cli("--input", str(data), "--model", str(score_model), "--output", str(out),
                   "--batch-size", "8", "--max-error-fraction", "1") == 0  # bad members on purpose
    text = capsys.readouterr().out
    df = read_predictions(out)
    assert len(df) == expected["images"] and df[schema.COL_URI].is_unique
    assert df[schema.COL_ERROR].notna().sum() == expected["errors"]
    assert any("cell_images.zip#" in u for u in df[schema.COL_URI])
    assert any("shard-0.tar#" in u for u in df[schema.COL_URI])
    non_images = expected["non_image_loose"] + expected["non_image_members"]
    assert f"non-images        {non_images:>10,}" in text
    assert f"empty archives    {expected['empty']:>10,}" in text


def test_one_big_tar_decodes_in_many_tasks(ray_session, sample_dir, score_model, tmp_path):
    """One archive is one read task, but its images decode in tasks of --batch-size rows, which
    Ray spreads over every CPU: a night that is one big tar is not decoded on one core."""
    import tarfile

    from malaria_ray.score import build_pipeline, inspect_model

    pngs = real_pngs(sample_dir, "Parasitized", 100) + real_pngs(sample_dir, "Uninfected", 100)
    with tarfile.open(tmp_path / "night.tar", "w") as tar:
        for p in pngs:
            tar.add(p, arcname=f"{p.parent.name}/{p.name}")
    listing = sources.list_units(str(tmp_path / "night.tar"))
    cfg = ScoreConfig(input=str(tmp_path / "night.tar"), model=str(score_model), output=str(tmp_path / "out"),
                      batch_size=16, threshold=0.5)
    ds = build_pipeline(cfg, listing, 32, ingest.NO_IDS, inspect_model(str(score_model))["model_id"], "r", {})
    rows = ds.take_all()
    assert sorted(r[schema.COL_URI].rsplit("#", 1)[1] for r in rows) == sorted(
        f"{p.parent.name}/{p.name}" for p in pngs)
    assert all(r[schema.COL_STATUS] == schema.STATUS_OK for r in rows)
    tasks = {op: tasks_executed(ds, op) for op in ("read_raw", "prepare_batch")}
    assert tasks == {"read_raw": 1, "prepare_batch": 200 // 16 + 1}, ds.stats()


def test_loose_files_reach_the_model_in_full_batches(ray_session, sample_dir, score_model, tmp_path):
    """Read tasks take loose files in multiples of --batch-size, so no task leaves a short batch
    behind: 200 files at 16 decode in ceil(200 / 16) = 13 tasks (near-equal slices of 50 made 16,
    a third of them short, and short batches cost a CPU model call nearly what full ones do)."""
    from malaria_ray.score import build_pipeline, inspect_model

    copy_cells(sample_dir, tmp_path / "night", 100)
    listing = sources.list_units(str(tmp_path / "night"))
    cfg = ScoreConfig(input=str(tmp_path / "night"), model=str(score_model), output=str(tmp_path / "out"),
                      batch_size=16, threshold=0.5)
    ds = build_pipeline(cfg, listing, 32, ingest.NO_IDS, inspect_model(str(score_model))["model_id"], "r", {})
    assert len(ds.take_all()) == 200
    assert tasks_executed(ds, "prepare_batch") == 13, ds.stats()


@pytest.fixture
def lambda_model(tmp_path) -> pathlib.Path:
    import keras

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    path = tmp_path / "lambda.keras"
    model.save(path)
    return path


def test_exit_codes_and_one_line_reasons(ray_session, sample_dir, score_model, lambda_model, tmp_path, capsys):
    data = tmp_path / "in"
    copy_cells(sample_dir, data, 2)
    (tmp_path / "only-junk").mkdir()
    (tmp_path / "only-junk" / "Thumbs.db").write_bytes(b"x")
    (tmp_path / "not-a-model.keras").write_text("hello")
    (tmp_path / "a-file").write_text("x")
    tarfile_empty = tmp_path / "empty-only"
    tarfile_empty.mkdir()
    import tarfile

    tarfile.open(tarfile_empty / "e.tar", "w").close()
    corrupt = tmp_path / "corrupt.keras"  # a valid zip and config, weights that are not HDF5
    with zipfile.ZipFile(score_model / "model.keras") as src, zipfile.ZipFile(corrupt, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, b"not hdf5" if item.filename.endswith(".h5") else src.read(item))
    cases = {
        "corrupt.keras is not a loadable Keras model": (str(data), str(corrupt), str(tmp_path / "o0")),
        "model": (str(data), str(tmp_path / "missing-model"), str(tmp_path / "o1")),
        "not a loadable Keras model": (str(data), str(tmp_path / "not-a-model.keras"), str(tmp_path / "o2")),
        "Lambda": (str(data), str(lambda_model), str(tmp_path / "o3")),
        "does not exist": (str(tmp_path / "no-input"), str(score_model), str(tmp_path / "o4")),
        "no images found": (str(tmp_path / "only-junk"), str(score_model), str(tmp_path / "o5")),
        "not writable": (str(data), str(score_model), str(tmp_path / "a-file" / "out")),
        "empty archives": (str(tarfile_empty), str(score_model), str(tmp_path / "o7")),
    }
    for needle, (inp, model, out) in cases.items():
        assert run_cli("--input", inp, "--model", model, "--output", out) == 2, needle
        # stderr also carries Ray worker log lines (log_to_driver); the reason is one line of its own.
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("malaria-ray: error:")]
        assert len(err) == 1 and needle.lower() in err[0].lower(), (needle, err)
        assert not (pathlib.Path(out) / "predictions").exists() or not list(
            (pathlib.Path(out) / "predictions").rglob("*.parquet")), needle
        # A failed run gives its actors' CPUs back (else the next run in this process would wait).
        deadline = time.monotonic() + 30
        while ray_session.available_resources().get("CPU", 0) < ray_session.cluster_resources()["CPU"]:
            assert time.monotonic() < deadline, (needle, ray_session.available_resources())
            time.sleep(0.5)


def test_killed_scoring_worker_loses_and_duplicates_nothing(ray_session, sample_dir, score_model, tmp_path,
                                                            monkeypatch):
    from malaria_ray import score

    data, out = tmp_path / "in", tmp_path / "out"
    n = copy_cells(sample_dir, data, 24)
    marker = tmp_path / "killed"
    monkeypatch.setenv(faults.ENV, faults.spec("score.batch", 3, str(marker)))
    result = score.score_archive(ScoreConfig(input=str(data), model=str(score_model), output=str(out), batch_size=8))
    assert marker.exists(), "the fault was not injected"
    assert int(marker.read_text()) != os.getpid()
    df = read_predictions(out)
    assert len(df) == n == result.rows
    assert df[schema.COL_URI].is_unique and df[schema.COL_ERROR].isna().all()


def test_s3_input_and_output_through_a_real_s3_server(ray_session, moto_s3, sample_dir, score_model, tmp_path):
    """moto's standalone server on 127.0.0.1: input read from s3://, outputs written to s3://."""
    import boto3
    import pandas as pd

    from malaria_ray import storage

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="slides")
    s3.create_bucket(Bucket="scores")
    n = 0
    for cls in ("Parasitized", "Uninfected"):
        for p in real_pngs(sample_dir, cls, 8):
            s3.upload_file(str(p), "slides", f"archive/2025 night/{cls}/{p.name}")
            n += 1
    s3.put_object(Bucket="slides", Key="archive/Thumbs.db", Body=b"x")
    s3.upload_file(str(score_model / "model.keras"), "scores", "models/m1/model.keras")
    args = ["--input", "s3://slides/archive/", "--model", "s3://scores/models/m1",
            "--output", "s3://scores/nightly", "--batch-size", "8", "--skip-scored"]
    assert run_cli(*args) == 0
    fs, path = storage.filesystem("s3://scores/nightly/predictions")
    df = pd.read_parquet(f"s3://{path}", storage_options=storage.s3_options())
    assert len(df) == n and df[schema.COL_URI].str.startswith("s3://slides/archive/2025 night/").all()
    assert df[schema.COL_ERROR].isna().all()
    table = pads.dataset(f"{path}", filesystem=fs, format="parquet").to_table()
    assert table.num_rows == n
    assert fs.exists("scores/nightly/metrics.parquet") and fs.exists("scores/nightly/slides.parquet")
    assert not fs.exists("scores/nightly/_staging") or not fs.ls("scores/nightly/_staging")
    assert all(re.match(r"scores/nightly/predictions/scored_date=\d{4}-\d\d-\d\d/[^/]+\.part\d{5}\.parquet$", k)
               for k in fs.find("scores/nightly/predictions")), fs.find("scores/nightly/predictions")
    assert run_cli(*args) == 0  # nightly rerun: nothing new
    fs.invalidate_cache()
    assert pads.dataset(f"{path}", filesystem=fs, format="parquet").count_rows() == n
    # A crashed run's staging object is kept while it may belong to a live run, then removed.
    s3.put_object(Bucket="scores", Key="nightly/predictions/_staging/20250101T000000Z-dead.parquet", Body=b"x")
    assert outputs.remove_stale_staging("s3://scores/nightly") == []
    assert outputs.remove_stale_staging("s3://scores/nightly", max_age_s=-1) == ["20250101T000000Z-dead.parquet"]
    fs.invalidate_cache()
    assert pads.dataset(f"{path}", filesystem=fs, format="parquet").count_rows() == n
    # A missing bucket is a one-line reason, not a traceback.
    assert run_cli("--input", "s3://no-such-bucket/x/", "--model", str(score_model), "--output", str(tmp_path)) == 2
    assert run_cli("--input", "s3://slides/archive/", "--model", str(score_model),
                   "--output", "s3://no-such-bucket/out") == 2
    assert "no-such-bucket" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]


def test_scoring_uses_the_models_operating_point_unless_told(ray_session, sample_dir, score_model, tmp_path):
    """A model.json threshold is what rows and metrics record, and slides get calls from its
    false-positive rate; --threshold overrides it (and then slides make no call: the rate at
    another threshold is unknown)."""
    import json

    import pandas as pd

    from malaria_ray import score

    model = tmp_path / "model"
    shutil.copytree(score_model, model)
    contract = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({**contract, "threshold": 0.3, "val_specificity": 0.9}))
    data = tmp_path / "in"
    n = copy_cells(sample_dir, data, 6)
    own = score.score_archive(ScoreConfig(input=str(data), model=str(model), output=str(tmp_path / "own")))
    told = score.score_archive(ScoreConfig(input=str(data), model=str(model), output=str(tmp_path / "told"),
                                           threshold=0.5))
    for result, t in ((own, 0.3), (told, 0.5)):
        df = read_predictions(pathlib.Path(result.output))
        assert len(df) == n and (df[schema.COL_THRESHOLD] == t).all()
        assert ((df[schema.COL_PROB] >= t) == (df[schema.COL_PRED] == "Parasitized")).all()
        assert pd.read_parquet(pathlib.Path(result.output) / "metrics.parquet")[schema.COL_THRESHOLD].tolist() == [t]
        assert json.loads((pathlib.Path(result.output) / "runs" / result.run_id / "config.json").read_text())[
            "threshold"] == t
    slides = pd.read_parquet(tmp_path / "own" / "slides.parquet")
    assert slides[schema.COL_CALL].notna().all()
    assert (slides[schema.COL_CALL] == (slides[schema.COL_FRAC_LOW] > 0.1)).all()
    assert (slides[schema.COL_FRAC_LOW] <= slides[schema.COL_FRAC_POS]).all()
    assert pd.read_parquet(tmp_path / "told" / "slides.parquet")[schema.COL_CALL].isna().all()


def test_guards_a_bad_night_fails_loudly(ray_session, sample_dir, score_model, tmp_path, capsys):
    """Error rows above --max-error-fraction: the rows commit and the exit code is 3 with one line;
    a reused --run-id and an output root inside the input are refused with exit 2."""
    data, out = tmp_path / "in", tmp_path / "out"
    n = copy_cells(sample_dir, data, 4)
    for i in range(2):
        (data / "Uninfected" / f"broken-{i}.png").write_bytes(b"not a png")
    args = ("--input", str(data), "--model", str(score_model), "--output", str(out), "--run-id", "night-1")
    assert run_cli(*args) == 3  # 2 of 10 = 20% > 5% (the default)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("malaria-ray: error:")]
    assert len(err) == 1 and "20.0%" in err[0] and "--max-error-fraction 0.05" in err[0], err
    assert len(read_predictions(out)) == n + 2, "the rows are committed all the same"
    assert run_cli(*args, "--max-error-fraction", "0.25") == 2  # the same --run-id again
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("malaria-ray: error:")]
    assert len(err) == 1 and "already used" in err[0], err
    assert len(read_predictions(out)) == n + 2
    inside = ("--input", str(data), "--model", str(score_model), "--output", str(data / "scores"))
    assert run_cli(*inside) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("malaria-ray: error:")]
    assert len(err) == 1 and "inside --input" in err[0], err
    assert not (data / "scores").exists()


def test_two_runs_on_one_output_root_one_refuses(ray_session, sample_dir, score_model, tmp_path, capsys):
    """While another run holds the root's lease, a run refuses with exit 2 and writes nothing; a
    lease that expired (its run crashed) is taken over; a finished run leaves no lease behind."""
    import json

    data, out = tmp_path / "in", tmp_path / "out"
    n = copy_cells(sample_dir, data, 3)
    other = Lease(str(out), "other-night")
    other.acquire()
    args = ("--input", str(data), "--model", str(score_model), "--output", str(out))
    assert run_cli(*args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("malaria-ray: error:")]
    assert len(err) == 1 and "other-night" in err[0] and "lease" in err[0], err
    assert not (out / "predictions").exists()
    lease = json.loads((out / LEASE_FILE).read_text())
    (out / LEASE_FILE).write_text(json.dumps({**lease, "expires_at": lease["renewed_at"] - 1}))  # it crashed
    assert run_cli(*args) == 0
    assert len(read_predictions(out)) == n
    assert not (out / LEASE_FILE).exists()


def test_a_real_nightly_archive_without_nih_names(ray_session, sample_dir, score_model, tmp_path, capsys):
    """Renamed cells in slide folders: folders give the slide, a --manifest gives patients and
    labels and wins; without labels the metrics hold nulls, not NaN, and the summary says so."""
    import pandas as pd

    data = tmp_path / "night"
    names = []
    for slide in ("slide-A", "slide-B"):
        (data / slide).mkdir(parents=True)
        for i, p in enumerate(sorted((sample_dir / "Parasitized").glob("*.png"))[:3]):
            (data / slide / f"cell-{i}.png").write_bytes(p.read_bytes())
            names.append(f"{slide}/cell-{i}.png")
    out = tmp_path / "plain"
    assert run_cli("--input", str(data), "--model", str(score_model), "--output", str(out)) == 0
    assert "an unlabelled archive" in capsys.readouterr().out
    df = read_predictions(out)
    assert sorted(set(df[schema.COL_SLIDE])) == ["slide-A", "slide-B"] and df[schema.COL_PATIENT].isna().all()
    m = pd.read_parquet(out / "metrics.parquet").iloc[0]
    assert m["n_labelled"] == 0 and all(m[k] is None or pd.isna(m[k]) for k in schema.METRIC_RATES)
    import pyarrow.parquet as pq

    assert pq.read_table(out / "metrics.parquet").column("accuracy").null_count == 1  # null, not NaN
    slides = pd.read_parquet(out / "slides.parquet")
    assert sorted(slides.loc[slides.level == "slide", schema.COL_SLIDE]) == ["slide-A", "slide-B"]

    manifest = tmp_path / "identity.csv"
    manifest.write_text("path,slide_id,patient_id,label\n" + "".join(
        f"{n},{n.split('/')[0].upper()},PT-{n[6]},{'Parasitized' if n.endswith('0.png') else ''}\n" for n in names))
    out = tmp_path / "with-manifest"
    assert run_cli("--input", str(data), "--model", str(score_model), "--output", str(out),
                   "--manifest", str(manifest)) == 0
    df = read_predictions(out).sort_values(schema.COL_URI)
    assert sorted(set(df[schema.COL_SLIDE])) == ["SLIDE-A", "SLIDE-B"]
    assert sorted(set(df[schema.COL_PATIENT])) == ["PT-A", "PT-B"]
    assert (df[schema.COL_LABEL] == "Parasitized").sum() == 2 and df[schema.COL_LABEL].isna().sum() == 4
    assert pd.read_parquet(out / "metrics.parquet").iloc[0]["n_labelled"] == 2


def test_skip_scored_trusts_an_unchanged_listing_and_hashes_the_rest(ray_session, sample_dir, score_model,
                                                                      tmp_path, capsys):
    """A loose file listed with the size and mtime it had when this model scored it is skipped
    without being read (proved by changing its bytes behind an unchanged size and mtime); a
    touched file is read and recognised by its content hash; a changed file is scored again."""
    import json

    data, out = tmp_path / "in", tmp_path / "out"
    n = copy_cells(sample_dir, data, 3)
    args = ("--input", str(data), "--model", str(score_model), "--output", str(out), "--skip-scored")
    assert run_cli(*args) == 0
    files = sorted(data.rglob("*.png"))
    same_stat, touched, changed = files[0], files[1], files[2]
    st = same_stat.stat()
    blob = bytearray(same_stat.read_bytes())
    blob[-5] ^= 0xFF  # other bytes, same size: only a read would notice
    same_stat.write_bytes(bytes(blob))
    os.utime(same_stat, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    changed.write_bytes(sorted((sample_dir / "Uninfected").glob("*.png"))[-1].read_bytes())
    capsys.readouterr()
    assert run_cli(*args) == 0
    text = capsys.readouterr().out
    assert f"already scored    {n - 1:>10,}" in text and f"{n - 2:,} unchanged in the listing, not read" in text
    assert "images scored              1" in text
    run = sorted((out / "runs").iterdir())[-1]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["unchanged_in_listing"] == n - 2 and manifest["counts"]["scored"] == 1
    df = read_predictions(out)
    assert df[schema.COL_SOURCE_VERSION].notna().all()
    assert len(df) == n + 1 and (df[schema.COL_URI] == str(changed)).sum() == 2
