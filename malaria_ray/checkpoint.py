"""The training checkpoint format and the finished-run marker.

A checkpoint is a directory that every Train worker writes after each epoch (a
MultiWorkerMirroredStrategy requirement; rank 0's copy is the one Ray Train keeps):

    model.keras     the model, weights and BatchNorm statistics included
    optimizer.npz   the optimizer's variables in order (``v0``, ``v1``, ...), its step count included
    state.json      ``{"epoch": <last finished epoch>, "history": [<one HISTORY_COLUMNS row per epoch>]}``

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

MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.keras", "optimizer.npz", "state.json"
# Columns of history.parquet: one row per epoch.
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds", "train_seconds",
                   "train_images")
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


def model_path(directory: str) -> str:
    return os.path.join(directory, MODEL_FILE)
