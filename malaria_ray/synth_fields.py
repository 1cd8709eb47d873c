"""SYNTHETIC field-of-view images of a thin smear, with their true boxes, for tests on a fresh clone.

Not real data, and not a model of any real data set: a greenish background under uneven light,
red cells as discs/ellipses with a denser rim and a pale centre (absorbances add where cells
overlap, as in a photograph through two cells), some touching or overlapping, some with dark purple
parasite dots, optionally a white cell (a big purple-nucleated cell, not a red cell), and a
burned-in scale bar. Cells mostly cut off by the border are drawn but not boxed, as annotators do.
Pure: numpy and Pillow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Light through the empty smear, and absorbance (-ln transmittance) per channel of a cell, of a
# parasite and of a white cell's nucleus; chosen to look like a Giemsa smear, nothing more.
BACKGROUND = np.array([200.0, 228.0, 205.0])
CELL_ABS = np.array([0.11, 0.45, 0.24])
PARASITE_ABS = np.array([0.9, 1.7, 0.6])
NUCLEUS_ABS = np.array([0.9, 1.6, 0.45])
BOXED_VISIBLE = 0.6  # a border cell is boxed when at least this share of it is in the image


@dataclass
class SyntheticField:
    """``image`` uint8 [h, w, 3]; ``boxes`` int32 [n, 4] (x, y, w, h) of the red cells to find;
    ``parasitized`` bool [n]; ``cut_off`` int32 [m, 4]: cells mostly outside the image (not boxed);
    ``white_cells`` int32 [k, 4]: boxes of white cells (not red cells)."""

    image: np.ndarray
    boxes: np.ndarray
    parasitized: np.ndarray
    cut_off: np.ndarray
    white_cells: np.ndarray


def _place(rng, n: int, d: float, w: int, h: int, touching: float):
    """Centres and radii (rx, ry) of ``n`` cells: most apart, a ``touching`` share overlapping a
    previously placed cell by 5-25% of the diameter."""
    cells: list[tuple[float, float, float, float]] = []
    tries = 0
    while len(cells) < n and tries < 200 * n:
        tries += 1
        r = d / 2 * rng.uniform(0.9, 1.1)
        rx, ry = r, r * rng.uniform(0.85, 1.0)
        if rng.random() > 0.5:
            rx, ry = ry, rx
        partner = -1
        if cells and rng.random() < touching:
            partner = int(rng.integers(len(cells)))
            cx0, cy0, rx0, ry0 = cells[partner]
            a = rng.uniform(0, 2 * np.pi)
            dist = (max(rx0, ry0) + max(rx, ry)) * rng.uniform(0.78, 0.95)
            cx, cy = cx0 + dist * np.cos(a), cy0 + dist * np.sin(a)
        else:
            cx, cy = rng.uniform(-0.3 * d, w + 0.3 * d), rng.uniform(-0.3 * d, h + 0.3 * d)
        # it may overlap its partner, but keeps clear of every other cell (no heaps of three)
        if any(np.hypot(cx - c[0], cy - c[1]) < 1.05 * (max(rx, ry) + max(c[2], c[3]))
               for i, c in enumerate(cells) if i != partner):
            continue
        cells.append((cx, cy, rx, ry))
    return cells


def _disc(shape, cx, cy, rx, ry):
    """Normalised radius rho (1 at the edge) over the image; cheap enough for test-sized fields."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)


def make_field(seed: int = 0, width: int = 640, height: int = 480, n_cells: int = 40, diameter: float = 48.0,
               touching: float = 0.3, parasitized: float = 0.15, white_cell: bool = True,
               scale_bar: bool = True) -> SyntheticField:
    """One SYNTHETIC field with its truth; deterministic for a given ``seed``."""
    rng = np.random.default_rng(seed)
    absorb = np.zeros((height, width, 3))
    boxes, infected, cut = [], [], []
    for cx, cy, rx, ry in _place(rng, n_cells, diameter, width, height, touching):
        x0, x1 = int(np.floor(cx - rx)), int(np.ceil(cx + rx))
        y0, y1 = int(np.floor(cy - ry)), int(np.ceil(cy + ry))
        bx0, by0, bx1, by1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        if bx1 <= bx0 or by1 <= by0:
            continue
        rho = _disc((by1 - by0, bx1 - bx0), cx - bx0, cy - by0, rx, ry)
        inside = rho <= 1
        # denser rim, pale centre: the biconcave disc seen through the microscope
        profile = np.where(inside, 0.75 + 0.45 * rho ** 4 - 0.35 * np.exp(-(rho / 0.35) ** 2), 0.0)
        sick = rng.random() < parasitized
        patch = profile[..., None] * CELL_ABS * rng.uniform(0.9, 1.1)
        if sick:
            for _ in range(int(rng.integers(1, 4))):
                a, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.6)
                px, py = cx - bx0 + rad * rx * np.cos(a), cy - by0 + rad * ry * np.sin(a)
                dot = _disc(rho.shape, px, py, diameter * 0.06, diameter * 0.06) <= 1
                patch += dot[..., None] * PARASITE_ABS
        absorb[by0:by1, bx0:bx1] += patch
        visible = inside.sum() / (np.pi * rx * ry)
        if visible >= BOXED_VISIBLE:
            boxes.append([bx0, by0, bx1 - bx0, by1 - by0])
            infected.append(sick)
        elif visible < 0.4:  # clearly cut off; in-between cells are neither boxed nor counted as cut off
            cut.append([bx0, by0, bx1 - bx0, by1 - by0])
    whites = []
    if white_cell:
        whites = _draw_white_cell(rng, absorb, diameter, boxes)
    light = BACKGROUND * (1 + 0.08 * np.linspace(-1, 1, width)[None, :, None]
                          - 0.05 * np.linspace(-1, 1, height)[:, None, None])
    img = light * np.exp(-absorb) + rng.normal(0, 3, absorb.shape)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.8))
    if scale_bar:
        _draw_scale_bar(im, diameter)
    as_boxes = lambda b: np.asarray(b, np.int32).reshape(-1, 4)
    return SyntheticField(np.asarray(im), as_boxes(boxes), np.asarray(infected, bool), as_boxes(cut), as_boxes(whites))


def _draw_white_cell(rng, absorb, d, boxes) -> list:
    """A white cell (1.6 d) with a lobed dark nucleus, where no boxed red cell is; returns its box."""
    h, w = absorb.shape[:2]
    r = 0.8 * d
    for _ in range(200):
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        if all(abs(cx - (b[0] + b[2] / 2)) > r + b[2] / 2 or abs(cy - (b[1] + b[3] / 2)) > r + b[3] / 2 for b in boxes):
            break
    else:
        return []
    x0, y0 = int(cx - r), int(cy - r)
    size = int(2 * r) + 1
    rho = _disc((size, size), cx - x0, cy - y0, r, r)
    nucleus = np.zeros((size, size), bool)
    for _ in range(3):  # three lobes
        a = rng.uniform(0, 2 * np.pi)
        nucleus |= _disc((size, size), r + 0.3 * r * np.cos(a) , r + 0.3 * r * np.sin(a), 0.35 * r, 0.3 * r) <= 1
    patch = (rho <= 1)[..., None] * CELL_ABS * 0.25 + nucleus[..., None] * NUCLEUS_ABS
    ys, xs = slice(max(y0, 0), min(y0 + size, h)), slice(max(x0, 0), min(x0 + size, w))
    absorb[ys, xs] += patch[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
    return [[x0, y0, size, size]]


def _draw_scale_bar(im: Image.Image, d: float) -> None:
    """A black bar with end ticks and a label, bottom right, over whatever is there (as cameras burn it in)."""
    draw = ImageDraw.Draw(im)
    w, h = im.size
    length = int(1.15 * d)
    x1, y = w - int(0.05 * w), h - int(0.12 * h)
    x0 = x1 - length
    draw.line([(x0, y), (x1, y)], fill=(0, 0, 0), width=3)
    draw.line([(x0, y - 5), (x0, y + 5)], fill=(0, 0, 0), width=2)
    draw.line([(x1, y - 5), (x1, y + 5)], fill=(0, 0, 0), width=2)
    draw.text((x0 + length // 3, y + 10), "50um", fill=(0, 0, 0))


def write_fields(dest: str, n: int, slides: int = 2, seed: int = 0, width: int = 640, height: int = 480) -> int:
    """``n`` SYNTHETIC field photographs as JPEG under ``dest/slide-<k>/`` (the folder names the
    slide, as a lab's archive of one folder per slide does), with their true boxes in COCO JSON
    (``dest/annotations.json``: ``red blood cell``, and ``ring`` for a parasitized cell), which
    ``score --fields --annotations`` reads; returns how many were written."""
    import json
    import os

    images, anns = [], []
    for i in range(n):
        f = make_field(seed=seed * 100_003 + i, width=width, height=height)
        name = f"field-{i:04d}.jpg"
        os.makedirs(os.path.join(dest, f"slide-{i % slides}"), exist_ok=True)
        Image.fromarray(f.image).save(os.path.join(dest, f"slide-{i % slides}", name), quality=92)
        images.append({"id": i, "file_name": name, "width": width, "height": height})
        anns += [{"id": len(anns) + j, "image_id": i, "bbox": [int(v) for v in box], "category_id": int(sick)}
                 for j, (box, sick) in enumerate(zip(f.boxes, f.parasitized))]
    with open(os.path.join(dest, "annotations.json"), "w") as fh:
        json.dump({"images": images, "annotations": anns,
                   "categories": [{"id": 0, "name": "red blood cell"}, {"id": 1, "name": "ring"}]}, fh)
    return n
