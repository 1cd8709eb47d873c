"""The vocabulary: every name that two modules (or a module and a file) must spell the same.

Class names; the listing's units and the container suffixes; raw input rows; row statuses; the
training rows and the workers' validation predictions; prediction, metrics and roll-up columns
and their Parquet schemas; a run's counts; the model artifact's files and the keys of its
``model.json``; member URIs. Every module takes these names from here, as do the tests
(tests/test_structure.py fails when one reappears as a literal elsewhere). Pure: imports only pyarrow.
"""

from __future__ import annotations

import pyarrow as pa

# ---------------------------------------------------------------- classes (folder names, labels)
CLASS_NAMES = ("Parasitized", "Uninfected")  # index 0 is the positive class
POSITIVE_CLASS, NEGATIVE_CLASS = CLASS_NAMES

# ---------------------------------------------------------------- identity and labels (every table)
COL_URI = "uri"
COL_LABEL = "label"
COL_SLIDE = "slide_id"
COL_PATIENT = "patient_id"
COL_SPLIT = "split"  # split.parquet of a training run: "train" or "val"

# ---------------------------------------------------------------- the listing (sources -> read tasks)
# One row per unit to read: a loose image, or a container of images; ``version`` is a loose file's
# size:mtime or size:ETag (null for containers).
COL_KIND, COL_VERSION = "kind", "version"
KIND_IMAGE, KIND_TAR, KIND_ZIP, KIND_PARQUET = "image", "tar", "zip", "parquet"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
ZIP_SUFFIXES = (".zip",)
PARQUET_SUFFIXES = (".parquet",)
# Entries a listing meets but never opens (docs/operations.md, "What a listing follows"): each is
# one row, so a night accounts for it. A link whose target is gone; a link loop (ELOOP) or a folder
# met again below itself; a pipe, socket or device named like an input; a link to a folder (not
# followed, counted); a folder or entry that could not be listed (denied, vanished, hung).
KIND_DANGLING, KIND_LINK_LOOP, KIND_SPECIAL = "dangling_link", "link_loop", "special_file"
KIND_FOLDER_LINK, KIND_UNLISTABLE = "folder_link", "unlistable"

# ---------------------------------------------------------------- raw input rows (sources -> decode)
COL_DATA = "data"  # encoded bytes of one image
COL_STATUS = "status"
COL_ERROR = "error"  # why a row could not be scored; None when it was
COL_LABEL_HINT = "label_hint"  # a label an input carries itself (a Parquet ``label`` column)
COL_SLIDE_HINT, COL_PATIENT_HINT = "slide_hint", "patient_hint"  # a Parquet input's slide_id / patient_id
COL_PIXELS = "pixels"  # decoded uint8 [size, size, 3]
# Whether an error row may succeed on another try (null on scored rows): a transient one (a read
# that timed out, a 5xx, a file that vanished or changed since it was listed) is read again by the
# next --skip-scored night; a permanent one (bytes that do not decode, a dangling link) is not.
COL_ERROR_KIND = "error_kind"
ERROR_TRANSIENT, ERROR_PERMANENT = "transient", "permanent"

# Row statuses: what a read task yields, then what decoding and scoring make of it.
STATUS_OK = "ok"  # bytes to score
STATUS_ERROR = "error"  # an input that exists but could not be read or decoded: an error row
STATUS_NON_IMAGE = "non_image"  # skipped and counted
STATUS_EMPTY = "empty_archive"  # counted
STATUS_HIDDEN = "hidden"  # an archive member under a "." or "_" folder, or named so (counted, not scored)
STATUS_DUPLICATE = "duplicate_name"  # a second archive member of the same name (counted, not scored)
STATUS_FOLDER_LINK = "folder_link"  # a link to a folder: not followed (counted, not scored)
STATUS_ALREADY = "already_scored"  # --skip-scored: this model scored the same bytes before
STATUS_MODEL_ERROR = "model_error"  # a scoring actor whose model did not load: the run stops

# ---------------------------------------------------------------- training rows (train -> workers)
# A decoded training or validation image: uri, image_id, ``image`` (uint8 pixels) and ``label``
# as a class index (0 = Parasitized), not a class name; the workers' validation predictions
# (``checkpoint.save_val_predictions``) carry uri, image_id, that label and ``prob``.
COL_TRAIN_IMAGE, COL_TRAIN_LABEL, COL_VAL_PROB = "image", "label", "prob"

# ---------------------------------------------------------------- predictions (scoring and training)
COL_IMAGE_ID = "image_id"
COL_PROB = "prob_parasitized"
COL_PRED = "pred_label"
COL_THRESHOLD = "threshold"
COL_MODEL_ID = "model_id"
COL_RUN_ID = "run_id"
COL_SCORED_AT = "scored_at"
COL_SOURCE_VERSION = "source_version"  # a loose file's size:mtime or size:ETag when listed; null in archives

# A cell found in a field photograph (``score --fields``): its image_id is the field's id plus its box
# (``fields.cell_id``) and its uri the field's; the columns below are null on a cut-out cell's row.
COL_FIELD_ID = "field_id"  # sha256 of the field image's bytes
COL_CELL = "cell"  # the cell's index in its field (0, 1, ...): a field scored has one row with cell 0
COL_BOX_X, COL_BOX_Y, COL_BOX_W, COL_BOX_H = "box_x", "box_y", "box_w", "box_h"  # in the field's pixels
COL_CELL_AREA = "cell_area"  # the cell's mask, full-size pixels
COL_FIELD_FLAGS = "field_flags"  # what detection noticed about the whole field (comma-separated), else null
COL_DETECTOR = "detector"  # ``DetectParams.key()`` of the detector that found the cell (part of the skip key)
FIELD_COLUMNS = (COL_FIELD_ID, COL_CELL, COL_BOX_X, COL_BOX_Y, COL_BOX_W, COL_BOX_H, COL_CELL_AREA, COL_FIELD_FLAGS,
                 COL_DETECTOR)

PREDICTIONS_SCHEMA = pa.schema([
    (COL_IMAGE_ID, pa.string()), (COL_URI, pa.string()), (COL_SLIDE, pa.string()),
    (COL_PATIENT, pa.string()), (COL_LABEL, pa.string()), (COL_PROB, pa.float32()),
    (COL_PRED, pa.string()), (COL_THRESHOLD, pa.float64()), (COL_MODEL_ID, pa.string()),
    (COL_RUN_ID, pa.string()), (COL_SCORED_AT, pa.timestamp("us", tz="UTC")), (COL_ERROR, pa.string()),
    (COL_SOURCE_VERSION, pa.string()), (COL_ERROR_KIND, pa.string()),
    (COL_FIELD_ID, pa.string()), (COL_CELL, pa.int32()), (COL_BOX_X, pa.int32()), (COL_BOX_Y, pa.int32()),
    (COL_BOX_W, pa.int32()), (COL_BOX_H, pa.int32()), (COL_CELL_AREA, pa.int64()), (COL_FIELD_FLAGS, pa.string()),
    (COL_DETECTOR, pa.string()),
])

# ---------------------------------------------------------------- metrics.parquet
METRIC_COUNTS = ("tp", "fp", "fn", "tn")
METRIC_RATES = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc")
COL_N_IMAGES, COL_N_ERRORS, COL_N_LABELLED = "n_images", "n_errors", "n_labelled"
METRIC_BASE_COLUMNS = (COL_RUN_ID, COL_MODEL_ID, COL_THRESHOLD, COL_N_IMAGES, COL_N_ERRORS, COL_N_LABELLED,
                       *METRIC_COUNTS, *METRIC_RATES)  # then NIGHT_COLUMNS (below): METRICS_COLUMNS

# ---------------------------------------------------------------- roll-ups: slides.parquet, patients.parquet
# One row per slide (level "slide") and per patient (level "patient"), the same columns in a
# scoring root's slides.parquet and a training run's patients.parquet (``metrics.evidence``).
COL_LEVEL, COL_N_CELLS, COL_N_PRED_POS = "level", "n_cells", "n_pred_parasitized"
COL_FRAC_POS, COL_MEAN_PROB = "frac_parasitized", "mean_prob"
COL_N_LABEL_POS, COL_N_LABEL_NEG = "n_label_parasitized", "n_label_uninfected"
# frac_parasitized is the parasitemia estimate; its Wilson 95% interval, and the call by
# metrics.CALL_RULE (null where the model records no operating point to take a false-positive rate from).
COL_FRAC_LOW, COL_FRAC_HIGH, COL_CALL = "frac_parasitized_ci_low", "frac_parasitized_ci_high", "call_parasitized"
COL_SUM_PROB = "sum_prob"  # a partial sum inside the roll-up (``metrics.evidence_sums``), never written
# The fraction corrected for the classifier's known error (``metrics.Correction``: Rogan-Gladen) with
# its 95% interval, null where it is not applied; ``correction`` says which, or why not.
COL_FRAC_CORR, COL_FRAC_CORR_LOW, COL_FRAC_CORR_HIGH = ("frac_corrected", "frac_corrected_ci_low",
                                                        "frac_corrected_ci_high")
COL_CORRECTION = "correction"
CORRECTION_COLUMNS = ((COL_FRAC_CORR, pa.float64()), (COL_FRAC_CORR_LOW, pa.float64()),
                      (COL_FRAC_CORR_HIGH, pa.float64()), (COL_CORRECTION, pa.string()))
SLIDES_SCHEMA = pa.schema([(COL_LEVEL, pa.string()), (COL_SLIDE, pa.string()), (COL_PATIENT, pa.string()),
                           (COL_N_CELLS, pa.int64()), (COL_N_PRED_POS, pa.int64()), (COL_FRAC_POS, pa.float64()),
                           (COL_MEAN_PROB, pa.float64()), (COL_N_LABEL_POS, pa.int64()),
                           (COL_N_LABEL_NEG, pa.int64()), (COL_MODEL_ID, pa.string()), (COL_FRAC_LOW, pa.float64()),
                           (COL_FRAC_HIGH, pa.float64()), (COL_CALL, pa.bool_()), *CORRECTION_COLUMNS])

# ---------------------------------------------------------------- metrics.parquet: the night columns
# A night, for ``malaria-ray report`` and the drift alarms (``malaria_ray.nights``): when it ran, how
# fast, its error rows by kind, what it called. ``n_images`` counts rows (scored + error); in a
# ``--fields`` run those are cells, and ``n_fields`` counts the photographs (null otherwise);
# ``cells`` says which kind of cell the rows are (``CELLS_CROPS`` or ``CELLS_FIELDS``). The error
# rate is over the images read (a field photograph that failed is one); the positive rate is over
# the cells scored; the slide calls are the night's own cells per slide by ``metrics.CALL_RULE``
# (null where the model has no false-positive rate to call with). Older rows lack these: null.
COL_STARTED_AT, COL_FINISHED_AT, COL_SECONDS = "started_at", "finished_at", "seconds"
COL_IMAGES_PER_S, COL_N_SCORED, COL_N_FIELDS, COL_CELLS = "images_per_s", "n_scored", "n_fields", "cells"
COL_N_TRANSIENT, COL_N_PERMANENT, COL_ERROR_RATE = "n_errors_transient", "n_errors_permanent", "error_rate"
COL_POS_RATE = "pred_parasitized_rate"
COL_N_SLIDES, COL_N_SLIDES_POS = "n_slides", "n_slides_called_parasitized"
NIGHT_COLUMNS = ((COL_STARTED_AT, pa.timestamp("us", tz="UTC")), (COL_FINISHED_AT, pa.timestamp("us", tz="UTC")),
                 (COL_SECONDS, pa.float64()), (COL_IMAGES_PER_S, pa.float64()), (COL_N_SCORED, pa.int64()),
                 (COL_N_FIELDS, pa.int64()), (COL_CELLS, pa.string()), (COL_N_TRANSIENT, pa.int64()),
                 (COL_N_PERMANENT, pa.int64()), (COL_ERROR_RATE, pa.float64()), (COL_N_PRED_POS, pa.int64()),
                 (COL_POS_RATE, pa.float64()), (COL_N_SLIDES, pa.int64()), (COL_N_SLIDES_POS, pa.int64()))
METRICS_COLUMNS = (*METRIC_BASE_COLUMNS, *(name for name, _ in NIGHT_COLUMNS))


# ---------------------------------------------------------------- fields.parquet (``score --fields``)
# One row per field photograph of the current model: the cells found and called, the fraction called
# (the field's parasitemia estimate) with its Wilson 95% interval, detection's flags, or the error
# that left the field unscored (no cells, undecodable...). Identity as the roll-ups have it.
FIELDS_SCHEMA = pa.schema([(COL_URI, pa.string()), (COL_FIELD_ID, pa.string()), (COL_SLIDE, pa.string()),
                           (COL_PATIENT, pa.string()), (COL_N_CELLS, pa.int64()), (COL_N_PRED_POS, pa.int64()),
                           (COL_FRAC_POS, pa.float64()), (COL_FRAC_LOW, pa.float64()), (COL_FRAC_HIGH, pa.float64()),
                           (COL_MEAN_PROB, pa.float64()), (COL_FIELD_FLAGS, pa.string()), (COL_ERROR, pa.string()),
                           (COL_DETECTOR, pa.string()), (COL_MODEL_ID, pa.string()), (COL_RUN_ID, pa.string()),
                           *CORRECTION_COLUMNS])

# ---------------------------------------------------------------- a scoring run's counts (summary, manifest)
COUNT_SCORED, COUNT_ERRORS = "scored", "errors"  # rows scored; error rows (besides the row statuses)
COUNT_FIELDS = "fields_scored"  # score --fields: field photographs whose cells were scored (each a file)

# ---------------------------------------------------------------- the model artifact and its model.json
MODEL_FILE, CONTRACT_FILE, H5_FILE = "model.keras", "model.json", "model.h5"
# The preprocessing contract (``model.contract``) and the operating point (``trainrun.operating_point``)
KEY_IMAGE_SIZE, KEY_SCALE, KEY_RESIZE, KEY_CHANNELS = "image_size", "scale", "resize", "channels"
KEY_CLASSES, KEY_POSITIVE_INDEX, KEY_MODEL_ID = "classes", "positive_index", "model_id"
KEY_THRESHOLD, KEY_TARGET_SENSITIVITY, KEY_THRESHOLD_SOURCE = "threshold", "target_sensitivity", "threshold_source"
KEY_VAL_SENSITIVITY, KEY_VAL_SPECIFICITY = "val_sensitivity", "val_specificity"
# How many validation cells each rate was measured on, and their kind: the correction of a
# parasitemia needs rates measured on the same kind of cells (a model.json without it: cut-out cells).
KEY_VAL_N_POSITIVE, KEY_VAL_N_NEGATIVE, KEY_VAL_CELLS = "val_n_parasitized", "val_n_uninfected", "val_cells"
CELLS_CROPS, CELLS_FIELDS = "cut-out cells", "cells found in field photographs"
# How images are resized to the model's input (PIL's filter of that name): what training used, and
# what scoring assumes for a bare ``.keras`` without a model.json.
RESIZE_DEFAULT = "bilinear"

# ---------------------------------------------------------------- member URIs
# An image inside an archive or a Parquet file is ``<container uri>#<member name>``. Only a
# container's own suffix before the ``#`` makes it a member URI, so a loose file whose path holds
# a ``#`` stays one path.
MEMBER_SEP = "#"
CONTAINER_SUFFIXES = TAR_SUFFIXES + ZIP_SUFFIXES + PARQUET_SUFFIXES


def member_uri(container: str, member: str) -> str:
    """The URI of ``member`` (a name inside the archive, or ``row=N``) of ``container``."""
    return f"{container}{MEMBER_SEP}{member}"


def split_member_uri(uri: str) -> tuple[str, str | None]:
    """(container URI, member name) of a member URI; (uri, None) for anything else."""
    start = 0
    while (i := uri.find(MEMBER_SEP, start)) >= 0:
        if uri[:i].lower().endswith(CONTAINER_SUFFIXES):
            return uri[:i], uri[i + 1:]
        start = i + 1
    return uri, None


def path_within(uri: str) -> str:
    """The path whose folders and file name carry an image's label and identity: the member name
    inside a container, else the URI itself."""
    container, member = split_member_uri(uri)
    return member if member is not None else container
