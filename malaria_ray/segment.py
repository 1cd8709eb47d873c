"""The detector's parameters and the image operations that find cell segments in a field.

``detect`` drives them (candidates, the red-cell rules, the crops); this module holds what the
segmentation itself does on the reduced copy: the foreground, the pale centres, the expected
radius, the watershed split of touching cells, fragment merging and the splitting of heaps.
``docs/fields.md`` has the method and the measurements behind each default.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy import ndimage as ndi
from skimage import feature, filters, morphology, segmentation


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
