"""Decode and resize cell images; the notebook's augmentation as one affine warp per image, in-graph.

Decoding is numpy/PIL only, so it runs in plain Ray Data CPU tasks. Scaling (1/255) is *not*
applied here: it is the first layer of the model, so it travels with the artifact and scoring
cannot drift from training. Every caller resizes through ``decode_image``.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from malaria_ray.config import AUGMENT_POLICIES
from malaria_ray.schema import RESIZE_DEFAULT

# The only decoders Pillow may use: what microscopes and slide scanners write. Every other format
# (and its decoder's attack surface) is refused before any of its bytes are parsed as an image.
FORMATS = ("PNG", "JPEG", "TIFF")
# Largest image we agree to decode (pixels). NIH cells are ~130x130; whole slides are ~5,000x4,000.
MAX_PIXELS = 64_000_000
# A cut-out cell larger than this a side is refused: NIH's crops are at most ~400 px, and a field
# photograph (640x480 and up) scored as one cell would be a confident, meaningless row.
MAX_CELL_SIDE = 600
# Resize methods a model.json may name (``schema.KEY_RESIZE``): PIL's filters of those names.
RESIZE_FILTERS = {name: getattr(Image.Resampling, name.upper())
                  for name in ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")}

# The notebook's ImageDataGenerator settings (training batches only).
ROTATION_DEG = 20.0
ZOOM = 0.05
SHIFT = 0.05
SHEAR = 0.05  # ImageDataGenerator reads shear_range in degrees

# ``--augment-policy``. "notebook": the settings above. "cells": a cell on a slide has no up, and
# patients' smears differ in stain: any rotation (with the flip, every orientation), and a colour
# jitter of ``COLOR_JITTER``: a gain per image and per channel (black background stays black) and a
# saturation change, drawn independently for every image and step.
COLOR_JITTER = 0.1


class DecodeError(ValueError):
    """Bytes that are not a usable image; the message goes into the row's ``error`` column."""


def decode_image(data: bytes, size: int, resize: str = RESIZE_DEFAULT) -> np.ndarray:
    """``size`` x ``size`` x 3 uint8 RGB from encoded bytes (PNG/JPEG/TIFF, any mode or bit depth),
    resized with ``resize`` (a name of ``RESIZE_FILTERS``: the model's contract says which)."""
    rgb, _ = decode_rgb(data)
    if max(rgb.size) > MAX_CELL_SIDE:
        raise DecodeError(f"{rgb.size[0]}x{rgb.size[1]} px is not a cut-out cell (a side over {MAX_CELL_SIDE} px): "
                          "a photograph of a whole field? score those with --fields")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), RESIZE_FILTERS[resize])
    return np.asarray(rgb, dtype=np.uint8)


def decode_rgb(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, str]:
    """The image of encoded bytes as 8-bit RGB, upright by its EXIF orientation, and the mode it
    was stored in (``L``, ``I;16``, ``RGB``...: a field photograph must have colour). Raises
    ``DecodeError`` with the reason for bad bytes, stacks, and images over ``max_pixels``."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise DecodeError(f"image too large ({w}x{h} > {max_pixels} pixels): possible decompression bomb"
                                      if max_pixels == MAX_PIXELS else f"image too large ({w}x{h} > {max_pixels} "
                                      "pixels, the cap)")
                if getattr(im, "n_frames", 1) > 1:
                    raise DecodeError(f"{im.format} with {im.n_frames} frames: one image per file is scored, "
                                      "not the first frame of a stack")
                im.load()
                mode = im.mode
                return _to_rgb(ImageOps.exif_transpose(im)), mode  # a camera's EXIF orientation, applied
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"decompression bomb refused: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise DecodeError(f"not a decodable image ({'/'.join(FORMATS)} only): {exc}") from exc
    except Exception as exc:  # PIL raises many types for bad bytes (UnidentifiedImageError, OSError, SyntaxError)
        raise DecodeError(f"not a decodable image: {type(exc).__name__}: {exc}") from exc


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (0, 0, 0))  # NIH crops are cells on black
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")


def _affine(u, size: int, m, rotation_deg: float | None = None):
    """Projective transforms (8 params each, output->input pixel map) from uniforms ``u`` [n, 7] in
    [0, 1): rotation, zoom x/y, shift x/y, shear, horizontal flip about the image centre, as one
    affine map C . T . R . Sh . Z . C^-1. ``m`` is the array module: numpy on the host, TensorFlow
    inside a compiled step; both compute the same matrices from the same draws. ``rotation_deg``:
    the rotation range (+-), by default the notebook's ``ROTATION_DEG``."""
    c = (size - 1) / 2.0
    theta = (2 * u[:, 0] - 1) * ((ROTATION_DEG if rotation_deg is None else rotation_deg) * math.pi / 180)
    zx = 1 - ZOOM + 2 * ZOOM * u[:, 1]
    zy = 1 - ZOOM + 2 * ZOOM * u[:, 2]
    tx = (2 * u[:, 3] - 1) * SHIFT * size
    ty = (2 * u[:, 4] - 1) * SHIFT * size
    shear = (2 * u[:, 5] - 1) * (SHEAR * math.pi / 180)
    flip = m.where(u[:, 6] < 0.5, -1.0, 1.0)  # mirror with probability 1/2
    a0, a1 = m.cos(theta) * zx * flip, -m.sin(theta + shear) * zy
    a3, a4 = m.sin(theta) * zx * flip, m.cos(theta + shear) * zy
    zero = 0 * a0
    return m.stack([a0, a1, c + tx - (a0 + a1) * c, a3, a4, c + ty - (a3 + a4) * c, zero, zero], axis=1)


def augment_tf(images, seed, policy: str = "notebook"):
    """Warp a float32 batch (N, H, W, 3) with fresh random transforms (and, for the "cells" policy,
    a colour jitter), as TensorFlow ops: runs inside the compiled train step, on the device that
    trains. ``seed``: int64 [2], one per step (stateless: the same seed gives the same result, so a
    resumed run repeats nothing by chance)."""
    import tensorflow as tf

    if policy not in AUGMENT_POLICIES:
        raise ValueError(f"augment policy must be one of {', '.join(AUGMENT_POLICIES)}, got {policy!r}")
    cells = policy == "cells"
    shape = tf.shape(images)
    # The notebook policy draws exactly the 7 columns it always drew: a run's warps do not change.
    u = tf.random.stateless_uniform([shape[0], 12 if cells else 7], seed=seed, dtype=tf.float32)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=_affine(u[:, :7], images.shape[1], tf, rotation_deg=180.0 if cells else None),
        output_shape=shape[1:3],
        fill_value=tf.constant(0.0),
        interpolation="BILINEAR",
        # ImageDataGenerator's default repeats the edge pixels; with any rotation that smears streaks
        # into the corners, so "cells" fills with the black that surrounds every NIH crop.
        fill_mode="CONSTANT" if cells else "NEAREST",
    )
    return color_jitter_tf(out, u[:, 7:]) if cells else out


def color_jitter_tf(images, u, strength: float | None = None):
    """A stain-like colour change of a float32 batch in [0, 255] from uniforms ``u`` [N, 5]: the
    saturation scaled by 1 +- 2s (about each pixel's grey), then a gain of 1 +- s per image times
    1 +- s/2 per channel (s: ``COLOR_JITTER``); black stays black; clipped to [0, 255]."""
    import tensorflow as tf

    s = COLOR_JITTER if strength is None else strength
    sat = tf.reshape(1 - 2 * s + 4 * s * u[:, 0], [-1, 1, 1, 1])
    gain = (1 - s + 2 * s * u[:, 1:2]) * (1 - s / 2 + s * u[:, 2:5])  # [N, 3]
    grey = tf.reduce_mean(images, axis=-1, keepdims=True)
    out = (grey + (images - grey) * sat) * gain[:, None, None, :]
    return tf.clip_by_value(out, 0.0, 255.0)
