"""Find the red cells of a field-of-view photograph of a thin smear and cut each one out.

A field (uint8 RGB, e.g. 1280x960) becomes one record per red cell: its box (x, y, w, h in the
field's pixels), its area, and the cell cut out, masked (outside the cell black, as the NIH crops
the model was trained on) and resized to the model's input. The method, on a copy reduced by
``work_scale`` (block mean):

1. absorbance-like channel ``1 - G / background`` (on Giemsa smears red cells absorb green; the
   background level is the 99th percentile of green), Gaussian smoothing, Otsu threshold
   (times ``threshold_scale``); near-black pixels (the burned-in scale bar and its label) removed;
2. the expected radius: median of the distance-transform maxima of the blobs (each blob, however
   many cells it holds, peaks near one cell's radius), unless ``diameter`` is given;
3. holes filled when they are pale centres: up to ``fill_holes_frac`` of a cell and stained
   throughout, or tiny; a gap ringed by touching cells reaches bare background and stays open;
4. markers: peaks of the smoothed distance transform at least ``peak_distance_frac`` radii apart
   (or its h-maxima), then a watershed of the inverted distance transform inside the foreground,
   which splits touching cells; touching fragments that together make one convex cell are joined;
   heaps the watershed left whole (over ``split_area_frac`` of a cell and not convex) are cut into
   their count of cells by k-means of their pixels, each piece boxed as its whole cell; the
   selection gives heaps of up to ``split_max_cells`` cells as their pieces, bigger ones whole;
5. segments judged against the field's reference cell area (median area of plausible segments):
   too small (platelets, debris, fragments), too large (unsplit heaps), cut by the border with
   less than ``border_area_frac`` of a cell visible or reaching less than ``border_depth_frac``
   diameters in (annotators do not box those), white cells
   (a large share of nucleus pixels: dark in green and bluer than red).

Boxes are the segment's bounding box grown by ``box_pad_frac`` of the diameter a side (the
annotators' boxes are looser than the stained area); the crop is the unpadded box, masked.
The defaults of the selection parameters are the values chosen on the training runs of
bench/field_detect.py (docs/fields.md).

Pure: numpy, scipy.ndimage, scikit-image and Pillow (for the crop resize, as ``preprocess``);
no Ray, no TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from malaria_ray.segment import (  # noqa: F401  (DetectParams is part of detect's API)
    DetectParams, estimate_radius, fill_small_holes, foreground, largest_blob, merge_fragments, reduce, split_cells, split_heaps,
)

MIN_FIELD_SIDE = 64  # px; a smaller image cannot hold a field of cells
FLAG_NO_CELLS = "no_cells"
FLAG_HUGE_BLOB = "one_huge_blob"  # most of the picture one object: not a thin smear, or out of focus
FLAG_FEW_CELLS = "few_cells"
HUGE_BLOB = 0.3  # one object over this share of the picture: no thin smear has a cell that big
FLAG_DIAMETER = "diameter_implausible"
REJECT_REASONS = ("small", "large", "border", "white_cell")


class FieldError(ValueError):
    """An array that is not a field image this detector can read; the message says why."""


@dataclass
class FieldDetection:
    """The red cells of one field: ``boxes`` int32 [n, 4] (x, y, w, h, full-size pixels), ``areas``
    int64 [n] (mask pixels, full size), ``crops`` uint8 [n, size, size, 3] (masked, resized);
    ``diameter`` the expected cell diameter used (px); ``rejected`` candidate segments left out, by
    reason; ``flags`` what a reader of the field's row should know (no cells, one huge blob...)."""

    boxes: np.ndarray
    areas: np.ndarray
    crops: np.ndarray
    diameter: float
    n_candidates: int
    rejected: dict[str, int] = field(default_factory=dict)
    flags: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.boxes)


def check_field(image) -> np.ndarray:
    """The image as uint8 [h, w, 3]; anything else raises ``FieldError`` with the reason."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise FieldError(f"field image must be 8-bit (uint8), got {arr.dtype}; convert 16-bit images on decode")
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise FieldError(f"field image must be RGB [h, w, 3], got shape {arr.shape} (grayscale has no stain colour)")
    if min(arr.shape[:2]) < MIN_FIELD_SIDE:
        raise FieldError(f"field image {arr.shape[1]}x{arr.shape[0]} is smaller than {MIN_FIELD_SIDE} px a side: "
                         "a single cell crop, not a field")
    return arr


@dataclass
class Candidates:
    """Every segment of one field before the red-cell rules: the label image of the reduced copy,
    and per segment its ``area`` (px of the reduced copy), ``bbox`` (y0, x0, y1, x1, reduced),
    ``on_border``, ``nucleus`` (px of nucleus colour); ``cell_area`` the reference cell (reduced px)."""

    labels: np.ndarray
    ids: np.ndarray  # label of each segment in ``labels``
    area: np.ndarray
    bbox: np.ndarray
    on_border: np.ndarray
    nucleus: np.ndarray
    cell_area: float
    scale: int
    flags: tuple[str, ...]
    shape: tuple[int, int] = (0, 0)  # of the reduced copy (``labels.shape``)
    heap_cells: np.ndarray | None = None  # cells of the heap a segment was split from, or that it is (1: no heap)
    whole: np.ndarray | None = None  # the segment is a split heap as one (the alternative to its pieces)
    parent: np.ndarray | None = None  # label of the heap before its split (0: no heap)

    @property
    def diameter(self) -> float:
        """The expected cell diameter in px of the full-size field."""
        return float(2 * np.sqrt(self.cell_area / np.pi) * self.scale)


def find_candidates(img: np.ndarray, p: DetectParams) -> Candidates:
    """Segment a checked field: foreground, cell radius, hole fill, watershed, per-segment measures."""
    s = max(1, int(p.work_scale))
    small = reduce(img, s)
    fg, absorb, level = foreground(small, p)
    bright = float(np.percentile(small[..., 1], 99))
    radius = p.diameter / 2 / s if p.diameter else estimate_radius(fg)
    flags: list[str] = []
    if largest_blob(fg) > HUGE_BLOB * fg.size:
        flags.append(FLAG_HUGE_BLOB)
    if radius < 2:
        labels = np.zeros(fg.shape, np.int32)
    else:
        labels = split_cells(fill_small_holes(fg, absorb, p.hole_level * level, p.fill_holes_frac * np.pi * radius ** 2,
                                                  p.tiny_hole_frac * np.pi * radius ** 2), absorb, level, radius, p)
    cell_area = np.pi * radius ** 2
    if not p.diameter and labels.any():  # the field's own reference: the median segment that looks like one cell
        sizes = np.bincount(labels.ravel())[1:]
        plausible = sizes[(sizes > 0.5 * cell_area) & (sizes < 2.5 * cell_area)]
        cell_area = float(np.median(plausible)) if len(plausible) >= 3 else cell_area
    labels, heaps = split_heaps(merge_fragments(labels, cell_area, p), cell_area, p)
    # find_objects + bincount: the boxes and areas regionprops would give, at a tenth of its cost
    slices = ndi.find_objects(labels)
    ids = np.array([i + 1 for i, sl in enumerate(slices) if sl is not None], np.int64)
    h, w = labels.shape
    area = np.bincount(labels.ravel())[ids].astype(np.float64)
    bbox = np.array([(sl[0].start, sl[1].start, sl[0].stop, sl[1].stop) for sl in slices if sl is not None],
                    np.int64).reshape(-1, 4)
    heap_cells = np.ones(len(ids), np.int64)
    parent = np.zeros(len(ids), np.int64)
    pos = {int(i): k for k, i in enumerate(ids)}
    extra = []
    for lab, k, piece_ids, boxes in heaps:  # each piece boxed as its whole cell, overlap included
        kk = [pos[j] for j in piece_ids if j in pos]
        if not kk:
            continue
        heap_cells[kk], parent[kk] = k, lab
        bbox[kk] = [boxes[piece_ids.index(int(ids[q]))] for q in kk]
        whole_box = (min(bbox[kk, 0]), min(bbox[kk, 1]), max(bbox[kk, 2]), max(bbox[kk, 3]))
        extra.append((lab, k, area[kk].sum(), whole_box))
    whole = np.r_[np.zeros(len(ids), bool), np.ones(len(extra), bool)]
    if extra:  # each split heap also as one segment: the selection chooses pieces or the whole (split_max_cells)
        ids = np.r_[ids, [-e[0] for e in extra]]
        heap_cells = np.r_[heap_cells, [e[1] for e in extra]]
        parent = np.r_[parent, [e[0] for e in extra]]
        area = np.r_[area, [e[2] for e in extra]]
        bbox = np.r_[bbox, np.array([e[3] for e in extra], np.int64)]
    on_border = (bbox[:, 0] == 0) | (bbox[:, 1] == 0) | (bbox[:, 2] >= h) | (bbox[:, 3] >= w)
    if not p.diameter:  # refined on the merged segments, away from the border
        plausible = ~on_border & ~whole & (area > 0.6 * cell_area) & (area < 1.6 * cell_area)
        if plausible.sum() >= 3:
            cell_area = float(np.median(area[plausible]))
    # a nucleus is dark in green and bluer than red; red cells, however deep their stain, stay redder than blue
    dark_blue = (small[..., 1] < p.nucleus_level * bright) & (small[..., 2] > small[..., 0])
    nucleus = np.asarray(ndi.sum(dark_blue, labels, ids[~whole]) if len(ids) else [], np.float64)
    if extra:
        nucleus = np.r_[nucleus, [nucleus[parent[~whole] == e[0]].sum() for e in extra]]
    return Candidates(labels, ids, area, bbox, on_border, nucleus, float(cell_area), s, tuple(flags), labels.shape,
                      heap_cells, whole, parent)


def select_cells(c: Candidates, p: DetectParams) -> tuple[np.ndarray, dict[str, int]]:
    """Indices of the candidates that are red cells, and how many were rejected for each reason."""
    ref = c.cell_area
    reason = np.full(len(c.area), "", dtype=object)
    if c.whole is not None and c.whole.any():  # a heap: its pieces, or itself whole when it holds too many cells
        reason[c.whole & (c.heap_cells <= p.split_max_cells)] = "alt"
        reason[~c.whole & (c.heap_cells > p.split_max_cells)] = "alt"
    reason[c.area < p.min_area_frac * ref] = "small"
    reason[(reason == "") & (c.area > p.max_area_frac * ref)] = "large"
    reason[(reason == "") & c.on_border & (c.area < p.border_area_frac * ref)] = "border"
    if p.border_depth_frac > 0 and len(c.area):  # how far a cut cell reaches in: the annotators' "most of it visible"
        h, w = c.shape
        y0, x0, y1, x1 = c.bbox.T
        depth = np.minimum(np.where((x0 == 0) | (x1 >= w), x1 - x0, np.inf), np.where((y0 == 0) | (y1 >= h), y1 - y0, np.inf))
        reason[(reason == "") & (depth < p.border_depth_frac * c.diameter / c.scale)] = "border"
    reason[(reason == "") & (c.nucleus > p.nucleus_frac * c.area)] = "white_cell"
    return np.flatnonzero(reason == ""), {k: int(np.sum(reason == k)) for k in REJECT_REASONS}


def n_segments(c: Candidates) -> int:
    """Segments of the field (a split heap counted as its pieces)."""
    return int(len(c.ids) - (c.whole.sum() if c.whole is not None else 0))


def detect_cells(image, size: int = 128, params: DetectParams | None = None) -> FieldDetection:
    """The red cells of one field image (uint8 RGB); ``size``: the side of each masked crop."""
    p = params or DetectParams()
    img = check_field(image)
    c = find_candidates(img, p)
    keep, rejected = select_cells(c, p)
    flags = list(c.flags)
    if c.cell_area > 0 and not p.min_diameter <= c.diameter <= p.max_diameter:
        flags.append(FLAG_DIAMETER)
    if not len(keep):
        return _empty(size, c.diameter, n_segments(c), flags + [FLAG_NO_CELLS], rejected)
    if len(keep) < p.few_cells:
        flags.append(FLAG_FEW_CELLS)
    boxes, areas, crops = cut_cells(img, c, keep, size, p.box_pad_frac * c.diameter)
    return FieldDetection(boxes, areas, crops, c.diameter, n_segments(c), rejected, tuple(flags))


def _empty(size, diameter, n_candidates, flags, rejected=None) -> FieldDetection:
    return FieldDetection(np.zeros((0, 4), np.int32), np.zeros(0, np.int64), np.zeros((0, size, size, 3), np.uint8),
                          float(diameter), n_candidates, dict(rejected or dict.fromkeys(REJECT_REASONS, 0)), tuple(flags))


def candidate_boxes(c: Candidates, shape, pad: float = 0.0) -> np.ndarray:
    """Full-size boxes (x, y, w, h) int32 of every candidate, grown by ``pad`` px a side, clipped
    to the field; a segment on the reduced copy's last row/column reaches the field's edge."""
    H, W = shape[:2]
    s = c.scale
    y0, x0, y1, x1 = (c.bbox * s).T
    y1 = np.where(y1 >= (H // s) * s, H, y1)
    x1 = np.where(x1 >= (W // s) * s, W, x1)
    bx0, by0 = np.clip(np.round(x0 - pad), 0, W), np.clip(np.round(y0 - pad), 0, H)
    bx1, by1 = np.clip(np.round(x1 + pad), 0, W), np.clip(np.round(y1 + pad), 0, H)
    return np.stack([bx0, by0, bx1 - bx0, by1 - by0], axis=1).astype(np.int32).reshape(-1, 4)


def cut_cells(img: np.ndarray, c: Candidates, keep: np.ndarray, size: int, pad: float):
    """Boxes (grown by ``pad`` px a side), mask areas (full-size px) and masked ``size`` x ``size``
    crops of the kept candidates; the mask is the segment brought to full size (nearest neighbour)."""
    s = c.scale
    tight = candidate_boxes(c, img.shape)[keep]
    areas = np.zeros(len(keep), np.int64)
    crops = np.zeros((len(keep), size, size, 3), np.uint8)
    for i, k in enumerate(keep):
        x, y, w, h = tight[i]
        y0, x0, y1, x1 = c.bbox[k]
        sub = c.labels[y0:y1, x0:x1]
        if c.ids[k] > 0:
            sub = sub == c.ids[k]
        else:  # a heap whole: all its pieces
            sub = np.isin(sub, c.ids[~c.whole & (c.parent == -c.ids[k])])
        mask = np.repeat(np.repeat(sub, s, axis=0), s, axis=1)
        mask = np.pad(mask, ((0, h - mask.shape[0]), (0, w - mask.shape[1])), mode="edge")
        cut = img[y:y + h, x:x + w] * mask[..., None]  # outside the cell black, as NIH's crops
        crops[i] = np.asarray(Image.fromarray(cut).resize((size, size), Image.Resampling.BILINEAR))
        areas[i] = int(mask.sum())
    return candidate_boxes(c, img.shape, pad)[keep], areas, crops
