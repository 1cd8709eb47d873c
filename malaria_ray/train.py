"""Data-parallel training of the ResNet50V2 classifier with Ray Train and Ray Data: the driver.

Flow: the driver lists the corpus (``corpus.list_corpus``, the scoring listing), splits it by
patient, decodes images once with Ray Data CPU tasks (``ingest.read_and_prepare``, the scoring
decode) and materializes them; Train workers (``malaria_ray.worker``) then only iterate their
shard, so Train workers and Ray Data never compete for the same CPUs mid-epoch (on 2 CPUs that
contention hangs a run). ``trainrun`` writes the run directory from the best checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from malaria_ray import checkpoint, config, corpus, faults, ingest, logs, resources, storage, tracking, trainrun
from malaria_ray.config import CorpusError, TrainConfig
from malaria_ray.schema import (CLASS_NAMES, COL_ERROR, COL_IMAGE_ID, COL_KIND, COL_LABEL, COL_PIXELS, COL_STATUS,
                                COL_TRAIN_IMAGE, COL_TRAIN_LABEL, COL_URI, STATUS_ERROR, STATUS_OK, split_member_uri)

DECODE_BATCH = 64
TRAIN_COLUMNS = [COL_URI, COL_IMAGE_ID, COL_TRAIN_IMAGE, COL_TRAIN_LABEL]
# Which subset of the run a decoded row belongs to (a column, and the shards' folders subset=...).
COL_SUBSET = "subset"
SUBSET_TRAIN, SUBSET_VAL, SUBSET_ERROR = "train", "val", "error"
# Streaming (--stream): decoded shards under OUTPUT/decoded/, at most SHARD_ROWS rows a file (~48 MiB
# at 128 px); auto streams when the decoded corpus would take more than STREAM_SHARE of the object store.
DECODED_DIR, DECODED_STARTED, DECODED_DONE = "decoded", "_STARTED", "_DONE"
SHARD_ROWS = 1024
STREAM_SHARE = 0.25
STREAM_SHUFFLE_BATCHES = 32  # local shuffle buffer when streaming, in batches (worker.SHUFFLE_BATCHES otherwise)
log = logs.get("train")


# ---------------------------------------------------------------- driver-side data preparation
def training_rows(batch: dict[str, np.ndarray], keep: np.ndarray, val: np.ndarray) -> dict[str, np.ndarray]:
    """Prepared rows -> the training columns, for the listed images (sorted ``keep``) only:
    ``image`` (uint8), ``label`` (class index), ``subset`` ("train", "val" for a uri in sorted ``val``,
    or "error": unreadable), ``status``, ``error``."""
    listed = np.array([s in (STATUS_OK, STATUS_ERROR) and ingest.in_sorted(keep, u)
                       for s, u in zip(batch[COL_STATUS], batch[COL_URI])], dtype=bool)
    uris, status = batch[COL_URI][listed], batch[COL_STATUS][listed]
    is_val = np.array([ingest.in_sorted(val, u) for u in uris], dtype=bool)
    return {
        COL_URI: uris, COL_IMAGE_ID: batch[COL_IMAGE_ID][listed], COL_TRAIN_IMAGE: batch[COL_PIXELS][listed],
        COL_TRAIN_LABEL: np.array([CLASS_NAMES.index(x) for x in batch[COL_LABEL][listed]], dtype=np.int64),
        COL_SUBSET: np.where(status == STATUS_ERROR, SUBSET_ERROR, np.where(is_val, SUBSET_VAL, SUBSET_TRAIN)).astype(object),
        COL_STATUS: status, COL_ERROR: batch[COL_ERROR][listed],
    }


def decoded_rows(listing: corpus.Listing, val_mask: np.ndarray, cfg: TrainConfig, blocks: int,
                 shuffle_units: bool = False):
    """The lazy Ray Data pipeline of ``training_rows`` over the listed images: read and decoded by
    CPU tasks (``ingest.read_and_prepare``, the scoring decode), ``blocks`` read tasks. With
    ``shuffle_units`` the files/archives are read in a seeded random order, so that each block (and
    each decoded shard) mixes classes and patients instead of following the listing's folders."""
    import ray

    uris = np.asarray(listing.uris, dtype=object)
    keep, val = np.sort(uris.astype(str)), np.sort(uris[val_mask].astype(str))
    known = listing.identities()  # the decode tasks take each image's label from the listing
    # Only the units that hold listed images (--max-images may keep a few of many).
    containers = pa.array(sorted({split_member_uri(u)[0] for u in listing.uris}), pa.string())
    units = listing.units.filter(pc.is_in(listing.units.column(COL_URI), value_set=containers))
    if shuffle_units:
        units = units.take(pa.array(np.random.default_rng(cfg.seed).permutation(units.num_rows)))
    return (
        ray.data.from_arrow(ingest.slices(units, blocks))
        .map_batches(ingest.read_and_prepare, batch_size=None, batch_format="numpy", num_cpus=1,
                     fn_kwargs={"image_size": cfg.image_size, "skip_ids": ingest.NO_IDS, "batch_size": DECODE_BATCH,
                                "known": known},
                     runtime_env={"env_vars": storage.worker_env()})
        .map_batches(training_rows, batch_size=None, batch_format="numpy", fn_kwargs={"keep": keep, "val": val})
    )


def prepare_datasets(listing: corpus.Listing, val_mask: np.ndarray, cfg: TrainConfig):
    """(train_ds, val_ds, unreadable) with decoded uint8 images, materialized in the object store.

    The training set is shuffled once (seeded) as it is materialized; each epoch then shuffles
    locally (``worker.run_epoch``)."""
    from ray.data.expressions import col

    blocks = max(2, min(64, len(listing) // DECODE_BATCH))
    decoded = decoded_rows(listing, val_mask, cfg, blocks).materialize()
    unreadable = (decoded.filter(expr=col(COL_SUBSET) == SUBSET_ERROR)
                  .select_columns([COL_URI, COL_IMAGE_ID, COL_ERROR]).take_all())
    train_ds = (decoded.filter(expr=col(COL_SUBSET) == SUBSET_TRAIN).select_columns(TRAIN_COLUMNS)
                .random_shuffle(seed=cfg.seed).materialize())
    val_ds = decoded.filter(expr=col(COL_SUBSET) == SUBSET_VAL).select_columns(TRAIN_COLUMNS).materialize()
    return train_ds, val_ds, unreadable


# ---------------------------------------------------------------- streaming from decoded shards
def decoded_gib(n_images: int, image_size: int) -> float:
    return n_images * image_size * image_size * 3 / 2**30


def should_stream(cfg: TrainConfig, n_images: int, object_store_bytes: float, shards_done: bool) -> bool:
    """``--stream on|off``, or auto: stream when the decoded corpus would take more than
    STREAM_SHARE of the cluster's object store (it would spill, or not fit), or when an interrupted
    run already wrote its decoded shards."""
    if cfg.stream != "auto":
        return cfg.stream == "on"
    return shards_done or decoded_gib(n_images, cfg.image_size) * 2**30 > STREAM_SHARE * object_store_bytes


def shards_fingerprint(listing: corpus.Listing, val_mask: np.ndarray, cfg: TrainConfig) -> str:
    """What decoded shards hold: the image size and every listed image with its side of the split.
    Shards are reused only for the same fingerprint (another --seed, --max-images or size: decoded again)."""
    h = hashlib.sha256(f"{cfg.image_size}\n".encode())
    for uri, is_val in sorted(zip(map(str, listing.uris), map(bool, val_mask))):
        h.update(f"{uri}\t{int(is_val)}\n".encode())
    return h.hexdigest()


def shards_ready(cfg: TrainConfig, fingerprint: str) -> bool:
    """Whether OUTPUT/decoded/ holds a complete decode pass (``_DONE``) of this very listing and split."""
    done = storage.join(cfg.output, DECODED_DIR, DECODED_DONE)
    return storage.exists(done) and json.loads(storage.read_bytes(done)).get("fingerprint") == fingerprint


def stream_datasets(listing: corpus.Listing, val_mask: np.ndarray, cfg: TrainConfig, fingerprint: str | None = None):
    """(train_ds, val_ds, unreadable) for a corpus larger than the object store: the images are
    decoded once, in a streaming pass, into Parquet shards of up to SHARD_ROWS rows under
    ``OUTPUT/decoded/subset=train|val|error/``; the datasets read those shards lazily, so no epoch
    holds more than a few blocks in memory. Loose files are decoded in a seeded random order; a
    corpus of archives (whose members come out one archive, often one class, at a time) is
    shuffled row by row on its way to the shards, once. The training set reads its shards in a
    fresh (seeded) order every epoch; the workers add a larger local shuffle (``shuffle_buffer``).
    A resumed run reuses complete shards of the same listing and split (``_DONE`` holds their
    fingerprint); anything else there that malaria-ray wrote is decoded again. ``fingerprint``:
    ``shards_fingerprint`` of this listing and split, if the caller has it already."""
    import ray
    from ray.data import FileShuffleConfig

    from malaria_ray.schema import KIND_IMAGE

    root = storage.join(cfg.output, DECODED_DIR)
    fs, path = storage.filesystem(root)
    arrow_fs = _arrow_fs(fs) if storage.is_remote(root) else None
    fingerprint = fingerprint or shards_fingerprint(listing, val_mask, cfg)
    if shards_ready(cfg, fingerprint):
        log.info(f"reusing the decoded shards in {root}")
    else:
        if fs.exists(path):
            if not (fs.exists(storage.join(path, DECODED_STARTED)) or fs.exists(storage.join(path, DECODED_DONE))):
                raise CorpusError(f"{root} exists and was not written by malaria-ray: move it, or choose another "
                                  "--output (streamed runs keep their decoded shards there)")
            fs.rm(path, recursive=True)  # an interrupted pass, or shards of another listing or split
        fs.makedirs(path, exist_ok=True)
        with fs.open(storage.join(path, DECODED_STARTED), "w") as f:
            f.write(fingerprint)
        t0 = time.perf_counter()
        archives = any(k != KIND_IMAGE for k in listing.units.column(COL_KIND).to_pylist())
        log.info(f"streaming: decoding {len(listing)} images once into Parquet shards in {root} "
                 f"(~{decoded_gib(len(listing), cfg.image_size):.1f} GiB)"
                 + ("; archives: shuffled row by row on the way" if archives else ""))
        blocks = max(2, min(4096, len(listing) // (4 * DECODE_BATCH)))
        rows = decoded_rows(listing, val_mask, cfg, blocks, shuffle_units=True)
        if archives:
            rows = rows.random_shuffle(seed=cfg.seed)
        (rows.select_columns([*TRAIN_COLUMNS, COL_SUBSET, COL_ERROR])
         .map_batches(_string_errors, batch_size=None, batch_format="pyarrow")
         .write_parquet(path, filesystem=arrow_fs, partition_cols=[COL_SUBSET], max_rows_per_file=SHARD_ROWS,
                        compression=storage.PARQUET_CODEC))
        with fs.open(storage.join(path, DECODED_DONE), "w") as f:
            f.write(json.dumps({"fingerprint": fingerprint, "images": len(listing), "image_size": cfg.image_size}))
        log.info(f"decoded shards written in {time.perf_counter() - t0:.0f}s")

    def read_subset(name: str, columns: list[str], **kwargs):
        where = storage.join(path, f"{COL_SUBSET}={name}")
        if not fs.exists(where):  # e.g. no unreadable image: no "error" partition
            return None
        # select_columns is pushed down into the Parquet read (only these columns are read)
        return ray.data.read_parquet(where, filesystem=arrow_fs, partitioning=None, **kwargs).select_columns(columns)

    errors = read_subset(SUBSET_ERROR, [COL_URI, COL_IMAGE_ID, COL_ERROR])
    unreadable = errors.take_all() if errors is not None else []
    train_ds = read_subset(SUBSET_TRAIN, TRAIN_COLUMNS, shuffle=FileShuffleConfig(seed=cfg.seed))
    val_ds = read_subset(SUBSET_VAL, TRAIN_COLUMNS)
    if train_ds is None or val_ds is None:
        raise CorpusError(f"no readable {'training' if train_ds is None else 'validation'} images in {cfg.data}")
    return train_ds, val_ds, unreadable


def _string_errors(table: pa.Table) -> pa.Table:
    """The error column as strings in every block (all-null would be another type: the shards' schemas
    would not merge), and the schema version in the metadata, which Ray's writer keeps."""
    i = table.schema.get_field_index(COL_ERROR)
    table = table.set_column(i, COL_ERROR, table.column(i).cast(pa.string()))
    return table.replace_schema_metadata(storage.versioned(table.schema).metadata)


def remove_decoded(cfg: TrainConfig) -> None:
    """A finished run's decoded shards are not part of it (they can be as large as the corpus)."""
    root = storage.join(cfg.output, DECODED_DIR)
    fs, path = storage.filesystem(root)
    if fs.exists(path):
        fs.rm(path, recursive=True)
        log.info(f"removed the decoded shards {root}")


def whole_validation_config():
    """Ray Train's DataConfig, except that the validation set is split into unequal shards: Ray
    cuts every dataset into equal shards, dropping up to (workers - 1) rows, which training needs
    (each step is a collective) but validation must not do (every image is predicted once)."""
    from ray.train import DataConfig

    class _WholeValidation(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            rest = {k: v for k, v in datasets.items() if k != "val"}
            output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
            if "val" in datasets:
                ds = datasets["val"].copy(datasets["val"])
                if ds.name is None:
                    ds.set_name("val")
                ds.context.execution_options = self._resolve_execution_options("val")
                for i, it in enumerate(ds.streaming_split(world_size, equal=False)):
                    output[i]["val"] = it
            return output

    return _WholeValidation()


# ---------------------------------------------------------------- the driver
@dataclasses.dataclass(frozen=True)
class Plan:
    cfg: TrainConfig
    listing: corpus.Listing
    val_mask: np.ndarray
    run_name: str  # Ray Train's: a new one per run, the saved one when resuming
    resumed: bool = False


def plan_run(cfg: TrainConfig, resume: bool = False) -> Plan:
    """Everything that can fail on bad input, checked before any Ray or TensorFlow start-up."""

    if resume:
        return plan_resume(cfg.output)
    cfg = cfg.with_absolute_inputs()
    if cfg.init_from:  # a missing run or another image size: one line now, not a failed worker later
        from malaria_ray.model import check_init

        check_init(cfg.init_from, cfg.image_size)
    cfg = tracking.check_train(cfg)  # --mlflow-uri: an unusable store fails now, before --overwrite removes anything
    _prepare_output(cfg)
    return _plan(cfg)


def _plan(cfg: TrainConfig) -> Plan:
    from malaria_ray import synth

    if cfg.annotations:  # field photographs: their annotated cells, cut once into <output>/field_crops
        from malaria_ray import fieldcrops

        listing = corpus.list_corpus(fieldcrops.training_corpus(cfg.data, cfg.annotations, cfg.output, cfg.image_size))
    else:
        listing = corpus.list_corpus(cfg.data)
    if cfg.max_images:
        listing = corpus.stable_subsample(listing, cfg.max_images, cfg.seed)
    synthetic = cfg.synthetic or synth.is_synthetic(cfg.data)
    cfg = dataclasses.replace(cfg, synthetic=synthetic)
    val_mask = corpus.make_split(listing, cfg.split, cfg.val_fraction, cfg.seed)
    log.info(f"corpus {cfg.data}{' (SYNTHETIC)' if synthetic else ''}: {len(listing)} images, "
             f"{len(set(corpus.group_keys(listing)))} patients/slides; split={cfg.split}: "
             f"{int((~val_mask).sum())} train / {int(val_mask.sum())} val"
             + (f"; {len(listing.skipped)} non-image files skipped" if listing.skipped else ""))
    # A reused name silently resumes an old run: every new run gets its own.
    return Plan(cfg, listing, val_mask, f"train-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}")


def plan_resume(run_dir: str) -> Plan:
    """The plan of an interrupted run in ``run_dir``: its saved config (so the same corpus, split
    and recipe) and Ray Train run name (so training continues from its latest checkpoint)."""
    if storage.exists(storage.join(run_dir, checkpoint.FINISHED_MARKER)):
        raise FileExistsError(f"{run_dir} holds a finished run: nothing to resume")
    run_file = storage.join(run_dir, checkpoint.RUN_FILE)
    if not storage.exists(run_file):
        raise CorpusError(f"{run_dir} is not a malaria-ray training run ({checkpoint.RUN_FILE} missing): cannot resume")
    saved = json.loads(storage.read_bytes(run_file))
    saved["config"].setdefault("class_weight", "none")  # runs from before --class-weight trained unweighted
    cfg = dataclasses.replace(TrainConfig.from_dict(saved["config"]), output=run_dir)
    if "<redacted>" in cfg.weights:  # a signed --weights URL is not kept; the checkpoint holds the weights
        log.info("the run's --weights URL carried credentials that were not saved: resuming from its checkpoint")
        cfg = dataclasses.replace(cfg, weights="none", weights_sha256=None)
    storage.check_writable(run_dir)
    cfg = tracking.check_train(cfg)
    plan = _plan(cfg)
    log.info(f"resuming {run_dir} (Ray Train run {saved['run_name']}) with its saved config and split")
    return dataclasses.replace(plan, run_name=saved["run_name"], resumed=True)


def fit(plan: Plan) -> dict[str, Any]:
    """Train per ``plan`` (``plan_run``: its config, listing and split) on the connected Ray cluster
    and write the run directory; returns a summary.

    The caller owns the Ray instance (``runtime.ray_for`` in the entrypoints).
    """
    import ray
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    from malaria_ray import worker
    from malaria_ray.worker import train_loop_per_worker

    t_start, started_at = time.perf_counter(), time.time()
    cfg, listing, val_mask = plan.cfg, plan.listing, plan.val_mask

    cluster = ray.cluster_resources()
    cpus_per_worker = _cpus_per_worker(cfg, cluster.get("CPU", 1.0))
    if cfg.use_gpu:
        resources.note_missing_gpus(cfg.num_workers, cluster.get("GPU", 0.0), "--use-gpu", "train")
        resources.require_visible_gpu("--use-gpu", {"env_vars": storage.worker_env()})
    # The fingerprint hashes every listed uri: computed here only where shards already exist, and
    # handed on, so no path computes it twice.
    done = storage.exists(storage.join(cfg.output, DECODED_DIR, DECODED_DONE))
    fingerprint = shards_fingerprint(listing, val_mask, cfg) if done else None
    stream = should_stream(cfg, len(listing), cluster.get("object_store_memory", 0.0),
                           fingerprint is not None and shards_ready(cfg, fingerprint))
    if stream and not storage.is_remote(cfg.output) and len([n for n in ray.nodes() if n["Alive"]]) > 1:
        raise CorpusError("--stream on a multi-node cluster needs an --output in object storage (s3://): decode "
                          "tasks on other nodes would write their shards to those nodes' local disks")
    if stream:
        train_ds, val_ds, unreadable = stream_datasets(listing, val_mask, cfg, fingerprint)
    else:
        train_ds, val_ds, unreadable = prepare_datasets(listing, val_mask, cfg)
    if unreadable:
        log.info(f"{len(unreadable)} unreadable images left out:")
        for row in unreadable[:20]:
            log.info(f"  {row[COL_URI]}: {row[COL_ERROR]}")
    n_train, n_val = train_ds.count(), val_ds.count()
    steps = n_train // cfg.batch_size
    if steps < 1 or n_val < 1:
        raise CorpusError(f"too few readable images: {n_train} train, {n_val} val for batch {cfg.batch_size}")

    weights = corpus.class_weights(listing, val_mask, cfg.class_weight)
    if cfg.class_weight != "none":
        log.info("class weights " + ", ".join(f"{c} {w:.3f}" for c, w in zip(CLASS_NAMES, weights)))
    fs, _ = storage.filesystem(cfg.output)
    storage.write_json(storage.join(cfg.output, checkpoint.RUN_FILE),
                       {"run_name": plan.run_name, "config": config.redacted(dataclasses.asdict(cfg))})
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": dataclasses.asdict(cfg), "steps_per_epoch": steps, "fault": faults.armed(),
                           "class_weights": weights,
                           # streamed shards arrive in file order: a larger local shuffle mixes them
                           "shuffle_buffer": STREAM_SHUFFLE_BATCHES if stream else worker.SHUFFLE_BATCHES},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
        ),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=whole_validation_config(),
        run_config=ray.train.RunConfig(
            name=plan.run_name,  # the same name and storage path continue from the latest checkpoint
            storage_path=_ray_storage_path(cfg.output),
            storage_filesystem=_arrow_fs(fs) if storage.is_remote(cfg.output) else None,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    result = trainer.fit()
    best = result.get_best_checkpoint("val_loss", "min")
    with result.checkpoint.as_directory() as d:
        history = checkpoint.read_state(d)["history"]
    summary = trainrun.write_run(cfg, listing, val_mask, best, history, val_ds, unreadable,
                                 extra={"cpus_per_worker_effective": cpus_per_worker, "n_train": n_train,
                                        "n_val": n_val, "steps_per_epoch": steps, "streamed": stream, "class_weights": weights,
                                        "ray_version": ray.__version__},
                                 before_finish=(lambda: remove_decoded(cfg)) if stream else None)
    summary["mlflow"] = tracking.log_train(cfg, started_at) if cfg.mlflow_uri else None
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    trainrun.print_summary(summary)
    return summary


def _prepare_output(cfg: TrainConfig) -> None:
    finished = storage.exists(storage.join(cfg.output, checkpoint.FINISHED_MARKER))
    started = finished or storage.exists(storage.join(cfg.output, checkpoint.RUN_FILE))
    if started and not cfg.overwrite:
        if finished:
            raise FileExistsError(f"{cfg.output} already holds a finished run; pass --overwrite to replace it")
        raise FileExistsError(f"{cfg.output} holds an unfinished run: continue it with --resume {cfg.output}, "
                              "or pass --overwrite to start over")
    if started:
        fs, path = storage.filesystem(cfg.output)
        fs.rm(path, recursive=True)
    storage.check_writable(cfg.output)


def _cpus_per_worker(cfg: TrainConfig, cluster_cpus: float) -> float:
    """Leave a CPU for Ray Data: N workers x 1 CPU on an N-CPU node starves dataset iteration."""
    if cfg.use_gpu:
        return cfg.cpus_per_worker
    return resources.leave_a_cpu(cfg.num_workers, cfg.cpus_per_worker, cluster_cpus, "workers", "train")


def _ray_storage_path(output: str) -> str:
    path = storage.join(output, "checkpoints")
    if storage.is_remote(output):
        return path.split("://", 1)[1]
    return os.path.abspath(path)


def _arrow_fs(fs):
    import pyarrow.fs

    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
