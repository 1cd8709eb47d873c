"""Training throughput: the product's loop (Ray Train, augmentation on) vs the fastest bare step, one run.

    python bench/train_throughput.py [--images 640] [--image-size 64] [--batch-size 32] [--epochs 3]

All sides train the same model (``malaria_ray.model.build_model``) at the same batch size on the
same real NIH cells (MALARIA_SAMPLE_DIR), on this machine, in this run:

- **bare step**: the fastest honest baseline: decoded uint8 arrays in memory, one compiled
  ``tf.function`` step (GradientTape, Adam, binary cross-entropy), no augmentation, no Ray; the
  bare variants are timed in alternating rounds and each keeps its best round.
- **bare step + augmentation**: the same step with the product's in-step augmentation
  (``preprocess.augment_tf``): what augmentation costs.
- **bare step, oneDNN off** (a subprocess with ``TF_ENABLE_ONEDNN_OPTS=0``): the setting an
  earlier CPU recipe used; kept in the bench so the decision stays measured.
- **Ray Train (1 worker)**: the product: Ray Data decode + materialize, a Train worker iterating
  its shard, the distributed step with augmentation, BatchNorm recalibration and a checkpoint
  every epoch. Images/s of the epoch's training loop, epochs after the first (tracing).

Prints each rate and its ratio to the bare step; the goal for the product loop is >= 0.8.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from malaria_ray import corpus, preprocess, storage  # noqa: E402
from malaria_ray.config import TrainConfig  # noqa: E402
from malaria_ray.schema import CLASS_NAMES  # noqa: E402


def bare_step(x: np.ndarray, y: np.ndarray, batch: int, augment: bool):
    """A timer for a compiled train step over in-memory batches: ``timer(steps) -> images/s``."""
    import keras
    import tensorflow as tf

    from malaria_ray.model import build_model

    model = build_model(x.shape[1], seed=0)
    opt = keras.optimizers.Adam(1e-3)
    bce = keras.losses.BinaryCrossentropy()

    @tf.function
    def step(xb, yb, seed):
        xf = tf.cast(xb, tf.float32)
        if augment:
            xf = preprocess.augment_tf(xf, seed)
        with tf.GradientTape() as tape:
            loss = bce(yb, model(xf, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    n = len(x) // batch
    batches = [(tf.constant(x[i * batch:(i + 1) * batch]), tf.constant(y[i * batch:(i + 1) * batch])) for i in range(n)]
    count = [0]

    def timer(steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step(*batches[count[0] % n], tf.constant([0, count[0]], tf.int64))
            count[0] += 1
        float(loss)
        return steps * batch / (time.perf_counter() - t0)

    timer(3)  # trace and warm up
    return timer


def best_of_rounds(timers: dict, steps: int, rounds: int = 3) -> dict[str, float]:
    """Each variant timed in ``rounds`` alternating rounds; the best round of each (the first
    minutes of a process run slower here, so one pass in a fixed order favours the later ones)."""
    best = dict.fromkeys(timers, 0.0)
    for _ in range(rounds):
        for name, timer in timers.items():
            best[name] = max(best[name], timer(steps))
    return best


def load(listing: corpus.Listing, size: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.stack([preprocess.decode_image(storage.read_bytes(u), size) for u in listing.uris])
    y = np.eye(2, dtype=np.float32)[[CLASS_NAMES.index(lab) for lab in listing.labels]]
    return x, y


def ray_train(data: str, n: int, size: int, batch: int, epochs: int) -> tuple[float, dict]:
    import pandas as pd
    import ray

    from malaria_ray import train

    out = tempfile.mkdtemp(prefix="bench-train-")
    cfg = TrainConfig(data=data, output=out, image_size=size, batch_size=batch, epochs=epochs, num_workers=1,
                      augment=True, max_images=n, val_fraction=0.3, split="random")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        train.fit(train.plan_run(cfg))
    finally:
        ray.shutdown()
    hist = pd.read_parquet(os.path.join(out, "history.parquet")).iloc[1:]
    resolved = json.loads(open(os.path.join(out, "config.json")).read())
    return float(hist["train_images"].sum() / hist["train_seconds"].sum()), resolved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("MALARIA_SAMPLE_DIR", "../shared/data/nih_malaria"))
    p.add_argument("--images", type=int, default=640, help="images drawn from the corpus (70%% train)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=15, help="timed steps per round of each bare variant")
    p.add_argument("--bare-only", choices=("on", "off"), help="time only the bare step in this environment and "
                   "print it as JSON (the oneDNN subprocess; bench/gpu_check.sh on a GPU)")
    a = p.parse_args()
    listing = corpus.stable_subsample(corpus.list_corpus(a.data), a.images, seed=0)
    train_part = listing.subset(np.flatnonzero(~corpus.split_random(listing, 0.3, seed=0)))
    x, y = load(train_part, a.image_size)
    if a.bare_only:
        print(json.dumps(best_of_rounds({"bare": bare_step(x, y, a.batch_size, augment=False)}, a.steps)))
        return
    # First, while this process has no TensorFlow threads of its own to compete with it.
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0"}
    off = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--bare-only", "off"], env=env,
                         capture_output=True, text=True, check=True)
    bare_off = json.loads(off.stdout.strip().splitlines()[-1])["bare"]
    rates = best_of_rounds({"bare": bare_step(x, y, a.batch_size, augment=False),
                            "aug": bare_step(x, y, a.batch_size, augment=True)}, a.steps)
    bare, bare_aug = rates["bare"], rates["aug"]
    ray_ips, resolved = ray_train(a.data, a.images, a.image_size, a.batch_size, a.epochs)
    print(f"machine: {os.cpu_count()} CPUs; images={a.images} (train {len(train_part)}), "
          f"size={a.image_size}, batch={a.batch_size}; bare: best of 3 alternating rounds of {a.steps} steps; "
          f"Ray: epochs={a.epochs} (first excluded), "
          f"worker CPUs={resolved['cpus_per_worker_effective']}")
    for name, rate in (("bare step (baseline)", bare), ("bare step + augmentation", bare_aug),
                       ("bare step, oneDNN off", bare_off), ("Ray Train loop, augmented", ray_ips)):
        print(f"{name:28s}: {rate:8.1f} images/s   ratio to bare {rate / bare:6.3f}")
    print(f"augmentation cost: {1 - bare_aug / bare:+.1%} of a step; product loop goal >= 0.8x bare")


if __name__ == "__main__":
    main()
