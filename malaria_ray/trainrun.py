"""The training run directory: best model, history, split, validation predictions/metrics, plots.

Written by the driver after Ray Train finishes. ``history.parquet`` is written last, so its
presence marks a finished run (``checkpoint.FINISHED_MARKER``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from malaria_ray import checkpoint, corpus, logs, metrics, report, storage
from malaria_ray import schema
from malaria_ray import config
from malaria_ray.config import DEFAULT_THRESHOLD, TrainConfig
from malaria_ray.schema import CLASS_NAMES, NEGATIVE_CLASS, POSITIVE_CLASS

log = logs.get("train")
THRESHOLD = DEFAULT_THRESHOLD  # argmax of a 2-way softmax, as the notebook


def predictions_table(uris, ids, probs, errors: list[dict], known: corpus.Identities, model_id: str, run_id: str,
                      threshold: float = THRESHOLD) -> pa.Table:
    """The validation predictions, with the label and identity the listing decided (``known``):
    the split, these rows, the roll-up and the bootstrap name the same patients."""
    now = dt.datetime.now(dt.timezone.utc)
    all_uris = list(uris) + [e[schema.COL_URI] for e in errors]
    identity = [known.get(u) or (None, None, None) for u in all_uris]  # (label, slide, patient)
    preds = [POSITIVE_CLASS if p >= threshold else NEGATIVE_CLASS for p in probs] + [None] * len(errors)
    n = len(all_uris)
    return pa.Table.from_pydict({
        schema.COL_IMAGE_ID: list(ids) + [e[schema.COL_IMAGE_ID] or None for e in errors],
        schema.COL_URI: all_uris,
        schema.COL_SLIDE: [d[1] for d in identity],
        schema.COL_PATIENT: [d[2] for d in identity],
        schema.COL_LABEL: [d[0] for d in identity],
        schema.COL_PROB: list(probs) + [None] * len(errors),
        schema.COL_PRED: preds,
        schema.COL_THRESHOLD: [threshold] * n,
        schema.COL_MODEL_ID: [model_id] * n,
        schema.COL_RUN_ID: [run_id] * n,
        schema.COL_SCORED_AT: [now] * n,
        schema.COL_ERROR: [None] * len(uris) + [e[schema.COL_ERROR] for e in errors],
        schema.COL_SOURCE_VERSION: [None] * n,
        # Training's unreadable images do not yet carry their kind (a training run is not read
        # again night over night, so nothing skips on it): null unless the row has one.
        schema.COL_ERROR_KIND: [None] * len(uris) + [e.get(schema.COL_ERROR_KIND) for e in errors],
        **{c: [None] * n for c in schema.FIELD_COLUMNS},  # cut-out cells
    }, schema=schema.PREDICTIONS_SCHEMA)


BOOTSTRAP_SAMPLES = 1000
DISAGREEMENTS_SHOWN = 12  # per direction, in plots/disagreements.png


def write_run(cfg: TrainConfig, listing: corpus.Listing, val_mask: np.ndarray, best_ckpt, history: list[dict],
              val_ds, unreadable: list[dict], extra: dict[str, Any],
              before_finish: Callable[[], None] | None = None) -> dict[str, Any]:
    from malaria_ray import model as model_mod

    out = cfg.output
    run_id = os.path.basename(out.rstrip("/")) or "train"
    with best_ckpt.as_directory() as d:
        best, _ = model_mod.load_model(checkpoint.model_path(d))
        best_state = checkpoint.read_state(d)
        made = checkpoint.read_val_predictions(d)
    if made.num_rows != val_ds.count():  # the workers predict every validation image once (unequal shards)
        raise RuntimeError(f"the best checkpoint holds {made.num_rows} validation predictions for "
                           f"{val_ds.count()} validation images")
    uris, ids = made.column(schema.COL_URI).to_pylist(), made.column(schema.COL_IMAGE_ID).to_pylist()
    labels, probs = made.column(schema.COL_TRAIN_LABEL).to_numpy(), made.column(schema.COL_VAL_PROB).to_numpy()
    y = labels == CLASS_NAMES.index(POSITIVE_CLASS)
    cells = schema.CELLS_FIELDS if cfg.annotations else schema.CELLS_CROPS  # what validation's cells are
    op = operating_point(y, probs, cfg.target_sensitivity, cells)
    model_id = model_mod.save_model(best, out, h5=cfg.export_h5, operating_point=op)
    threshold = op[schema.KEY_THRESHOLD]

    val_uris = set(np.asarray(listing.uris)[val_mask].tolist())
    val_errors = [e for e in unreadable if e[schema.COL_URI] in val_uris]
    preds = predictions_table(uris, ids, probs, val_errors, listing.identities(), model_id, run_id, threshold)
    # bootstrap groups: the patient, or the image itself where no patient is known
    patients = np.asarray([p or f"uri:{u}" for p, u in zip(preds.column(schema.COL_PATIENT).to_pylist()[:len(uris)], uris)],
                          dtype=object)
    common = {schema.COL_N_IMAGES: len(uris) + len(val_errors), schema.COL_N_ERRORS: len(val_errors),
              schema.COL_MODEL_ID: model_id, schema.COL_RUN_ID: run_id, "split": "val", "split_kind": cfg.split,
              "best_epoch": best_state["epoch"], "synthetic": cfg.synthetic, "brier": metrics.brier(y, probs)}
    # as scoring's slides.parquet; the correction uses the rates of these same cells (in-sample)
    groups = metrics.roll_up(preds, 1 - op[schema.KEY_VAL_SPECIFICITY], model_id,
                             metrics.Correction.of(op, threshold, cells))
    rows = []
    kinds = (("operating_point", threshold), ("argmax", THRESHOLD))
    intervals = metrics.patient_bootstraps(y, probs, patients, [t for _, t in kinds], n_boot=BOOTSTRAP_SAMPLES,
                                           seed=cfg.seed)  # one set of resamples for both thresholds
    for (kind, t), ci in zip(kinds, intervals):
        rows.append({**metrics.binary_metrics(y, probs, t), schema.COL_THRESHOLD: t, "threshold_kind": kind, **common,
                     **{f"{k}_ci_{side}": v for k, (lo, hi) in ci.items() for side, v in (("low", lo), ("high", hi))},
                     **(metrics.group_rates(groups, "patient") | metrics.group_rates(groups, "slide")
                        if kind == "operating_point" else {})})
    m = rows[0]

    bad = {e[schema.COL_URI] for e in unreadable}
    split_tbl = pa.Table.from_pydict({
        schema.COL_URI: listing.uris, schema.COL_LABEL: listing.labels,
        schema.COL_SLIDE: listing.slide_ids, schema.COL_PATIENT: listing.patient_ids,
        schema.COL_SPLIT: ["val" if v else "train" for v in val_mask],
        "readable": [u not in bad for u in listing.uris],
    })
    hist_tbl = pa.Table.from_pylist(history).select(list(checkpoint.HISTORY_COLUMNS))
    cm = metrics.confusion_matrix(y, probs, threshold)
    title = (f"Validation ({cfg.split} split, best epoch {best_state['epoch']}, threshold {threshold:.3f})"
             + (" - SYNTHETIC data" if cfg.synthetic else ""))
    resolved = {**config.redacted(dataclasses.asdict(cfg)), **extra, "model_id": model_id, "best_epoch": best_state["epoch"],
                "operating_point": op}

    storage.write_text(storage.join(out, "config.json"), json.dumps(resolved, indent=2, sort_keys=True))
    storage.write_bytes(storage.join(out, "split.parquet"), storage.table_bytes(split_tbl))
    storage.write_bytes(storage.join(out, "predictions.parquet"), storage.table_bytes(preds))
    storage.write_bytes(storage.join(out, "metrics.parquet"), storage.table_bytes(pa.Table.from_pylist(rows)))
    storage.write_bytes(storage.join(out, "patients.parquet"), storage.table_bytes(groups))
    storage.write_bytes(storage.join(out, "plots", "curves.png"), report.curves_png(
        {k: [h[k] for h in history] for k in ("loss", "val_loss", "accuracy", "val_accuracy")}))
    storage.write_bytes(storage.join(out, "plots", "confusion_matrix.png"), report.confusion_png(cm, title))
    storage.write_bytes(storage.join(out, "plots", "calibration.png"),
                        report.calibration_png(metrics.reliability(y, probs), m["brier"]))
    storage.write_bytes(storage.join(out, "plots", "disagreements.png"), disagreements_png(val_ds, ids, y, probs,
                                                                                         threshold))
    storage.write_text(storage.join(out, "model_card.md"), report.model_card(
        resolved, listing, val_mask, rows, groups, history, len(unreadable)))
    if before_finish is not None:  # e.g. removing streamed shards: a run is finished only once they are gone
        before_finish()
    storage.write_bytes(storage.join(out, checkpoint.FINISHED_MARKER), storage.table_bytes(hist_tbl))  # last: finished
    return {"output": out, "model_id": model_id, "best_epoch": best_state["epoch"], "epochs": len(history),
            "n_val": len(uris), "n_unreadable": len(unreadable), "synthetic": cfg.synthetic, "split": cfg.split,
            "threshold": threshold, "target_sensitivity": cfg.target_sensitivity, "argmax_accuracy": rows[1]["accuracy"],
            **{k: m[k] for k in ("accuracy", "sensitivity", "specificity", "roc_auc", "tp", "fp", "fn", "tn")},
            **{k: m[k] for k in m if k.endswith(("_ci_low", "_ci_high"))}}


def disagreements_png(val_ds, ids: list[str], y: np.ndarray, probs: np.ndarray, threshold: float,
                      n: int = DISAGREEMENTS_SHOWN) -> bytes:
    """``report.disagreements_png`` of the validation images the model and the labels disagree on
    most confidently; the pixels come from the decoded validation set (whatever the input kind)."""
    missed, flagged = report.confident_disagreements(y, probs, threshold, n)
    wanted = np.asarray([ids[i] for i in (*missed, *flagged)], dtype=object)
    pixels = {}
    if len(wanted):
        for row in val_ds.map_batches(_rows_with_ids, batch_format="numpy", fn_kwargs={"ids": wanted}).take_all():
            pixels[row[schema.COL_IMAGE_ID]] = row[schema.COL_TRAIN_IMAGE]
    if len(pixels) < len(set(wanted)):
        log.warning(f"disagreements plot: {len(set(wanted)) - len(pixels)} of {len(set(wanted))} selected validation "
                    "images were not found in the validation set; the plot leaves them out")
    return report.disagreements_png([(pixels[ids[i]], float(probs[i])) for i in missed if ids[i] in pixels],
                                    [(pixels[ids[i]], float(probs[i])) for i in flagged if ids[i] in pixels],
                                    threshold)


def _rows_with_ids(batch: dict[str, np.ndarray], ids: np.ndarray) -> dict[str, np.ndarray]:
    """The rows of a numpy batch whose image_id is in ``ids`` (str or object arrays alike)."""
    keep = np.isin(batch[schema.COL_IMAGE_ID].astype(object), ids)
    return {schema.COL_IMAGE_ID: batch[schema.COL_IMAGE_ID][keep], schema.COL_TRAIN_IMAGE: batch[schema.COL_TRAIN_IMAGE][keep]}


def operating_point(y: np.ndarray, probs: np.ndarray, target: float, cells: str = schema.CELLS_CROPS) -> dict[str, Any]:
    """The decision threshold for ``target`` sensitivity on the validation split, with the
    validation sensitivity and specificity it gives (what ``model.json`` records)."""
    t = metrics.threshold_for_sensitivity(y, probs, target)
    if np.isnan(t):  # no positive cell in validation: keep the argmax
        t = THRESHOLD
    m = metrics.binary_metrics(y, probs, t)
    return {schema.KEY_THRESHOLD: float(t), schema.KEY_TARGET_SENSITIVITY: float(target),
            schema.KEY_VAL_SENSITIVITY: m["sensitivity"], schema.KEY_VAL_SPECIFICITY: m["specificity"],
            schema.KEY_VAL_N_POSITIVE: int(m["tp"] + m["fn"]), schema.KEY_VAL_N_NEGATIVE: int(m["fp"] + m["tn"]),
            schema.KEY_VAL_CELLS: cells,
            schema.KEY_THRESHOLD_SOURCE: "chosen on this run's validation split (the same images its metrics describe)"}


def print_summary(s: dict[str, Any]) -> None:
    tag = " (SYNTHETIC data)" if s["synthetic"] else ""
    print(f"\n== malaria-ray train: done in {s['seconds']}s{tag}\n"
          f"   run directory   {s['output']}\n"
          f"   model_id        {s['model_id']} (best epoch {s['best_epoch']} of {s['epochs']}, by val_loss)\n"
          f"   validation      {s['n_val']} images, {s['split']} split; unreadable images: {s['n_unreadable']}\n"
          f"   operating point threshold {s['threshold']:.4f} (target sensitivity {s['target_sensitivity']}); "
          f"accuracy at argmax (0.5) {s['argmax_accuracy']:.4f}\n"
          f"   accuracy {_ci(s, 'accuracy')}  sensitivity {_ci(s, 'sensitivity')}\n"
          f"   specificity {_ci(s, 'specificity')}  ROC AUC {_ci(s, 'roc_auc')}\n"
          f"   (95% intervals: bootstrap over patients)\n"
          f"   confusion (rows true P/U, cols pred P/U): [[{s['tp']} {s['fn']}] [{s['fp']} {s['tn']}]]"
          + (f"\n   mlflow          {s['mlflow']}" if s.get("mlflow") else ""), flush=True)


def _ci(s: dict[str, Any], k: str) -> str:
    return f"{s[k]:.4f} [{s[k + '_ci_low']:.3f}, {s[k + '_ci_high']:.3f}]"
