"""Field scoring speed and memory: the `score --fields` Ray job vs detection alone plus the bare model.

    flock /tmp/malaria-ray-ray.lock python bench/field_score.py --fields 30 --replicate 10

Takes ``--fields`` real field photographs (``MALARIA_FIELDS_DIR``, default
../shared/data/iml_malaria beside the checkout) and, with ``--replicate R``, a second archive of R x
that many (the same files linked under new names). One JSON line each:

1. ``baseline``: in one process on one CPU, detection alone (``fields.prepare_fields``: decode,
   detect, cut) over the fields, then the bare model (the scoring actor's inference function, same
   batch size) on exactly the cells it cut. From their CPU seconds per field, the fastest this
   machine could go with every core busy and nothing else: ``ideal_fields_per_s`` = cores / (detect
   + model CPU per field). This is the honest baseline: no Ray, no Parquet, no listing.
2. ``job``: ``score_archive(fields=True)`` end to end on a local Ray with every core (listing, read,
   detection tasks, the model actor, Parquet commit, roll-ups), fields/s over its wall time and over
   its streaming loop, ``ratio`` to the ideal, peak anonymous memory of the driver and the workers.
3. ``job`` again on the R x archive: memory should stay flat.

The model is a randomly initialised classifier (speed does not depend on its weights) at
``--image-size`` (default 64, the CPU recipe's). Each measurement runs in its own subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from score_throughput import WorkerRss, last_json  # noqa: E402  (bench/ is not a package)

REPO = pathlib.Path(__file__).resolve().parents[1]
FIELDS = pathlib.Path(os.environ.get("MALARIA_FIELDS_DIR", REPO.parent / "shared" / "data" / "iml_malaria"))


def build_archive(dest: pathlib.Path, n: int, copies: int) -> None:
    """``copies`` x the first ``n`` field photographs, linked under ``dest/copyK/`` (one slide each)."""
    names = sorted((FIELDS / "images").iterdir())[:n]
    for k in range(copies):
        folder = dest / f"copy{k:03d}"
        folder.mkdir(parents=True)
        for src in names:
            os.link(src, folder / src.name)


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def baseline(archive: pathlib.Path, model_dir: str, batch_size: int) -> dict:
    import numpy as np

    from malaria_ray import fields, schema, sources
    from malaria_ray.backends import predictor
    from malaria_ray.model import load_model

    model, _ = load_model(model_dir)
    size = int(model.input_shape[1])
    files = sorted(f for f in archive.rglob("*") if f.is_file())
    rows = [{schema.COL_URI: str(f), schema.COL_STATUS: schema.STATUS_OK, schema.COL_DATA: f.read_bytes(),
             schema.COL_ERROR: None, schema.COL_LABEL_HINT: None, schema.COL_SLIDE_HINT: None,
             schema.COL_PATIENT_HINT: None, schema.COL_SOURCE_VERSION: None, schema.COL_ERROR_KIND: None} for f in files]
    c0, t0 = _cpu_s(), time.perf_counter()
    crops = [fields.prepare_fields(sources.rows_to_batch(rows[i:i + 4]), size)[schema.COL_PIXELS]
             for i in range(0, len(rows), 4)]
    detect_wall, detect_cpu = time.perf_counter() - t0, _cpu_s() - c0
    x = np.concatenate(crops)
    predict = predictor(model)
    predict(x[:batch_size])  # traced outside the timed loop, as the actor's first batch
    c0, t0 = _cpu_s(), time.perf_counter()
    for a in range(0, len(x), batch_size):
        predict(x[a:a + batch_size])
    model_wall, model_cpu = time.perf_counter() - t0, _cpu_s() - c0
    per_field_cpu = (detect_cpu + model_cpu) / len(files)
    return {"kind": "baseline", "fields": len(files), "cells": len(x), "cells_per_field": round(len(x) / len(files), 1),
            "detect_fields_per_s": round(len(files) / detect_wall, 2),
            "detect_fields_per_cpu_s": round(len(files) / detect_cpu, 2),
            "bare_model_cells_per_s": round(len(x) / model_wall, 1),
            "detect_cpu_ms_per_field": round(1000 * detect_cpu / len(files)),
            "model_cpu_ms_per_field": round(1000 * model_cpu / len(files)),
            "ideal_fields_per_s": round(os.cpu_count() / per_field_cpu, 2), "cores": os.cpu_count()}


def job(archive: pathlib.Path, model_dir: str, out: pathlib.Path, batch_size: int) -> dict:
    import resource

    import ray

    from malaria_ray import score, schema
    from malaria_ray.config import ScoreConfig

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    watcher = WorkerRss()
    watcher.start()
    start = time.perf_counter()
    result = score.score_archive(ScoreConfig(input=str(archive), model=model_dir, output=str(out), fields=True,
                                             batch_size=batch_size, actors=1))
    wall = time.perf_counter() - start
    watcher.stop.set()
    ray.shutdown()
    n = result.counts.get(schema.COUNT_FIELDS, 0)
    return {"kind": "job", "fields": n, "cells": result.counts.get(schema.COUNT_SCORED, 0),
            "errors": result.counts.get(schema.COUNT_ERRORS, 0), "job_fields_per_s": round(n / wall, 2),
            "job_stream_fields_per_s": round(n / result.seconds, 2), "wall_s": round(wall, 1),
            "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "driver_peak_anon_mib": round(watcher.driver_peak_anon / 2**20),
            "worker_peak_anon_mib": round(watcher.peak_anon / 2**20)}


def _sub(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"bench step failed ({args[0]}):\n{proc.stderr[-3000:]}")
    return last_json(proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fields", type=int, default=30)
    p.add_argument("--replicate", type=int, default=10)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--step", choices=("baseline", "job"), help=argparse.SUPPRESS)
    p.add_argument("--archive", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.step == "baseline":
        print(json.dumps(baseline(pathlib.Path(args.archive), args.model, args.batch_size)), flush=True)
        return
    if args.step == "job":
        print(json.dumps(job(pathlib.Path(args.archive), args.model, pathlib.Path(args.out), args.batch_size)),
              flush=True)
        return
    if not (FIELDS / "images").is_dir():
        sys.exit(f"no field photographs at {FIELDS}/images: set MALARIA_FIELDS_DIR")
    with tempfile.TemporaryDirectory(prefix="field-bench-") as tmp:
        tmp = pathlib.Path(tmp)
        from malaria_ray.model import build_model, save_model

        save_model(build_model(image_size=args.image_size, seed=0), str(tmp / "model"))
        build_archive(tmp / "one", args.fields, 1)
        common = ["--model", str(tmp / "model"), "--batch-size", str(args.batch_size)]
        base = _sub("--step", "baseline", "--archive", str(tmp / "one"), *common)
        print(json.dumps(base), flush=True)
        one = _sub("--step", "job", "--archive", str(tmp / "one"), "--out", str(tmp / "out1"), *common)
        one["ratio_to_ideal"] = round(one["job_fields_per_s"] / base["ideal_fields_per_s"], 3)
        one["stream_ratio_to_ideal"] = round(one["job_stream_fields_per_s"] / base["ideal_fields_per_s"], 3)
        print(json.dumps(one), flush=True)
        if args.replicate > 1:
            build_archive(tmp / "many", args.fields, args.replicate)
            many = _sub("--step", "job", "--archive", str(tmp / "many"), "--out", str(tmp / "out2"), *common)
            many["ratio_to_ideal"] = round(many["job_fields_per_s"] / base["ideal_fields_per_s"], 3)
            many["driver_anon_growth"] = round(many["driver_peak_anon_mib"] / max(one["driver_peak_anon_mib"], 1), 2)
            many["worker_anon_growth"] = round(many["worker_peak_anon_mib"] / max(one["worker_peak_anon_mib"], 1), 2)
            print(json.dumps(many), flush=True)


if __name__ == "__main__":
    main()
