"""Decode and resize cell images; the notebook's augmentation as one affine warp per image.

Decoding is numpy/PIL only, so it runs in plain Ray Data CPU tasks. Scaling (1/255) is *not*
applied here: it is the first layer of the model, so it travels with the artifact and scoring
cannot drift from training. Every caller resizes through ``decode_image``.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image

# Largest image we agree to decode (pixels). NIH cells are ~130x130; whole slides are ~5,000x4,000.
MAX_PIXELS = 64_000_000
RESAMPLE = Image.Resampling.BILINEAR

# The notebook's ImageDataGenerator settings (training batches only).
ROTATION_DEG = 20.0
ZOOM = 0.05
SHIFT = 0.05
SHEAR = 0.05  # ImageDataGenerator reads shear_range in degrees
HFLIP = True


class DecodeError(ValueError):
    """Bytes that are not a usable image; the message goes into the row's ``error`` column."""


def decode_image(data: bytes, size: int) -> np.ndarray:
    """``size`` x ``size`` x 3 uint8 RGB from encoded bytes (PNG/JPEG/TIFF, any mode or bit depth)."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise DecodeError(f"image too large ({w}x{h} > {MAX_PIXELS} pixels): possible decompression bomb")
                im.load()
                rgb = _to_rgb(im)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"decompression bomb refused: {exc}") from exc
    except Exception as exc:  # PIL raises many types for bad bytes (UnidentifiedImageError, OSError, SyntaxError)
        raise DecodeError(f"not a decodable image: {type(exc).__name__}: {exc}") from exc
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), RESAMPLE)
    return np.asarray(rgb, dtype=np.uint8)


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


def augment_matrices(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` projective transforms (8 params each, output->input pixel map) for random
    rotation, zoom, shift, shear and horizontal flip about the image centre."""
    out = np.empty((n, 8), dtype=np.float32)
    c = (size - 1) / 2.0
    for i in range(n):
        theta = math.radians(rng.uniform(-ROTATION_DEG, ROTATION_DEG))
        zx, zy = rng.uniform(1 - ZOOM, 1 + ZOOM, size=2)
        tx, ty = rng.uniform(-SHIFT, SHIFT, size=2) * size
        shear = math.radians(rng.uniform(-SHEAR, SHEAR))
        flip = -1.0 if (HFLIP and rng.random() < 0.5) else 1.0
        rot = np.array([[math.cos(theta), -math.sin(theta), 0], [math.sin(theta), math.cos(theta), 0], [0, 0, 1]])
        shr = np.array([[1, -math.sin(shear), 0], [0, math.cos(shear), 0], [0, 0, 1]])
        zoom = np.diag([zx * flip, zy, 1.0])
        centre = np.array([[1, 0, c], [0, 1, c], [0, 0, 1]])
        uncentre = np.array([[1, 0, -c], [0, 1, -c], [0, 0, 1]])
        shift = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
        m = centre @ shift @ rot @ shr @ zoom @ uncentre
        m = m / m[2, 2]
        out[i] = m.reshape(-1)[:8]
    return out


def augment_batch(images: np.ndarray, rng: np.random.Generator):
    """Warp a batch (N, H, W, 3) with fresh random transforms; returns a float32 ``tf.Tensor``."""
    import tensorflow as tf

    n, h, w, _ = images.shape
    transforms = augment_matrices(n, h, rng)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.convert_to_tensor(images, tf.float32),
        transforms=tf.convert_to_tensor(transforms),
        output_shape=tf.constant([h, w], tf.int32),
        fill_value=tf.constant(0.0),
        interpolation="BILINEAR",
        fill_mode="NEAREST",  # ImageDataGenerator's default
    )
