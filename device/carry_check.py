"""Proves an unpacked carry works, under the GPU machine's Python with only what that machine has.

    PYTHONPATH=SITE:REPO KERAS_BACKEND=jax python device/carry_check.py --cells device/carry/cells --out DIR

In order, each step one JSON line on stdout, the first failure fatal:
1. ``import ray, ray.data, ray.train, keras, malaria_ray`` (and the scoring modules), Ray and Keras
   from the carry, not from some site-packages;
2. a Ray Data ``map_batches`` job on a local Ray;
3. a Ray Train V2 ``JaxTrainer`` run of one worker whose loop computes with JAX and reports;
4. the product's untrained model (``malaria_ray.model.build_model`` + ``save_model``) saved under
   Keras on JAX, then the real ``malaria-ray score --backend jax`` CLI on ``--images`` carried cells,
   its outputs read back.
Run by ``device/build_carry.py dry`` here and first thing by device/gpu_run.sh on the GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def emit(step: str, t0: float, **fields) -> None:
    print(json.dumps({"step": step, "seconds": round(time.perf_counter() - t0, 1), **fields}), flush=True)


def imports() -> None:
    t0 = time.perf_counter()
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import keras
    import ray
    import ray.data
    import ray.train
    import ray.train.v2.jax  # noqa: F401

    import malaria_ray
    import malaria_ray.cli
    import malaria_ray.score  # noqa: F401

    site = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0]
    for module in (ray, keras):
        if site and not module.__file__.startswith(site):
            sys.exit(f"carry_check: {module.__name__} came from {module.__file__}, not the carry at {site}")
    if keras.backend.backend() != "jax":
        sys.exit(f"carry_check: Keras runs on {keras.backend.backend()}, not JAX (set KERAS_BACKEND=jax)")
    import jax

    emit("imports", t0, python=sys.version.split()[0], ray=ray.__version__, keras=keras.__version__,
         jax=jax.__version__, jax_devices=[str(d) for d in jax.devices()], malaria_ray=os.path.dirname(malaria_ray.__file__))


def data_job() -> None:
    import ray

    t0 = time.perf_counter()
    ds = ray.data.range(1000, override_num_blocks=4).map_batches(lambda b: {"sq": b["id"] ** 2}, batch_format="numpy")
    total = ds.sum("sq")
    if total != sum(i * i for i in range(1000)):
        sys.exit(f"carry_check: map_batches summed to {total}")
    emit("ray-data-map-batches", t0, rows=1000, sum=int(total))


def _loop(config: dict) -> None:
    """One Train V2 worker: a few JAX steps of a least-squares fit, each reported, the last with a
    checkpoint (Train V2 keeps the metrics of checkpointed reports only)."""
    import tempfile

    import jax
    import jax.numpy as jnp
    import ray.train

    x = jnp.linspace(0.0, 1.0, 64)
    y = 3.0 * x + 1.0
    w = jnp.zeros(2)
    grad = jax.jit(jax.grad(lambda w: jnp.mean((w[0] * x + w[1] - y) ** 2)))
    for step in range(config["steps"]):
        w = w - 0.5 * grad(w)
        metrics = {"step": step, "w0": float(w[0]), "world_size": ray.train.get_context().get_world_size()}
        if step < config["steps"] - 1:
            ray.train.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "w.txt"), "w") as f:
                f.write(repr(w.tolist()))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def train_job(storage: Path) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.v2.jax import JaxTrainer

    t0 = time.perf_counter()
    trainer = JaxTrainer(_loop, train_loop_config={"steps": 20}, scaling_config=ScalingConfig(num_workers=1),
                         run_config=RunConfig(name="carry-check", storage_path=str(storage)))
    result = trainer.fit()
    metrics = result.metrics or {}
    if result.error or metrics.get("step") != 19 or result.checkpoint is None:
        sys.exit(f"carry_check: the Train V2 run ended with error {result.error!r}, metrics {metrics}, "
                 f"checkpoint {result.checkpoint}")
    emit("ray-train-v2-jax", t0, trainer=type(trainer).__module__, metrics=metrics, checkpoint=result.checkpoint.path)


def cells_subset(cells: Path, dest: Path, n: int) -> Path:
    """``n`` carried cells, half per class, hard-linked under ``dest`` (the class folders kept: the
    run is labelled, so it computes and draws its confusion matrix too)."""
    for cls in ("Parasitized", "Uninfected"):
        (dest / cls).mkdir(parents=True, exist_ok=True)
        for src in sorted((cells / cls).glob("*.png"))[: n // 2]:
            os.link(src, dest / cls / src.name)
    return dest


def score_cli(cells: Path, out: Path, n: int, size: int) -> None:
    """The product's model, untrained, saved here under Keras on JAX; then ``malaria-ray score
    --backend jax`` as a user runs it, in its own process (it starts and stops its own Ray)."""
    import pyarrow.parquet as pq

    from malaria_ray.model import build_model, save_model

    t0 = time.perf_counter()
    save_model(build_model(size, seed=0), str(out / "model"))
    built_s = time.perf_counter() - t0
    inputs = cells_subset(cells, out / "cells", n)
    cmd = [sys.executable, "-m", "malaria_ray.cli", "score", "--input", str(inputs), "--model", str(out / "model"),
           "--output", str(out / "scores"), "--backend", "jax", "--batch-size", "32"]
    t1 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"carry_check: {' '.join(cmd[2:])} exited {done.returncode}:\n{done.stderr[-4000:]}")
    rows = pq.read_table(out / "scores" / "predictions").num_rows
    plots = sorted(p.name for p in (out / "scores").rglob("*.png"))
    if rows != n or "confusion_matrix.png" not in plots:
        sys.exit(f"carry_check: score wrote {rows} prediction rows for {n} cells, plots {plots}\n{done.stdout}")
    throughput = [line.strip() for line in done.stdout.splitlines() if "throughput" in line]
    emit("score-cli-jax", t0, images=n, image_size=size, model_build_save_s=round(built_s, 1),
         cli_s=round(time.perf_counter() - t1, 1), rows=rows, summary=throughput)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", required=True, help="the carried cells (device/carry/cells)")
    ap.add_argument("--out", required=True, help="an empty folder for the runs' outputs")
    ap.add_argument("--images", type=int, default=100, help="cells the CLI scores (default 100)")
    ap.add_argument("--image-size", type=int, default=64, help="the model's input size (default 64: CPU-cheap)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    imports()
    import ray

    ray.init(num_cpus=min(2, os.cpu_count() or 1), configure_logging=False, log_to_driver=False)
    try:
        data_job()
        train_job(out / "train")
    finally:
        ray.shutdown()
    score_cli(Path(args.cells), out, args.images, args.image_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
