"""Every documented command, run as a user runs it: a subprocess in a fresh environment with no Ray
running, so each command starts (and stops) its own local Ray through ``malaria_ray.runtime``.

Marked ``fresh``: ``make test`` runs these in its second pytest session, after the in-process
session's Ray is gone (one Ray instance per machine at a time), before the cluster tests start
their own head. Short real runs: synthetic and real NIH cells, 32 px, one epoch.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pandas as pd
import pytest

pytestmark = [pytest.mark.fresh, pytest.mark.timeout(900)]

REPO = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent
TRAIN_FLAGS = ["--image-size", "32", "--epochs", "1", "--batch-size", "16", "--bn-recal-batches", "2"]


def _ray_processes() -> list[str]:
    out = subprocess.run(["pgrep", "-a", "-f", "raylet|gcs_server"], capture_output=True, text=True).stdout
    # A "<defunct>" entry is a Ray process that has exited and awaits its parent's wait(): not running
    # (the cluster tests' heads leave such zombies under pytest until it reaps them).
    return [line for line in out.splitlines() if "pgrep" not in line and "<defunct>" not in line]


def fresh_env() -> dict[str, str]:
    """A user's shell: no RAY_* variables and no armed fault, this venv's commands first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "MALARIA_RAY_FAULT"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def run(*cmd: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    """``cmd`` in a fresh environment (``fresh_env``); asserts no Ray before or after."""
    assert not _ray_processes(), f"a Ray instance is already running: {_ray_processes()}"
    r = subprocess.run(list(cmd), cwd=cwd, env=fresh_env(), capture_output=True, text=True, timeout=600)
    assert not _ray_processes(), f"the command left Ray running: {_ray_processes()}"
    return r


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> pathlib.Path:
    work = tmp_path_factory.mktemp("synth")
    r = run("malaria-ray", "synth", "corpus", "--n", "64", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "wrote 64 SYNTHETIC cell images" in r.stdout
    assert len(list((work / "corpus").rglob("*.png"))) == 64
    return work / "corpus"


def test_malaria_ray_train_then_score(synthetic, tmp_path):
    r = run("malaria-ray", "train", "--data", str(synthetic), "--output", "run", *TRAIN_FLAGS, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "malaria-ray train: done" in r.stdout and "starting a local Ray" in r.stderr  # summary; log line
    assert "malaria-ray.ray:" not in r.stdout and "malaria-ray.train:" not in r.stdout
    for name in ("model.keras", "model.json", "history.parquet", "predictions.parquet", "split.parquet"):
        assert (tmp_path / "run" / name).exists(), name
    assert len(pd.read_parquet(tmp_path / "run" / "history.parquet")) == 1

    r = run("malaria-ray", "score", "--input", str(synthetic), "--model", "run", "--output", "scores", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "committed" in r.stdout and "images scored" in r.stdout
    preds = pd.read_parquet(tmp_path / "scores" / "predictions")
    assert len(preds) == 64 and preds["uri"].is_unique and preds["error"].isna().all()
    assert (tmp_path / "scores" / "slides.parquet").exists() and (tmp_path / "scores" / "metrics.parquet").exists()

    # Field photographs, as the README has them: SYNTHETIC fields, scored with the same run's model.
    r = run("malaria-ray", "synth", "fields", "--fields", "--n", "4", cwd=tmp_path)
    assert r.returncode == 0 and "wrote 4 SYNTHETIC field photographs" in r.stdout, r.stderr
    r = run("malaria-ray", "score", "--input", "fields", "--model", "run", "--output", "field-scores", "--fields",
            cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"fields scored\s+4 ", r.stdout) and "cells scored" in r.stdout, r.stdout
    table = pd.read_parquet(tmp_path / "field-scores" / "fields.parquet")
    assert len(table) == 4 and (table["n_cells"] > 20).all() and table["error"].isna().all()
    cells = pd.read_parquet(tmp_path / "field-scores" / "predictions")
    assert len(cells) == table["n_cells"].sum() and cells["image_id"].is_unique


def test_jobs_entrypoints_train_then_score_real_cells(small_corpus, tmp_path):
    r = run(sys.executable, str(REPO / "jobs" / "train.py"), "--data", str(small_corpus), "--output", "run",
            *TRAIN_FLAGS, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    split = pd.read_parquet(tmp_path / "run" / "split.parquet")
    assert len(split) == len(list(small_corpus.rglob("*.png")))

    args = ("--input", str(small_corpus), "--model", "run", "--output", "scores", "--skip-scored")
    r = run(sys.executable, str(REPO / "jobs" / "score.py"), *args, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert len(pd.read_parquet(tmp_path / "scores" / "predictions")) == len(split)
    # The nightly rerun: everything is already scored by this model, nothing is scored twice.
    r = run(sys.executable, str(REPO / "jobs" / "score.py"), *args, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert len(pd.read_parquet(tmp_path / "scores" / "predictions")) == len(split)


def test_score_on_either_keras_backend_gives_the_same_predictions(sample_dir, score_model, tmp_path):
    """``score --backend jax`` runs the model actors on Keras' JAX backend: the same model.keras
    (saved by TensorFlow) gives every image the probability TensorFlow gives it, within float32
    round-off (1e-4). Each run's manifest names its backend. (JAX's bf16 predictor is checked
    against its fp32 one in tests/test_model.py, without Ray.)"""
    import json

    from malaria_ray import schema

    probs = {}
    for backend in ("tensorflow", "jax"):
        out = tmp_path / backend
        r = run("malaria-ray", "score", "--input", str(sample_dir), "--model", str(score_model), "--output", str(out),
                "--backend", backend, cwd=tmp_path)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        (run_id,) = os.listdir(out / "runs")
        manifest = json.loads((out / "runs" / run_id / "manifest.json").read_text())
        assert (manifest["backend"], manifest["finished"]) == (backend, True)
        preds = pd.read_parquet(out / "predictions").set_index(schema.COL_URI)
        assert len(preds) == 288 and preds[schema.COL_ERROR].isna().all()
        probs[backend] = preds[schema.COL_PROB]
    tf, jax = probs["tensorflow"], probs["jax"].reindex(probs["tensorflow"].index)
    assert tf.max() - tf.min() > 10 * 1e-4, "the images' probabilities must differ by more than the tolerance"
    assert (tf - jax).abs().max() < 1e-4  # measured 3e-8 (the untrained 32 px model: spread 0.011)

def test_make_demo_trains_then_scores_a_held_out_synthetic_night(tmp_path):
    """`make demo` as the README has it (its venv already built by `make test`): trains on one
    synthetic corpus, scores a second one of other patients, and says both are synthetic. The
    training flags are the other fresh tests' (32 px, one epoch) through the Makefile's DEMO_FLAGS:
    the recipe is the demo's, the flags only its cost."""
    venv = pathlib.Path(sys.executable).parents[1]
    r = run("make", "--no-print-directory", "-C", str(REPO), "demo", f"VENV={venv}", f"OUT={tmp_path / 'demo-out'}",
            f"DEMO_FLAGS={' '.join(TRAIN_FLAGS)} --num-workers 1", "-o", str(venv / "bin" / ".installed"), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SYNTHETIC corpus" in r.stdout and "held-out SYNTHETIC night" in r.stdout and "in-sample" not in r.stdout
    out = tmp_path / "demo-out"
    for name in ("model.keras", "model.json", "model_card.md", "history.parquet", "plots/confusion_matrix.png"):
        assert (out / "train-run" / name).exists(), name
    split = pd.read_parquet(out / "train-run" / "split.parquet")
    preds = pd.read_parquet(out / "scores" / "predictions")
    assert len(preds) == 200 and preds["error"].isna().all()
    assert not set(preds["patient_id"]) & set(split["patient_id"]), "the scored night shares patients with training"
    assert (out / "scores" / "metrics.parquet").exists() and (out / "scores" / "slides.parquet").exists()


def test_bad_input_exits_2_with_one_line_and_no_ray_left(tmp_path):
    for cmd in (["malaria-ray", "score", "--input", "nope", "--model", "nope", "--output", "out"],
                [sys.executable, str(REPO / "jobs" / "score.py"), "--input", "nope", "--model", "nope", "--output", "o"],
                ["malaria-ray", "train", "--data", "nope", "--output", "out"]):
        r = run(*cmd, cwd=tmp_path)
        errors = [line for line in r.stderr.splitlines() if line.startswith("malaria-ray: error:")]
        assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, (cmd, r.stderr[-2000:])


def test_migrate_moves_an_old_root_into_partitions_that_score_then_reads(tmp_path):
    """A root in the flat layout of earlier versions: ``score`` refuses it with one line naming
    ``malaria-ray migrate`` (before any Ray starts), ``migrate`` moves it, and says so once."""
    from test_layout import old_root

    old_root(tmp_path / "old")
    (tmp_path / "night").mkdir()
    r = run("malaria-ray", "score", "--input", "night", "--model", "m.keras", "--output", "old", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "malaria-ray: error: old/predictions holds 6 part(s) in the flat layout of earlier versions (e.g. "
        "20250101T230000Z-aaaaaa.part00001.parquet): run `malaria-ray migrate old` once to move them into "
        "scored_date=YYYY-MM-DD/ partitions"), r.stderr[-2000:]
    r = run("malaria-ray", "migrate", "old", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("malaria-ray migrate: moved 6 part(s) of 3 run(s)"), r.stderr
    assert len(pd.read_parquet(tmp_path / "old" / "predictions")) == 18
    r = run("malaria-ray", "migrate", "old", cwd=tmp_path)
    assert r.returncode == 0 and "nothing to move" in r.stdout
    r = run("malaria-ray", "migrate", "missing", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "malaria-ray: error: missing does not exist: nothing to migrate"


def test_train_resumes_after_its_driver_is_killed(small_corpus, tmp_path):
    """SIGKILL the training driver after its second checkpoint; its local Ray goes with it; the
    same command refuses to start over the unfinished run; --resume finishes it from the last
    checkpoint, with each epoch exactly once in history and the same split."""
    import json
    import signal
    import time

    args = ["malaria-ray", "train", "--data", str(small_corpus), "--output", "run", *TRAIN_FLAGS]
    args[args.index("--epochs") + 1] = "8"
    assert not _ray_processes()
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(args, cwd=tmp_path, env=fresh_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 480
    while True:
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no second checkpoint in time"
        epochs = []
        for state in (tmp_path / "run" / "checkpoints").rglob("state.json"):
            try:
                epochs.append(json.loads(state.read_text())["epoch"])
            except ValueError:  # being written
                pass
        if max(epochs, default=0) >= 2:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 90
    while _ray_processes():  # the local Ray shares the driver's fate
        assert time.monotonic() < deadline, f"Ray outlived its killed driver: {_ray_processes()}"
        time.sleep(1)
    assert not (tmp_path / "run" / "history.parquet").exists(), "the run finished before the kill"
    split_before = json.loads((tmp_path / "run" / "run.json").read_text())["config"]

    r = run(*args, cwd=tmp_path)
    assert r.returncode == 2 and "--resume" in r.stderr, r.stderr[-2000:]

    r = run("malaria-ray", "train", "--resume", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from checkpoint after epoch" in r.stderr  # rank 0's log line, through Ray's worker stderr
    hist = pd.read_parquet(tmp_path / "run" / "history.parquet")
    assert hist["epoch"].tolist() == list(range(1, 9)), hist
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert {k: resolved[k] for k in split_before if k != "output"} == {k: v for k, v in split_before.items()
                                                                      if k != "output"}
    split = pd.read_parquet(tmp_path / "run" / "split.parquet")
    assert len(split) == len(list(small_corpus.rglob("*.png")))


@pytest.fixture(scope="module")
def night(sample_dir, tmp_path_factory) -> pathlib.Path:
    """2,000 distinct real NIH cells (the fixture's cells flipped and turned), as a night's folder."""
    from conftest import write_distinct_cells

    root = tmp_path_factory.mktemp("night")
    assert write_distinct_cells(sample_dir, root, 1000) == 2000
    return root


@pytest.mark.parametrize("kill", ["driver", "whole_ray"])
def test_a_killed_scoring_night_keeps_what_it_scored(night, score_model, tmp_path, kill):
    """SIGKILL the scoring driver (or, like a lost node, every process of its local Ray) after two
    parts were committed; the parts stay readable by pandas, pyarrow and DuckDB; the next night with
    --skip-scored scores only the rest, says it completed the killed run, and no row is doubled."""
    import json
    import signal
    import time

    import duckdb
    import pyarrow.dataset as pads

    args = ["malaria-ray", "score", "--input", str(night), "--model", str(score_model), "--output", "out",
            "--skip-scored", "--commit-every-rows", "100", "--batch-size", "8"]
    assert not _ray_processes()
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(args, cwd=tmp_path, env=fresh_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    preds = tmp_path / "out" / "predictions"
    deadline = time.monotonic() + 300
    while len(list(preds.glob("scored_date=*/*.part*.parquet"))) < 2:
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no two committed parts in time"
        time.sleep(0.05)
    if kill == "driver":
        proc.send_signal(signal.SIGKILL)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 90
    while _ray_processes():
        assert time.monotonic() < deadline, f"Ray outlived its killed driver: {_ray_processes()}"
        time.sleep(1)
    first_id = next(iter(os.listdir(tmp_path / "out" / "runs")))
    first = json.loads((tmp_path / "out" / "runs" / first_id / "manifest.json").read_text())
    assert first["finished"] is False, "the run finished before the kill"
    kept = pd.read_parquet(preds)
    assert 200 <= len(kept) < 2000 and kept["uri"].is_unique
    assert pads.dataset(str(preds), format="parquet", partitioning="hive").count_rows() == len(kept)
    assert duckdb.connect().execute(f"select count(*) from read_parquet('{preds}/**/*.parquet', hive_partitioning=true)"
                                    ).fetchall() == [(len(kept),)]
    assert len(first["parts"]) <= len(list(preds.glob("scored_date=*/*.parquet")))

    r = run(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"completes         unfinished run(s) {first_id}" in r.stdout, r.stdout[-2000:]
    final = pd.read_parquet(preds)
    assert len(final) == 2000 and final["uri"].is_unique, "exactly one row per input"
    second_id = (set(os.listdir(tmp_path / "out" / "runs")) - {first_id}).pop()
    second = json.loads((tmp_path / "out" / "runs" / second_id / "manifest.json").read_text())
    assert second["finished"] is True and second["completes"] == [first_id]
    assert second["counts"]["scored"] == 2000 - len(kept) < 2000
    assert second["counts"]["already_scored"] == len(kept)
    assert json.loads((tmp_path / "out" / "runs" / first_id / "manifest.json").read_text())["completed_by"] == second_id
