"""scikit-image vs OpenCV for the detector's key operations, on the same field, in one process.

    PYTHONPATH=. python bench/detect_libs.py [--field PATH] [--rounds 7]

The detector (``malaria_ray.detect``) runs on a field reduced 2x (640x480 for a 1280x960 photo).
For each operation it needs, this times the scikit-image/SciPy call it uses and the nearest OpenCV
call on the same input (best of ``--rounds``), and says whether OpenCV can do the same thing:
its watershed floods an 8-bit colour image by colour difference, not a float surface from given
markers in height order, so the distance-transform watershed does not port one to one. Then the
share of ``detect_cells`` each stage takes. One JSON line per operation, then a summary. Needs
``opencv-python-headless`` (dev extra) for the OpenCV side; the field is real
(``$MALARIA_FIELDS_DIR``) where present, else a SYNTHETIC one.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from malaria_ray import detect as D  # noqa: E402

FIELDS = pathlib.Path(os.environ.get("MALARIA_FIELDS_DIR", REPO.parent / "shared" / "data" / "iml_malaria"))


def best(fn, rounds: int) -> float:
    """Best wall time of ``rounds`` calls, in ms."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * min(times)


def load_field(path: pathlib.Path | None) -> tuple[np.ndarray, str]:
    from PIL import Image

    if path is None and (FIELDS / "images").is_dir():
        path = sorted((FIELDS / "images").iterdir())[0]
    if path is not None:
        return np.asarray(Image.open(path).convert("RGB")), str(path.name)
    from malaria_ray.synth_fields import make_field

    return make_field(seed=0, width=1280, height=960, n_cells=120, diameter=80).image, "SYNTHETIC 1280x960"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--field", type=pathlib.Path, help="a field image (default: the first IML-Malaria field)")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    import cv2
    from scipy import ndimage as ndi
    from skimage import feature, filters, segmentation

    cv2.setNumThreads(1)  # per core, as the detector runs: one field per CPU task
    img, name = load_field(args.field)
    p = D.DetectParams()
    small = D.reduce(img, 2)
    fg, absorb, level = D.foreground(small, p)
    fg8 = fg.astype(np.uint8)
    a8 = np.clip(absorb * 255, 0, 255).astype(np.uint8)
    dist = ndi.distance_transform_edt(fg).astype(np.float32)
    radius = D.estimate_radius(fg)
    md = max(1, int(p.peak_distance_frac * radius))
    peaks = feature.peak_local_max(dist, min_distance=md, threshold_abs=p.peak_min_frac * radius, exclude_border=False)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)

    def cv_fill():
        m = fg8.copy()
        pad = np.zeros((m.shape[0] + 2, m.shape[1] + 2), np.uint8)
        cv2.floodFill(m, pad, (0, 0), 1)  # background reachable from the corner; the rest are holes
        return fg8 | (1 - m)

    def cv_peaks():
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * md + 1, 2 * md + 1))
        return (dist == cv2.dilate(dist, k)) & (dist > p.peak_min_frac * radius)

    def cv_watershed():  # the distance surface squeezed into an 8-bit colour image: not the same method
        surf = cv2.cvtColor((255 - np.clip(dist / dist.max() * 255, 0, 255)).astype(np.uint8), cv2.COLOR_GRAY2BGR)
        m = markers.copy()
        m[(fg8 == 0)] = len(peaks) + 1
        return cv2.watershed(surf, m)

    seg = segmentation.watershed(-dist, markers, mask=fg)
    crop = img[100:185, 100:185].copy()
    from PIL import Image

    ops = [
        ("gaussian blur", lambda: filters.gaussian(absorb, 1.0), lambda: cv2.GaussianBlur(absorb, (0, 0), 1.0), "same"),
        ("otsu threshold", lambda: filters.threshold_otsu(absorb), lambda: cv2.threshold(a8, 0, 1, cv2.THRESH_OTSU),
         "same (8-bit)"),
        ("fill holes", lambda: ndi.binary_fill_holes(fg), cv_fill, "same"),
        ("distance transform", lambda: ndi.distance_transform_edt(fg), lambda: cv2.distanceTransform(fg8, cv2.DIST_L2, 5),
         "cv2: 5x5 mask approximation; exact with DIST_MASK_PRECISE"),
        ("connected components", lambda: ndi.label(fg), lambda: cv2.connectedComponents(fg8), "same"),
        ("local maxima (markers)", lambda: feature.peak_local_max(dist, min_distance=md, threshold_abs=p.peak_min_frac * radius,
                                                                   exclude_border=False), cv_peaks,
         "cv2: plateaus give several markers"),
        ("marker watershed", lambda: segmentation.watershed(-dist, markers, mask=fg), cv_watershed,
         "NOT the same: cv2 floods by colour difference of an 8-bit image"),
        ("segment boxes and areas", lambda: (ndi.find_objects(seg), np.bincount(seg.ravel())),
         lambda: cv2.connectedComponentsWithStats(fg8), "same (skimage's regionprops, used at first: 10x slower)"),
        ("crop resize 85->128 (x100)",
         lambda: [Image.fromarray(crop).resize((128, 128), Image.Resampling.BILINEAR) for _ in range(100)],
         lambda: [cv2.resize(crop, (128, 128), interpolation=cv2.INTER_LINEAR) for _ in range(100)], "Pillow, as preprocess"),
    ]
    total_sk = total_cv = 0.0
    for op, sk, cv, note in ops:
        t_sk, t_cv = best(sk, args.rounds), best(cv, args.rounds)
        total_sk, total_cv = total_sk + t_sk, total_cv + t_cv
        print(json.dumps({"op": op, "skimage_scipy_ms": round(t_sk, 2), "opencv_ms": round(t_cv, 2),
                          "ratio": round(t_sk / t_cv, 1), "note": note}))
    t_all = best(lambda: D.detect_cells(img, 128, p), args.rounds)
    t_cand = best(lambda: D.find_candidates(img, p), args.rounds)
    t_fg = best(lambda: D.foreground(D.reduce(img, 2), p), args.rounds)
    print(f"{name}: key ops {total_sk:.1f} ms with scikit-image/SciPy (+Pillow), {total_cv:.1f} ms with OpenCV; "
          f"detect_cells {t_all:.0f} ms = reduce+foreground {t_fg:.0f} + rest of segmentation {t_cand - t_fg:.0f} "
          f"+ selection and {128}px crops {t_all - t_cand:.0f} ({1000 / t_all:.2f} fields/s per core)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
