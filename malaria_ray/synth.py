"""A deterministic SYNTHETIC cell corpus, so ``make demo`` runs offline on a fresh machine.

Cells are pale discs on black, like NIH crops; Parasitized cells carry one to three dark purple
ring-form blobs. Filenames follow NIH's pattern with slide numbers >= 900 (never used by NIH; each seed its own), so
the identity parser and patient-grouped splits work on them as on real data. This is not NIH data
and says so wherever it is used.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

from malaria_ray.schema import CLASS_NAMES, NEGATIVE_CLASS, POSITIVE_CLASS

N_PATIENTS = 12  # infected patients (both classes); as many control slides again (Uninfected only)
SYNTHETIC_MARKER = "SYNTHETIC.txt"


def _cell(rng: np.random.Generator, size: int, parasitized: bool) -> Image.Image:
    im = Image.new("RGB", (size, size), (0, 0, 0))
    d = ImageDraw.Draw(im)
    r = size * rng.uniform(0.36, 0.46)
    cx, cy = size / 2 + rng.normal(0, size * 0.02, 2)
    base = np.array([212, 150, 160]) + rng.normal(0, 10, 3)
    d.ellipse([cx - r, cy - r * rng.uniform(0.85, 1.0), cx + r, cy + r], fill=tuple(int(v) for v in base))
    if parasitized:
        for _ in range(int(rng.integers(1, 4))):
            a, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0, r * 0.6)
            px, py = cx + rad * np.cos(a), cy + rad * np.sin(a)
            s = size * rng.uniform(0.05, 0.1)
            d.ellipse([px - s, py - s, px + s, py + s], outline=(110, 40, 140), width=max(1, size // 40))
    arr = np.asarray(im, dtype=np.float32) + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def write_corpus(dest: str, n: int, size: int = 96, seed: int = 0) -> int:
    """Write ``n`` PNGs (half per class) under ``dest``; returns the number written."""
    if n < 4:
        raise ValueError("--n must be >= 4")
    rng = np.random.default_rng(seed)
    for cls in CLASS_NAMES:
        os.makedirs(os.path.join(dest, cls), exist_ok=True)
    with open(os.path.join(dest, SYNTHETIC_MARKER), "w") as f:
        f.write("SYNTHETIC cell images written by `malaria-ray synth`; not NIH data.\n")
    written = 0
    for i in range(n):
        parasitized = i % 2 == 0
        k = i // 2
        # Each seed has its own patients and controls, so a second seed is a held-out set.
        patient, control = 900 + N_PATIENTS * seed + k % N_PATIENTS, 9000 + N_PATIENTS * seed + k % N_PATIENTS
        if parasitized or k % 3 != 0:
            slide = f"C{patient}P{patient}ThinF"
        else:
            slide = f"C{control}ThinF"  # control slide: no P token
        name = f"{slide}_IMG_20260101_{k % 7:06d}_cell_{i}.png"
        cls = POSITIVE_CLASS if parasitized else NEGATIVE_CLASS
        _cell(rng, size, parasitized).save(os.path.join(dest, cls, name))
        written += 1
    return written


def is_synthetic(data_uri: str) -> bool:
    from malaria_ray import storage

    return storage.exists(storage.join(data_uri, SYNTHETIC_MARKER))
