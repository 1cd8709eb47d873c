"""MLflow: a finished training run logged to a tracking server and registered; a registered model
(``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``) resolved for scoring.

Training logs from the driver once its run directory is finished (``log_training_run``): the
resolved config as params, the per-epoch history as metrics with ``step=epoch`` (after the run,
from ``history.parquet``, not live from the workers: the workers need neither MLflow nor a route to
the server), the operating point and validation metrics with their patient-bootstrap intervals,
the patient- and slide-level evidence, and the artifacts: ``model/`` (``model.keras`` with its
``model.json`` contract), the model card, plots and tables. The run's ``model/`` is then
registered as a new version of ``--registered-model`` with the contract as version tags. The run
directory stays the source of truth: a server that fails at that point costs a warning, not the run.

Scoring resolves an alias to one version on the driver (``resolve``), so every model actor loads
that version even if the alias moves mid-run; the actors download it themselves (``download``).

MLflow is an optional extra (``malaria-ray[mlflow]``, the client only): it is imported here, when
a command asks for it. Pure otherwise: imports neither Ray nor TF.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass

from malaria_ray import logs, storage
from malaria_ray.config import ConfigError, TrainConfig
from malaria_ray.schema import CONTRACT_FILE, H5_FILE, MODEL_FILE

log = logs.get("mlflow")
SCHEME = "models:/"
MODEL_DIR = "model"  # the run's artifact folder that a registered version points at
RECORD_FILE = "mlflow.json"  # in the run directory: its MLflow run and registered version
# Run-directory files logged as artifacts beside model/ (plots/ goes whole).
RUN_FILES = ("config.json", "model_card.md", "metrics.parquet", "patients.parquet", "history.parquet")
CHECK_RETRIES = 1  # the start-up check: a server that is down fails in seconds, not after MLflow's ~2 min of retries
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
_MODEL_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<number>\d+))/?$")


class RegistryError(RuntimeError):
    """A registered model the registry cannot give (no such model, version or alias; a failed
    download); the message is shown to the user as is."""


def is_registered(uri: str | None) -> bool:
    return bool(uri) and uri.startswith(SCHEME)


def _mlflow(what: str):
    try:
        import mlflow
    except ImportError:
        raise ConfigError(f"{what} needs MLflow's client: pip install 'malaria-ray[mlflow]'") from None
    # MLflow's INFO lines (a new sqlite store's table migrations, "waiting for model version") would
    # fill the command's stderr around its one-line errors and its own log lines.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return mlflow


def normalize_uri(uri: str) -> str:
    """A tracking URI that names the same store from any working directory: a relative
    ``sqlite:///`` file or local path made absolute (resumed runs and Ray actors run elsewhere)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if "://" not in uri and not uri.startswith(("databricks", "file:")):
        return "file://" + os.path.abspath(uri)
    return uri


def message(exc: Exception) -> str:
    """MLflow's exceptions carry a message of one line, or a long JSON body: its first line."""
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return storage.redact(text.strip().splitlines()[0])[:400]


def _quick():
    """MLflow's HTTP client with few retries, for a check whose failure should come in seconds."""
    return storage.environ({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(CHECK_RETRIES), "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"})


def client(uri: str, what: str = "--mlflow-uri"):
    mlflow = _mlflow(what)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _artifact_location(uri: str) -> str | None:
    """A new experiment in a ``sqlite:///`` store keeps its artifacts beside the database file,
    not in ``./mlruns`` under whatever directory the command ran in."""
    if uri.startswith("sqlite:///"):
        return "file://" + os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "mlartifacts")
    return None


def check_tracking(uri: str, experiment: str) -> str:
    """Before training starts: the store answers and the experiment exists (created if not);
    its id. Raises ConfigError with one line when the store cannot be used (MLflow 3's file
    store, refused unless MLFLOW_ALLOW_FILE_STORE=true, among them)."""
    try:
        c = client(uri)
        with _quick():
            found = c.get_experiment_by_name(experiment)
            return found.experiment_id if found else c.create_experiment(experiment, _artifact_location(uri))
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"--mlflow-uri {storage.redact(uri)}: cannot use the tracking store: {message(exc)}") from exc


def check_train(cfg: TrainConfig) -> TrainConfig:
    """``train --mlflow-uri``: ``cfg`` with the URI made absolute, once the store answered (``cfg``
    as it is without one). A store that cannot be used (MLflow not installed, server down, refused)
    fails here in one line, before hours of training whose tracking would then be lost."""
    if not cfg.mlflow_uri:
        return cfg
    cfg = dataclasses.replace(cfg, mlflow_uri=normalize_uri(cfg.mlflow_uri))
    check_tracking(cfg.mlflow_uri, cfg.mlflow_experiment)
    return cfg


def log_train(cfg: TrainConfig, started_at: float) -> str:
    """Log the finished run directory to ``--mlflow-uri`` (``log_training_run``); the line the
    training summary prints. The run is finished on disk by now: a store that fails here is a
    warning, and the run directory can still be scored by its URI."""
    try:
        return log_training_run(cfg.mlflow_uri, cfg.mlflow_experiment, cfg.registered_model, cfg.output,
                                started_at).line()
    except Exception as exc:
        line = (f"the run in {cfg.output} is finished, but logging it to MLflow {storage.redact(cfg.mlflow_uri)} "
                f"failed: {type(exc).__name__}: {message(exc)}")
        log.warning(line)
        return "NOT logged: " + line


def _flat_params(config: dict) -> dict[str, str]:
    out = {}
    for k, v in sorted(config.items()):
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in _flat_params(v).items()})
        else:
            out[k] = (json.dumps(v) if isinstance(v, (list, tuple)) else str(v))[:MAX_PARAM_CHARS]
    return out


def _finite(value) -> bool:
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_metrics(history: list[dict], rows: list[dict], contract: dict) -> list[tuple[str, float, int]]:
    """(key, value, step) to log: every history column per epoch (step = epoch); the validation
    metrics at the operating point (intervals and patient/slide rates included) and at argmax
    (``argmax_`` prefix) and the operating point's numbers from ``model.json``, at the best epoch."""
    out = [(k, float(v), int(h["epoch"])) for h in history for k, v in h.items() if k != "epoch" and _finite(v)]
    best = int(rows[0].get("best_epoch", 0)) if rows else 0
    for row in rows:
        prefix = "" if row.get("threshold_kind") == "operating_point" else f"{row.get('threshold_kind')}_"
        out += [(f"{prefix}{k}", float(v), best) for k, v in row.items() if _finite(v) and k != "best_epoch"]
    out += [(f"model_{k}", float(v), best) for k, v in contract.items() if _finite(v)]
    return out


@dataclass(frozen=True)
class Logged:
    tracking_uri: str
    experiment: str
    run_id: str
    registered_model: str
    version: str

    def line(self) -> str:
        return (f"MLflow run {self.run_id} (experiment {self.experiment}); registered {self.registered_model} "
                f"version {self.version}: score it as models:/{self.registered_model}/{self.version}")


def log_training_run(uri: str, experiment: str, registered_model: str, run_dir: str,
                     started_at: float | None = None) -> Logged:
    """Log the finished run directory ``run_dir`` (local or s3://) as one MLflow run and register
    its model; writes ``mlflow.json`` into the run directory. ``started_at``: the run's start, in
    seconds since the epoch (MLflow shows the run's duration from it)."""
    import pyarrow.parquet as pq
    from mlflow.entities import Metric, Param

    c = client(uri)
    experiment_id = check_tracking(uri, experiment)
    config = json.loads(storage.read_bytes(storage.join(run_dir, "config.json")))
    contract = json.loads(storage.read_bytes(storage.join(run_dir, CONTRACT_FILE)))
    with tempfile.TemporaryDirectory(prefix="malaria-ray-mlflow-") as tmp:
        for name in (*RUN_FILES, "plots"):
            _copy(run_dir, name, tmp)
        for name in (MODEL_FILE, CONTRACT_FILE, H5_FILE):
            _copy(run_dir, name, os.path.join(tmp, MODEL_DIR))
        history = pq.read_table(os.path.join(tmp, "history.parquet")).to_pylist()
        rows = pq.read_table(os.path.join(tmp, "metrics.parquet")).to_pylist()
        now_ms = int(time.time() * 1000)
        tags = {"malaria_ray.run_dir": storage.redact(run_dir), "malaria_ray.model_id": contract.get("model_id", ""),
                "malaria_ray.synthetic": str(config.get("synthetic", False)).lower()}
        run = c.create_run(experiment_id, start_time=int((started_at or time.time()) * 1000),
                           run_name=os.path.basename(run_dir.rstrip("/")) or None, tags=tags)
        run_id = run.info.run_id
        try:
            params = [Param(k, v) for k, v in _flat_params(config).items()]
            metrics = [Metric(k, v, now_ms, step) for k, v, step in run_metrics(history, rows, contract)]
            for i in range(0, max(len(params), len(metrics)), 100):  # MLflow's batch limits: 100 params, 1000 metrics
                c.log_batch(run_id, metrics=metrics[i:i + 100], params=params[i:i + 100])
            c.log_artifacts(run_id, tmp)
        except Exception:
            c.set_terminated(run_id, "FAILED")
            raise
        c.set_terminated(run_id, "FINISHED")
        source = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_DIR}"
    version = _register(c, registered_model, source, run_id, contract)
    logged = Logged(storage.redact(uri), experiment, run_id, registered_model, str(version))
    storage.write_text(storage.join(run_dir, RECORD_FILE), json.dumps(asdict(logged), indent=2))
    return logged


def _copy(run_dir: str, name: str, dest: str) -> None:
    """``run_dir/name`` (a file, or a folder of files one level deep) into the local ``dest``, if it exists."""
    fs, path = storage.filesystem(storage.join(run_dir, name))
    if not fs.exists(path):
        return
    files = [p for p in fs.ls(path, detail=False)] if fs.isdir(path) else [path]
    target = os.path.join(dest, name) if fs.isdir(path) else dest
    os.makedirs(target, exist_ok=True)
    for p in files:
        with fs.open(p, "rb") as src, open(os.path.join(target, os.path.basename(p.rstrip("/"))), "wb") as dst:
            dst.write(src.read())


def _register(c, name: str, source: str, run_id: str, contract: dict) -> str:
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description="malaria-ray cell classifier (ResNet50V2); each version's "
                                  "model.json contract is in its tags")
    tags = {f"contract.{k}": json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in contract.items()}
    mv = c.create_model_version(name, source, run_id=run_id, tags=tags,
                                description=f"model_id {contract.get('model_id')}, threshold {contract.get('threshold')}")
    return mv.version


@dataclass(frozen=True)
class Registered:
    """A registered model version as scoring resolved it: ``pinned`` (``models:/NAME/VERSION``) is
    what every model actor loads."""

    name: str
    version: str
    alias: str | None
    run_id: str | None
    source: str
    tracking_uri: str

    @property
    def pinned(self) -> str:
        return f"{SCHEME}{self.name}/{self.version}"

    def describe(self) -> str:
        return describe(self.record())

    def record(self) -> dict:
        """What a scoring run's manifest records (credentials redacted)."""
        return {"name": self.name, "model_version": self.version, "alias": self.alias, "mlflow_run_id": self.run_id,
                "source": storage.redact(self.source), "tracking_uri": storage.redact(self.tracking_uri)}


def tracking_uri_for(uri: str | None) -> str:
    """The tracking URI scoring uses for a models:/ URI: ``--mlflow-uri``, else MLFLOW_TRACKING_URI."""
    found = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not found:
        raise ConfigError("--model models:/... names a registered model: give --mlflow-uri (or set MLFLOW_TRACKING_URI)")
    if storage.redact(found) != found:
        raise ConfigError("--mlflow-uri must not carry credentials (they would reach Ray's logs with the actors' "
                          "environment): set MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN on the nodes")
    return normalize_uri(found)


def resolve(model: str, uri: str) -> Registered:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` as one version; raises ConfigError for a
    malformed URI and RegistryError (one line) for a model, version or alias the registry does not have."""
    m = _MODEL_RE.match(model)
    if m is None:
        raise ConfigError(f"--model {model}: a registered model is models:/NAME@ALIAS or models:/NAME/VERSION")
    try:
        c = client(uri, "--model models:/...")
        with _quick():
            if m.group("alias"):
                mv = c.get_model_version_by_alias(m.group("name"), m.group("alias"))
            else:
                mv = c.get_model_version(m.group("name"), m.group("number"))
    except ConfigError:
        raise
    except Exception as exc:
        raise RegistryError(f"--model {model} in {storage.redact(uri)}: {message(exc)}") from exc
    return Registered(mv.name, str(mv.version), m.group("alias"), mv.run_id, mv.source, uri)


def download(uri: str, dest: str, tracking_uri: str | None = None) -> str:
    """The registered artifact ``uri`` (``models:/NAME/VERSION[/file]``) downloaded into the local
    folder ``dest``; its local path. The tracking store: ``tracking_uri``, else MLFLOW_TRACKING_URI
    (how scoring's model actors receive it). The version's location is looked up with a client of
    that store (MLflow's own ``models:/`` download reads the process-wide registry URI instead).
    Raises RegistryError."""
    mlflow = _mlflow("--model models:/...")
    m = re.match(r"^models:/(?P<name>[^/@]+)/(?P<number>\d+)(?:/(?P<path>.*))?$", uri)
    if m is None:
        raise RegistryError(f"{uri}: not a registered model version (models:/NAME/VERSION)")
    store = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    try:
        base = client(store, "--model models:/...").get_model_version_download_uri(m.group("name"), m.group("number"))
        target = f"{base.rstrip('/')}/{m.group('path')}" if m.group("path") else base
        return mlflow.artifacts.download_artifacts(artifact_uri=target, dst_path=dest, tracking_uri=store)
    except ConfigError:
        raise
    except Exception as exc:
        raise RegistryError(f"cannot download {uri} from the MLflow registry: {message(exc)}") from exc


def describe(record: dict) -> str:
    """``NAME version N @ALIAS`` of a ``Registered.record`` (a scoring run's summary line)."""
    return f"{record['name']} version {record['model_version']}" + (f" @{record['alias']}" if record.get("alias") else "")
