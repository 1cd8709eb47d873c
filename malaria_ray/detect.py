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

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage import feature, filters, morphology, segmentation

MIN_FIELD_SIDE = 64  # px; a smaller image cannot hold a field of cells
FLAG_NO_CELLS = "no_cells"
FLAG_HUGE_BLOB = "one_huge_blob"  # most of the picture one object: not a thin smear, or out of focus
FLAG_FEW_CELLS = "few_cells"
HUGE_BLOB = 0.3  # one object over this share of the picture: no thin smear has a cell that big
FLAG_DIAMETER = "diameter_implausible"
REJECT_REASONS = ("small", "large", "border", "white_cell")


class FieldError(ValueError):
    """An array that is not a field image this detector can read; the message says why."""


@dataclass(frozen=True)
class DetectParams:
    """Every knob of the detector. Sizes are relative to the expected cell diameter, which is
    estimated per field unless ``diameter`` (px of the full-size field) is given for an archive."""

    diameter: float | None = None
    work_scale: int = 2  # segment on a copy reduced this many times (block mean): speed
    smooth_sigma: float = 1.0  # Gaussian of the channel, px of the reduced copy
    threshold_scale: float = 1.0  # x Otsu's threshold of the absorbance-like channel
    black_level: int = 60  # all channels below: the scale bar and its label, never a cell
    fill_holes_frac: float = 0.5  # holes up to this share of a cell are pale centres...
    hole_level: float = 0.6  # ...if stained throughout (absorbance >= this x the threshold)
    tiny_hole_frac: float = 0.08  # holes up to this share of a cell are filled whatever their shade
    h_frac: float = 0.08  # h-maxima depth of the watershed surface (distance transform in radii)
    stain_weight: float = 0.0  # absorbance's weight in that surface
    peak_distance_frac: float = 0.6  # > 0: markers are the surface's peaks at least this x radius apart...
    peak_min_frac: float = 0.4  # ...and at least this high (radii from the edge)
    merge_piece_frac: float = 0.75  # touching segments each under this share of a cell...
    merge_union_frac: float = 1.3  # ...are joined when together under this share (0: never)...
    merge_solidity: float = 0.9  # ...and convex
    split_area_frac: float = 1.6  # > 0: segments over this share of a cell are split into their count of cells...
    split_solidity: float = 0.93  # ...when less convex than this (or over split_always_frac of a cell)...
    split_always_frac: float = 2.5
    split_count_bias: float = 0.0  # ...the count: round(area / cell + this)
    split_limit_cells: int = 8  # heaps of more cells are not split (thick areas; speed)
    split_disc_frac: float = 1.0  # a piece's box: the heap within this x radius of the piece's centre
    split_max_cells: int = 2  # selection: a heap of up to this many cells is given as its pieces, a bigger one whole
    min_area_frac: float = 0.5  # segments smaller than this share of a cell are debris
    max_area_frac: float = 2.5  # larger: a heap the watershed could not split
    border_area_frac: float = 0.5  # a border cell is kept when this share of a cell is visible...
    border_depth_frac: float = 0.8  # ...and (> 0) it reaches this x diameter into the field from the edge it touches
    nucleus_level: float = 0.22  # G / background below this: a white cell's nucleus
    nucleus_frac: float = 0.15  # share of nucleus pixels that makes a segment a white cell
    box_pad_frac: float = 0.06  # box grown by this share of the diameter per side (annotators' boxes are loose)
    min_diameter: float = 16.0  # px of the full field; an estimate outside [min, max] is flagged
    max_diameter: float = 400.0
    few_cells: int = 10  # fewer cells than this: flagged, too few to call a field

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DetectParams":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown detector parameter(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def key(self) -> str:
        """A short stable hash of the parameters: part of a field's skip key, so a change rescores."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


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


def reduce(image: np.ndarray, s: int) -> np.ndarray:
    """Block mean by ``s`` (float32), cropping the last partial block: a cheap, alias-free reduction
    (a sum of the s x s strided views: several times faster than a reshaped mean)."""
    if s == 1:
        return image.astype(np.float32)
    h, w = (image.shape[0] // s) * s, (image.shape[1] // s) * s
    out = np.zeros((h // s, w // s, image.shape[2]), np.float32)
    for dy in range(s):
        for dx in range(s):
            out += image[dy:h:s, dx:w:s]
    return out / (s * s)


def foreground(small: np.ndarray, p: DetectParams):
    """Red-cell-coloured pixels (bool), the absorbance-like channel of the reduced field and the
    threshold applied to it."""
    g = small[..., 1]
    # the background is the brightest thing on a smear; a high percentile, not the mode, so that a
    # picture mostly covered by one object still has its background found
    bright = float(np.percentile(g, 99))
    absorb = np.clip(1.0 - g / max(bright, 1), 0.0, 1.0)
    absorb = filters.gaussian(absorb, p.smooth_sigma) if p.smooth_sigma > 0 else absorb
    if absorb.max() - absorb.min() < 0.05:  # a blank picture: Otsu would split the noise
        return np.zeros(g.shape, bool), absorb, 1.0
    level = filters.threshold_otsu(absorb) * p.threshold_scale
    black = ndi.binary_dilation(small.max(axis=2) < p.black_level, iterations=2)
    return (absorb > level) & ~black, absorb, level


def largest_blob(fg: np.ndarray) -> int:
    """Pixels of the largest object of ``fg`` with its holes filled (0 when empty)."""
    if not fg.any():
        return 0
    blobs, _ = ndi.label(ndi.binary_fill_holes(fg))
    return int(np.bincount(blobs.ravel())[1:].max())


def fill_small_holes(fg: np.ndarray, absorb: np.ndarray, level: float, max_area: float, tiny_area: float) -> np.ndarray:
    """Fill holes up to ``max_area`` px that stay stained (every pixel's absorbance >= ``level``): a
    cell's pale centre. A gap ringed by touching cells reaches the bare background and stays open,
    or the cells around it would become one blob. Holes up to ``tiny_area`` are filled whatever
    their shade: a bright spot in a pale centre is smaller than any gap between cells."""
    holes = ndi.binary_fill_holes(fg) & ~fg
    lab, n = ndi.label(holes)
    if not n:
        return fg
    idx = np.arange(1, n + 1)
    size = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    small = np.zeros(n + 1, bool)
    small[1:] = ((size <= max_area) & (ndi.minimum(absorb, lab, idx) >= level)) | (size <= tiny_area)
    return fg | small[lab]


def estimate_radius(fg: np.ndarray) -> float:
    """Cell radius (px of ``fg``): the median distance-transform maximum over blobs bigger than specks."""
    filled = ndi.binary_fill_holes(fg)
    lab, n = ndi.label(filled)
    if not n:
        return 0.0
    peaks = ndi.maximum(ndi.distance_transform_edt(filled), lab, np.arange(1, n + 1))
    peaks = peaks[peaks > 3]
    return float(np.median(peaks)) if len(peaks) else 0.0


def split_cells(fg: np.ndarray, absorb: np.ndarray, level: float, radius: float, p: DetectParams) -> np.ndarray:
    """Label image of the foreground, touching cells split by a marker watershed. The surface is the
    distance transform (in radii) plus ``stain_weight`` x the absorbance (in thresholds): where two
    cells touch, the line between them is paler than either, so it adds a ridge the shape alone lacks."""
    dist = ndi.distance_transform_edt(fg) / max(radius, 1.0)
    height = filters.gaussian(dist + p.stain_weight * absorb / max(level, 1e-6), 1.0)
    if p.peak_distance_frac > 0:
        peaks = feature.peak_local_max(height, min_distance=max(1, int(p.peak_distance_frac * radius)),
                                       threshold_abs=p.peak_min_frac, exclude_border=False)
        markers = np.zeros(fg.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    else:
        markers, _ = ndi.label(morphology.h_maxima(height, p.h_frac))
    return segmentation.watershed(-height, markers, mask=fg)


def merge_fragments(labels: np.ndarray, cell_area: float, p: DetectParams) -> np.ndarray:
    """Join touching segments that are each less than ``merge_piece_frac`` of a cell when together
    they are at most ``merge_union_frac`` of one and convex (solidity >= ``merge_solidity``): one
    cell the watershed cut in two (a pale centre, a notch), not two cells."""
    if p.merge_union_frac <= 0:
        return labels
    area = np.bincount(labels.ravel())
    pairs = set()
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        touch = (a != b) & (a > 0) & (b > 0)
        pairs |= set(zip(np.minimum(a[touch], b[touch]).tolist(), np.maximum(a[touch], b[touch]).tolist()))
    small = area < p.merge_piece_frac * cell_area
    merged = np.arange(len(area))
    for a, b in sorted(pairs, key=lambda ab: area[ab[0]] + area[ab[1]]):
        ra, rb = merged[a], merged[b]
        if ra == rb or not (small[a] and small[b]):
            continue
        union = (merged[labels] == ra) | (merged[labels] == rb)
        if union.sum() > p.merge_union_frac * cell_area:
            continue
        ys, xs = np.nonzero(union)
        box = union[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        if box.sum() >= p.merge_solidity * morphology.convex_hull_image(box).sum():
            merged[merged == rb] = ra
    return merged[labels]


def _solidity(mask: np.ndarray) -> float:
    return float(mask.sum() / max(1, morphology.convex_hull_image(mask).sum()))


def _kmeans(pts: np.ndarray, init: np.ndarray, iters: int = 12) -> np.ndarray:
    """Lloyd's k-means of pixel coordinates from ``init`` centres; returns each point's cluster."""
    centres = init.astype(np.float64)
    k = len(centres)
    for _ in range(iters):
        near = ((pts[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2).argmin(axis=1)
        n = np.bincount(near, minlength=k)
        new = np.where(n[:, None] > 0, np.stack([np.bincount(near, pts[:, 0], k), np.bincount(near, pts[:, 1], k)], axis=1)
                       / np.maximum(n, 1)[:, None], centres)
        if np.abs(new - centres).max() < 0.25:
            break
        centres = new
    return ((pts[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2).argmin(axis=1)


def split_heaps(labels: np.ndarray, cell_area: float, p: DetectParams):
    """Split segments that hold several cells into as many pieces as cells they can hold. A heap
    of over ``split_area_frac`` of a cell that is not convex (solidity under ``split_solidity``),
    or any segment over ``split_always_frac`` of a cell, is cut into k = round(area / cell +
    ``split_count_bias``) pieces (k up to ``split_limit_cells``) by k-means of its pixel coordinates, started from the k highest
    peaks of its own distance transform (and the farthest pixels when it has fewer). Each piece is
    boxed as its whole cell: the heap's pixels within ``split_disc_frac`` radii of the piece's
    centre, since overlapping cells share the overlap. Returns the new label image and, per heap,
    (its label before the split, k, the pieces' labels, their boxes y0, x0, y1, x1)."""
    heaps: list[tuple[int, int, list[int], list[tuple[int, int, int, int]]]] = []
    if p.split_area_frac <= 0 or cell_area <= 0:
        return labels, heaps
    area = np.bincount(labels.ravel())
    big = np.flatnonzero(area > p.split_area_frac * cell_area)
    big = big[big > 0]
    if not len(big):
        return labels, heaps
    out = labels.copy()
    nxt = int(labels.max()) + 1
    slices = ndi.find_objects(labels)
    radius = np.sqrt(cell_area / np.pi)
    for i in big:
        sl = slices[i - 1]
        mask = labels[sl] == i
        a = area[i] / cell_area
        if a < p.split_always_frac and mask.sum() >= p.split_solidity * morphology.convex_hull_image(mask).sum():
            continue
        k = int(np.round(a + p.split_count_bias))
        if k < 2 or k > p.split_limit_cells:
            continue
        peaks = feature.peak_local_max(ndi.distance_transform_edt(mask), min_distance=max(1, int(0.3 * radius)),
                                       num_peaks=k, exclude_border=False)
        ys, xs = np.nonzero(mask)
        pts = np.stack([ys, xs], axis=1).astype(np.float64)
        init = [q.astype(np.float64) for q in peaks]
        while len(init) < k:  # the pixel farthest from the centres so far
            init.append(pts[((pts[:, None, :] - np.array(init)[None]) ** 2).sum(axis=2).min(axis=1).argmax()])
        near = _kmeans(pts, np.array(init))
        ids = [int(i)] + list(range(nxt, nxt + k - 1))
        nxt += k - 1
        out[sl][ys, xs] = np.array(ids)[near]
        boxes = []
        for j in range(k):
            cy, cx = pts[near == j].mean(axis=0) if np.any(near == j) else init[j]
            inside = ((pts[:, 0] - cy) ** 2 + (pts[:, 1] - cx) ** 2 <= (p.split_disc_frac * radius) ** 2) | (near == j)
            yy, xx = ys[inside], xs[inside]
            boxes.append((sl[0].start + yy.min(), sl[1].start + xx.min(), sl[0].start + yy.max() + 1, sl[1].start + xx.max() + 1))
        heaps.append((int(i), k, ids, boxes))
    return out, heaps


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
