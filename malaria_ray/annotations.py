"""Box annotations of field images: read them, split field corpora, match detections to boxes.

Two formats are read: the IML-Malaria ``annotations.json`` (a list of ``{"image_name", "objects":
[{"type", "bbox": {"x", "y", "w", "h"}}]}``, numbers as strings) and COCO JSON (``images``,
``annotations`` with ``bbox: [x, y, w, h]``, ``categories``). Both become one ``FieldBoxes`` per
image: boxes (x, y, w, h in the image's pixels), the class of each (parasite stages -> Parasitized,
``red blood cell`` -> Uninfected) and its stage as written; ``difficult`` boxes are kept apart (a
cell, but not one to score). Pure: numpy and scipy only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from malaria_ray.config import CorpusError
from malaria_ray.schema import NEGATIVE_CLASS, POSITIVE_CLASS

PARASITE_STAGES = ("ring", "trophozoite", "schizont", "gametocyte")
UNINFECTED_TYPES = ("red blood cell", "rbc", "uninfected", "healthy")
DIFFICULT_TYPES = ("difficult",)
PARASITIZED, UNINFECTED = POSITIVE_CLASS, NEGATIVE_CLASS
# Boxes may run this far past the image edge (IML-Malaria has 1,100 such boxes, all <= 5 px); they
# are clipped to the image. Anything further out is an error in the annotation file.
EDGE_TOLERANCE = 8
IOU_MATCH = 0.5


class AnnotationError(CorpusError):
    """An annotation file that cannot be used as is; the message names what and where."""


@dataclass
class FieldBoxes:
    """The annotated cells of one image: ``boxes`` int32 [n, 4] (x, y, w, h), ``labels`` and
    ``stages`` (n strings each); ``difficult`` int32 [m, 4]: cells the annotators would not call."""

    image_name: str
    boxes: np.ndarray
    labels: list[str]
    stages: list[str]
    difficult: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int32))
    size: tuple[int, int] | None = None  # (width, height) where the file states it (COCO)

    def all_boxes(self) -> np.ndarray:
        """Every boxed cell, ``difficult`` ones last: the truth that detection is measured against."""
        return np.concatenate([self.boxes, self.difficult]).astype(np.int32)


def class_of(kind: str) -> str | None:
    """Parasitized / Uninfected for an annotation type, None for ``difficult``; unknown types raise."""
    k = kind.strip().lower()
    if k in PARASITE_STAGES or k == PARASITIZED.lower():
        return PARASITIZED
    if k in UNINFECTED_TYPES:
        return UNINFECTED
    if k in DIFFICULT_TYPES:
        return None
    raise AnnotationError(f"unknown annotation type {kind!r} (expected a parasite stage {PARASITE_STAGES}, "
                          f"one of {UNINFECTED_TYPES} or 'difficult')")


def _number(v, where: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise AnnotationError(f"{where}: box value {v!r} is not a number") from None


def _collect(name: str, items: list[tuple[str, list]], size=None) -> FieldBoxes:
    boxes, labels, stages, difficult = [], [], [], []
    for kind, box in items:
        cls = class_of(kind)
        if cls is None:
            difficult.append(box)
        else:
            boxes.append(box)
            labels.append(cls)
            stages.append(kind.strip().lower())
    as_arr = lambda b: np.round(np.asarray(b, np.float64).reshape(-1, 4)).astype(np.int32)
    return FieldBoxes(name, as_arr(boxes), labels, stages, as_arr(difficult), size)


def parse_iml(records: list) -> dict[str, FieldBoxes]:
    """IML-Malaria's list of ``{"image_name", "objects"}`` records -> {image name: FieldBoxes}."""
    out: dict[str, FieldBoxes] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "image_name" not in rec:
            raise AnnotationError(f"record {i}: expected an object with 'image_name' and 'objects'")
        name = str(rec["image_name"])
        if name in out:
            raise AnnotationError(f"image {name} is annotated twice")
        items = []
        for j, obj in enumerate(rec.get("objects") or []):
            where = f"{name} object {j}"
            try:
                b = obj["bbox"]
                box = [_number(b[k], where) for k in ("x", "y", "w", "h")]
                items.append((str(obj["type"]), box))
            except (KeyError, TypeError):
                raise AnnotationError(f"{where}: expected 'type' and 'bbox' with x, y, w, h") from None
        out[name] = _collect(name, items)
    return out


def parse_coco(doc: dict) -> dict[str, FieldBoxes]:
    """COCO ``{"images", "annotations", "categories"}`` -> {file name: FieldBoxes} (sizes from ``images``)."""
    try:
        cats = {c["id"]: str(c["name"]) for c in doc["categories"]}
        images = {im["id"]: (str(im["file_name"]), (int(im["width"]), int(im["height"]))) for im in doc["images"]}
    except (KeyError, TypeError, ValueError):
        raise AnnotationError("COCO: every category needs id and name, every image id, file_name, width, height") from None
    items: dict[int, list] = {k: [] for k in images}
    for j, ann in enumerate(doc.get("annotations") or []):
        where = f"COCO annotation {ann.get('id', j)}"
        if ann.get("image_id") not in images:
            raise AnnotationError(f"{where}: image_id {ann.get('image_id')!r} is not among the images")
        if ann.get("category_id") not in cats:
            raise AnnotationError(f"{where}: category_id {ann.get('category_id')!r} is not among the categories")
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise AnnotationError(f"{where}: bbox must be [x, y, w, h]")
        items[ann["image_id"]].append((cats[ann["category_id"]], [_number(v, where) for v in bbox]))
    out: dict[str, FieldBoxes] = {}
    for k, (name, size) in images.items():
        if name in out:
            raise AnnotationError(f"COCO: file_name {name} appears twice among the images")
        out[name] = _collect(name, items[k], size)
    return out


def parse_annotations(doc) -> dict[str, FieldBoxes]:
    """Either format, told apart by shape: a list is IML-Malaria's, a dict with ``images`` is COCO."""
    if isinstance(doc, list):
        return parse_iml(doc)
    if isinstance(doc, dict) and "images" in doc and "categories" in doc:
        return parse_coco(doc)
    raise AnnotationError("not an annotation file: expected IML-Malaria's list of image records or COCO JSON "
                          "(images, annotations, categories)")


def load_annotations(path: str) -> dict[str, FieldBoxes]:
    """Read and parse an annotation JSON file."""
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise AnnotationError(f"{path}: cannot read annotation JSON: {exc}") from exc
    return parse_annotations(doc)


def image_sizes(folder: str, names) -> dict[str, tuple[int, int]]:
    """(width, height) of each named image under ``folder`` from its header (EXIF rotation applied);
    a missing or unreadable image raises, naming up to five of them."""
    from PIL import Image

    sizes, missing = {}, []
    for name in names:
        try:
            with Image.open(os.path.join(folder, name)) as im:
                w, h = im.size
                # EXIF orientations 5-8 turn the picture by 90 degrees: decoding swaps its sides
                sizes[name] = (h, w) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)
        except OSError:
            missing.append(name)
    if missing:
        raise AnnotationError(f"{len(missing)} annotated image(s) missing or unreadable under {folder}: "
                              + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    return sizes


def check_boxes(table: dict[str, FieldBoxes], sizes: dict[str, tuple[int, int]],
                tolerance: int = EDGE_TOLERANCE) -> dict[str, FieldBoxes]:
    """Clip boxes that run at most ``tolerance`` px past the image to it; raise on boxes further out,
    empty boxes and images without a size, naming up to five of them."""
    problems = []
    for name, fb in table.items():
        size = sizes.get(name, fb.size)
        if size is None:
            problems.append(f"{name}: image missing")
            continue
        w_img, h_img = size
        for attr in ("boxes", "difficult"):
            b = getattr(fb, attr).astype(np.int64)
            x0, y0, x1, y1 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
            bad = ((b[:, 2] <= 0) | (b[:, 3] <= 0) | (x0 < -tolerance) | (y0 < -tolerance)
                   | (x1 > w_img + tolerance) | (y1 > h_img + tolerance))
            for i in np.flatnonzero(bad):
                problems.append(f"{name}: box {b[i].tolist()} (x, y, w, h) lies outside the {w_img}x{h_img} image or is empty")
            x0, y0 = np.clip(x0, 0, w_img), np.clip(y0, 0, h_img)
            x1, y1 = np.clip(x1, 0, w_img), np.clip(y1, 0, h_img)
            setattr(fb, attr, np.stack([x0, y0, x1 - x0, y1 - y0], axis=1).astype(np.int32))
        fb.size = (w_img, h_img)
    if problems:
        raise AnnotationError(f"{len(problems)} bad box(es): " + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
    return table


# Documented exclusions (docs/fields.md): boxes the annotation convention makes unfit to score
# detection against. Relative to the image's own median box, so they follow the cell size.
DEGENERATE_SIDE = 0.5  # shorter side under this share of the median box side: a sliver, not a cell
MERGED_AREA = 1.6  # area over this multiple of the median box area: usually two cells in one box
EXCLUSIONS = ("degenerate", "merged", "border")


def exclusion_reasons(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Per box "" (kept) or why it is excluded: ``degenerate``, ``merged`` (two cells in one box),
    ``border`` (touches the image edge, where boxing depends on how much of the cell shows)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    reason = np.full(len(b), "", dtype=object)
    if not len(b):
        return reason
    area = b[:, 2] * b[:, 3]
    med_area = float(np.median(area))
    reason[np.minimum(b[:, 2], b[:, 3]) < DEGENERATE_SIDE * np.sqrt(med_area)] = "degenerate"
    reason[(reason == "") & (area > MERGED_AREA * med_area)] = "merged"
    w, h = size
    edge = (b[:, 0] <= 0) | (b[:, 1] <= 0) | (b[:, 0] + b[:, 2] >= w) | (b[:, 1] + b[:, 3] >= h)
    reason[(reason == "") & edge] = "border"
    return reason


def contiguous_folds(names, k: int) -> np.ndarray:
    """Fold index (0..k-1) of each name: sorted by name (camera serial numbers), cut into ``k``
    contiguous runs of near-equal length, so neighbouring shots (likely one slide) share a fold.
    Deterministic; the result is in the order of ``names``."""
    names = [str(n) for n in names]
    if not 2 <= k <= len(names):
        raise ValueError(f"k must be between 2 and the number of images ({len(names)}), got {k}")
    if len(set(names)) != len(names):
        raise ValueError("image names must be unique")
    order = sorted(range(len(names)), key=lambda i: names[i])
    folds = np.empty(len(names), np.int64)
    for f, idx in enumerate(np.array_split(np.asarray(order), k)):
        folds[idx] = f
    return folds


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` [n, 4] with every box of ``b`` [m, 4] (x, y, w, h) -> [n, m]."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 0] + a[:, None, 2], b[None, :, 0] + b[None, :, 2])
                 - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 1] + a[:, None, 3], b[None, :, 1] + b[None, :, 3])
                 - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


@dataclass
class Match:
    """One-to-one matches of predicted to true boxes: ``pairs`` [k, 2] (truth index, prediction
    index) and their ``ious``; counts that leave ignored boxes out; recall and precision."""

    pairs: np.ndarray
    ious: np.ndarray
    tp: int
    fn: int
    fp: int

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")


def match_boxes(truth: np.ndarray, pred: np.ndarray, iou_min: float = IOU_MATCH,
                ignore: np.ndarray | None = None) -> Match:
    """Hungarian one-to-one matching maximising total IoU, pairs kept at IoU >= ``iou_min``.

    ``ignore`` (bool per true box): such a box counts neither as found nor missed, a prediction
    matched to it is not a false positive, nor is an unmatched prediction lying mostly (>= half its
    area) inside it (e.g. the two cells of a box drawn around two)."""
    from scipy.optimize import linear_sum_assignment

    truth = np.asarray(truth).reshape(-1, 4)
    pred = np.asarray(pred).reshape(-1, 4)
    ign = np.zeros(len(truth), bool) if ignore is None else np.asarray(ignore, bool)
    iou = iou_matrix(truth, pred)
    pairs = np.zeros((0, 2), np.int64)
    if iou.size:
        rows, cols = linear_sum_assignment(np.where(iou >= iou_min, iou, 0.0), maximize=True)
        keep = iou[rows, cols] >= iou_min
        pairs = np.stack([rows[keep], cols[keep]], axis=1).astype(np.int64)
    matched_t = np.zeros(len(truth), bool)
    matched_p = np.zeros(len(pred), bool)
    matched_t[pairs[:, 0]] = True
    matched_p[pairs[:, 1]] = True
    pred_on_ignored = np.zeros(len(pred), bool)
    pred_on_ignored[pairs[ign[pairs[:, 0]], 1]] = True
    if ign.any() and len(pred):
        t = truth[ign].astype(np.float64)
        p = pred.astype(np.float64)
        ix = np.clip(np.minimum(p[:, None, 0] + p[:, None, 2], t[None, :, 0] + t[None, :, 2])
                     - np.maximum(p[:, None, 0], t[None, :, 0]), 0, None)
        iy = np.clip(np.minimum(p[:, None, 1] + p[:, None, 3], t[None, :, 1] + t[None, :, 3])
                     - np.maximum(p[:, None, 1], t[None, :, 1]), 0, None)
        inside = (ix * iy).max(axis=1) >= 0.5 * np.maximum(p[:, 2] * p[:, 3], 1)
        pred_on_ignored |= inside & ~matched_p
    tp = int(np.sum(~ign[pairs[:, 0]]))
    fn = int(np.sum(~matched_t & ~ign))
    fp = int(np.sum(~matched_p & ~pred_on_ignored))
    return Match(pairs, iou[pairs[:, 0], pairs[:, 1]] if len(pairs) else np.zeros(0), tp, fn, fp)
