"""The Parquet output contract (DESIGN.md): column names shared by writers, readers and tests."""

from __future__ import annotations

import pyarrow as pa

# predictions: one row per input image (per run), errors included
IMAGE_ID = "image_id"  # sha256 of the file's bytes
URI = "uri"
SLIDE_ID = "slide_id"
PATIENT_ID = "patient_id"
LABEL = "label"  # "Parasitized" / "Uninfected" / null when unknown
PROB = "prob_parasitized"
PRED = "pred_label"
THRESHOLD = "threshold"
MODEL_ID = "model_id"
RUN_ID = "run_id"
SCORED_AT = "scored_at"
ERROR = "error"

PREDICTIONS = pa.schema([
    (IMAGE_ID, pa.string()), (URI, pa.string()), (SLIDE_ID, pa.string()), (PATIENT_ID, pa.string()),
    (LABEL, pa.string()), (PROB, pa.float32()), (PRED, pa.string()), (THRESHOLD, pa.float32()),
    (MODEL_ID, pa.string()), (RUN_ID, pa.string()), (SCORED_AT, pa.timestamp("us", tz="UTC")),
    (ERROR, pa.string()),
])

# metrics: one row per run (and per split where relevant)
N_IMAGES = "n_images"
N_ERRORS = "n_errors"
SPLIT = "split"
