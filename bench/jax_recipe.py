"""Does a longer, higher-resolution recipe beat the CPU one? A probe for GPU machines without TensorFlow.

The lent GPU machines carry JAX but neither TensorFlow nor Ray (docs/benchmarks.md, "The model on
a GPU"), so the product's training cannot run there. This probe trains the product's model
(``malaria_ray.model.build_model``) on Keras' JAX backend over the product's own patient-grouped
splits (``corpus.make_split``, the same seeds and validation fraction as ``malaria-ray train``) and
reports validation accuracy and ROC AUC per split. It is evidence for choosing a recipe, not a
second training path: the augmentation here (any of the 8 flips/quarter-turns, and a shift of up to
--shift pixels) and the loop are the probe's own.

  # here, where the data is: decode once to --image-size and pack (lossless WebP, ~8 KB a cell)
  python bench/jax_recipe.py pack --data ../shared/data/nih_malaria --out pack --splits 0,1,2
  # on the GPU machine
  KERAS_BACKEND=jax python bench/jax_recipe.py train --pack pack --splits 0,1,2 --epochs 40

``train`` prints one JSON line per split (final-epoch metrics, never the best epoch: choosing
the epoch on the validation split would tune to it) and writes them, with the validation
probabilities, to --json.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_ceiling import build, loss_grad, probabilities, variables  # noqa: E402  (shared with the ceiling bench)

from malaria_ray import metrics  # noqa: E402
from malaria_ray.config import TrainConfig  # noqa: E402

VAL_FRACTION = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "val_fraction")

PACK_FILE = "cells.npz"


def _encode(args) -> bytes:
    uri, size = args
    from PIL import Image

    from malaria_ray import storage
    from malaria_ray.preprocess import decode_image

    pixels = decode_image(storage.read_bytes(uri), size)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "WEBP", lossless=True, quality=50, method=4)
    return out.getvalue()


def pack(data: str, out: str, size: int, splits: list[int], val_fraction: float, procs: int) -> None:
    import numpy as np

    from malaria_ray import corpus
    from malaria_ray.schema import CLASS_NAMES

    listing = corpus.list_corpus(data)
    if any("#" in u for u in listing.uris):
        raise SystemExit(f"{data}: pack reads loose image files; unpack tar/zip/Parquet corpora first")
    masks = {s: corpus.make_split(listing, "patient", val_fraction, s) for s in splits}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(procs) as pool:
        blobs = list(pool.map(_encode, [(u, size) for u in listing.uris], chunksize=64))
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    root = data.rstrip("/")
    Path(out).mkdir(parents=True, exist_ok=True)
    np.savez(Path(out) / PACK_FILE, blob=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets,
             label=np.array([CLASS_NAMES.index(c) for c in listing.labels], np.int32),
             name=np.array([u[len(root) + 1:] if u.startswith(root) else u for u in listing.uris]),
             image_size=size, splits=np.array(splits), **{f"val_{s}": m for s, m in masks.items()})
    print(json.dumps({"images": len(blobs), "bytes": int(offsets[-1]), "seconds": round(time.perf_counter() - t0, 1),
                      "val_images": {s: int(m.sum()) for s, m in masks.items()}}), flush=True)


def _decode_webp(blob: bytes):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


def load_pack(path: str):
    import numpy as np

    z = np.load(Path(path) / PACK_FILE)
    blob, offsets = z["blob"].tobytes(), z["offsets"]
    pixels = np.stack([_decode_webp(blob[offsets[i]:offsets[i + 1]]) for i in range(len(offsets) - 1)])
    return pixels, z


def augment(x, key, shift: int):
    """Each image: one of the 8 flips/quarter-turns, then a shift of up to ``shift`` px (black fill)."""
    import jax
    import jax.numpy as jnp

    n, size = x.shape[0], x.shape[1]
    k_flip, k_rot, k_dx, k_dy = jax.random.split(key, 4)
    flip = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
    x = jnp.where(flip, x[:, :, ::-1], x)
    turns = jax.random.randint(k_rot, (n,), 0, 4)
    x = jnp.select([(turns == k)[:, None, None, None] for k in range(4)],
                   [jnp.rot90(x, k, axes=(1, 2)) for k in range(4)])
    if shift:
        padded = jnp.pad(x, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
        dx = jax.random.randint(k_dx, (n,), 0, 2 * shift + 1)
        dy = jax.random.randint(k_dy, (n,), 0, 2 * shift + 1)
        x = jax.vmap(lambda im, a, b: jax.lax.dynamic_slice(im, (a, b, 0), (size, size, 3)))(padded, dy, dx)
    return x


class Trainer:
    """One compiled epoch and one compiled inference for every split: the model's structure, the
    steps per epoch (the fewest any split allows) and the schedule are shared; each split starts
    from its own freshly initialised weights and optimizer state."""

    def __init__(self, size: int, steps_per_epoch: int, *, epochs: int, batch: int, lr: float, warmup: float,
                 precision: str, shift: int):
        import jax
        import jax.numpy as jnp
        import keras

        self.size, self.steps, self.epochs, self.batch = size, steps_per_epoch, epochs, batch
        self.precision = precision
        warm = int(round(warmup * steps_per_epoch))
        total = steps_per_epoch * epochs
        self.schedule = lambda: keras.optimizers.schedules.CosineDecay(
            0.0, max(1, total - warm), warmup_target=lr, warmup_steps=warm)
        model, optimizer = self.fresh(0)
        grad = loss_grad(model)

        def epoch(state, x_all, y_all, order, key):
            def one(carry, i):
                (trainable, non_trainable, opt), key = carry
                key, sub = jax.random.split(key)
                idx = jax.lax.dynamic_slice(order, (i * batch,), (batch,))
                (loss, non_trainable), grads = grad(trainable, non_trainable, augment(x_all[idx], sub, shift),
                                                    y_all[idx])
                trainable, opt = optimizer.stateless_apply(opt, grads, trainable)
                return ((trainable, non_trainable, opt), key), loss
            (state, _), losses = jax.lax.scan(one, (state, key), jnp.arange(steps_per_epoch))
            return state, losses.mean()

        self.epoch = jax.jit(epoch, donate_argnums=0)
        self.probs = jax.jit(probabilities(model))

    def fresh(self, seed: int):
        import keras

        model = build(self.precision, self.size, seed)
        optimizer = keras.optimizers.Adam(self.schedule())
        optimizer.build(model.trainable_variables)
        return model, optimizer

    def predict(self, state, x, chunk: int = 1024):
        """P(Parasitized) for ``x`` (on the device), in padded chunks of one shape: no retracing."""
        import jax.numpy as jnp
        import numpy as np

        n = x.shape[0]
        x = jnp.pad(x, ((0, -n % chunk), (0, 0), (0, 0), (0, 0)))
        return np.concatenate([np.asarray(self.probs(state[0], state[1], x[i:i + chunk]))
                               for i in range(0, x.shape[0], chunk)])[:n]

    def run(self, x_all, y_all, labels, val_mask, seed: int, log) -> dict:
        import jax
        import numpy as np

        train_idx, val_idx = np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
        state = variables(*self.fresh(seed))
        x_val = x_all[jax.device_put(val_idx)]
        positive = labels[val_idx] == 0
        key, rng, history = jax.random.PRNGKey(seed), np.random.default_rng(seed), []
        t0 = time.perf_counter()
        for epoch in range(self.epochs):
            key, sub = jax.random.split(key)
            order = jax.device_put(rng.permutation(train_idx)[: self.steps * self.batch].astype(np.int32))
            state, loss = self.epoch(state, x_all, y_all, order, sub)
            p = self.predict(state, x_val)
            m = metrics.binary_metrics(positive, p)
            acc = m["accuracy"]
            history.append({"epoch": epoch + 1, "loss": round(float(loss), 5), "val_accuracy": round(acc, 4)})
            log(f"split {seed} epoch {epoch + 1}/{self.epochs}: loss {float(loss):.4f} val_acc {acc:.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
        seconds = time.perf_counter() - t0
        return {"split": seed, "image_size": self.size, "epochs": self.epochs, "batch": self.batch,
                "steps_per_epoch": self.steps, "precision": self.precision,
                "train_images": int(len(train_idx)), "val_images": int(len(val_idx)),
                "val_accuracy": round(m["accuracy"], 4), "val_roc_auc": round(m["roc_auc"], 4),
                "val_sensitivity": round(m["sensitivity"], 4), "val_specificity": round(m["specificity"], 4),
                "errors": m["fp"] + m["fn"], "seconds": round(seconds, 1),
                "images_per_s": round(self.steps * self.batch * self.epochs / seconds, 1), "history": history,
                "val_prob": [round(float(v), 5) for v in p]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="decode a corpus to --image-size and pack it with its patient splits")
    pk.add_argument("--data", required=True, help="corpus root (Parasitized/, Uninfected/)")
    pk.add_argument("--out", required=True, help="folder to write cells.npz into")
    pk.add_argument("--image-size", type=int, default=128)
    pk.add_argument("--splits", default="0,1,2", help="split seeds, as malaria-ray train --seed (default 0,1,2)")
    pk.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                    help=f"as malaria-ray train --val-fraction (default {VAL_FRACTION})")
    pk.add_argument("--procs", type=int, default=os.cpu_count())
    tr = sub.add_parser("train", help="train and validate on each packed split")
    tr.add_argument("--pack", required=True)
    tr.add_argument("--splits", help="split seeds to run (default: all packed)")
    tr.add_argument("--epochs", type=int, default=40)
    tr.add_argument("--batch-size", type=int, default=64)
    tr.add_argument("--learning-rate", type=float, default=1e-3)
    tr.add_argument("--warmup-epochs", type=float, default=1.0)
    tr.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    tr.add_argument("--shift", type=int, default=4, help="largest shift, px (default 4)")
    tr.add_argument("--deadline", type=float, help="seconds: start no split after this")
    tr.add_argument("--json", help="write every split's result (with validation probabilities) here")
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        pack(args.data, args.out, args.image_size, [int(s) for s in args.splits.split(",")], args.val_fraction,
             args.procs)
        return 0

    if args.epochs < 1 or args.batch_size < 1 or args.shift < 0 or not 0 <= args.warmup_epochs < args.epochs:
        ap.error("need --epochs >= 1, --batch-size >= 1, --shift >= 0 and 0 <= --warmup-epochs < --epochs")
    os.environ.setdefault("KERAS_BACKEND", "jax")
    start = time.perf_counter()
    pixels, z = load_pack(args.pack)
    splits = [int(s) for s in args.splits.split(",")] if args.splits else z["splits"].tolist()
    missing = [s for s in splits if f"val_{s}" not in z.files]
    if missing:
        ap.error(f"split(s) {missing} are not in {args.pack}: pack them with --splits")
    labels = z["label"]
    print(json.dumps({"images": int(len(labels)), "image_size": int(pixels.shape[1]),
                      "load_seconds": round(time.perf_counter() - start, 1)}), flush=True)
    import jax
    import numpy as np

    steps = min(int((~z[f"val_{s}"]).sum()) for s in splits) // args.batch_size
    if steps < 1:
        ap.error(f"--batch-size {args.batch_size} is larger than a split's training set")
    trainer = Trainer(int(pixels.shape[1]), steps, epochs=args.epochs, batch=args.batch_size, lr=args.learning_rate,
                      warmup=args.warmup_epochs, precision=args.precision, shift=args.shift)
    x_all, y_all = jax.device_put(pixels), jax.device_put(np.asarray(labels, np.int32))
    results = []
    for s in splits:
        if args.deadline and time.perf_counter() - start > args.deadline:
            print(json.dumps({"split": s, "skipped": "past --deadline"}), flush=True)
            continue
        r = trainer.run(x_all, y_all, labels, z[f"val_{s}"], s, log=lambda m: print(m, flush=True))
        r.update(lr=args.learning_rate, warmup_epochs=args.warmup_epochs, shift=args.shift)
        r["val_names"] = z["name"][z[f"val_{s}"]].tolist()
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k not in ("history", "val_prob", "val_names")}), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results))
    if results:
        acc = [r["val_accuracy"] for r in results]
        auc = [r["val_roc_auc"] for r in results]
        print(f"mean over {len(results)} split(s): accuracy {sum(acc) / len(acc):.4f}, ROC AUC {sum(auc) / len(auc):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
