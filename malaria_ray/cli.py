"""``malaria-ray train|score|overlay|synth|migrate``: flags map one-to-one onto the config dataclasses.

Defaults live only in ``malaria_ray.config``; flags left unset are not passed, so the dataclass
default applies (and ``--help`` shows it). Errors a user can fix print one line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable, Sequence

from malaria_ray.config import (
    AUGMENT_POLICIES,
    BACKENDS,
    CLASS_WEIGHTS,
    LR_REFERENCE_BATCH,
    LR_SCALINGS,
    LR_SCHEDULES,
    PRECISIONS,
    RECIPES,
    SMOKE_TRAIN,
    SPLITS,
    STREAM_MODES,
    ConfigError,
    ScoreConfig,
    TrainConfig,
)

# Each kind of error a user can act on; anything else is a bug and keeps its traceback.
EXIT_USAGE = 2


def _user_errors() -> tuple[type[BaseException], ...]:
    from malaria_ray.config import CorpusError
    from malaria_ray.model import ModelError
    from malaria_ray.lease import LeaseHeld
    from malaria_ray.storage import StorageError
    from malaria_ray.tracking import RegistryError

    return (ConfigError, CorpusError, ModelError, RegistryError, StorageError, FileExistsError, LeaseHeld)


def _default(cls, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _flag(p: argparse.ArgumentParser, cls, name: str, help_: str, **kw) -> None:
    default = _default(cls, name)
    shown = "" if default is dataclasses.MISSING else f" (default: {default})"
    p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=help_ + shown, **kw)


def _switch(p: argparse.ArgumentParser, name: str, help_: str) -> None:
    p.add_argument("--" + name.replace("_", "-"), dest=name, action="store_true", default=None, help=help_)


def add_train_args(p: argparse.ArgumentParser) -> None:
    T = TrainConfig
    _flag(p, T, "data", "corpus URI: local path, file:// or s3:// with Parasitized/ and Uninfected/ folders "
          "(loose images, tar/zip shards or Parquet); required unless --resume")
    _flag(p, T, "output", "run directory URI (local or s3://); required unless --resume")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint, with "
                   "its saved config and split (no other flag is needed or taken)")
    _flag(p, T, "image_size", "input size in pixels (square)", type=int)
    _flag(p, T, "epochs", "training epochs", type=int)
    _flag(p, T, "batch_size", "global batch size, split across workers", type=int)
    _flag(p, T, "batch_size_per_worker", "images per worker per step; the global batch is this times "
          "--num-workers (instead of --batch-size)", type=int)
    _flag(p, T, "learning_rate", f"Adam learning rate (the peak, with a schedule) at a global batch of "
          f"{LR_REFERENCE_BATCH}", type=float)
    _flag(p, T, "lr_scaling", f"scale --learning-rate by the global batch / {LR_REFERENCE_BATCH}: none, "
          "sqrt (Adam's rule) or linear", choices=LR_SCALINGS)
    _flag(p, T, "lr_schedule", "learning-rate schedule", choices=LR_SCHEDULES)
    _flag(p, T, "warmup_epochs", "epochs of linear warm-up before the cosine decay", type=float)
    _flag(p, T, "label_smoothing", "label smoothing of the training loss", type=float)
    _flag(p, T, "class_weight", "balanced: weight each training image by n / (2 x its class's count), so either "
          "class carries half the loss (annotated fields are ~1:75 parasitized; NIH crops ~1:1, where the weights "
          "are ~1); none: every image 1", choices=CLASS_WEIGHTS)
    _flag(p, T, "precision", "fp32, or bf16: mixed bfloat16 compute with float32 weights and softmax "
          "(GPUs with bf16 units; CPUs with AVX512_BF16/AMX)", choices=PRECISIONS)
    _switch(p, "xla", "XLA-compile the forward and backward pass (try it on GPUs: bench/gpu_check.sh measures it; "
            "slower than the default on CPUs)")
    _flag(p, T, "stream", "on: decode the corpus once into Parquet shards in OUTPUT/decoded/ and stream them each "
          "epoch (corpora larger than the object store); off: hold it decoded in the object store; auto: on above "
          "a quarter of the object store", choices=STREAM_MODES)
    _flag(p, T, "num_workers", "Ray Train workers (one per GPU on a GPU cluster)", type=int)
    _switch(p, "use_gpu", "one GPU per worker")
    _flag(p, T, "cpus_per_worker", "CPUs reserved per Train worker", type=float)
    _flag(p, T, "split", "validation split: by patient (honest) or by image (the notebook's)", choices=SPLITS)
    _flag(p, T, "val_fraction", "share of images held out for validation", type=float)
    _flag(p, T, "weights", "initial ResNet50V2 weights: none, imagenet, or a URI of a notop .h5 file")
    _flag(p, T, "init_from", "fine-tune: start from every weight of a trained run (its directory or model.keras; "
          "the same --image-size), instead of --weights")
    _flag(p, T, "annotations", "--data holds field photographs and this file (IML-Malaria JSON or COCO) boxes their "
          "cells: train on the detected cells that match a box, cut as scoring cuts them (docs/fields.md)")
    _flag(p, T, "weights_sha256", "sha256 of the --weights file; a file that differs is refused")
    _flag(p, T, "seed", "seed for split, init and augmentation", type=int)
    _flag(p, T, "max_images", "use a class-balanced subset of this many images", type=int)
    _flag(p, T, "max_failures", "worker failures to recover from (resume from the last checkpoint)", type=int)
    _switch(p, "overwrite", "replace a finished run in --output")
    _switch(p, "export_h5", "also write model.h5 (legacy format, as the notebook)")
    _flag(p, T, "target_sensitivity", "operating point: the decision threshold is the highest whose validation "
          "sensitivity reaches this; recorded in model.json and used by scoring", type=float)
    _flag(p, T, "bn_recal_batches", "clean training batches per epoch on which BatchNorm statistics are "
          "re-estimated before validation and the checkpoint (0: off)", type=int)
    _flag(p, T, "augment_policy", "training augmentation: the notebook's warps, or cells: any rotation and a "
          "stain-like colour jitter", choices=AUGMENT_POLICIES)
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="train without augmentation (neither policy)")
    _flag(p, T, "mlflow_uri", "MLflow tracking store (http(s):// server, or sqlite:///PATH.db offline): the finished run's "
          "config, per-epoch metrics, operating point, patient-level evidence and artifacts are logged there and its "
          "model registered (needs malaria-ray[mlflow]; an unreachable store fails at the start)")
    _flag(p, T, "mlflow_experiment", "MLflow experiment of the run (with --mlflow-uri)")
    _flag(p, T, "registered_model", "registered model the run's model becomes a new version of (with --mlflow-uri)")
    p.add_argument("--recipe", choices=sorted(RECIPES), help="a named preset of the flags above (explicit flags "
                   + "still win): " + "; ".join(f"{k}: {v}" for k, v in RECIPES.items()))
    p.add_argument("--smoke", action="store_true", help=f"tiny preset for a quick check: {SMOKE_TRAIN}")


def add_score_args(p: argparse.ArgumentParser) -> None:
    S = ScoreConfig
    _flag(p, S, "input", "images to score: folder/prefix of images, tar, zip or Parquet (local or s3://)", required=True)
    _flag(p, S, "model", "trained model: a run directory, a model.keras URI, or a registered model "
          "models:/NAME@ALIAS or models:/NAME/VERSION (MLflow: --mlflow-uri)", required=True)
    _flag(p, S, "output", "output root shared by nightly runs (local or s3://)", required=True)
    _flag(p, S, "batch_size", "images per model call and per decode task", type=int)
    _flag(p, S, "actors", "model actors: a pool of exactly this many (default: 1 on CPU; with --gpus-per-actor, "
          "an autoscaling pool from 1 to --max-actors)", type=int)
    _flag(p, S, "precision", "fp32, or bf16: the model actors compute in mixed bfloat16 with a float32 softmax "
          "(GPUs with bf16 units)", choices=PRECISIONS)
    _flag(p, S, "backend", "the model actors' Keras backend: tensorflow, or jax (the actors compute with JAX "
          "and need no TensorFlow installed; the same predictions from the same model.keras)", choices=BACKENDS)
    _flag(p, S, "max_actors", "the autoscaling GPU pool's largest size (default: the GPUs in the cluster at the "
          "start / --gpus-per-actor)", type=int)
    _flag(p, S, "gpus_per_actor", "GPUs per model actor (0 on CPU-only clusters)", type=float)
    _flag(p, S, "cpus_per_actor", "CPUs per model actor", type=float)
    _flag(p, S, "memory_per_actor_gb", "memory Ray reserves for each model actor, GiB", type=float)
    _flag(p, S, "threshold", "P(Parasitized) at or above which a cell is called Parasitized; unset: the "
          "model's operating point from its model.json, or 0.5 without one", type=float)
    _switch(p, "skip_scored", "skip images this model already scored under --output (nightly; also completes "
            "runs that were killed before they finished)")
    _flag(p, S, "max_member_mb", "archive members larger than this (MiB, from the header) are error rows, not read",
          type=float)
    _flag(p, S, "max_compression_ratio", "zip members that unpack to more than this times their packed size are "
          "error rows, not read (zip bombs)", type=float)
    _flag(p, S, "read_timeout_s", "seconds one read of an input (a file, a piece of an archive, an S3 GET) may take; "
          "a read that takes longer is tried again, then becomes a transient error row", type=float)
    _flag(p, S, "read_attempts", "tries of a read that failed for a passing reason (timeout, dropped connection, "
          "throttling, 5xx), with backoff", type=int)
    _flag(p, S, "max_error_fraction", "error rows (unreadable images) above this share of the run's images: "
          "the run commits, then exits 3 with one line, so schedulers report a failed night", type=float)
    _flag(p, S, "alarm_drift", "drift alarm: after the run commits, exit 4 (predicted-Parasitized rate) or 5 (error "
          "rate) with one line when tonight's rate leaves the median +- this many robust standard deviations of the "
          "earlier nights (docs/operations.md, \"Drift band\"; unset: no alarm; 4 is a usual choice)", type=float)
    _flag(p, S, "alarm_nights", "finished nights before tonight that --alarm-drift's band is drawn from (5 at least "
          "before it can fire)", type=int)
    _flag(p, S, "commit_every_rows", "publish scored rows in a part of this many rows (a killed run keeps them)",
          type=int)
    _flag(p, S, "commit_every_minutes", "... or every this many minutes, whichever comes first", type=float)
    _flag(p, S, "run_id", "run identifier (default: UTC time + random suffix); a used one is refused")
    _flag(p, S, "manifest", "CSV or Parquet with path (relative to --input, or a full URI), slide_id, patient_id and "
          "optional label: identity and labels for archives whose file names carry none (wins over names and folders)")
    _switch(p, "fields", "the input holds photographs of whole smear fields, not cut-out cells: find every red cell "
            "(docs/fields.md), score each, and add fields.parquet (per field) beside the roll-ups")
    _flag(p, S, "cell_diameter", "with --fields: the red cells' diameter in pixels, for the whole archive "
          "(default: estimated per field)", type=float)
    _flag(p, S, "max_field_megapixels", "with --fields: a larger photograph is an error row, not detected", type=float)
    _flag(p, S, "annotations", "with --fields: the fields' annotated boxes (IML-Malaria JSON or COCO): the run is "
          "measured against them (detection, cells, fields, blocks of fields) in runs/<run_id>/field_eval.*")
    _flag(p, S, "mlflow_uri", "MLflow tracking store holding the registry of a --model models:/... "
          "(default: $MLFLOW_TRACKING_URI; needs malaria-ray[mlflow] on the driver and the scoring nodes)")


def config_from_args(cls, args: argparse.Namespace, preset: dict[str, Any] | None = None):
    names = {f.name for f in dataclasses.fields(cls)}
    values = dict(preset or {})
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    return cls(**values)


def parse_train(argv: Sequence[str] | None = None) -> tuple[TrainConfig, bool]:
    """(config, resume): with ``--resume RUN_DIR`` the config only names the run directory; the
    run's saved config replaces it (``train.plan_resume``)."""
    p = argparse.ArgumentParser(prog="malaria-ray train", description="Train the ResNet50V2 classifier with Ray Train.")
    add_train_args(p)
    args = p.parse_args(argv)
    if args.resume:
        given = [a for a in (argv or sys.argv[1:]) if a.startswith("--") and a.split("=")[0] != "--resume"]
        if given:
            raise ConfigError(f"--resume RUN_DIR takes no other flag (the run's saved config applies): {' '.join(given)}")
        return TrainConfig(data="(resume)", output=args.resume), True
    if args.batch_size is not None and args.batch_size_per_worker is not None:
        raise ConfigError("give --batch-size (global) or --batch-size-per-worker, not both")
    preset = {**(RECIPES[args.recipe] if args.recipe else {}), **(SMOKE_TRAIN if args.smoke else {})}
    if args.batch_size_per_worker is not None:
        preset.pop("batch_size", None)  # the per-worker form replaces a preset's global batch
    return config_from_args(TrainConfig, args, preset), False


def parse_score(argv: Sequence[str] | None = None) -> tuple[ScoreConfig, int | None]:
    """(config, metrics export port): the port is how this command's Ray runs, not part of the
    run, so it is not in the config (``runtime.ray_for``)."""
    p = argparse.ArgumentParser(prog="malaria-ray score", description="Bulk-score cell images with Ray Data.")
    add_score_args(p)
    p.add_argument("--metrics-export-port", type=int, metavar="PORT",
                   help="the local Ray this command starts serves Prometheus metrics (Ray's and the run's "
                   "ray_malaria_*, docs/operations.md) on http://127.0.0.1:PORT/metrics while it runs; not with "
                   "RAY_ADDRESS (a cluster's nodes export on their `ray start --metrics-export-port`)")
    args = p.parse_args(argv)
    return config_from_args(ScoreConfig, args), args.metrics_export_port


def score_config(argv: Sequence[str] | None = None) -> ScoreConfig:
    return parse_score(argv)[0]


def run_guarded(fn: Callable[[], int]) -> int:
    """Run ``fn``; a user-fixable error becomes one line on stderr and exit code 2."""
    from malaria_ray import logs

    logs.setup()
    try:
        return fn()
    except _user_errors() as exc:
        print(f"malaria-ray: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": _train, "score": _score, "report": _report, "overlay": _overlay, "synth": _synth,
                "migrate": _migrate}
    if not argv or argv[0] not in commands:
        print("usage: malaria-ray {train,score,report,overlay,synth,migrate} [--help]\n\n"
              "  train    train the classifier with Ray Train (writes a run directory)\n"
              "  score    bulk-score images with Ray Data (writes Parquet predictions, metrics, slides)\n"
              "  report   one HTML page of an output root's nights: trends, drift, the latest night's disputed cells\n"
              "  overlay  draw one scored field photograph with its cells' boxes coloured by their calls (PNG)\n"
              "  synth    write a small synthetic corpus (offline demos)\n"
              "  migrate  move an output root's predictions written by earlier versions into scored_date= partitions",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else EXIT_USAGE
    return commands[argv[0]](argv[1:])


def _train(argv: list[str]) -> int:
    def go() -> int:
        cfg, resume = parse_train(argv)  # before Ray starts: bad flags need no cluster
        from malaria_ray import runtime, train

        plan = train.plan_run(cfg, resume=resume)  # bad data/output paths fail here, before any start-up
        with runtime.ray_for("train"):
            train.fit(plan)
        return 0

    return run_guarded(go)


def _score(argv: list[str]) -> int:
    def go() -> int:
        cfg, metrics_port = parse_score(argv)
        from malaria_ray import runtime, score

        checked = score.preflight(cfg)
        with runtime.ray_for("score", metrics_port):
            return score.main(cfg, checked)

    return run_guarded(go)


def _report(argv: list[str]) -> int:
    from malaria_ray import nights

    p = argparse.ArgumentParser(prog="malaria-ray report", description="Write one self-contained HTML page of the "
                                "finished scoring runs (nights) under an output root: images, predicted-Parasitized "
                                "rate, error rate, throughput and slides called per night, the latest night's summary, "
                                "drift flag and disputed cells (docs/operations.md). Needs no Ray.")
    p.add_argument("output_root", metavar="OUTPUT_ROOT", help="the scoring output root (local or s3://)")
    p.add_argument("--out", help="HTML file to write, local or s3:// (default: OUTPUT_ROOT/report.html)")
    p.add_argument("--nights", type=int, default=30, help="nights plotted and listed, the latest last (default: 30)")
    p.add_argument("--drift-k", type=float, default=nights.DRIFT_K, help="the drift band's half-width in robust "
                   f"standard deviations, as score --alarm-drift takes it (default: {nights.DRIFT_K:g})")
    p.add_argument("--drift-nights", type=int, default=nights.DRIFT_NIGHTS, help="earlier nights the band is drawn "
                   f"from, as score --alarm-nights (default: {nights.DRIFT_NIGHTS})")
    args = p.parse_args(argv)

    def go() -> int:
        from malaria_ray import nightpage

        if args.nights < 1 or args.drift_k <= 0 or args.drift_nights < 1:
            raise ConfigError("--nights and --drift-nights must be >= 1 and --drift-k > 0")
        out, bands = nightpage.write(args.output_root, args.out, nights_shown=args.nights, k=args.drift_k,
                                     drift_nights=args.drift_nights)
        print(f"wrote {out}")
        for band in bands.values():
            print(("  DRIFT: " if band.flagged else "  ") + band.line())
        return 0

    return run_guarded(go)


def _overlay(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="malaria-ray overlay", description="Draw one field photograph that `score "
                                "--fields` scored, with the newest run's boxes: Parasitized calls red with their "
                                "probability, Uninfected green, annotated boxes dashed (docs/fields.md). Needs no Ray.")
    p.add_argument("--output", required=True, help="the scoring output root (local or s3://)")
    p.add_argument("--uri", required=True, help="the field's URI, as the uri column of OUTPUT/predictions spells it")
    p.add_argument("--annotations", help="IML-Malaria or COCO JSON (local or s3://): its boxes for this image, matched "
                   "by file name, drawn dashed")
    p.add_argument("--to", help="PNG to write, local or s3:// (default: <field name>.overlay.png here)")
    args = p.parse_args(argv)

    def go() -> int:
        from malaria_ray import overlay, storage

        image, cells = overlay.render_uri(args.output, args.uri, args.annotations)
        to = args.to or f"{cells.name.rsplit('.', 1)[0]}.overlay.png"
        storage.write_bytes(to, overlay.png_bytes(image))
        print(f"wrote {to}: {cells.caption()} (run {cells.run_id})")
        return 0

    return run_guarded(go)


def _synth(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="malaria-ray synth", description="Write a deterministic SYNTHETIC cell corpus, "
                                "or SYNTHETIC field photographs (--fields).")
    p.add_argument("dest", help="folder to create (Parasitized/ and Uninfected/ inside; with --fields, slide-<k>/)")
    p.add_argument("--n", type=int, default=None, help="images in total (default: 200 cells, or 20 fields)")
    p.add_argument("--size", type=int, default=96, help="cell image size in pixels (default: 96)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--fields", action="store_true", help="640x480 photographs of whole smear fields, many cells each, "
                   "with their true boxes in annotations.json, COCO (to try `score --fields [--annotations]`)")
    args = p.parse_args(argv)

    def go() -> int:
        if args.fields:
            from malaria_ray import synth_fields

            n = synth_fields.write_fields(args.dest, 20 if args.n is None else args.n, seed=args.seed)
            print(f"wrote {n} SYNTHETIC field photographs to {args.dest} (not real smears)")
            return 0
        from malaria_ray import synth

        n = synth.write_corpus(args.dest, 200 if args.n is None else args.n, size=args.size, seed=args.seed)
        print(f"wrote {n} SYNTHETIC cell images to {args.dest} (not NIH data)")
        return 0

    return run_guarded(go)


def _migrate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="malaria-ray migrate", description="Move the predictions parts of a scoring "
                                "output root written by earlier versions (predictions/<run_id>.partNNNNN.parquet) into "
                                "predictions/scored_date=YYYY-MM-DD/, each part whole, in one step; run it once, while "
                                "no scoring run writes there (it takes the root's lease). Needs no Ray.")
    p.add_argument("root", help="the scoring output root (local or s3://)")
    args = p.parse_args(argv)

    def go() -> int:
        from malaria_ray import migrate

        print(migrate.migrate(args.root).summary())
        return 0

    return run_guarded(go)


if __name__ == "__main__":
    sys.exit(main())
