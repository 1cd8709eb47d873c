"""A ``score --fields --annotations`` run measured against the annotated boxes.

``evaluate(cells, truth)`` takes one run's cell rows (box, call, field URI) and the annotation
table (``annotations.load_annotations``: IML-Malaria JSON or COCO) and returns one row per
annotated field the run scored plus the run's figures:

- detection: recall and precision at IoU >= 0.5 against every boxed cell (``difficult`` included:
  a cell, though not one the annotators would call), one-to-one (``annotations.match_boxes``);
- cells: the confusion matrix of matched cells with a class (``difficult`` left out); the
  sensitivity for infected cells end to end (a parasite whose cell was not found is missed), per
  parasite stage too, and the cells called Parasitized that are not an annotated parasite, per field;
- fields: the called fraction against the annotated parasitemia (absolute error); detection of any
  parasite per field (sensitivity over fields with parasites, and with at least two; specificity
  over fields without);
- blocks of ``block`` consecutive fields in name order (what a microscopist counts for one slide):
  the called fraction against the annotated one, and the share of blocks within 25% of it.

A field is matched to its annotation by file name (the member name inside an archive). Pure:
numpy and pyarrow.
"""

from __future__ import annotations

import posixpath
from collections import defaultdict

import numpy as np
import pyarrow as pa

from malaria_ray.annotations import FieldBoxes, match_boxes
from malaria_ray.metrics import rates
from malaria_ray.schema import (
    COL_BOX_H, COL_BOX_W, COL_BOX_X, COL_BOX_Y, COL_ERROR, COL_PRED, COL_URI, NEGATIVE_CLASS, POSITIVE_CLASS, path_within,
)

BLOCK_FIELDS = 15  # fields per block: a slide's count is judged on many fields, not one
BLOCK_TOLERANCE = 0.25  # WHO competence for parasite counts: within 25% of the reference


def field_name(uri: str) -> str:
    """The file name an annotation file knows a field by."""
    return posixpath.basename(path_within(uri).replace("\\", "/"))


def evaluate(cells: pa.Table, truth: dict[str, FieldBoxes], block: int = BLOCK_FIELDS) -> tuple[pa.Table, dict]:
    """(per-field table, the run's figures) of ``cells`` (one run's predictions rows) against ``truth``."""
    scored = cells.filter(pa.compute.is_null(cells.column(COL_ERROR)))
    by_field: dict[str, list[int]] = defaultdict(list)
    for i, uri in enumerate(scored.column(COL_URI).to_pylist()):
        by_field[field_name(uri)].append(i)
    boxes = np.stack([scored.column(c).to_numpy(zero_copy_only=False) for c in (COL_BOX_X, COL_BOX_Y, COL_BOX_W,
                                                                                 COL_BOX_H)], axis=1).reshape(-1, 4)
    called = np.asarray([p == POSITIVE_CLASS for p in scored.column(COL_PRED).to_pylist()], bool)
    rows, stages = [], defaultdict(lambda: [0, 0])
    for name in sorted(set(by_field) & set(truth)):
        idx = np.asarray(by_field[name])
        rows.append(_field_row(name, truth[name], boxes[idx], called[idx], stages))
    table = pa.Table.from_pylist(rows) if rows else pa.table({"field": pa.array([], pa.string())})
    figures = _figures(rows, stages, block)
    figures["annotated_fields_not_scored"] = len(set(truth) - set(by_field))
    figures["scored_fields_not_annotated"] = len(set(by_field) - set(truth))
    return table, figures


def _field_row(name: str, t: FieldBoxes, pred: np.ndarray, called: np.ndarray, stages: dict) -> dict:
    m = match_boxes(t.all_boxes(), pred)
    labels = np.asarray(t.labels + [None] * len(t.difficult), dtype=object)
    pair_truth, pair_pred = (m.pairs[:, 0], m.pairs[:, 1]) if len(m.pairs) else (np.zeros(0, int), np.zeros(0, int))
    pos = labels[pair_truth] == POSITIVE_CLASS
    neg = labels[pair_truth] == NEGATIVE_CLASS
    hit = called[pair_pred]
    found_pos = np.zeros(len(labels), bool)
    found_pos[pair_truth[pos & hit]] = True
    for stage, label, found in zip(t.stages, t.labels, found_pos):
        if label == POSITIVE_CLASS:
            stages[stage][0] += int(found)
            stages[stage][1] += 1
    true_pos = int(sum(lbl == POSITIVE_CLASS for lbl in t.labels))
    n_cells = len(labels)  # parasitemia's denominator: every red cell, ``difficult`` ones too
    return {"field": name, "n_true": len(labels), "n_true_parasitized": true_pos, "n_found": len(pred),
            "n_called_parasitized": int(called.sum()), "det_tp": m.tp, "det_fp": m.fp, "det_fn": m.fn,
            "tp": int((pos & hit).sum()), "fn": int((pos & ~hit).sum()), "fp": int((neg & hit).sum()),
            "tn": int((neg & ~hit).sum()), "parasites_found": int(found_pos.sum()),
            # called Parasitized but not an annotated parasite: matched to an uninfected cell, or to nothing
            "false_positive_cells": int(called.sum() - (pos & hit).sum()),
            "true_fraction": true_pos / n_cells if n_cells else None,
            "called_fraction": float(called.mean()) if len(called) else None}


def _figures(rows: list[dict], stages: dict, block: int) -> dict:
    s = lambda k: sum(r[k] for r in rows)  # noqa: E731
    n = len(rows)
    out = {"fields": n, "detection_recall": _div(s("det_tp"), s("det_tp") + s("det_fn")),
           "detection_precision": _div(s("det_tp"), s("det_tp") + s("det_fp"))}
    out.update({f"matched_{k}": v for k, v in rates(s("tp"), s("fp"), s("fn"), s("tn")).items()
                if k in ("sensitivity", "specificity")})
    out.update({"tp": s("tp"), "fp": s("fp"), "fn": s("fn"), "tn": s("tn"),
                "infected_cell_sensitivity": _div(s("parasites_found"), s("n_true_parasitized")),
                "false_positive_cells_per_field": _div(s("false_positive_cells"), n),
                "stage_sensitivity": {k: _div(v[0], v[1]) for k, v in sorted(stages.items())},
                "stage_counts": {k: v[1] for k, v in sorted(stages.items())}})
    errors = [abs(r["called_fraction"] - r["true_fraction"]) for r in rows
              if r["called_fraction"] is not None and r["true_fraction"] is not None]
    out["field_parasitemia_mae"] = float(np.mean(errors)) if errors else None
    with_p = [r for r in rows if r["n_true_parasitized"] >= 1]
    with_2 = [r for r in rows if r["n_true_parasitized"] >= 2]
    without = [r for r in rows if r["n_true_parasitized"] == 0]
    out["field_sensitivity"] = _div(sum(r["n_called_parasitized"] >= 1 for r in with_p), len(with_p))
    out["field_sensitivity_2plus"] = _div(sum(r["n_called_parasitized"] >= 1 for r in with_2), len(with_2))
    out["field_specificity"] = _div(sum(r["n_called_parasitized"] == 0 for r in without), len(without))
    out.update(_blocks(rows, block))
    return out


def _blocks(rows: list[dict], block: int) -> dict:
    """Consecutive fields in name order, ``block`` at a time (the last, shorter one left out)."""
    found = []
    for a in range(0, len(rows) - block + 1, block):
        part = rows[a:a + block]
        truth = _div(sum(r["n_true_parasitized"] for r in part), sum(r["n_true"] for r in part))
        called = _div(sum(r["n_called_parasitized"] for r in part), sum(r["n_found"] for r in part))
        within = (truth is not None and called is not None and
                  (abs(called - truth) <= BLOCK_TOLERANCE * truth if truth > 0 else called == 0))
        found.append({"first": part[0]["field"], "true_fraction": truth, "called_fraction": called,
                      "within_25pct": bool(within)})
    return {"blocks": found, "block_fields": block,
            "blocks_within_25pct": _div(sum(b["within_25pct"] for b in found), len(found))}


def _div(a: float, b: float) -> float | None:
    return float(a) / b if b else None


def load_truth(uri: str) -> dict[str, FieldBoxes]:
    """The annotation file at ``uri`` (local or s3://), parsed; raises ``AnnotationError`` (a
    ``CorpusError``: one line, exit 2) when it cannot be read or is not one."""
    import json

    from malaria_ray import storage
    from malaria_ray.annotations import AnnotationError, parse_annotations

    try:
        doc = json.loads(storage.read_bytes(uri))
    except (OSError, ValueError) as exc:
        raise AnnotationError(f"--annotations {uri}: cannot read annotation JSON: {type(exc).__name__}: {exc}") from None
    return parse_annotations(doc)


def measure_run(root: str, run_id: str, truth: dict[str, FieldBoxes]) -> dict:
    """Evaluate run ``run_id`` under ``root`` against ``truth``; writes
    ``runs/<run_id>/field_eval.parquet`` (per field) and ``field_eval.json`` (the figures)."""
    from malaria_ray import outputs, storage

    cells = outputs.run_table(root, run_id, [COL_URI, COL_ERROR, COL_PRED, COL_BOX_X, COL_BOX_Y, COL_BOX_W, COL_BOX_H])
    table, figures = evaluate(cells, truth)
    run = outputs.run_uri(root, run_id)
    storage.write_bytes(storage.join(run, "field_eval.parquet"), storage.table_bytes(table))
    storage.write_json(storage.join(run, "field_eval.json"), figures)
    return figures


def summary_lines(f: dict) -> list[str]:
    """The summary's lines for a run measured against annotations."""
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    stages = ", ".join(f"{k} {fmt(v)} (of {f['stage_counts'][k]})" for k, v in f["stage_sensitivity"].items())
    return [
        f"  vs annotations    {f['fields']} annotated fields ({f['annotated_fields_not_scored']} annotated but not "
        f"scored, {f['scored_fields_not_annotated']} scored without annotation)",
        f"    detection recall {fmt(f['detection_recall'])}  precision {fmt(f['detection_precision'])} (IoU >= 0.5)",
        f"    infected cells: sensitivity {fmt(f['infected_cell_sensitivity'])}, false-positive cells per field "
        f"{fmt(f['false_positive_cells_per_field'])}; by stage: {stages or 'none annotated'}",
        f"    fields: parasitemia MAE {fmt(f['field_parasitemia_mae'])}; any parasite: sensitivity "
        f"{fmt(f['field_sensitivity'])} (>= 2 parasites: {fmt(f['field_sensitivity_2plus'])}), specificity "
        f"{fmt(f['field_specificity'])}; blocks of {f['block_fields']}: {fmt(f['blocks_within_25pct'])} within 25%",
    ]
