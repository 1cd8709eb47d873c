"""Every documented command, run as a user runs it: a subprocess in a fresh environment with no Ray
running, so each command starts (and stops) its own local Ray through ``malaria_ray.runtime``.

Marked ``fresh``: ``make test`` runs these in its second pytest session, after the in-process
session's Ray is gone (one Ray instance per machine at a time), before the cluster tests start
their own head. Short real runs: synthetic and real NIH cells, 32 px, one epoch.
"""

from __future__ import annotations

import os
import pathlib
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
    return [line for line in out.splitlines() if "pgrep" not in line]


def run(*cmd: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    """``cmd`` in a fresh environment (no RAY_* variables); asserts no Ray before or after."""
    assert not _ray_processes(), f"a Ray instance is already running: {_ray_processes()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "MALARIA_RAY_FAULT"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    r = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
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
    assert "malaria-ray train: done" in r.stdout and "starting a local Ray" in r.stdout
    for name in ("model.keras", "model.json", "history.parquet", "predictions.parquet", "split.parquet"):
        assert (tmp_path / "run" / name).exists(), name
    assert len(pd.read_parquet(tmp_path / "run" / "history.parquet")) == 1

    r = run("malaria-ray", "score", "--input", str(synthetic), "--model", "run", "--output", "scores", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "committed" in r.stdout and "images scored" in r.stdout
    preds = pd.read_parquet(tmp_path / "scores" / "predictions")
    assert len(preds) == 64 and preds["uri"].is_unique and preds["error"].isna().all()
    assert (tmp_path / "scores" / "slides.parquet").exists() and (tmp_path / "scores" / "metrics.parquet").exists()


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


def test_bad_input_exits_2_with_one_line_and_no_ray_left(tmp_path):
    for cmd in (["malaria-ray", "score", "--input", "nope", "--model", "nope", "--output", "out"],
                [sys.executable, str(REPO / "jobs" / "score.py"), "--input", "nope", "--model", "nope", "--output", "o"],
                ["malaria-ray", "train", "--data", "nope", "--output", "out"]):
        r = run(*cmd, cwd=tmp_path)
        errors = [line for line in r.stderr.splitlines() if line.startswith("malaria-ray: error:")]
        assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, (cmd, r.stderr[-2000:])
