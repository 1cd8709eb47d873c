"""Training throughput: Ray Train (TensorflowTrainer, 1 worker) vs a bare Keras loop, one run.

    python bench/train_throughput.py [--images 640] [--image-size 64] [--batch-size 32] [--epochs 3]

Both sides train the same model (malaria_ray.model.build_model) at the same global batch size on the
same real NIH cells (MALARIA_SAMPLE_DIR), without augmentation, on this machine. The bare side is
what a notebook does: decoded numpy arrays in memory and ``model.fit``. The Ray side is the product:
Ray Data decode + materialize, a Train worker iterating its shard, the custom distributed step,
checkpoints every epoch. Throughput counts training images per second of the epoch's training loop,
epochs after the first (the first pays tf.function tracing on both sides). Prints one ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from malaria_ray import corpus, preprocess, storage  # noqa: E402
from malaria_ray.config import CLASS_NAMES, TrainConfig  # noqa: E402


def bare_keras(listing: corpus.Listing, size: int, batch: int, epochs: int) -> float:
    import keras

    from malaria_ray.model import build_model

    x = np.stack([preprocess.decode_image(storage.read_bytes(u), size) for u in listing.uris]).astype(np.float32)
    y = keras.utils.to_categorical([CLASS_NAMES.index(lab) for lab in listing.labels], 2)
    model = build_model(size, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy", metrics=["accuracy"])

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t0)

    times: list[float] = []
    steps = len(x) // batch
    model.fit(x[: steps * batch], y[: steps * batch], batch_size=batch, epochs=epochs, shuffle=True,
              callbacks=[Timer()], verbose=0)
    return steps * batch * (epochs - 1) / sum(times[1:])


def ray_train(data: str, n: int, size: int, batch: int, epochs: int) -> tuple[float, dict]:
    import pandas as pd
    import ray

    from malaria_ray import train

    out = tempfile.mkdtemp(prefix="bench-train-")
    cfg = TrainConfig(data=data, output=out, image_size=size, batch_size=batch, epochs=epochs, num_workers=1,
                      augment=False, max_images=n, val_fraction=0.3, split="random")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        train.fit(cfg)
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
    a = p.parse_args()
    listing = corpus.stable_subsample(corpus.list_corpus(a.data), a.images, seed=0)
    train_part = listing.subset(np.flatnonzero(~corpus.split_random(listing, 0.3, seed=0)))
    bare = bare_keras(train_part, a.image_size, a.batch_size, a.epochs)
    ray_ips, resolved = ray_train(a.data, a.images, a.image_size, a.batch_size, a.epochs)
    print(f"machine: {os.cpu_count()} CPUs; images={a.images} (train {len(train_part)}), size={a.image_size}, "
          f"batch={a.batch_size}, epochs={a.epochs} (first excluded); "
          f"ray worker CPUs={resolved['cpus_per_worker_effective']}")
    print(f"bare Keras model.fit      : {bare:8.1f} images/s")
    print(f"Ray Train (1 worker)      : {ray_ips:8.1f} images/s")
    print(f"ratio ray_train / bare    : {ray_ips / bare:8.3f}   (goal >= 0.8)")


if __name__ == "__main__":
    main()
