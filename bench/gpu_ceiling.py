"""What the product's model reaches on a GPU machine that has no TensorFlow or Ray.

The lent GPU machines (H100/H200, 16 CPUs) carry PyTorch and JAX but neither TensorFlow nor Ray,
and their working-tree limit (64 MiB) cannot carry TensorFlow's 573 MB wheel or Ray's 79 MB one, so
``bench/gpu_check.sh`` (the product's own GPU paths) cannot run there. This script measures the
ceilings those paths are judged against, with the product's own model definition
(``malaria_ray.model.build_model``, Keras 3) on Keras' JAX backend:

- the bare train step (one jitted value_and_grad + Adam update, uint8 input cast on the device) in
  fp32 and in mixed bfloat16, at --image-size and --batch-size;
- inference in fp32 and mixed bfloat16 at --infer-batch: on device-resident input (the model alone)
  and fed from host uint8 arrays with two batches in flight (transfer included, as a scoring actor
  sees it);
- PNG decode+resize (``malaria_ray.preprocess.decode_image``) per process and across --procs
  processes, on the real NIH files in --decode-dir if given.

  KERAS_BACKEND=jax python bench/gpu_ceiling.py [--decode-dir DIR] [--smi nvidia-smi.csv]

Prints one JSON line per measurement, then a table with the ratios. With --smi (a CSV written by
``nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms
250``) it adds each phase's mean GPU utilisation. Runs on CPU too (small sizes), which is how it is
tested where no GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES: list[dict] = []


def emit(record: dict) -> None:
    PHASES.append(record)
    print(json.dumps(record), flush=True)


def timed(step, seconds: float, min_iters: int) -> tuple[int, float]:
    """Call ``step()`` (which blocks on its own result) until ``seconds`` and ``min_iters`` are
    both reached; returns (iterations, elapsed)."""
    n, t0 = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n, time.perf_counter() - t0


def build(precision: str, size: int, seed: int = 0):
    """The product's model, its layers computing in ``precision`` (float32 softmax either way)."""
    import keras

    from malaria_ray.model import build_model

    keras.config.set_dtype_policy("mixed_bfloat16" if precision == "bf16" else "float32")
    model = build_model(size, seed=seed)
    keras.config.set_dtype_policy("float32")
    return model


def loss_grad(model):
    """``(trainable, non_trainable, uint8 x, int y) -> ((loss, non_trainable), grads)``: the
    model's training-mode forward pass (BatchNorm statistics updated) and its gradient, pure."""
    import jax
    import jax.numpy as jnp
    import keras

    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    def loss_of(trainable, non_trainable, x, y):
        probs, non_trainable = model.stateless_call(trainable, non_trainable, x.astype(jnp.float32),
                                                    training=True)
        return loss_fn(y, probs), non_trainable

    return jax.value_and_grad(loss_of, has_aux=True)


def probabilities(model):
    """``(trainable, non_trainable, uint8 x) -> P(Parasitized)``: the model's inference, pure."""
    import jax.numpy as jnp

    def probs(trainable, non_trainable, x):
        out, _ = model.stateless_call(trainable, non_trainable, x.astype(jnp.float32), training=False)
        return out[:, 0]

    return probs


def variables(model, optimizer=None) -> tuple:
    """The values that ``stateless_call`` (and ``stateless_apply``) take: trainable,
    non-trainable, then the optimizer's if one is given."""
    state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables])
    return state + ([v.value for v in optimizer.variables],) if optimizer is not None else state


def train_ceiling(precision: str, size: int, batch: int, seconds: float) -> None:
    import jax
    import keras
    import numpy as np

    model = build(precision, size)
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    grad = loss_grad(model)

    def step(state, x, y):
        trainable, non_trainable, opt = state
        (loss, non_trainable), grads = grad(trainable, non_trainable, x, y)
        trainable, opt = optimizer.stateless_apply(opt, grads, trainable)
        return loss, (trainable, non_trainable, opt)

    step = jax.jit(step, donate_argnums=0)
    state = variables(model, optimizer)
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
    y = jax.device_put(rng.integers(0, 2, batch).astype(np.int32))
    t0 = time.perf_counter()
    loss, state = step(state, x, y)
    loss.block_until_ready()
    compile_s = time.perf_counter() - t0
    holder = [state, loss]

    def one():
        holder[1], holder[0] = step(holder[0], x, y)
        return holder[1]

    def ten():
        for _ in range(9):
            one()
        one().block_until_ready()

    start = time.time()
    n, dt = timed(ten, seconds, 2)
    emit({"phase": f"train-{precision}-b{batch}", "images_per_s": round(n * 10 * batch / dt, 1),
          "batch": batch, "image_size": size, "steps": n * 10, "seconds": round(dt, 2),
          "compile_s": round(compile_s, 1), "loss_first": float(loss), "loss": float(holder[1]), "t0": start, "t1": time.time()})


def infer_ceiling(precision: str, size: int, batch: int, seconds: float) -> None:
    import jax
    import numpy as np

    model = build(precision, size)
    pure, (trainable, non_trainable) = probabilities(model), variables(model)
    probs = jax.jit(lambda x: pure(trainable, non_trainable, x))

    rng = np.random.default_rng(1)
    host = [rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8) for _ in range(4)]
    x = jax.device_put(host[0])
    t0 = time.perf_counter()
    probs(x).block_until_ready()
    compile_s = time.perf_counter() - t0

    def ten():
        for _ in range(9):
            probs(x)
        probs(x).block_until_ready()

    start = time.time()
    n, dt = timed(ten, seconds, 2)
    emit({"phase": f"infer-{precision}-device-b{batch}", "images_per_s": round(n * 10 * batch / dt, 1),
          "batch": batch, "image_size": size, "seconds": round(dt, 2), "compile_s": round(compile_s, 1),
          "t0": start, "t1": time.time()})

    def ten_from_host():  # two in flight: batch i+1 is sent while batch i's probabilities come back
        pending = probs(jax.device_put(host[0]))
        for i in range(1, 10):
            nxt = probs(jax.device_put(host[i % len(host)]))
            np.asarray(pending)
            pending = nxt
        np.asarray(pending)

    start = time.time()
    n, dt = timed(ten_from_host, seconds, 2)
    emit({"phase": f"infer-{precision}-host-b{batch}", "images_per_s": round(n * 10 * batch / dt, 1),
          "batch": batch, "image_size": size, "seconds": round(dt, 2), "t0": start, "t1": time.time()})


def _decode_files(args) -> int:
    paths, size = args
    from malaria_ray.preprocess import decode_image

    for p in paths:
        decode_image(Path(p).read_bytes(), size)
    return len(paths)


def decode_rate(files: list[str], size: int, procs: list[int]) -> None:
    """Images/s of one worker process, then of each count in ``procs``. All run in spawned worker
    processes: measured in this process instead (JAX loaded), one process read 2.4x slow on the
    2-core VM."""
    spawn = multiprocessing.get_context("spawn")  # JAX forbids fork
    rates = {}
    for n in sorted({1, *procs}):
        # the set split in ``n`` parts and decoded ``n`` times over: every process stays busy
        chunks = [(files[i::n], size) for i in range(n)] * n
        with ProcessPoolExecutor(n, mp_context=spawn) as pool:
            list(pool.map(_decode_files, [(files[:50], size)] * n))  # start the workers, import PIL
            start = time.time()
            t0 = time.perf_counter()
            total = sum(pool.map(_decode_files, chunks))
            rates[n] = total / (time.perf_counter() - t0)
        record = {"phase": f"decode-{n}proc", "images_per_s": round(rates[n], 1), "images": total,
                  "image_size": size, "t0": start, "t1": time.time()}
        if n != 1:
            record["per_proc_vs_1proc"] = round(rates[n] / n / rates[1], 3)
        emit(record)


def smi_means(csv: str) -> None:
    rows = []
    for line in Path(csv).read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            t = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            rows.append((t, float(parts[1])))
        except (ValueError, IndexError):
            continue
    for rec in PHASES:
        inside = [u for t, u in rows if rec["t0"] <= t <= rec["t1"]]
        rec["gpu_util_mean"] = round(sum(inside) / len(inside), 1) if inside else None


def table() -> None:
    by = {r["phase"]: r for r in PHASES}
    print("\n| phase | images/s | ratio | GPU util % |\n|---|---|---|---|")
    for r in PHASES:
        phase = r["phase"]
        if phase.startswith("decode-"):
            base = by.get("decode-1proc") if phase != "decode-1proc" else None
        elif "-host-" in phase:
            base = by.get(phase.replace("-host-", "-device-"))
        else:
            base = by.get(phase.replace("-bf16-", "-fp32-")) if "-bf16-" in phase else None
        ratio = f"{r['images_per_s'] / base['images_per_s']:.2f} x {base['phase']}" if base else ""
        print(f"| {r['phase']} | {r['images_per_s']:,.0f} | {ratio} | {r.get('gpu_util_mean', '')} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", default="256", help="train step batch, or a comma list (default 256)")
    ap.add_argument("--infer-batch", default="1024", help="inference batch, or a comma list (default 1024)")
    ap.add_argument("--seconds", type=float, default=8.0, help="timed seconds per phase (default 8)")
    ap.add_argument("--precisions", default="bf16,fp32", help="comma list of bf16, fp32")
    ap.add_argument("--skip", default="", help="comma list of train, infer, decode to skip")
    ap.add_argument("--decode-dir", help="a folder of cell images (searched recursively for .png)")
    ap.add_argument("--decode-images", type=int, default=1500)
    ap.add_argument("--procs", default=str(os.cpu_count()),
                    help="decode processes, or a comma list (default: all CPUs); one process is always measured")
    ap.add_argument("--smi", help="nvidia-smi CSV sampled during the run: adds GPU utilisation per phase")
    ap.add_argument("--json", help="write all measurements to this file")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    precisions = [p for p in args.precisions.split(",") if p]
    try:
        train_batches = [int(b) for b in args.batch_size.split(",")]
        infer_batches = [int(b) for b in args.infer_batch.split(",")]
        procs = [int(n) for n in args.procs.split(",")]
    except ValueError:
        ap.error("--batch-size, --infer-batch and --procs take integers, comma-separated")
    if min(train_batches + infer_batches + procs) < 1:
        ap.error("--batch-size, --infer-batch and --procs must be >= 1")
    if bad := set(precisions) - {"bf16", "fp32"}:
        ap.error(f"unknown precision(s) {sorted(bad)}: use bf16, fp32")

    os.environ.setdefault("KERAS_BACKEND", "jax")
    import jax

    print(json.dumps({"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
                      "jax": jax.__version__, "keras": __import__("keras").__version__}), flush=True)
    if "decode" not in skip and args.decode_dir:
        files = sorted(str(p) for p in Path(args.decode_dir).rglob("*.png"))[: args.decode_images]
        if not files:
            ap.error(f"no .png files under {args.decode_dir}")
        decode_rate(files, args.image_size, procs)
    for precision in precisions:
        for batch in train_batches if "train" not in skip else []:
            train_ceiling(precision, args.image_size, batch, args.seconds)
        for batch in infer_batches if "infer" not in skip else []:
            infer_ceiling(precision, args.image_size, batch, args.seconds)
    if args.smi and Path(args.smi).exists():
        smi_means(args.smi)
    table()
    if args.json:
        Path(args.json).write_text(json.dumps(PHASES, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
