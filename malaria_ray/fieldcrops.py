"""Annotated field photographs -> a training corpus of cell crops, cut as scoring cuts them.

``train --data FIELDS --annotations FILE`` trains on field photographs with boxed cells (IML-Malaria
JSON or COCO). Each field is run through the scoring detector (``detect.detect_cells``), and each
detected cell that matches an annotated box with a class (IoU >= 0.5, one to one) becomes a
training crop with the box's label (parasite stages -> Parasitized, ``red blood cell`` ->
Uninfected) and its stage: training sees exactly the crops scoring will see. ``difficult`` boxes,
annotated cells the detector did not find (their crop would not look like a scored one) and
detected cells no box matches are left out and counted.

Identity: fields in two or more folders are grouped by folder (one folder per slide); fields in one
folder are grouped in name order into runs of ``group_fields`` consecutive shots (neighbouring
serial numbers are likely one slide). A group is the crops' ``slide_id`` and ``patient_id``, so
the patient split of training keeps a group's fields on one side.

The crops go to Parquet files (PNG bytes, label, slide_id, patient_id, stage, field, box) that the
existing Parquet corpus path reads. Imports neither Ray nor TensorFlow.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import posixpath
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image

from malaria_ray import listing, reads, resources, storage
from malaria_ray.annotations import FieldBoxes, match_boxes
from malaria_ray.detect import FieldError, detect_cells
from malaria_ray.fieldeval import field_name, load_truth
from malaria_ray.fields import decode_field
from malaria_ray.preprocess import DecodeError
from malaria_ray.schema import COL_KIND, COL_LABEL, COL_PATIENT, COL_SLIDE, COL_URI, COL_VERSION, KIND_IMAGE, POSITIVE_CLASS
from malaria_ray.segment import DetectParams

GROUP_FIELDS = 10  # consecutive fields per identity group (one slide, presumably)
CROP_SIZE = 128  # px of the crops written: the product's default image size (training resizes to its own)
SUMMARY_FILE = "crops.json"
COL_STAGE, COL_FIELD = "stage", "field"


def annotated_crops(image: np.ndarray, truth: FieldBoxes, size: int = CROP_SIZE,
                    params: DetectParams | None = None) -> tuple[list[dict], dict[str, int]]:
    """(one dict per matched cell: crop, label, stage, box; counts) of one field."""
    det = detect_cells(image, size, params)
    m = match_boxes(truth.all_boxes(), det.boxes)
    rows = []
    for ti, pi in (m.pairs if len(m.pairs) else []):
        if ti >= len(truth.boxes):  # a difficult box: a cell, but no class to learn
            continue
        rows.append({"crop": det.crops[pi], COL_LABEL: truth.labels[ti], COL_STAGE: truth.stages[ti],
                     "box": [int(v) for v in det.boxes[pi]]})
    labelled = len(truth.boxes)
    return rows, {"annotated": labelled, "difficult": len(truth.difficult), "detected": len(det),
                  "matched": len(rows), "annotated_not_found": labelled - len(rows),
                  "detected_unmatched": int(len(det) - len(m.pairs))}


def _one_field(args) -> tuple[str, list[dict], dict[str, int] | str]:
    path, version, truth, size, params = args
    try:  # a bounded read, retried on transient failures (``malaria_ray.reads``), as scoring reads
        img = decode_field(reads.read_whole(path, version, reads.ReadPolicy()))
        rows, counts = annotated_crops(img, truth, size, DetectParams.from_dict(params))
    except (DecodeError, FieldError, OSError) as exc:
        return path, [], f"{type(exc).__name__}: {exc}"
    for r in rows:
        buf = io.BytesIO()
        Image.fromarray(r.pop("crop")).save(buf, "PNG")
        r["image"] = buf.getvalue()
    return path, rows, counts


def list_fields(data_uri: str) -> dict[str, str | None]:
    """{uri: listing version} of the loose images under ``data_uri``, listed as scoring lists them
    (``listing.list_units``: links to files followed, odd entries never opened)."""
    t = listing.list_units(data_uri).table
    return {u: v for k, u, v in zip(t.column(COL_KIND).to_pylist(), t.column(COL_URI).to_pylist(),
                                    t.column(COL_VERSION).to_pylist()) if k == KIND_IMAGE}


def identity_groups(paths: list[str], group_fields: int = GROUP_FIELDS) -> dict[str, str]:
    """Each field's identity group: its folder, where the fields sit in two or more folders (an
    archive of one folder per slide), else its run of ``group_fields`` consecutive names."""
    folders = {path: posixpath.dirname(path) for path in paths}
    if len(set(folders.values())) >= 2:
        return {path: posixpath.basename(folder) or folder for path, folder in folders.items()}
    return {path: f"fields-{i // group_fields:04d}" for i, path in enumerate(sorted(paths, key=field_name))}


def write_corpus(data_uri: str, annotations_uri: str, out_uri: str, size: int = CROP_SIZE,
                 params: DetectParams | None = None, group_fields: int = GROUP_FIELDS,
                 workers: int | None = None) -> dict:
    """Cut the annotated fields under ``data_uri`` into a Parquet crop corpus at ``out_uri``
    (``crops.parquet`` and ``crops.json``, the counts); returns the counts. Raises
    ``AnnotationError`` for an unreadable annotation file, ``CorpusError`` when no field matches."""
    import pyarrow as pa

    from malaria_ray.config import CorpusError

    truth = load_truth(annotations_uri)
    versions = list_fields(data_uri)
    paths = [p for p in versions if field_name(p) in truth]
    if not paths:
        raise CorpusError(f"no image under {data_uri} is named in {annotations_uri}: nothing to train on")
    p = (params or DetectParams()).to_dict()
    group = identity_groups(paths, group_fields)
    totals: dict[str, int] = {}
    errors, rows = [], []
    # forkserver, not fork: the driver is multi-threaded (TensorFlow, Ray, the bounded reader), and a
    # forked child can inherit a lock some other thread held (Python 3.12+ warns; 3.14's default).
    with ProcessPoolExecutor(workers or resources.usable_cpus(), mp_context=multiprocessing.get_context("forkserver")) as pool:
        for path, found, counts in pool.map(_one_field, [(q, versions[q], truth[field_name(q)], size, p) for q in paths]):
            if isinstance(counts, str):
                errors.append(f"{path}: {counts}")
                continue
            for k, v in counts.items():
                totals[k] = totals.get(k, 0) + v
            name = field_name(path)
            rows += [{**r, "path": f"{r[COL_LABEL]}/{name}/cell-{j:04d}.png", COL_FIELD: path,
                      COL_SLIDE: group[path], COL_PATIENT: group[path]} for j, r in enumerate(found)]
    table = pa.Table.from_pylist(rows)
    summary = {"fields": len(paths) - len(errors), "field_errors": errors[:20], "n_field_errors": len(errors),
               "annotated_fields_missing": len(set(truth) - {field_name(q) for q in paths}), "groups": len(set(group.values())),
               "crops": len(rows), "parasitized": int(sum(r[COL_LABEL] == POSITIVE_CLASS for r in rows)),
               "detector": {"key": DetectParams.from_dict(p).key(), "params": p}, "size": size, **totals}
    fs, out = storage.filesystem(out_uri)
    fs.makedirs(out, exist_ok=True)
    with fs.open(posixpath.join(out, "crops.parquet"), "wb") as f:
        f.write(storage.table_bytes(table))
    storage.write_text(storage.join(out_uri, SUMMARY_FILE), json.dumps(summary, indent=1))
    return summary


def training_corpus(data_uri: str, annotations_uri: str, output: str, image_size: int) -> str:
    """``train --annotations``: the crop corpus of the annotated fields under ``data_uri``, cut at
    the run's image size into ``<output>/field_crops/`` once (a resumed run reuses it); its URI."""
    from malaria_ray import logs

    dest = storage.join(output, "field_crops")
    if not storage.exists(storage.join(dest, SUMMARY_FILE)):
        s = write_corpus(data_uri, annotations_uri, dest, size=image_size)
        logs.get("train").info(
            f"field crops: {s['crops']} cells ({s['parasitized']} parasitized) from {s['fields']} fields of {data_uri} "
            f"in {s['groups']} groups of consecutive fields; left out: {s['annotated_not_found']} annotated cells the "
            f"detector did not find, {s['detected_unmatched']} detected cells no box matched, {s['difficult']} "
            f"difficult; {s['n_field_errors']} unreadable fields")
    return dest
