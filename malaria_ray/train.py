"""Data-parallel training of the ResNet50V2 classifier with Ray Train and Ray Data.

Why a Keras 3 custom training step (``strategy.run``) and not ``Model.fit``: under
MultiWorkerMirroredStrategy inside TensorflowTrainer, Keras 3 ``Model.fit`` fails ("PerReplica ...
to a Tensor", ray-project/ray#47464). tf-keras with TF_USE_LEGACY_KERAS=1 would work, but it pins
the project to a legacy Keras whose ``.keras`` files Keras 3 scorers cannot rely on, and it needs an
environment variable set before every TensorFlow import on every node. A 30-line custom step keeps
one Keras everywhere (training, ``model.keras``, scoring) and makes the distributed loop explicit.

Flow: the driver lists the corpus, splits it by patient, decodes images once with Ray Data CPU tasks
and materializes them; Train workers then only iterate their shard, so Train workers and Ray Data
never compete for the same CPUs mid-epoch (on 2 CPUs that contention hangs a run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
import uuid
from typing import Any

import numpy as np

from malaria_ray import corpus, resources, storage
from malaria_ray.config import CLASS_NAMES, TrainConfig

# Columns of history.parquet.
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds", "train_seconds",
                   "train_images")
FINISHED_MARKER = "history.parquet"  # written last: its presence means the run finished
DECODE_BATCH = 64


# ---------------------------------------------------------------- driver-side data preparation
def decode_batch(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Ray Data task: read and decode one batch of URIs; failures become an ``error`` string."""
    from malaria_ray import preprocess

    n = len(batch[corpus.COL_URI])
    images = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    errors = np.full(n, "", dtype=object)
    ids = np.full(n, "", dtype=object)
    for i, uri in enumerate(batch[corpus.COL_URI]):
        try:
            data = storage.read_bytes(str(uri))
            ids[i] = hashlib.sha256(data).hexdigest()
            images[i] = preprocess.decode_image(data, image_size)
        except Exception as exc:  # DecodeError, OSError from storage: reported per image, not fatal
            errors[i] = f"{type(exc).__name__}: {exc}"
    return {**batch, "image_id": ids, "image": images, "error": errors}


def _keep(batch: dict[str, np.ndarray], ok: bool) -> dict[str, np.ndarray]:
    mask = (batch["error"] == "") if ok else (batch["error"] != "")
    return {k: v[mask] for k, v in batch.items()}


def prepare_datasets(listing: corpus.Listing, val_mask: np.ndarray, cfg: TrainConfig):
    """(train_ds, val_ds, unreadable) with decoded uint8 images, materialized in the object store."""
    import ray
    from ray.data.expressions import col

    items = [
        {corpus.COL_URI: u, "label": CLASS_NAMES.index(lab), "is_val": bool(v)}
        for u, lab, v in zip(listing.uris, listing.labels, val_mask)
    ]
    rng = np.random.default_rng(cfg.seed)
    items = [items[i] for i in rng.permutation(len(items))]  # one seeded shuffle; more per epoch below
    blocks = max(2, min(64, len(items) // DECODE_BATCH))
    decoded = (
        ray.data.from_items(items, override_num_blocks=blocks)
        .map_batches(decode_batch, fn_kwargs={"image_size": cfg.image_size}, batch_size=DECODE_BATCH,
                     batch_format="numpy", runtime_env={"env_vars": storage.worker_env()})
        .materialize()
    )
    unreadable = (
        decoded.select_columns([corpus.COL_URI, "image_id", "error"])
        .map_batches(_keep, fn_kwargs={"ok": False}, batch_format="numpy")
        .take_all()
    )
    good = decoded.map_batches(_keep, fn_kwargs={"ok": True}, batch_format="numpy")
    cols = [corpus.COL_URI, "image_id", "image", "label"]
    is_val = col("is_val") == True  # noqa: E712 (a Ray Data expression, not a Python test)
    train_ds = good.filter(expr=~is_val).select_columns(cols).materialize()
    val_ds = good.filter(expr=is_val).select_columns(cols).materialize()
    return train_ds, val_ds, unreadable


# ---------------------------------------------------------------- the per-worker loop
def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import tensorflow as tf

    cfg = TrainConfig.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _enable_memory_growth(tf)
    tf.get_logger().setLevel("WARNING")  # MultiWorkerMirroredStrategy logs every collective at INFO
    strategy = tf.distribute.MultiWorkerMirroredStrategy()

    import keras

    from malaria_ray.model import build_model
    from malaria_ray.preprocess import augment_batch

    with strategy.scope():
        model = build_model(cfg.image_size, cfg.weights, seed=cfg.seed)
        optimizer = keras.optimizers.Adam(learning_rate=cfg.learning_rate)
        optimizer.build(model.trainable_variables)
    bce = keras.losses.BinaryCrossentropy(reduction=None)  # the notebook's loss, per example
    local_batch = cfg.batch_size // world
    steps = config["steps_per_epoch"]

    @tf.function
    def train_step(x, y):
        def replica_fn(x, y):
            with tf.GradientTape() as tape:
                probs = model(x, training=True)
                loss = tf.nn.compute_average_loss(bce(y, probs), global_batch_size=cfg.batch_size)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            hits = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, 1), tf.argmax(y, 1)), tf.float32))
            return loss * cfg.batch_size, hits

        loss_sum, hits = strategy.run(replica_fn, args=(x, y))
        return (strategy.reduce(tf.distribute.ReduceOp.SUM, loss_sum, axis=None),
                strategy.reduce(tf.distribute.ReduceOp.SUM, hits, axis=None))

    @tf.function
    def eval_step(x, y):
        probs = model(x, training=False)
        return (tf.reduce_sum(bce(y, probs)),
                tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, 1), tf.argmax(y, 1)), tf.float32)))

    @tf.function
    def all_sum(v):  # a collective: every worker calls it the same number of times
        per_replica = strategy.run(lambda t: tf.identity(t), args=(v,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    recalibrate = _bn_recalibrator(model, all_sum, world)

    start_epoch, history = 1, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            model.load_weights(os.path.join(d, "model.keras"))
            saved = np.load(os.path.join(d, "optimizer.npz"))
            for i, var in enumerate(optimizer.variables):
                var.assign(saved[f"v{i}"])
            state = json.load(open(os.path.join(d, "state.json")))
        start_epoch, history = state["epoch"] + 1, state["history"]
        _log(rank, f"resumed from checkpoint after epoch {state['epoch']}")

    rng = np.random.default_rng([cfg.seed, rank, start_epoch])
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        loss_sum = hits = seen = 0.0
        it = train_shard.iter_batches(batch_size=local_batch, drop_last=True, batch_format="numpy",
                                      local_shuffle_buffer_size=max(4 * local_batch, 256),
                                      local_shuffle_seed=int(rng.integers(1 << 31)))
        clean: list[np.ndarray] = []  # un-augmented batches for the BatchNorm recalibration
        for step, batch in zip(range(steps), it):
            _maybe_fail(cfg, epoch, step, steps, rank, world)
            if step < cfg.bn_recal_batches:
                clean.append(batch["image"])  # uint8: 4x smaller than the float batch
            x = batch["image"].astype(np.float32)
            x = augment_batch(x, rng) if cfg.augment else tf.convert_to_tensor(x)
            y = tf.one_hot(batch["label"], 2)
            ls, h = train_step(x, y)
            loss_sum, hits, seen = loss_sum + float(ls), hits + float(h), seen + cfg.batch_size
            if (step + 1) % max(1, steps // 4) == 0 and step + 1 < steps:  # progress on long epochs
                _log(rank, f"epoch {epoch} step {step + 1}/{steps}: loss {loss_sum / seen:.4f} "
                           f"({seen / (time.perf_counter() - t0):.1f} images/s)")
        train_seconds = time.perf_counter() - t0
        if clean:
            recalibrate(clean)
            del clean
        v = np.zeros(3, np.float32)  # val loss sum, hits, count on this worker
        for batch in val_shard.iter_batches(batch_size=local_batch, batch_format="numpy"):
            ls, h = eval_step(tf.convert_to_tensor(batch["image"], tf.float32), tf.one_hot(batch["label"], 2))
            v += (float(ls), float(h), len(batch["label"]))
        v = all_sum(tf.constant(v)).numpy()
        row = {"epoch": epoch, "loss": loss_sum / max(seen, 1), "accuracy": hits / max(seen, 1),
               "val_loss": float(v[0] / max(v[2], 1)), "val_accuracy": float(v[1] / max(v[2], 1)),
               "seconds": time.perf_counter() - t0, "train_seconds": train_seconds, "train_images": seen}
        history.append(row)
        _log(rank, "epoch {epoch}/{n}: loss {loss:.4f} acc {accuracy:.4f} val_loss {val_loss:.4f} "
                   "val_acc {val_accuracy:.4f} ({seconds:.0f}s)".format(n=cfg.epochs, **row))
        _save_and_report(model, optimizer, row, history, rank)


def _bn_recalibrator(model, all_sum=None, world: int = 1):
    """A function that re-estimates every BatchNorm layer's moving statistics ("precise BN").

    Why: trained from random init with Adam, ResNet50V2's weights move faster than BatchNorm's
    moving averages (momentum 0.99) follow them; the moving statistics then describe activations
    of older weights, and the model in inference mode (what validation, checkpoints and scoring
    use) can call every cell one class while the same weights with batch statistics are right
    (docs/training.md measured 0.54 -> 0.85 on held-out patients by recalibrating). The fix
    re-runs the current weights in training mode over clean training batches with momentum 0, so
    each layer's moving statistics become that batch's statistics, averages them over the batches,
    then over all workers with ``all_sum`` (a collective: every rank calls this with the same
    batch count; None in a single process), and assigns the averages. Weights do not change; the
    optimizer is not involved.
    """
    import keras
    import tensorflow as tf

    layers = [la for la in model._flatten_layers() if isinstance(la, keras.layers.BatchNormalization)]
    stats = [v for la in layers for v in (la.moving_mean, la.moving_variance)]
    momenta = [la.momentum for la in layers]
    forward = None

    def recalibrate(batches: list[np.ndarray]) -> None:
        nonlocal forward
        if not layers:
            return
        for la in layers:
            la.momentum = 0.0  # read when ``forward`` is traced (once, below); restored after
        if forward is None:
            forward = tf.function(lambda x: model(x, training=True))
        sums = [np.zeros(v.shape, np.float64) for v in stats]
        for x in batches:
            forward(tf.convert_to_tensor(x, tf.float32))
            for s, v in zip(sums, stats):
                s += v.numpy()
        for la, m in zip(layers, momenta):
            la.momentum = m
        flat = np.concatenate([s.ravel() for s in sums]) / len(batches)
        if all_sum is not None:
            flat = all_sum(tf.constant(flat, tf.float32)).numpy() / world
        offset = 0
        for v in stats:
            n = int(np.prod(v.shape))
            v.assign(flat[offset:offset + n].reshape(v.shape))
            offset += n

    return recalibrate


def _save_and_report(model, optimizer, row: dict, history: list, rank: int) -> None:
    """Every rank saves (a MultiWorkerMirroredStrategy requirement); only rank 0 reports the files."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="malaria-ray-ckpt-") as d:
        model.save(os.path.join(d, "model.keras"))
        np.savez(os.path.join(d, "optimizer.npz"), **{f"v{i}": v.numpy() for i, v in enumerate(optimizer.variables)})
        with open(os.path.join(d, "state.json"), "w") as f:
            json.dump({"epoch": row["epoch"], "history": history}, f)
        checkpoint = ray.train.Checkpoint.from_directory(d) if rank == 0 else None
        ray.train.report(row, checkpoint=checkpoint)


def fault_marker(output: str) -> str:
    """The file ``_maybe_fail`` leaves when it has killed a worker of the run writing ``output``.
    Same name in every worker process (str hash() is salted per process); one machine only."""
    return os.path.join(tempfile.gettempdir(), f"malaria-ray-fault-{hashlib.sha256(output.encode()).hexdigest()[:16]}")


def _maybe_fail(cfg: TrainConfig, epoch: int, step: int, steps: int, rank: int, world: int) -> None:
    """Test-only fault injection: the last rank dies once, hard, halfway through ``fail_at_epoch``."""
    if cfg.fail_at_epoch != epoch or step != steps // 2 or rank != world - 1:
        return
    marker = fault_marker(cfg.output)
    if not os.path.exists(marker):
        open(marker, "w").close()
        print(f"[fault injection] worker rank {rank} exits at epoch {epoch}, step {step}", flush=True)
        os._exit(1)


def _enable_memory_growth(tf) -> None:
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)


def _log(rank: int, msg: str) -> None:
    if rank == 0:  # one voice per run: rank 0 speaks for all workers
        print(f"[train] {msg}", flush=True)


# ---------------------------------------------------------------- the driver
@dataclasses.dataclass(frozen=True)
class Plan:
    cfg: TrainConfig
    listing: corpus.Listing
    val_mask: np.ndarray


def plan_run(cfg: TrainConfig) -> Plan:
    """Everything that can fail on bad input, checked before any Ray or TensorFlow start-up."""
    from malaria_ray import synth

    _prepare_output(cfg)
    listing = corpus.list_corpus(cfg.data)
    if cfg.max_images:
        listing = corpus.stable_subsample(listing, cfg.max_images, cfg.seed)
    synthetic = cfg.synthetic or synth.is_synthetic(cfg.data)
    cfg = dataclasses.replace(cfg, synthetic=synthetic)
    val_mask = corpus.make_split(listing, cfg.split, cfg.val_fraction, cfg.seed)
    print(f"[train] corpus {cfg.data}{' (SYNTHETIC)' if synthetic else ''}: {len(listing)} images, "
          f"{len(set(corpus.group_keys(listing)))} patients/slides; split={cfg.split}: "
          f"{int((~val_mask).sum())} train / {int(val_mask.sum())} val"
          + (f"; {len(listing.skipped)} non-image files skipped" if listing.skipped else ""), flush=True)
    return Plan(cfg, listing, val_mask)


def fit(cfg: TrainConfig, plan: Plan | None = None) -> dict[str, Any]:
    """Train per ``cfg`` on the connected Ray cluster and write the run directory; returns a summary.

    The caller owns the Ray instance (``ray.init`` lives in entrypoints).
    """
    import ray
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    t_start = time.perf_counter()
    if plan is None:
        plan = plan_run(cfg)
    cfg, listing, val_mask = plan.cfg, plan.listing, plan.val_mask

    cluster = ray.cluster_resources()
    cpus_per_worker = _cpus_per_worker(cfg, cluster.get("CPU", 1.0))
    if cfg.use_gpu:
        resources.note_missing_gpus(cfg.num_workers, cluster.get("GPU", 0.0), "--use-gpu", "train")
    train_ds, val_ds, unreadable = prepare_datasets(listing, val_mask, cfg)
    if unreadable:
        print(f"[train] {len(unreadable)} unreadable images left out:", flush=True)
        for row in unreadable[:20]:
            print(f"[train]   {row[corpus.COL_URI]}: {row['error']}", flush=True)
    n_train, n_val = train_ds.count(), val_ds.count()
    steps = n_train // cfg.batch_size
    if steps < 1 or n_val < 1:
        raise corpus.CorpusError(f"too few readable images: {n_train} train, {n_val} val for batch {cfg.batch_size}")

    fs, _ = storage.filesystem(cfg.output)
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": dataclasses.asdict(cfg), "steps_per_epoch": steps},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
        ),
        datasets={"train": train_ds, "val": val_ds},
        run_config=ray.train.RunConfig(
            # A reused name silently resumes an old run: every invocation gets its own.
            name=f"train-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}",
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
        history = json.load(open(os.path.join(d, "state.json")))["history"]
    from malaria_ray import trainrun

    summary = trainrun.write_run(cfg, listing, val_mask, best, history, val_ds, unreadable,
                                 extra={"cpus_per_worker_effective": cpus_per_worker, "n_train": n_train,
                                        "n_val": n_val, "steps_per_epoch": steps,
                                        "ray_version": ray.__version__})
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    trainrun.print_summary(summary)
    return summary


def _prepare_output(cfg: TrainConfig) -> None:
    marker = storage.join(cfg.output, FINISHED_MARKER)
    if storage.exists(marker):
        if not cfg.overwrite:
            raise FileExistsError(f"{cfg.output} already holds a finished run; pass --overwrite to replace it")
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
