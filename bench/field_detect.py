"""Red-cell detection on real field photographs (IML-Malaria): quality per held-out split, and speed.

    PYTHONPATH=. python bench/field_detect.py             # all 300 fields, 3 splits (~5 min on 2 cores)
    PYTHONPATH=. python bench/field_detect.py --limit 30  # a quick look (every 10th field)

The fields (``--data``, default ``$MALARIA_FIELDS_DIR`` or ``../shared/data/iml_malaria``) are
cut into ``--folds`` contiguous runs of serial numbers (``annotations.contiguous_folds``); each run
is held out once. Segmentation runs once per field with the default parameters; the selection
parameters (``border_area_frac``, ``border_depth_frac``, ``box_pad_frac``: the annotators' border
and box conventions; ``split_max_cells``: which heaps are given as their cells) are chosen on
the training runs only, by F1 against their raw boxes, and the held-out run is reported with
them. Per split, one line: recall and precision at IoU >= 0.5 against the raw boxes, and again
with the documented exclusions (``annotations.exclusion_reasons``: degenerate boxes, boxes over
1.6x the field's median area, boxes touching the edge; a detection on an excluded box, or lying
mostly inside one, is not counted). Then detection speed: fields/s of one process (= per core)
by wall clock and by CPU time, decode excluded, crops at ``--size`` included. Then indicators of the
annotation's own ceiling. ``--overlays DIR`` writes PNGs of held-out fields (annotated boxes green,
missed yellow; detections blue, unmatched red) to look at; never commit them.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import pathlib
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from malaria_ray import annotations as A  # noqa: E402
from malaria_ray import detect as D  # noqa: E402

DATA = pathlib.Path(os.environ.get("MALARIA_FIELDS_DIR", REPO.parent / "shared" / "data" / "iml_malaria"))
GRID = {"border_area_frac": (0.5, 0.7, 0.8, 0.9, 1.0),
        "border_depth_frac": (0.0, 0.7, 0.8, 0.9),
        "box_pad_frac": (0.03, 0.06, 0.09),
        "split_max_cells": (1, 2, 4)}


def measure_fields(data: pathlib.Path, names: list[str], size: int, base: D.DetectParams) -> dict:
    """Decode and segment every field once; keep the candidates (without pixels) and the timings."""
    out = {}
    for n in names:
        t0 = time.perf_counter()
        img = np.asarray(Image.open(data / "images" / n).convert("RGB"))
        t1, c1 = time.perf_counter(), time.process_time()
        c = D.find_candidates(D.check_field(img), base)
        keep, _ = D.select_cells(c, base)
        D.cut_cells(img, c, keep, size, base.box_pad_frac * c.diameter)  # timed: part of what detection costs
        t2, c2 = time.perf_counter(), time.process_time()
        out[n] = {"cand": dataclasses.replace(c, labels=None), "shape": img.shape,
                  "decode_s": t1 - t0, "detect_s": t2 - t1, "detect_cpu_s": c2 - c1}
    return out


def detections(rec: dict, p: D.DetectParams) -> np.ndarray:
    keep, _ = D.select_cells(rec["cand"], p)
    return D.candidate_boxes(rec["cand"], rec["shape"], p.box_pad_frac * rec["cand"].diameter)[keep]


def score(fields: dict, truth: dict, names, p: D.DetectParams, exclude: bool) -> dict:
    """Pooled counts and rates over ``names`` at IoU >= 0.5, raw or with the documented exclusions."""
    tp = fp = fn = 0
    for n in names:
        t = truth[n].all_boxes()
        ignore = A.exclusion_reasons(t, truth[n].size) != "" if exclude else None
        m = A.match_boxes(t, detections(fields[n], p), ignore=ignore)
        tp, fp, fn = tp + m.tp, fp + m.fp, fn + m.fn
    r = tp / (tp + fn) if tp + fn else math.nan
    pr = tp / (tp + fp) if tp + fp else math.nan
    return {"tp": tp, "fp": fp, "fn": fn, "recall": r, "precision": pr, "f1": 2 * r * pr / (r + pr) if r + pr else math.nan}


def tune(fields: dict, truth: dict, names, base: D.DetectParams) -> D.DetectParams:
    """The selection parameters of ``GRID`` with the best F1 against the raw boxes of ``names``."""
    best, best_f1 = base, -1.0
    for values in itertools.product(*GRID.values()):
        p = dataclasses.replace(base, **dict(zip(GRID, values)))
        f1 = score(fields, truth, names, p, exclude=False)["f1"]
        if f1 > best_f1:
            best, best_f1 = p, f1
    return best


def ceiling_indicators(fields: dict, truth: dict, names, params: dict) -> dict:
    """What the annotation itself holds against a perfect detector, counted automatically: boxes
    that are degenerate, merged or on the border, and detections far from every box (IoU < 0.1, not
    on the edge: mostly cells nobody boxed, see docs/fields.md for the hand count)."""
    counts = dict.fromkeys(A.EXCLUSIONS, 0)
    n_boxes = far = 0
    for n in names:
        t = truth[n].all_boxes()
        n_boxes += len(t)
        for r in A.exclusion_reasons(t, truth[n].size):
            if r:
                counts[r] += 1
        b = detections(fields[n], params[n])
        h, w = fields[n]["shape"][:2]
        inner = (b[:, 0] > 0) & (b[:, 1] > 0) & (b[:, 0] + b[:, 2] < w) & (b[:, 1] + b[:, 3] < h)
        near = A.iou_matrix(b, t).max(axis=1, initial=0) >= 0.1
        far += int(np.sum(inner & ~near))
    return {"boxes": n_boxes, **counts, "detections_far_from_any_box": far}


def draw_overlay(data: pathlib.Path, name: str, truth: A.FieldBoxes, boxes: np.ndarray, dest: pathlib.Path) -> None:
    """Annotated boxes (green; yellow when missed) and detections (blue; red when unmatched), as a PNG."""
    t = truth.all_boxes()
    m = A.match_boxes(t, boxes)
    im = Image.open(data / "images" / name).convert("RGB")
    draw = ImageDraw.Draw(im)
    hit_t, hit_p = set(m.pairs[:, 0].tolist()), set(m.pairs[:, 1].tolist())
    for i, (x, y, w, h) in enumerate(t):
        draw.rectangle([x, y, x + w, y + h], outline=(0, 160, 0) if i in hit_t else (255, 220, 0), width=2 if i in hit_t else 4)
    for i, (x, y, w, h) in enumerate(boxes):
        draw.rectangle([x + 3, y + 3, x + w - 3, y + h - 3], outline=(0, 0, 255) if i in hit_p else (255, 0, 0),
                       width=2 if i in hit_p else 4)
    im.save(dest / (pathlib.Path(name).stem + ".png"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=pathlib.Path, default=DATA, help=f"IML-Malaria folder (default: {DATA})")
    ap.add_argument("--folds", type=int, default=3, help="contiguous runs, each held out once (default: 3)")
    ap.add_argument("--limit", type=int, default=0, help="use N fields spread evenly over the serial numbers (0: all)")
    ap.add_argument("--size", type=int, default=128, help="side of each masked crop (default: 128, the model input)")
    ap.add_argument("--overlays", type=pathlib.Path, help="write overlay PNGs of held-out fields here (not into the repo)")
    ap.add_argument("--overlays-per-split", type=int, default=3)
    args = ap.parse_args(argv)
    ann_path = args.data / "annotations.json"
    if not ann_path.exists():
        print(f"no annotations at {ann_path}: set MALARIA_FIELDS_DIR or --data", file=sys.stderr)
        return 2
    truth = A.load_annotations(str(ann_path))
    names = sorted(truth)
    if args.limit:
        names = names[:: max(1, len(names) // args.limit)][: args.limit]
    truth = A.check_boxes({n: truth[n] for n in names}, A.image_sizes(str(args.data / "images"), names))
    base = D.DetectParams()
    fields = measure_fields(args.data, names, args.size, base)
    folds = A.contiguous_folds(names, args.folds)
    chosen: dict[str, D.DetectParams] = {}
    pooled = {"raw": [0, 0, 0], "excluded": [0, 0, 0]}
    for k in range(args.folds):
        train = [n for n, f in zip(names, folds) if f != k]
        test = [n for n, f in zip(names, folds) if f == k]
        p = tune(fields, truth, train, base)
        chosen.update(dict.fromkeys(test, p))
        raw = score(fields, truth, test, p, exclude=False)
        exc = score(fields, truth, test, p, exclude=True)
        for key, s in (("raw", raw), ("excluded", exc)):
            pooled[key] = [a + s[c] for a, c in zip(pooled[key], ("tp", "fp", "fn"))]
        print(f"split {k}: held out {test[0]}..{test[-1]} ({len(test)} fields); raw boxes: recall {raw['recall']:.3f} "
              f"precision {raw['precision']:.3f}; with exclusions: recall {exc['recall']:.3f} precision {exc['precision']:.3f}; "
              f"chosen on {len(train)} training fields: " + ", ".join(f"{g}={getattr(p, g)}" for g in GRID))
        if args.overlays:
            args.overlays.mkdir(parents=True, exist_ok=True)
            for n in test[:: max(1, len(test) // args.overlays_per_split)][: args.overlays_per_split]:
                draw_overlay(args.data, n, truth[n], detections(fields[n], p), args.overlays)
    for key, (tp, fp, fn) in pooled.items():
        print(f"all held-out fields, {key} boxes: recall {tp / (tp + fn):.3f} precision {tp / (tp + fp):.3f} "
              f"(tp {tp}, fp {fp}, fn {fn})")
    det_s = sum(f["detect_s"] for f in fields.values())
    cpu_s = sum(f["detect_cpu_s"] for f in fields.values())
    dec_s = sum(f["decode_s"] for f in fields.values())
    diam = np.array([f["cand"].diameter for f in fields.values()])
    print(f"speed: {len(names) / det_s:.2f} fields/s per core (detection with {args.size}px crops, one process, "
          f"{1000 * det_s / len(names):.0f} ms/field; JPEG decode {1000 * dec_s / len(names):.0f} ms/field more); "
          f"by CPU time, which other processes on the machine disturb less: {len(names) / cpu_s:.2f} fields per CPU-second "
          f"(load average then {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs); "
          f"estimated diameter median {np.median(diam):.1f} px (range {diam.min():.1f}-{diam.max():.1f})")
    odd = [f"{n} {fields[n]['cand'].diameter:.0f} px {'/'.join(fields[n]['cand'].flags) or ''}"
           for n in names if not 0.67 < fields[n]["cand"].diameter / np.median(diam) < 1.5]
    print(f"fields whose estimated diameter is off the median by 1.5x: {len(odd)}" + (": " + "; ".join(odd[:10]) if odd else ""))
    print("annotation ceiling indicators (all fields):", json.dumps(ceiling_indicators(fields, truth, names, chosen)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
