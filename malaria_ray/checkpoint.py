"""The training checkpoint format and the finished-run marker.

A checkpoint is a directory that every Train worker writes after each epoch (a
MultiWorkerMirroredStrategy requirement; rank 0's copy is the one Ray Train keeps):

    model.keras     the model, weights and BatchNorm statistics included
    optimizer.npz   the optimizer's variables in order (``v0``, ``v1``, ...), its step count included
    state.json      ``{"epoch": <last finished epoch>, "history": [<one HISTORY_COLUMNS row per epoch>]}``
    val_predictions.rankNNN.parquet
                    each worker's validation predictions of this epoch's model (uri, image_id,
                    label index, P(Parasitized)): Ray Train merges every rank's files into the
                    checkpoint, and the run directory's predictions come from the best one's

A run directory is finished when ``FINISHED_MARKER`` (``history.parquet``, written last) exists.
``RUN_FILE`` (``run.json``), written before training starts, holds the resolved config and the Ray
Train run name: ``--resume`` reads it, and Ray Train, given the same name and storage path,
continues from the latest checkpoint under ``checkpoints/<name>/``.
Imports TensorFlow only inside ``save`` and ``restore``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from malaria_ray import storage
from malaria_ray.schema import COL_IMAGE_ID, COL_TRAIN_LABEL, COL_URI, COL_VAL_PROB, MODEL_FILE

OPTIMIZER_FILE, STATE_FILE = "optimizer.npz", "state.json"
# Columns of history.parquet: one row per epoch.
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds", "train_seconds",
                   "train_images")
VAL_PREDICTIONS_PREFIX = "val_predictions.rank"
FINISHED_MARKER = "history.parquet"
RUN_FILE = "run.json"


def save(directory: str, model, optimizer, epoch: int, history: list[dict[str, Any]]) -> None:
    model.save(os.path.join(directory, MODEL_FILE))
    np.savez(os.path.join(directory, OPTIMIZER_FILE), **{f"v{i}": v.numpy() for i, v in enumerate(optimizer.variables)})
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump({"epoch": epoch, "history": history}, f)


def restore(directory: str, model, optimizer) -> dict[str, Any]:
    """Load weights and optimizer state saved by ``save`` into built objects; returns the state."""
    model.load_weights(os.path.join(directory, MODEL_FILE))
    saved = np.load(os.path.join(directory, OPTIMIZER_FILE))
    for i, var in enumerate(optimizer.variables):
        var.assign(saved[f"v{i}"])
    return read_state(directory)


def read_state(directory: str) -> dict[str, Any]:
    with open(os.path.join(directory, STATE_FILE)) as f:
        return json.load(f)


VAL_PREDICTION_COLUMNS = (COL_URI, COL_IMAGE_ID, COL_TRAIN_LABEL, COL_VAL_PROB)


def save_val_predictions(directory: str, rank: int, uris, image_ids, labels, probs) -> None:
    import pyarrow as pa

    table = pa.table({COL_URI: pa.array(uris, pa.string()), COL_IMAGE_ID: pa.array(image_ids, pa.string()),
                      COL_TRAIN_LABEL: pa.array(labels, pa.int8()), COL_VAL_PROB: pa.array(probs, pa.float32())})
    with open(os.path.join(directory, f"{VAL_PREDICTIONS_PREFIX}{rank:03d}.parquet"), "wb") as f:
        f.write(storage.table_bytes(table))


def read_val_predictions(directory: str):
    """Every rank's validation predictions in a checkpoint as one table (rank order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(f for f in os.listdir(directory) if f.startswith(VAL_PREDICTIONS_PREFIX))
    if not files:
        raise FileNotFoundError(f"checkpoint {directory} holds no {VAL_PREDICTIONS_PREFIX}*.parquet: "
                                "not a checkpoint of this version")
    tables = []
    for name in files:
        pf = pq.ParquetFile(os.path.join(directory, name))
        storage.require_columns(pf.schema_arrow, VAL_PREDICTION_COLUMNS, os.path.join(directory, name),
                                "checkpoint's validation predictions")
        tables.append(pf.read(columns=list(VAL_PREDICTION_COLUMNS)))
    return pa.concat_tables(tables)


def model_path(directory: str) -> str:
    return os.path.join(directory, MODEL_FILE)
