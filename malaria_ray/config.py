"""Typed run configuration: the only place defaults live.

The CLI maps flags one-to-one onto these fields; the resolved config is saved as
``config.json`` beside every model and every output. Crossing into a Ray worker,
pass ``dataclasses.asdict(cfg)`` and rebuild with ``TrainConfig.from_dict``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

DEFAULT_THRESHOLD = 0.5  # P(Parasitized) at or above which a cell is called Parasitized (argmax)
SPLITS = ("patient", "random")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")
BACKENDS = ("tensorflow", "jax")  # Keras 3 backends a scoring actor runs on (malaria_ray.backends)
AUGMENT_POLICIES = ("notebook", "cells")  # preprocess.augment_tf
CLASS_WEIGHTS = ("balanced", "none")  # corpus.class_weights
STREAM_MODES = ("auto", "on", "off")  # train.should_stream
# --lr-scaling: "none" trains at --learning-rate whatever the batch; "sqrt" (the rule for Adam) and
# "linear" (the rule for SGD) scale it by the global batch over the notebook's batch of 32.
LR_SCALINGS = ("none", "sqrt", "linear")
LR_REFERENCE_BATCH = 32


class ConfigError(ValueError):
    """A configuration value that cannot work; the message is shown to the user as is."""


class CorpusError(ValueError):
    """Input data that cannot be trained on or scored; the message is shown to the user as is."""


class _Serialized:
    """Round trip through plain dicts (into Ray workers) and JSON (``config.json``)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(redacted(dataclasses.asdict(self)), indent=2, sort_keys=True)


def redacted(d: dict[str, Any]) -> dict[str, Any]:
    """A resolved config for files and logs: URI credentials and query strings removed."""
    from malaria_ray.storage import redact

    return {k: redact(v) if isinstance(v, str) else v for k, v in d.items()}


@dataclass(frozen=True)
class TrainConfig(_Serialized):
    data: str
    output: str
    image_size: int = 128
    epochs: int = 30
    batch_size: int = 32  # global: split across workers
    batch_size_per_worker: int | None = None  # set: the global batch is this x num_workers
    learning_rate: float = 1e-3  # Keras Adam default, as the notebook; at the reference batch with lr_scaling
    lr_scaling: str = "none"  # how learning_rate follows a global batch other than LR_REFERENCE_BATCH
    lr_schedule: str = "constant"  # the notebook's; "cosine": decay to 0 over the run
    warmup_epochs: float = 0.0  # linear warm-up from 0 before the cosine decay
    label_smoothing: float = 0.0
    class_weight: str = "balanced"  # each class weighs half of the training loss (field cells are ~1:75)
    precision: str = "fp32"  # "bf16": mixed bfloat16 compute, float32 variables and softmax
    xla: bool = False  # XLA-compile the forward and backward pass (GPUs; slower than oneDNN on CPUs)
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    split: str = "patient"
    val_fraction: float = 0.3
    weights: str = "none"
    weights_sha256: str | None = None  # checked against a --weights file before Keras reads it
    init_from: str | None = None  # a trained run (or its model.keras): start from all its weights (fine-tuning)
    annotations: str | None = None  # --data holds field photographs boxed by this file (malaria_ray.fieldcrops)
    seed: int = 0
    max_images: int | None = None
    max_failures: int = 2
    overwrite: bool = False
    export_h5: bool = False
    augment: bool = True
    augment_policy: str = "notebook"  # "cells": any rotation and a stain-like colour jitter (preprocess)
    bn_recal_batches: int = 50  # per epoch: BatchNorm statistics re-estimated on this many clean batches
    synthetic: bool = False  # set when the corpus came from `malaria-ray synth`
    stream: str = "auto"  # decode once into Parquet shards and stream them (train.should_stream)
    recipe: str | None = None  # the --recipe preset the run started from, if any
    target_sensitivity: float = 0.97  # the operating point: threshold chosen on validation for this
    mlflow_uri: str | None = None  # log the finished run to this MLflow tracking store and register its model
    mlflow_experiment: str = "malaria-ray"
    registered_model: str = "malaria-ray"  # the registry name each run's model becomes a new version of

    def __post_init__(self) -> None:
        if self.batch_size_per_worker is not None:
            if self.batch_size_per_worker < 1:
                raise ConfigError(f"--batch-size-per-worker must be >= 1, got {self.batch_size_per_worker}")
            object.__setattr__(self, "batch_size", self.batch_size_per_worker * self.num_workers)
        validate_train(self)

    @property
    def peak_learning_rate(self) -> float:
        """The learning rate training uses: ``learning_rate`` scaled from LR_REFERENCE_BATCH to the
        global batch by ``lr_scaling`` (docs/training.md, "Batch size and learning rate")."""
        ratio = self.batch_size / LR_REFERENCE_BATCH
        return self.learning_rate * {"none": 1.0, "linear": ratio, "sqrt": ratio ** 0.5}[self.lr_scaling]

    def with_absolute_inputs(self) -> "TrainConfig":
        """Local ``--init-from`` and ``--weights`` files as absolute paths: Ray Train runs each worker
        in a working directory of its own, where a path relative to the user's shell names nothing."""
        import os

        from malaria_ray.storage import is_remote, local_path

        def absolute(uri: str | None) -> str | None:
            return uri if uri is None or is_remote(uri) else os.path.abspath(local_path(uri))

        weights = self.weights if self.weights in ("none", "imagenet") else absolute(self.weights)
        return dataclasses.replace(self, init_from=absolute(self.init_from), weights=weights)


def validate_train(cfg: TrainConfig) -> None:
    if not cfg.data:
        raise ConfigError("--data is required")
    if not cfg.output:
        raise ConfigError("--output is required")
    if cfg.image_size < 32:
        raise ConfigError(f"--image-size must be >= 32 (ResNet50V2 downsamples 32x), got {cfg.image_size}")
    if cfg.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {cfg.epochs}")
    if cfg.num_workers < 1:
        raise ConfigError(f"--num-workers must be >= 1, got {cfg.num_workers}")
    if cfg.batch_size < cfg.num_workers or cfg.batch_size % cfg.num_workers:
        raise ConfigError(
            f"--batch-size ({cfg.batch_size}) is the global batch and must be a multiple of "
            f"--num-workers ({cfg.num_workers})"
        )
    if cfg.split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {cfg.split!r}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in (0, 1), got {cfg.val_fraction}")
    if cfg.recipe is not None and cfg.recipe not in RECIPES:
        raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)}, got {cfg.recipe!r}")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.augment_policy not in AUGMENT_POLICIES:
        raise ConfigError(f"--augment-policy must be one of {', '.join(AUGMENT_POLICIES)}, "
                          f"got {cfg.augment_policy!r}")
    if not cfg.augment and cfg.augment_policy != "notebook":
        raise ConfigError(f"--augment-policy {cfg.augment_policy} has no effect with --no-augment: give one or the other")
    if cfg.stream not in STREAM_MODES:
        raise ConfigError(f"--stream must be one of {', '.join(STREAM_MODES)}, got {cfg.stream!r}")
    if cfg.lr_scaling not in LR_SCALINGS:
        raise ConfigError(f"--lr-scaling must be one of {', '.join(LR_SCALINGS)}, got {cfg.lr_scaling!r}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {cfg.lr_schedule!r}")
    if cfg.warmup_epochs < 0 or cfg.warmup_epochs >= cfg.epochs:
        raise ConfigError(f"--warmup-epochs must be in [0, --epochs), got {cfg.warmup_epochs}")
    if cfg.warmup_epochs and cfg.lr_schedule == "constant":
        raise ConfigError("--warmup-epochs needs --lr-schedule cosine")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise ConfigError(f"--label-smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    if cfg.class_weight not in CLASS_WEIGHTS:
        raise ConfigError(f"--class-weight must be one of {', '.join(CLASS_WEIGHTS)}, got {cfg.class_weight!r}")
    if not 0.5 <= cfg.target_sensitivity < 1.0:
        raise ConfigError(f"--target-sensitivity must be in [0.5, 1), got {cfg.target_sensitivity}")
    if cfg.bn_recal_batches < 0:
        raise ConfigError(f"--bn-recal-batches must be >= 0, got {cfg.bn_recal_batches}")
    if cfg.max_images is not None and cfg.max_images < 4:
        raise ConfigError(f"--max-images must be >= 4, got {cfg.max_images}")
    if not cfg.mlflow_uri and (cfg.mlflow_experiment != "malaria-ray" or cfg.registered_model != "malaria-ray"):
        raise ConfigError("--mlflow-experiment and --registered-model apply to runs logged to MLflow: add --mlflow-uri")
    if not cfg.mlflow_experiment or not cfg.registered_model:
        raise ConfigError("--mlflow-experiment and --registered-model must not be empty")


# Presets a developer can run in a minute on a laptop; the CLI's --smoke applies SMOKE_TRAIN.
SMOKE_TRAIN: dict[str, Any] = {
    "image_size": 64,
    "epochs": 2,
    "batch_size": 16,
    "max_images": 256,
}

# ``--recipe NAME``: a named preset of training flags; flags given explicitly still win.
# "cpu": the reference recipe for CPU-only nodes (docs/training.md has its per-split results and
# time on a 2-core machine): 64 px, where a CPU trains ~5x faster than at the notebook's 128 px,
# a one-epoch warm-up and a cosine decay to 0 in place of the notebook's constant learning rate.
RECIPES: dict[str, dict[str, Any]] = {
    "cpu": {
        "image_size": 64,
        "epochs": 16,
        "batch_size": 32,
        "learning_rate": 1e-3,
        "lr_schedule": "cosine",
        "warmup_epochs": 1.0,
    },
}


@dataclass(frozen=True)
class ScoreConfig(_Serialized):
    input: str
    model: str
    output: str
    batch_size: int = 256  # per model call; CPU scoring measured 5% faster than at 64 (docs/benchmarks.md)
    actors: int | None = None  # a fixed pool; default: 1 on CPU, an autoscaling pool of GPU actors
    max_actors: int | None = None  # GPU pool's upper bound; default: the GPUs in the cluster / --gpus-per-actor
    precision: str = "fp32"  # "bf16": the model actors compute in mixed bfloat16 (GPUs)
    backend: str = "tensorflow"  # the model actors' Keras backend; "jax": scoring nodes need not import TensorFlow
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    memory_per_actor_gb: float = 2.0  # 128 px, batch 256 on CPU: ~1.5 GiB anonymous measured
    threshold: float | None = None  # None: the model's operating point (model.json), else DEFAULT_THRESHOLD
    skip_scored: bool = False
    max_member_mb: float = 64.0  # an archive member larger than this is an error row, not read
    max_compression_ratio: float = 100.0  # a zip member unpacking to more than this x its packed size: error row
    # One read of an input (a loose file, a piece of an archive, an S3 GET) that takes longer is
    # abandoned: a hung mount or a stalled object store becomes a transient error row, not a stalled night.
    read_timeout_s: float = 60.0
    read_attempts: int = 3  # tries of a read that failed for a passing reason (timeout, 5xx), with backoff
    max_error_fraction: float = 0.05  # above it the run still commits, and exits 3 to page someone
    # Drift alarms (``malaria_ray.nights``): after the run commits, tonight's predicted-Parasitized rate or
    # error rate outside median +- this many robust SDs of the last ``alarm_nights`` nights exits 4 or 5.
    alarm_drift: float | None = None  # None: no drift alarm
    alarm_nights: int = 14
    commit_every_rows: int = 100_000  # a part of the predictions is published at this many rows ...
    commit_every_minutes: float = 10.0  # ... or after this long, whichever comes first
    run_id: str | None = None  # default: UTC timestamp + short random suffix
    manifest: str | None = None  # CSV/Parquet: path, slide_id, patient_id[, label]; wins over names and folders
    fields: bool = False  # the input holds field photographs: find the red cells, score each (malaria_ray.fields)
    cell_diameter: float | None = None  # px; None: estimated per field (score --fields)
    max_field_megapixels: float = 25.0  # a larger field photograph is an error row (detection time grows with pixels)
    annotations: str | None = None  # IML-Malaria or COCO JSON: measure a --fields run against its boxes
    mlflow_uri: str | None = None  # the registry of a --model models:/NAME@ALIAS (default: MLFLOW_TRACKING_URI)

    def __post_init__(self) -> None:
        for name in ("input", "model", "output"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.actors is not None and self.actors < 1:
            raise ConfigError(f"--actors must be >= 1, got {self.actors}")
        if self.max_actors is not None and self.max_actors < 1:
            raise ConfigError(f"--max-actors must be >= 1, got {self.max_actors}")
        if self.actors is not None and self.max_actors is not None:
            raise ConfigError("give --actors (a fixed pool) or --max-actors (an autoscaling pool), not both")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.gpus_per_actor < 0:
            raise ConfigError(f"--gpus-per-actor must be >= 0, got {self.gpus_per_actor}")
        if self.max_member_mb <= 0 or self.max_compression_ratio < 1:
            raise ConfigError("--max-member-mb must be > 0 and --max-compression-ratio >= 1")
        if self.read_timeout_s <= 0 or self.read_attempts < 1:
            raise ConfigError("--read-timeout-s must be > 0 and --read-attempts >= 1")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ConfigError(f"--max-error-fraction must be in [0, 1], got {self.max_error_fraction}")
        if self.alarm_drift is not None and self.alarm_drift <= 0:
            raise ConfigError(f"--alarm-drift must be > 0 (robust standard deviations), got {self.alarm_drift}")
        if self.alarm_nights < 1:
            raise ConfigError(f"--alarm-nights must be >= 1, got {self.alarm_nights}")
        if self.commit_every_rows < 1 or self.commit_every_minutes <= 0:
            raise ConfigError("--commit-every-rows must be >= 1 and --commit-every-minutes > 0")
        if self.memory_per_actor_gb <= 0:
            raise ConfigError(f"--memory-per-actor-gb must be > 0, got {self.memory_per_actor_gb}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--threshold must be in [0, 1], got {self.threshold}")
        if self.cell_diameter is not None and self.cell_diameter <= 0:
            raise ConfigError(f"--cell-diameter must be > 0 px, got {self.cell_diameter}")
        if self.max_field_megapixels <= 0:
            raise ConfigError(f"--max-field-megapixels must be > 0, got {self.max_field_megapixels}")
        if not self.fields and (self.cell_diameter is not None or self.max_field_megapixels != 25.0
                                or self.annotations is not None):
            raise ConfigError("--cell-diameter, --max-field-megapixels and --annotations apply to field photographs: "
                              "add --fields")
