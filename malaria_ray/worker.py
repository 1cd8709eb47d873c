"""What each Ray Train worker runs: build, restore, then per epoch train, recalibrate, validate, save.

Why a Keras 3 custom training step (``strategy.run``) and not ``Model.fit``: under
MultiWorkerMirroredStrategy inside TensorflowTrainer, Keras 3 ``Model.fit`` fails ("PerReplica ...
to a Tensor", ray-project/ray#47464). tf-keras with TF_USE_LEGACY_KERAS=1 would work, but it pins
the project to a legacy Keras whose ``.keras`` files Keras 3 scorers cannot rely on, and it needs an
environment variable set before every TensorFlow import on every node. A short custom step keeps
one Keras everywhere (training, ``model.keras``, scoring) and makes the distributed loop explicit.

Rank 0 speaks for all workers (``_Log``) and reports the checkpoint; every rank saves one.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from malaria_ray import checkpoint, faults, logs
from malaria_ray.config import TrainConfig
from malaria_ray.schema import COL_IMAGE_ID, COL_TRAIN_IMAGE, COL_TRAIN_LABEL, COL_URI

# The local shuffle buffer of each epoch, in batches (at least 256 rows); a streamed corpus,
# whose shards arrive in file order, asks for more (``train.STREAM_SHUFFLE_BATCHES``).
SHUFFLE_BATCHES = 4


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import tensorflow as tf

    cfg = TrainConfig.from_dict(config["cfg"])
    steps_per_epoch, fault = config["steps_per_epoch"], config.get("fault")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    log = _Log(rank)
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)
    tf.get_logger().setLevel("WARNING")  # MultiWorkerMirroredStrategy logs every collective at INFO
    implementation = collective_implementation(cfg.use_gpu)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=getattr(tf.distribute.experimental.CommunicationImplementation, implementation)))
    log(f"{world} worker(s), {implementation} collectives, global batch {cfg.batch_size} "
        f"({cfg.batch_size // world} per worker), peak learning rate {cfg.peak_learning_rate:g}")
    compiled = compile_model(cfg, strategy, steps_per_epoch, config.get("class_weights"))
    recalibrate = bn_recalibrator(compiled.model, compiled.all_sum, world)

    start_epoch, history = 1, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = checkpoint.restore(d, compiled.model, compiled.optimizer)
        start_epoch, history = state["epoch"] + 1, state["history"]
        log(f"resumed from checkpoint after epoch {state['epoch']}")

    rng = np.random.default_rng([cfg.seed, rank, start_epoch])
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        stats, clean = run_epoch(cfg, compiled, train_shard, epoch, steps_per_epoch, cfg.batch_size // world, rng, log,
                                 fault=fault if rank == world - 1 else None,
                                 shuffle_batches=config["shuffle_buffer"])
        train_seconds = time.perf_counter() - t0
        if clean:
            recalibrate(clean)
        val_stats, val_predictions = evaluate(compiled, val_shard, cfg.batch_size // world)
        row = {"epoch": epoch, **stats, **val_stats, "seconds": time.perf_counter() - t0, "train_seconds": train_seconds}
        history.append(row)
        log("epoch {epoch}/{n}: loss {loss:.4f} acc {accuracy:.4f} val_loss {val_loss:.4f} "
            "val_acc {val_accuracy:.4f} ({seconds:.0f}s)".format(n=cfg.epochs, **row))
        save_and_report(compiled, row, history, rank, val_predictions)


def collective_implementation(use_gpu: bool) -> str:
    """NCCL all-reduce between GPUs (device to device, NVLink/InfiniBand where present); RING
    (gRPC through the hosts) on CPUs, where NCCL cannot run. TensorFlow's AUTO picks RING for
    MultiWorkerMirroredStrategy whatever the devices, which sends every GPU's gradients through host
    memory and the network stack."""
    return "NCCL" if use_gpu else "RING"


@dataclass
class Compiled:
    """The model, its optimizer and the compiled functions every epoch calls."""

    model: Any
    optimizer: Any
    train_step: Callable  # (uint8 x, y, seed) -> (loss sum, hits) over the global batch; a collective
    eval_step: Callable  # (uint8 x, y) -> (loss sum, hits) over this worker's batch
    all_sum: Callable  # tensor -> its sum over all workers; a collective


def learning_rate(cfg: TrainConfig, steps_per_epoch: int):
    """``cfg.peak_learning_rate`` (``--learning-rate`` scaled to the global batch by ``--lr-scaling``),
    constant (the notebook), or a cosine decay to 0 over the run after a linear warm-up of
    ``cfg.warmup_epochs`` from 0. Keyed on the optimizer's step count, which the
    checkpoint saves, so a resumed run continues the schedule where it stopped."""
    import keras

    peak = cfg.peak_learning_rate
    if cfg.lr_schedule == "constant":
        return peak
    total = cfg.epochs * steps_per_epoch
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
    if not warmup:
        return keras.optimizers.schedules.CosineDecay(peak, total)
    return keras.optimizers.schedules.CosineDecay(0.0, total - warmup, warmup_target=peak,
                                                  warmup_steps=warmup)


def weighted(losses, y, per_class):
    """Each example's loss times its class's weight (``y`` one-hot, ``per_class`` in class order)."""
    import tensorflow as tf

    return losses * tf.reduce_sum(tf.cast(y, losses.dtype) * tf.cast(per_class, losses.dtype), axis=1)


def compile_model(cfg: TrainConfig, strategy, steps_per_epoch: int, class_weights=None) -> Compiled:
    import keras
    import tensorflow as tf

    from malaria_ray.model import build_model
    from malaria_ray.preprocess import augment_tf

    keras.mixed_precision.set_dtype_policy("mixed_bfloat16" if cfg.precision == "bf16" else "float32")
    with strategy.scope():
        model = build_model(cfg.image_size, cfg.weights, seed=cfg.seed, weights_sha256=cfg.weights_sha256)
        if cfg.init_from:  # fine-tuning: every weight of a trained run, head included
            from malaria_ray.model import copy_weights

            copy_weights(model, cfg.init_from)
        optimizer = keras.optimizers.Adam(learning_rate=learning_rate(cfg, steps_per_epoch))
        optimizer.build(model.trainable_variables)
    # The notebook's loss, per example; label smoothing (a recipe option) only in training.
    bce = keras.losses.BinaryCrossentropy(reduction=None, label_smoothing=cfg.label_smoothing)
    bce_eval = keras.losses.BinaryCrossentropy(reduction=None)
    # Per-class weights of the training loss (corpus.class_weights; validation stays unweighted).
    per_class = tf.constant(class_weights or [1.0] * 2, tf.float32)

    def hits(y, probs):
        return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, 1), tf.argmax(y, 1)), tf.float32))

    # --xla compiles the forward and backward pass (not the augmentation, whose image op XLA
    # lacks, nor the all-reduce in apply_gradients). On this project's CPUs it is slower than
    # oneDNN; on GPUs it fuses BatchNorm and activations: bench/gpu_check.sh measures it.
    @tf.function(jit_compile=cfg.xla)
    def gradients(x, y):
        with tf.GradientTape() as tape:
            probs = model(x, training=True)
            loss = tf.nn.compute_average_loss(weighted(bce(y, probs), y, per_class), global_batch_size=cfg.batch_size)
        return loss, probs, tape.gradient(loss, model.trainable_variables)

    @tf.function
    def train_step(x, y, seed):
        def replica_fn(x, y, seed):
            x = tf.cast(x, tf.float32)  # uint8 crosses to the device: 4x fewer bytes than float32
            if cfg.augment:
                x = augment_tf(x, seed, cfg.augment_policy)
            loss, probs, grads = gradients(x, y)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss * cfg.batch_size, hits(y, probs)

        loss_sum, n_hits = strategy.run(replica_fn, args=(x, y, seed))
        return (strategy.reduce(tf.distribute.ReduceOp.SUM, loss_sum, axis=None),
                strategy.reduce(tf.distribute.ReduceOp.SUM, n_hits, axis=None))

    @tf.function
    def eval_step(x, y):
        probs = model(tf.cast(x, tf.float32), training=False)
        return tf.reduce_sum(bce_eval(y, probs)), hits(y, probs), probs[:, 0]

    @tf.function
    def all_sum(v):  # a collective: every worker calls it the same number of times
        per_replica = strategy.run(lambda t: tf.identity(t), args=(v,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return Compiled(model, optimizer, train_step, eval_step, all_sum)


def run_epoch(cfg: TrainConfig, compiled: Compiled, shard, epoch: int, steps_per_epoch: int, local_batch: int,
              rng: np.random.Generator, log: Callable[[str], None],
              fault: str | None = None, shuffle_batches: int = SHUFFLE_BATCHES) -> tuple[dict, list[np.ndarray]]:
    """One epoch of ``steps_per_epoch`` global batches; returns its loss/accuracy and up to
    ``cfg.bn_recal_batches`` clean (un-augmented) uint8 batches for the BatchNorm recalibration.
    ``fault``: the test's armed fault (``malaria_ray.faults``), checked halfway through.
    ``shuffle_batches``: the local shuffle buffer, in batches (at least 256 rows)."""
    import tensorflow as tf

    t0 = time.perf_counter()
    # Loss and hits add up on the device; the host reads them only at the progress lines and at the
    # end, so no step waits for the previous one to finish (a float() per step would).
    totals, seen = tf.zeros([2], tf.float32), 0
    it = shard.iter_batches(batch_size=local_batch, drop_last=True, batch_format="numpy", prefetch_batches=2,
                            local_shuffle_buffer_size=max(shuffle_batches * local_batch, 256),
                            local_shuffle_seed=int(rng.integers(1 << 31)))
    clean: list[np.ndarray] = []
    for step, batch in zip(range(steps_per_epoch), it):
        if step == steps_per_epoch // 2:
            faults.maybe_fail(fault, "train.epoch", epoch)
        if step < cfg.bn_recal_batches:
            clean.append(batch[COL_TRAIN_IMAGE])  # uint8: 4x smaller than the float batch
        seed = tf.constant(rng.integers(0, 2**62, size=2), tf.int64)
        totals += tf.stack(compiled.train_step(tf.constant(batch[COL_TRAIN_IMAGE]), tf.one_hot(batch[COL_TRAIN_LABEL], 2), seed))
        seen += cfg.batch_size
        if (step + 1) % max(1, steps_per_epoch // 4) == 0 and step + 1 < steps_per_epoch:  # progress on long epochs
            log(f"epoch {epoch} step {step + 1}/{steps_per_epoch}: loss {float(totals[0]) / seen:.4f} "
                f"({seen / (time.perf_counter() - t0):.1f} images/s)")
    loss_sum, hits = (float(v) for v in totals.numpy())
    stats = {"loss": loss_sum / max(seen, 1), "accuracy": hits / max(seen, 1), "train_images": seen}
    return stats, clean


def evaluate(compiled: Compiled, shard, local_batch: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Validation loss and accuracy over every worker's shard (one collective at the end), and this
    worker's per-image predictions (uri, image_id, label, prob): the run's validation predictions
    are made here, on the training devices, not again on the driver."""
    import tensorflow as tf

    v = np.zeros(3, np.float32)  # val loss sum, hits, count on this worker
    cols: dict[str, list] = {"uris": [], "image_ids": [], "labels": [], "probs": []}
    for batch in shard.iter_batches(batch_size=local_batch, batch_format="numpy"):
        ls, h, p = compiled.eval_step(tf.constant(batch[COL_TRAIN_IMAGE]), tf.one_hot(batch[COL_TRAIN_LABEL], 2))
        v += (float(ls), float(h), len(batch[COL_TRAIN_LABEL]))
        for key, values in zip(cols, (batch[COL_URI], batch[COL_IMAGE_ID], batch[COL_TRAIN_LABEL], p.numpy())):
            cols[key].append(values)
    v = compiled.all_sum(tf.constant(v)).numpy()
    predictions = {k: np.concatenate(c) if c else np.array([]) for k, c in cols.items()}
    return {"val_loss": float(v[0] / max(v[2], 1)), "val_accuracy": float(v[1] / max(v[2], 1))}, predictions


def bn_recalibrator(model, all_sum=None, world: int = 1):
    """A function that re-estimates every BatchNorm layer's moving statistics ("precise BN").

    Why: trained from random init with Adam, ResNet50V2's weights move faster than BatchNorm's
    moving averages (momentum 0.99) follow them; the moving statistics then describe activations
    of older weights, and the model in inference mode (what validation, checkpoints and scoring
    use) can call every cell one class while the same weights with batch statistics are right
    (docs/training.md). The fix re-runs the current weights in training mode over clean training
    batches with momentum 0, so each layer's moving statistics become that batch's statistics,
    averages them over the batches, then over all workers with ``all_sum`` (a collective: every
    rank calls this with the same batch count; None in a single process), and assigns the
    averages. Weights do not change; the optimizer is not involved.
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


def save_and_report(compiled: Compiled, row: dict, history: list, rank: int, val_predictions: dict[str, np.ndarray]) -> None:
    """Every rank saves the model (a MultiWorkerMirroredStrategy requirement), rank 0's copy is
    reported; every rank reports its validation predictions, which Ray Train merges into the same
    checkpoint directory."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="malaria-ray-ckpt-") as d, \
            tempfile.TemporaryDirectory(prefix="malaria-ray-preds-") as p:
        checkpoint.save(d, compiled.model, compiled.optimizer, row["epoch"], history)
        reported = d if rank == 0 else p
        checkpoint.save_val_predictions(reported, rank, **val_predictions)
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(reported))


class _Log:
    """Rank 0 speaks for all workers; the other ranks stay silent."""

    def __init__(self, rank: int) -> None:
        self.logger = logs.get("train") if rank == 0 else None
        if self.logger:
            logs.setup_worker()

    def __call__(self, msg: str) -> None:
        if self.logger:
            self.logger.info(msg)
