"""Data-parallel training of the ResNet50V2 classifier with Ray Train and Ray Data: the driver.

Flow: the driver lists the corpus (``corpus.list_corpus``, the scoring listing), splits it by
patient, decodes images once with Ray Data CPU tasks (``ingest.read_and_prepare``, the scoring
decode) and materializes them; Train workers (``malaria_ray.worker``) then only iterate their
shard, so Train workers and Ray Data never compete for the same CPUs mid-epoch (on 2 CPUs that
contention hangs a run). ``trainrun`` writes the run directory from the best checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from malaria_ray import checkpoint, config, corpus, faults, ingest, logs, resources, storage, trainrun
from malaria_ray.config import CLASS_NAMES, CorpusError, TrainConfig
from malaria_ray.schema import (
    COL_ERROR, COL_IMAGE_ID, COL_LABEL, COL_PIXELS, COL_STATUS, COL_URI, STATUS_ERROR, STATUS_OK, split_member_uri,
)

DECODE_BATCH = 64
log = logs.get("train")


# ---------------------------------------------------------------- driver-side data preparation
def training_rows(batch: dict[str, np.ndarray], keep: np.ndarray, val: np.ndarray) -> dict[str, np.ndarray]:
    """Prepared rows -> the training columns, for the listed images (sorted ``keep``) only:
    ``image`` (uint8), ``label`` (class index), ``is_val`` (uri in sorted ``val``), ``status``, ``error``."""
    listed = np.array([s in (STATUS_OK, STATUS_ERROR) and ingest.in_sorted(keep, u)
                       for s, u in zip(batch[COL_STATUS], batch[COL_URI])], dtype=bool)
    uris = batch[COL_URI][listed]
    return {
        COL_URI: uris, COL_IMAGE_ID: batch[COL_IMAGE_ID][listed], "image": batch[COL_PIXELS][listed],
        "label": np.array([CLASS_NAMES.index(x) for x in batch[COL_LABEL][listed]], dtype=np.int64),
        "is_val": np.array([ingest.in_sorted(val, u) for u in uris], dtype=bool),
        COL_STATUS: batch[COL_STATUS][listed], COL_ERROR: batch[COL_ERROR][listed],
    }


def prepare_datasets(listing: corpus.Listing, val_mask: np.ndarray, cfg: TrainConfig):
    """(train_ds, val_ds, unreadable) with decoded uint8 images, materialized in the object store.

    The training set is shuffled once (seeded) as it is materialized; each epoch then shuffles
    locally (``worker.run_epoch``)."""
    import ray
    from ray.data.expressions import col

    uris = np.asarray(listing.uris, dtype=object)
    keep, val = np.sort(uris.astype(str)), np.sort(uris[val_mask].astype(str))
    # Only the units that hold listed images (--max-images may keep a few of many).
    containers = pa.array(sorted({split_member_uri(u)[0] for u in listing.uris}), pa.string())
    units = listing.units.filter(pc.is_in(listing.units.column("uri"), value_set=containers))
    blocks = max(2, min(64, len(listing) // DECODE_BATCH))
    decoded = (
        ray.data.from_arrow(ingest.slices(units, blocks))
        .map_batches(ingest.read_and_prepare, batch_size=None, batch_format="numpy", num_cpus=1,
                     fn_kwargs={"image_size": cfg.image_size, "skip_ids": ingest.NO_IDS, "batch_size": DECODE_BATCH},
                     runtime_env={"env_vars": storage.worker_env()})
        .map_batches(training_rows, batch_size=None, batch_format="numpy", fn_kwargs={"keep": keep, "val": val})
        .materialize()
    )
    failed = col(COL_STATUS) == STATUS_ERROR
    unreadable = decoded.filter(expr=failed).select_columns([COL_URI, COL_IMAGE_ID, COL_ERROR]).take_all()
    good = decoded.filter(expr=~failed)
    cols = [COL_URI, COL_IMAGE_ID, "image", "label"]
    is_val = col("is_val") == True  # noqa: E712 (a Ray Data expression, not a Python test)
    train_ds = good.filter(expr=~is_val).select_columns(cols).random_shuffle(seed=cfg.seed).materialize()
    val_ds = good.filter(expr=is_val).select_columns(cols).materialize()
    return train_ds, val_ds, unreadable


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
    _prepare_output(cfg)
    return _plan(cfg)


def _plan(cfg: TrainConfig) -> Plan:
    from malaria_ray import synth

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
    cfg = dataclasses.replace(TrainConfig.from_dict(saved["config"]), output=run_dir)
    if "<redacted>" in cfg.weights:  # a signed --weights URL is not kept; the checkpoint holds the weights
        log.info("the run's --weights URL carried credentials that were not saved: resuming from its checkpoint")
        cfg = dataclasses.replace(cfg, weights="none", weights_sha256=None)
    storage.check_writable(run_dir)
    plan = _plan(cfg)
    log.info(f"resuming {run_dir} (Ray Train run {saved['run_name']}) with its saved config and split")
    return dataclasses.replace(plan, run_name=saved["run_name"], resumed=True)


def fit(cfg: TrainConfig, plan: Plan | None = None) -> dict[str, Any]:
    """Train per ``cfg`` on the connected Ray cluster and write the run directory; returns a summary.

    The caller owns the Ray instance (``runtime.ray_for`` in the entrypoints).
    """
    import ray
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    from malaria_ray.worker import train_loop_per_worker

    t_start = time.perf_counter()
    if plan is None:
        plan = plan_run(cfg)
    cfg, listing, val_mask = plan.cfg, plan.listing, plan.val_mask

    cluster = ray.cluster_resources()
    cpus_per_worker = _cpus_per_worker(cfg, cluster.get("CPU", 1.0))
    if cfg.use_gpu:
        resources.note_missing_gpus(cfg.num_workers, cluster.get("GPU", 0.0), "--use-gpu", "train")
        resources.require_visible_gpu("--use-gpu", {"env_vars": storage.worker_env()})
    train_ds, val_ds, unreadable = prepare_datasets(listing, val_mask, cfg)
    if unreadable:
        log.info(f"{len(unreadable)} unreadable images left out:")
        for row in unreadable[:20]:
            log.info(f"  {row[COL_URI]}: {row[COL_ERROR]}")
    n_train, n_val = train_ds.count(), val_ds.count()
    steps = n_train // cfg.batch_size
    if steps < 1 or n_val < 1:
        raise CorpusError(f"too few readable images: {n_train} train, {n_val} val for batch {cfg.batch_size}")

    fs, _ = storage.filesystem(cfg.output)
    storage.write_json(storage.join(cfg.output, checkpoint.RUN_FILE),
                       {"run_name": plan.run_name, "config": config.redacted(dataclasses.asdict(cfg))})
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": dataclasses.asdict(cfg), "steps_per_epoch": steps, "fault": faults.armed()},
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
                                        "n_val": n_val, "steps_per_epoch": steps,
                                        "ray_version": ray.__version__})
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
