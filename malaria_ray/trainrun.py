"""The training run directory: best model, history, split, validation predictions/metrics, plots.

Written by the driver after Ray Train finishes. ``history.parquet`` is written last, so its
presence marks a finished run (``checkpoint.FINISHED_MARKER``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from typing import Any

import numpy as np
import pyarrow as pa

from malaria_ray import checkpoint, corpus, metrics, report, storage
from malaria_ray import schema as S
from malaria_ray.config import CLASS_NAMES, DEFAULT_THRESHOLD, POSITIVE_CLASS, TrainConfig

THRESHOLD = DEFAULT_THRESHOLD  # argmax of a 2-way softmax, as the notebook


def predict_dataset(model, ds, batch_size: int = 64) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(uris, image_ids, labels, P(Parasitized)) over a decoded Ray dataset, streamed in batches."""
    uris, ids, labels, probs = [], [], [], []
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        p = model.predict_on_batch(batch["image"].astype(np.float32))
        probs.append(np.asarray(p)[:, 0])
        uris.extend(batch[S.COL_URI].tolist())
        ids.extend(batch["image_id"].tolist())
        labels.append(batch["label"])
    return uris, ids, np.concatenate(labels), np.concatenate(probs).astype(np.float32)


def predictions_table(uris, ids, labels, probs, errors: list[dict], model_id: str, run_id: str) -> pa.Table:
    now = dt.datetime.now(dt.timezone.utc)
    all_uris = list(uris) + [e[S.COL_URI] for e in errors]
    described = [corpus.describe(u) for u in all_uris]  # (label, slide, patient)
    names = [CLASS_NAMES[int(i)] for i in labels] + [d[0] for d in described[len(uris):]]
    preds = [CLASS_NAMES[0] if p >= THRESHOLD else CLASS_NAMES[1] for p in probs] + [None] * len(errors)
    n = len(all_uris)
    return pa.Table.from_pydict({
        S.COL_IMAGE_ID: list(ids) + [e[S.COL_IMAGE_ID] or None for e in errors],
        S.COL_URI: all_uris,
        S.COL_SLIDE: [d[1] for d in described],
        S.COL_PATIENT: [d[2] for d in described],
        S.COL_LABEL: names,
        S.COL_PROB: list(probs) + [None] * len(errors),
        S.COL_PRED: preds,
        S.COL_THRESHOLD: [THRESHOLD] * n,
        S.COL_MODEL_ID: [model_id] * n,
        S.COL_RUN_ID: [run_id] * n,
        S.COL_SCORED_AT: [now] * n,
        S.COL_ERROR: [None] * len(uris) + [e[S.COL_ERROR] for e in errors],
    }, schema=S.PREDICTIONS_SCHEMA)


def write_run(cfg: TrainConfig, listing: corpus.Listing, val_mask: np.ndarray, best_ckpt, history: list[dict],
              val_ds, unreadable: list[dict], extra: dict[str, Any]) -> dict[str, Any]:
    from malaria_ray import model as model_mod

    out = cfg.output
    run_id = os.path.basename(out.rstrip("/")) or "train"
    with best_ckpt.as_directory() as d:
        best, _ = model_mod.load_model(checkpoint.model_path(d))
        best_state = checkpoint.read_state(d)
    model_id = model_mod.save_model(best, out, h5=cfg.export_h5)

    uris, ids, labels, probs = predict_dataset(best, val_ds)
    val_uris = set(np.asarray(listing.uris)[val_mask].tolist())
    val_errors = [e for e in unreadable if e[S.COL_URI] in val_uris]
    preds = predictions_table(uris, ids, labels, probs, val_errors, model_id, run_id)
    y = labels == CLASS_NAMES.index(POSITIVE_CLASS)
    m = metrics.binary_metrics(y, probs, THRESHOLD)
    metrics_row = {**m, S.COL_N_IMAGES: len(uris) + len(val_errors), S.COL_N_ERRORS: len(val_errors),
                   S.COL_THRESHOLD: THRESHOLD, S.COL_MODEL_ID: model_id, S.COL_RUN_ID: run_id,
                   "split": "val", "split_kind": cfg.split, "best_epoch": best_state["epoch"],
                   "synthetic": cfg.synthetic}

    bad = {e[S.COL_URI] for e in unreadable}
    split_tbl = pa.Table.from_pydict({
        S.COL_URI: listing.uris, S.COL_LABEL: listing.labels,
        S.COL_SLIDE: listing.slide_ids, S.COL_PATIENT: listing.patient_ids,
        S.COL_SPLIT: ["val" if v else "train" for v in val_mask],
        "readable": [u not in bad for u in listing.uris],
    })
    hist_tbl = pa.Table.from_pylist(history).select(list(checkpoint.HISTORY_COLUMNS))
    cm = metrics.confusion_matrix(y, probs, THRESHOLD)
    title = f"Validation ({cfg.split} split, best epoch {best_state['epoch']})" + (" - SYNTHETIC data" if cfg.synthetic else "")
    resolved = {**dataclasses.asdict(cfg), **extra, "model_id": model_id, "best_epoch": best_state["epoch"]}

    storage.write_text(storage.join(out, "config.json"), json.dumps(resolved, indent=2, sort_keys=True))
    storage.write_bytes(storage.join(out, "split.parquet"), storage.table_bytes(split_tbl))
    storage.write_bytes(storage.join(out, "predictions.parquet"), storage.table_bytes(preds))
    storage.write_bytes(storage.join(out, "metrics.parquet"), storage.table_bytes(pa.Table.from_pylist([metrics_row])))
    storage.write_bytes(storage.join(out, "plots", "curves.png"), report.curves_png(
        {k: [h[k] for h in history] for k in ("loss", "val_loss", "accuracy", "val_accuracy")}))
    storage.write_bytes(storage.join(out, "plots", "confusion_matrix.png"), report.confusion_png(cm, title))
    storage.write_bytes(storage.join(out, checkpoint.FINISHED_MARKER), storage.table_bytes(hist_tbl))  # last: marks finished
    return {"output": out, "model_id": model_id, "best_epoch": best_state["epoch"], "epochs": len(history),
            "n_val": len(uris), "n_unreadable": len(unreadable), "synthetic": cfg.synthetic,
            "split": cfg.split, **{k: metrics_row[k] for k in ("accuracy", "sensitivity", "specificity", "roc_auc")},
            "tp": m["tp"], "fp": m["fp"], "fn": m["fn"], "tn": m["tn"]}


def print_summary(s: dict[str, Any]) -> None:
    tag = " (SYNTHETIC data)" if s["synthetic"] else ""
    print(f"\n== malaria-ray train: done in {s['seconds']}s{tag}\n"
          f"   run directory   {s['output']}\n"
          f"   model_id        {s['model_id']} (best epoch {s['best_epoch']} of {s['epochs']}, by val_loss)\n"
          f"   validation      {s['n_val']} images, {s['split']} split; unreadable images: {s['n_unreadable']}\n"
          f"   accuracy {s['accuracy']:.4f}  sensitivity {s['sensitivity']:.4f}  "
          f"specificity {s['specificity']:.4f}  ROC AUC {s['roc_auc']:.4f}\n"
          f"   confusion (rows true P/U, cols pred P/U): [[{s['tp']} {s['fn']}] [{s['fp']} {s['tn']}]]", flush=True)
