"""MLflow (docs/operations.md, "MLflow: track runs, roll models by alias"): a training run logged to a
real tracking server and registered, then scored by alias as the alias moves; the offline sqlite
store; the one-line errors before any Ray starts.

The ``fresh`` tests run the documented commands in subprocesses (``test_commands.run``: no Ray
before or after) against ``mlflow server`` on 127.0.0.1 (sqlite backend, artifacts in tmp), with
one 32 px, one-epoch training run shared by the module. The rest are in-process and start no Ray.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import socket
import subprocess
import sys

import pandas as pd
import pytest

from conftest import serve_on_free_port
from test_commands import TRAIN_FLAGS, run

pytest.importorskip("mlflow", reason="the [dev] extra installs MLflow")
from mlflow import MlflowClient  # noqa: E402

from malaria_ray import cli, tracking  # noqa: E402

BIN = pathlib.Path(sys.executable).parent
NAME = "cells"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``mlflow server`` on a free port of 127.0.0.1: a sqlite registry, artifacts served from tmp."""
    work = tmp_path_factory.mktemp("mlflow-server")
    proc, url = serve_on_free_port(lambda port: [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}", "--artifacts-destination", str(work / "artifacts"),
    ], "mlflow server", wait_s=120, path="/health")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def trained(server, tmp_path_factory):
    """(work dir, tracking URL): a corpus and one training run logged to the server as ``cells``."""
    work = tmp_path_factory.mktemp("mlflow-run")
    r = run("malaria-ray", "synth", "corpus", "--n", "64", cwd=work)
    assert r.returncode == 0, r.stderr
    r = run("malaria-ray", "train", "--data", "corpus", "--output", "run", *TRAIN_FLAGS, "--mlflow-uri", server,
            "--mlflow-experiment", "cells-test", "--registered-model", NAME, cwd=work)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"registered {NAME} version 1" in r.stdout, r.stdout[-2000:]
    return work, server


@pytest.mark.fresh
def test_train_logs_the_run_and_registers_its_model(trained):
    work, url = trained
    c = MlflowClient(url, url)
    record = json.loads((work / "run" / tracking.RECORD_FILE).read_text())
    contract = json.loads((work / "run" / "model.json").read_text())
    run_ = c.get_run(record["run_id"])
    assert run_.info.status == "FINISHED"
    assert c.get_experiment(run_.info.experiment_id).name == "cells-test"
    params = run_.data.params
    assert params["image_size"] == "32" and params["epochs"] == "1" and params["operating_point.threshold"]
    assert params["model_id"] == contract["model_id"]
    m = run_.data.metrics
    assert m["threshold"] == pytest.approx(contract["threshold"]) and 0 <= m["sensitivity"] <= 1
    assert "accuracy_ci_low" in m and "argmax_accuracy" in m and "model_val_specificity" in m
    history = c.get_metric_history(record["run_id"], "loss")  # per epoch, step = epoch
    assert [h.step for h in history] == [1]
    assert history[0].value == pytest.approx(pd.read_parquet(work / "run" / "history.parquet")["loss"][0])
    files = {f.path for f in c.list_artifacts(record["run_id"])}
    assert {"model", "plots", "model_card.md", "config.json", "metrics.parquet", "patients.parquet"} <= files
    assert {f.path for f in c.list_artifacts(record["run_id"], "model")} == {"model/model.keras", "model/model.json"}
    mv = c.get_model_version(NAME, "1")
    assert mv.run_id == record["run_id"] and mv.tags["contract.model_id"] == contract["model_id"]
    assert float(mv.tags["contract.threshold"]) == pytest.approx(contract["threshold"])


def _register(c: MlflowClient, model_dir: pathlib.Path | None = None, of_version: str | None = None) -> str:
    """A new version of NAME: ``model_dir`` logged as a new run's model/ folder, or the model of
    version ``of_version`` again (the server wants the run that holds a source)."""
    if of_version is None:
        r = c.create_run(c.get_experiment_by_name("cells-test").experiment_id)
        c.log_artifacts(r.info.run_id, str(model_dir), "model")
        c.set_terminated(r.info.run_id)
        source, run_id = r.info.artifact_uri + "/model", r.info.run_id
    else:
        source, run_id = c.get_model_version(NAME, of_version).source, c.get_model_version(NAME, of_version).run_id
    return c.create_model_version(NAME, source, run_id=run_id).version


def _score(work: pathlib.Path, url: str, *flags: str) -> tuple[dict, pd.DataFrame, str]:
    """Score the corpus with models:/NAME@champion; (its manifest, its rows, its stdout)."""
    r = run("malaria-ray", "score", "--input", "corpus", "--model", f"models:/{NAME}@champion", "--mlflow-uri", url,
            "--output", "scores", *flags, cwd=work)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_id = r.stdout.split("malaria-ray score: run ", 1)[1].split()[0]
    manifest = json.loads((work / "scores" / "runs" / run_id / "manifest.json").read_text())
    preds = pd.read_parquet(work / "scores" / "predictions")
    return manifest, preds[preds["run_id"] == run_id], r.stdout


@pytest.mark.fresh
def test_score_follows_the_alias(trained):
    """Score models:/cells@champion, move the alias to another model (rescored), then to a version
    of the first run's model (the same model_id: nothing is scored again)."""
    work, url = trained
    c = MlflowClient(url, url)
    first_id = json.loads((work / "run" / "model.json").read_text())["model_id"]
    c.set_registered_model_alias(NAME, "champion", "1")
    manifest, rows, out = _score(work, url)
    assert manifest["registered_model"]["model_version"] == "1" and manifest["registered_model"]["alias"] == "champion"
    assert manifest["registered_model"]["mlflow_run_id"] == c.get_model_version(NAME, "1").run_id
    assert manifest["model"] == f"models:/{NAME}@champion" and manifest["model_id"] == first_id
    assert len(rows) == 64 and set(rows["model_id"]) == {first_id}
    assert f"{NAME} version 1 @champion" in out

    # another model (a fresh 32 px classifier) as version 2; the alias moves to it
    r = subprocess.run([sys.executable, "-c", "from malaria_ray.model import build_model, save_model; "
                        "print(save_model(build_model(32, seed=1), 'other'))"], cwd=work, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    other_id = r.stdout.split()[-1]
    c.set_registered_model_alias(NAME, "champion", _register(c, work / "other"))
    manifest, rows, _ = _score(work, url, "--skip-scored")
    assert manifest["registered_model"]["model_version"] == "2" and manifest["model_id"] == other_id != first_id
    assert len(rows) == 64 and set(rows["model_id"]) == {other_id}

    # version 3 registers the first run's model again: the same model_id, so nothing is rescored
    version = _register(c, of_version="1")
    c.set_registered_model_alias(NAME, "champion", version)
    manifest, rows, out = _score(work, url, "--skip-scored")
    assert manifest["registered_model"]["model_version"] == "3" and manifest["model_id"] == first_id
    assert len(rows) == 0 and manifest["counts"]["already_scored"] == 64, manifest["counts"]


@pytest.mark.fresh
def test_offline_sqlite_store_keeps_artifacts_beside_it(trained, tmp_path):
    """The offline store (no server): sqlite:///PATH.db, artifacts in mlartifacts/ beside it."""
    work, _ = trained
    run_dir = tmp_path / "run"
    shutil.copytree(work / "run", run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    logged = tracking.log_training_run(uri, "offline", NAME, str(run_dir))
    assert logged.version == "1" and json.loads((run_dir / tracking.RECORD_FILE).read_text())["run_id"] == logged.run_id
    source = MlflowClient(uri, uri).get_model_version(NAME, "1").source
    assert source.startswith(f"file://{tmp_path / 'store' / 'mlartifacts'}/"), source
    assert (pathlib.Path(source[len("file://"):]) / "model.keras").read_bytes() == (run_dir / "model.keras").read_bytes()
    reg = tracking.resolve(f"models:/{NAME}/1", uri)
    assert (reg.name, reg.version, reg.alias, reg.run_id) == (NAME, "1", None, logged.run_id)


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_train_refuses_an_unusable_tracking_store_before_it_starts(tmp_path, capsys, monkeypatch):
    """A server that is down, and MLflow 3's file store (refused unless MLFLOW_ALLOW_FILE_STORE)."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for uri, shown in ((_closed_port_url(), None), (str(tmp_path / "mlruns"), f"file://{tmp_path / 'mlruns'}")):
        code = cli.main(["train", "--data", str(tmp_path), "--output", str(tmp_path / "run"), "--mlflow-uri", uri])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"malaria-ray: error: --mlflow-uri {shown or uri}: cannot use the tracking store"), err
        assert not (tmp_path / "run").exists()


def test_a_store_that_fails_after_training_is_a_warning(tmp_path):
    """The run directory is finished when MLflow is called: a server gone by then costs a warning."""
    from malaria_ray.config import TrainConfig

    cfg = TrainConfig(data=str(tmp_path), output=str(tmp_path / "run"), mlflow_uri=_closed_port_url())
    line = tracking.log_train(cfg, 0.0)
    assert line.startswith(f"NOT logged: the run in {cfg.output} is finished, but logging it to MLflow"), line


def test_registered_model_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "in").mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri, uri).create_registered_model(NAME)
    capsys.readouterr()
    base = ["score", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    cases = {
        (f"models:/{NAME}@champion",): "give --mlflow-uri (or set MLFLOW_TRACKING_URI)",
        (f"models:/{NAME}@champion", "--mlflow-uri", uri): f"--model models:/{NAME}@champion in {uri}:",
        (f"models:/{NAME}", "--mlflow-uri", uri): "a registered model is models:/NAME@ALIAS or models:/NAME/VERSION",
        (str(tmp_path), "--mlflow-uri", uri): "--mlflow-uri applies to a registered --model",
    }
    for (model, *rest), expected in cases.items():
        code = cli.main([*base, "--model", model, *rest])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expected in err[0], (model, err)


def test_without_mlflow_the_flags_say_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as on a node without the [mlflow] extra
    code = cli.main(["train", "--data", str(tmp_path), "--output", str(tmp_path / "run"), "--mlflow-uri", "sqlite:///x.db"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "malaria-ray: error: --mlflow-uri needs MLflow's client: pip install 'malaria-ray[mlflow]'"


def test_tracking_uri_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.normalize_uri("sqlite:///m.db") == f"sqlite:///{tmp_path}/m.db"
    assert tracking.normalize_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert tracking.normalize_uri("http://host:5000") == "http://host:5000"
    assert tracking.normalize_uri("store") == f"file://{tmp_path}/store"
