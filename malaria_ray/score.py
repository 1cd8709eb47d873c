"""Bulk scoring with Ray Data: read + decode/resize (CPU tasks) -> model (actor pool) -> Parquet.

``score_archive(cfg)`` runs one scoring run and commits it under ``cfg.output`` (layout in
``malaria_ray.outputs``, the commit protocol in ``malaria_ray.scoringrun``); ``main(cfg)`` adds the
one-screen summary and the exit code. The image size comes from the model artifact (its zip
config, read without TensorFlow, so the driver never imports it); read and decode are
``malaria_ray.ingest``, as in training; ``Scorer`` loads the model once per actor and feeds it raw
0..255 pixels, because the model's first layer rescales. A test can kill a Scorer at its n-th batch
(``faults`` point ``score.batch``); Ray Data must then restart the actor and retry the batch.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from malaria_ray import backends, corpus, faults, fieldeval, fields, ingest, logs, manifests, metrics, outputs, resources, sources
from malaria_ray import storage, telemetry, tracking
from malaria_ray import schema
from malaria_ray.config import DEFAULT_THRESHOLD, ConfigError, CorpusError, ScoreConfig
from malaria_ray.model import ModelError, check_contract, inspect_artifact, read_contract, resize_of
from malaria_ray.scoringrun import ERRORS, RunResult, ScoringRun, summary
from malaria_ray.segment import DetectParams

log = logs.get("score")
FIELDS_PER_TASK = 4  # field photographs per detection call: ~150 cells each, so blocks of a few MB
READ_CPUS = 0.25  # a read task waits on storage; decoding (1 CPU per task) is where the CPU goes
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$")


def new_run_id() -> str:
    """UTC time first, so run ids sort in run order (slide roll-ups take the newest row)."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


class Scorer:
    """Ray Data callable class: the model is loaded once per actor; ``__call__`` scores a batch."""

    def __init__(self, model_uri: str, model_id: str, threshold: float, run_id: str, fault: str | None = None,
                 pad_to: int | None = None, precision: str = "fp32", backend: str = "tensorflow",
                 batch_size: int = 1, input_: str = telemetry.INPUT_CELLS) -> None:
        """``pad_to``: GPU actors pad every batch to this many images, so the device sees one shape
        (cuDNN picks its kernels once; a short last batch does not pick again). ``backend``: the
        Keras backend this actor's process was started on (``backends.with_backend``);
        ``batch_size``: the batches to expect (the predictor is compiled for them here); ``input_``:
        what the rows are, for the metrics (``telemetry``: cut-out cells, or cells of fields)."""
        from malaria_ray.backends import predictor, start
        from malaria_ray.model import bf16_copy, load_model

        # A model that fails to load is reported in every row this actor returns, not raised: an
        # exception from an actor reaches the driver wrapped in Ray's worker header, and a failed
        # map task leaves the actor pool's CPUs held until Python collects Ray's exception. The
        # driver stops the run at the first such row with the one-line reason.
        self.error: ModelError | None = None
        try:
            start(backend)
            model, loaded_id = load_model(model_uri)
            if loaded_id != model_id:
                raise ModelError(f"model {model_uri} changed during the run ({model_id} -> {loaded_id})")
            self.predict = predictor(bf16_copy(model) if precision == "bf16" else model, pad_to or batch_size)
        except ModelError as exc:
            self.error = exc
        self.model_id, self.threshold, self.run_id, self.fault = model_id, float(threshold), run_id, fault
        self.calls, self.pad_to, self.input = 0, pad_to, input_

    def __call__(self, batch):
        """A pyarrow batch in, a pyarrow batch out: the text columns pass through as Arrow columns,
        never as numpy object arrays; only the pixels become an array (for the model)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        n = batch.num_rows
        status, error = batch.column(schema.COL_STATUS), batch.column(schema.COL_ERROR)
        if self.error is not None:
            status = pa.array([schema.STATUS_MODEL_ERROR] * n, pa.string())
            error = pa.array([str(self.error)] * n, pa.string())
        else:
            self.calls += 1
            faults.maybe_fail(self.fault, "score.batch", self.calls)
        ok = pc.fill_null(pc.equal(status, schema.STATUS_OK), False).to_numpy(zero_copy_only=False)
        prob = np.full(n, np.nan, dtype=np.float32)
        if ok.any():
            x = pixels(batch.column(schema.COL_PIXELS))[ok]
            if self.pad_to and len(x) % self.pad_to:
                x = np.concatenate([x, np.zeros((self.pad_to - len(x) % self.pad_to, *x.shape[1:]), x.dtype)])
            started = time.perf_counter()
            prob[ok] = self.predict(x)[:int(ok.sum())]
            telemetry.observe_predict(time.perf_counter() - started, self.run_id, self.model_id)
        telemetry.count_rows(status, batch.column(schema.COL_ERROR_KIND) if schema.COL_ERROR_KIND in batch.column_names
                             else None, self.run_id, self.model_id, self.input, model_failed=self.error is not None)
        pred = np.where(prob >= self.threshold, schema.POSITIVE_CLASS, schema.NEGATIVE_CLASS).astype(object)
        pred[~ok] = None
        now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        # Columns that were all null in a block may arrive as Arrow's null type: the driver's
        # ``writer.normalize`` gives every column its contract type.
        out = {k: batch.column(k) for k in (schema.COL_IMAGE_ID, schema.COL_URI, schema.COL_SLIDE, schema.COL_PATIENT,
                                            schema.COL_LABEL, schema.COL_SOURCE_VERSION, schema.COL_ERROR_KIND,
                                            *schema.FIELD_COLUMNS)
               if k in batch.column_names}  # a field's cells carry their box (``malaria_ray.fields``)
        return pa.table({**out, schema.COL_ERROR: error, schema.COL_STATUS: status,
                         schema.COL_PROB: pa.array(prob, pa.float32(), mask=~ok), schema.COL_PRED: pa.array(pred, pa.string()),
                         schema.COL_THRESHOLD: pa.array(np.full(n, self.threshold)),
                         schema.COL_MODEL_ID: pa.array([self.model_id] * n, pa.string()),
                         schema.COL_RUN_ID: pa.array([self.run_id] * n, pa.string()),
                         schema.COL_SCORED_AT: pa.array([now] * n, pa.timestamp("us"))})


def pixels(column) -> np.ndarray:
    """A Ray Data tensor column (a chunked pyarrow extension array) as one numpy array."""
    chunks = [c.to_numpy() for c in column.chunks]
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


def inspect_model(model_uri: str) -> dict:
    """Image size and model_id of the artifact, loaded once with safe_mode (raises ModelError)."""
    from malaria_ray.model import load_model

    model, model_id = load_model(model_uri)
    return {schema.KEY_IMAGE_SIZE: int(model.input_shape[1]), schema.KEY_MODEL_ID: model_id}


def score_archive(cfg: ScoreConfig, checked: Preflight | None = None) -> RunResult:
    """Score every image under ``cfg.input`` and commit the run under ``cfg.output``.

    ``checked``: what ``preflight`` returned, when the caller ran it already (it is not run twice).
    Raises CorpusError (input missing/unreadable/no images), ModelError, StorageError.
    """
    import pyarrow as pa

    # The driver's Arrow work is a row group at a time in a process that lives for hours: the
    # system allocator returns what it frees (docs/benchmarks.md, driver memory).
    pa.set_memory_pool(pa.system_memory_pool())
    run_id = cfg.run_id or new_run_id()
    if not _RUN_ID_RE.match(run_id) or outputs.PART_SUFFIX.match(run_id):
        raise CorpusError(f"--run-id {run_id!r} must be letters, digits, '_', '.', '-' (not starting with '_' or '.', "
                          "not ending in .partNNNNN)")
    if checked is None:
        checked = preflight(cfg)
    listing = sources.list_units(cfg.input, cfg.read_timeout_s)
    if not len(listing):
        raise CorpusError(f"no images found in {cfg.input} ({len(listing.skipped)} non-image files skipped)")
    storage.check_writable(cfg.output)
    if storage.exists(outputs.run_uri(cfg.output, run_id)) or run_id in outputs.committed_runs(cfg.output):
        raise CorpusError(f"--run-id {run_id} was already used under {cfg.output}: a run id names one run")
    with ScoringRun(cfg.output, run_id) as run:
        result = _score_leased(cfg, run, listing, checked)
    if checked.truth is not None:  # committed first: a failed evaluation leaves the night's rows in place
        result.evaluation = fieldeval.measure_run(cfg.output, run_id, checked.truth)
    return result


def _score_leased(cfg: ScoreConfig, run: ScoringRun, listing: sources.Units, checked: Preflight) -> RunResult:
    """The pipeline and its loop; ``run`` carries out the commit protocol."""
    import ray

    env = storage.worker_env()
    if checked.registered is not None:  # the model actors download the registered version themselves
        env["MLFLOW_TRACKING_URI"] = checked.registered.tracking_uri
    remote_env = {"runtime_env": {"env_vars": env}} if env else {}
    model_info = checked.model_info
    if model_info is None:  # a legacy .h5 only Keras can read: inspect it in a throwaway worker
        try:
            model_info = ray.get(ray.remote(max_calls=1)(inspect_model).options(
                **backends.with_backend(remote_env, cfg.backend)).remote(cfg.model))
        except ray.exceptions.RayTaskError as exc:
            raise (exc.cause if isinstance(exc.cause, Exception) else exc) from None
    model_id, size = model_info[schema.KEY_MODEL_ID], model_info[schema.KEY_IMAGE_SIZE]
    cfg, fp_rate = operating_point(cfg, checked.contract)
    detector = detector_params(cfg)
    key = DetectParams.from_dict(detector).key() if detector is not None else None
    skip_ids, unchanged = ingest.NO_IDS, 0
    if cfg.skip_scored:  # loose files listed as they were when this model (and detector) scored them: not read again
        skip_ids = (outputs.scored_fields(cfg.output, model_id, key) if cfg.fields
                    else outputs.scored_ids(cfg.output, model_id))
        listing, unchanged = skip_unchanged(listing, outputs.scored_sources(cfg.output, model_id, key))
    known = corpus.Identities.from_manifest(sources.load_manifest(cfg.manifest, cfg.input)) if cfg.manifest else None
    # Runs that were killed before they finished: with --skip-scored this run completes them.
    unfinished = manifests.unfinished_runs(cfg.output) if cfg.skip_scored else []

    ds = build_pipeline(cfg, listing, size, skip_ids, model_id, run.run_id, remote_env, known, checked.resize,
                        checked.model_uri(cfg))
    if cfg.gpus_per_actor:
        resources.require_visible_gpu("--gpus-per-actor", backends.with_backend(remote_env, cfg.backend)["runtime_env"],
                                      cfg.backend)
    run.begin(cfg, model_id, size, listing, len(known) if known is not None else 0, unfinished, unchanged,
              detector=None if detector is None else {"key": key, "params": detector},
              registered=checked.registered.record() if checked.registered is not None else None)
    started = time.perf_counter()
    failure: str | None = None
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            failure = model_failure(batch)
            if failure is not None:  # the model did not load: stop here (``break`` shuts the executor down)
                break
            rows = run.tally(batch)
            if rows is not None:
                run.write(rows)
        if failure is not None:
            raise ModelError(failure)
        run.close()
    except BaseException as exc:
        run.fail(exc)
        raise
    cells = schema.CELLS_FIELDS if cfg.fields else schema.CELLS_CROPS
    correction = metrics.Correction.of(checked.contract, cfg.threshold, cells)
    if checked.contract.get(schema.KEY_VAL_CELLS, schema.CELLS_CROPS) != cells:
        fp_rate = None  # a false-positive rate measured on crops does not hold for cells found in fields
    return run.finish(time.perf_counter() - started, fp_rate, correction, checked.truth, ray_version=ray.__version__)


def operating_point(cfg: ScoreConfig, contract: dict) -> tuple[ScoreConfig, float | None]:
    """``cfg`` with its threshold (the model's own operating point, chosen on validation when it
    was trained, unless ``--threshold`` says otherwise), and the per-cell false-positive rate for
    the slide calls: known only at the model's own threshold."""
    if cfg.threshold is None:
        cfg = dataclasses.replace(cfg, threshold=float(contract.get(schema.KEY_THRESHOLD, DEFAULT_THRESHOLD)))
    own = cfg.threshold == contract.get(schema.KEY_THRESHOLD) and contract.get(schema.KEY_VAL_SPECIFICITY) is not None
    return cfg, (1 - contract[schema.KEY_VAL_SPECIFICITY] if own else None)


def model_failure(batch) -> str | None:
    """The reason a scoring actor's model did not load, where this batch carries one."""
    import pyarrow.compute as pc

    failed = batch.filter(pc.equal(batch.column(schema.COL_STATUS), schema.STATUS_MODEL_ERROR))
    return failed.column(schema.COL_ERROR)[0].as_py() if failed.num_rows else None


def build_pipeline(cfg: ScoreConfig, listing: sources.Units, size: int, skip_ids: np.ndarray, model_id: str,
                   run_id: str, remote_args: dict, known: corpus.Identities | None = None,
                   resize: str = schema.RESIZE_DEFAULT, model_uri: str | None = None):
    """The Ray Data pipeline, not yet executed: units -> rows -> decoded pixels -> model rows.
    ``known``: the ``--manifest`` identities, applied where each image's identity is decided;
    ``resize``: the model contract's resize method; ``model_uri``: what the model actors load
    (default ``cfg.model``; a registered model's pinned version)."""
    import ray

    cluster = ray.cluster_resources()
    pool = resources.actor_pool(cfg.actors, cfg.max_actors, cfg.gpus_per_actor, cluster.get("GPU", 0.0))
    if cfg.gpus_per_actor:  # GPU actors land on GPU nodes that may not exist yet: their memory is unknown
        cpus_per_actor, memory_per_actor = cfg.cpus_per_actor, int(cfg.memory_per_actor_gb * 2**30)
        resources.note_missing_gpus(pool.min_size * cfg.gpus_per_actor, cluster.get("GPU", 0.0), "--gpus-per-actor",
                                    "score")
    else:  # leave a CPU for the read and decode tasks (see ``malaria_ray.resources``)
        cpus_per_actor = resources.leave_a_cpu(pool.max_size, cfg.cpus_per_actor, cluster.get("CPU", 1.0), "actors",
                                               "score")
        memory_per_actor = resources.fit_memory(pool.max_size, cfg.memory_per_actor_gb, cluster.get("memory", 0.0),
                                                "actors", "score")
    # Read, then decode, as two stages: a read task takes ~256 loose files (a multiple of
    # --batch-size, so it leaves no short batch behind; fetched concurrently)
    # or an archive and emits raw bytes in blocks of --batch-size rows; decode tasks take one block
    # each, so a single big archive decodes on every CPU. The read stage's smaller CPU request
    # (it waits on I/O) also keeps Ray Data from fusing it into the decode tasks.
    # Fields: FIELDS_PER_TASK photographs per decode (detection) task, each ~150 cells out.
    raw_rows = FIELDS_PER_TASK if cfg.fields else cfg.batch_size
    ds = ray.data.from_arrow(ingest.slices(listing.table, max(4, len(listing) // 256), raw_rows))
    ds = ds.map_batches(ingest.read_raw, batch_size=None, batch_format="numpy", num_cpus=READ_CPUS,
                        fn_kwargs={"batch_size": raw_rows, "limits": sources.Limits.of(cfg)},
                        **remote_args)
    # Ray Data joins a task's yielded batches into blocks of up to 128 MiB: cut them back to
    # --batch-size rows, or one archive would be one block and so one decode task.
    ds = ds.repartition(target_num_rows_per_block=raw_rows)
    if cfg.fields:
        ds = ds.map_batches(telemetry.counting_fields(fields.prepare_fields, run_id), batch_size=None,
                            batch_format="numpy", num_cpus=1,
                            fn_kwargs={"image_size": size, "params": detector_params(cfg), "skip_fields": skip_ids,
                                       "known": known, "max_pixels": int(cfg.max_field_megapixels * 1e6)},
                            **remote_args)
    else:
        ds = ds.map_batches(ingest.prepare_batch, batch_size=None, batch_format="numpy", num_cpus=1,
                            fn_kwargs={"image_size": size, "skip_ids": skip_ids, "known": known,
                                       "resize_method": resize}, **remote_args)
    return ds.map_batches(
        Scorer, batch_size=cfg.batch_size, batch_format="pyarrow",
        compute=pool.strategy(),
        fn_constructor_kwargs={"model_uri": model_uri or cfg.model, "model_id": model_id, "threshold": cfg.threshold,
                               "run_id": run_id, "fault": faults.armed(),
                               "pad_to": cfg.batch_size if cfg.gpus_per_actor else None, "precision": cfg.precision,
                               "backend": cfg.backend, "batch_size": cfg.batch_size,
                               "input_": telemetry.INPUT_FIELDS if cfg.fields else telemetry.INPUT_CELLS},
        # Ray Data's actor pools default to max_restarts=-1 and max_task_retries=-1: a killed
        # actor restarts and its in-flight batch is retried (tests/test_score.py kills one).
        # The memory reservation keeps Ray from packing more actors on a node than fit. It also
        # keeps decode a stage of its own: with equal resources Ray Data fuses the decode tasks
        # into the actor, which then decodes and predicts in turn instead of side by side.
        num_cpus=cpus_per_actor, num_gpus=cfg.gpus_per_actor or None, memory=memory_per_actor,
        **backends.with_backend(remote_args, cfg.backend),
    )


def detector_params(cfg: ScoreConfig) -> dict | None:
    """The cell detector's parameters of a ``--fields`` run (recorded in its manifest; their key is
    part of every cell row, so a detector change rescores), None for cut-out cells."""
    if not cfg.fields:
        return None
    return dataclasses.replace(DetectParams(), diameter=cfg.cell_diameter).to_dict()


def skip_unchanged(listing: sources.Units, scored: np.ndarray) -> tuple[sources.Units, int]:
    """``listing`` without the loose images whose (uri, version) this model already scored, and
    how many were dropped. Archive members and unversioned files go on to the content-hash check."""
    import pyarrow as pa

    if not len(scored) or not len(listing):
        return listing, 0
    t = listing.table
    keys = np.fromiter((outputs.source_key(u, v) if k == schema.KIND_IMAGE and v is not None else 0
                        for k, u, v in zip(t.column(schema.COL_KIND).to_pylist(), t.column(schema.COL_URI).to_pylist(),
                                           t.column(schema.COL_VERSION).to_pylist())), dtype=np.uint64, count=t.num_rows)
    same = np.isin(keys, scored) & (keys != 0)
    return sources.Units(t.filter(pa.array(~same)), listing.skipped), int(same.sum())


@dataclass(frozen=True)
class Preflight:
    """What ``preflight`` found: the artifact's ``image_size`` and ``model_id`` (None for a legacy
    ``.h5``, which is inspected inside Ray), its ``model.json`` ({} for a bare artifact) and the
    resize method that names (the documented default without one: ``schema.RESIZE_DEFAULT``)."""

    model_info: dict | None
    contract: dict
    resize: str
    truth: dict | None = None  # --annotations, parsed (``fieldeval.load_truth``)
    registered: tracking.Registered | None = None  # --model models:/...: the one version this run scores

    def model_uri(self, cfg: ScoreConfig) -> str:
        """What the model actors load: a registered model's version (never its alias, which may
        move while the run goes on), else ``--model`` as given."""
        return self.registered.pinned if self.registered is not None else cfg.model


def preflight(cfg: ScoreConfig) -> Preflight:
    """The checks that need no Ray: the input exists, the output is not inside it, the model
    artifact is a classifier; what it found goes to ``score_archive``, which then need not check
    the paths or hash the model again.

    Entrypoints run this before Ray starts, so a mistyped path costs a second, not a cluster start.
    """
    check_paths(cfg)
    try:
        outputs.committed_files(cfg.output)  # a root in the flat layout of earlier versions: refused before Ray
    except storage.StorageError:
        raise
    except Exception:  # noqa: BLE001 - an output it cannot list yet: check_writable says why, later
        pass
    fs, path = storage.filesystem(cfg.input)
    try:
        found = fs.exists(path)
    except Exception as exc:  # missing bucket, denied, bad endpoint: the backend's type varies
        raise CorpusError(f"cannot list input {cfg.input}: {type(exc).__name__}: {exc}") from exc
    if not found:
        raise CorpusError(f"input {cfg.input} does not exist")
    registered = None
    if tracking.is_registered(cfg.model):  # one version, read here from a copy that is then removed
        registered = tracking.resolve(cfg.model, tracking.tracking_uri_for(cfg.mlflow_uri))
        log.info(f"{cfg.model} is {registered.name} version {registered.version} (MLflow run {registered.run_id})")
        with tempfile.TemporaryDirectory(prefix="malaria-ray-registered-") as tmp:
            local = tracking.download(registered.pinned, tmp, registered.tracking_uri)
            contract, artifact = read_contract(local), inspect_artifact(local)
    elif cfg.mlflow_uri:
        raise ConfigError("--mlflow-uri applies to a registered --model models:/NAME@ALIAS or models:/NAME/VERSION")
    else:
        contract = read_contract(cfg.model)
        # inspect_artifact: None for a legacy .h5, which is checked inside Ray
        artifact = inspect_artifact(cfg.model)
    check_contract(contract, artifact[schema.KEY_IMAGE_SIZE] if artifact else None)
    truth = fieldeval.load_truth(cfg.annotations) if cfg.annotations else None
    return Preflight(artifact, contract, resize_of(contract), truth, registered)


EXIT_TOO_MANY_ERRORS = 3
EXIT_DRIFT_POSITIVE, EXIT_DRIFT_ERRORS = 4, 5  # --alarm-drift: the positive rate, the error rate left its band


def main(cfg: ScoreConfig, checked: Preflight | None = None) -> int:
    """Run, print the summary; 0 when the run committed with error rows within
    ``--max-error-fraction`` and no drift alarm; 3 when it committed with more error rows; 4 or 5
    when ``--alarm-drift`` found tonight's predicted-Parasitized rate or error rate outside its band
    (``nights.drift``). Each alarm is one line on stderr; the first code of 3, 4, 5 that applies is
    the exit code. ``checked``: what ``preflight`` returned, when the caller ran it."""
    result = score_archive(cfg, checked)
    print(summary(result), file=sys.stdout, flush=True)
    codes = []
    if result.error_fraction > cfg.max_error_fraction:
        print(f"malaria-ray: error: run {result.run_id} committed, but {result.counts.get(ERRORS, 0)} of "
              f"{result.inputs} images ({result.error_fraction:.1%}) are error rows, above --max-error-fraction "
              f"{cfg.max_error_fraction:g}", file=sys.stderr, flush=True)
        codes.append(EXIT_TOO_MANY_ERRORS)
    if cfg.alarm_drift is not None:
        from malaria_ray import nights

        bands = nights.drift(nights.load(cfg.output), cfg.alarm_drift, cfg.alarm_nights)
        for metric, code in ((schema.COL_POS_RATE, EXIT_DRIFT_POSITIVE), (schema.COL_ERROR_RATE, EXIT_DRIFT_ERRORS)):
            if bands[metric].flagged:
                print(f"malaria-ray: error: run {result.run_id} committed, but its {bands[metric].line()} "
                      f"(--alarm-drift {cfg.alarm_drift:g})", file=sys.stderr, flush=True)
                codes.append(code)
    return min(codes, default=0)


def check_paths(cfg: ScoreConfig) -> None:
    """An output root inside the input would be read back as input the next night: refused."""
    def norm(uri: str) -> str:
        if storage.is_remote(uri):
            return storage.canonical(uri).rstrip("/") + "/"
        return os.path.abspath(storage.local_path(uri)).rstrip("/") + "/"

    if norm(cfg.output).startswith(norm(cfg.input)) or norm(cfg.output) == norm(cfg.input):
        raise ConfigError(f"--output {cfg.output} is inside --input {cfg.input}: its Parquet files would be "
                          "scored as input; put the output root elsewhere")
