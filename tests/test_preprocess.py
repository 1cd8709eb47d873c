"""Decoding and augmentation geometry on real and crafted images (numpy/PIL; TF only where marked)."""

import io

import numpy as np
import pytest
from PIL import Image

from malaria_ray import preprocess


def _png(arr, mode=None):
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG") if mode else Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_real_cell(sample_dir):
    path = next((sample_dir / "Parasitized").glob("*.png"))
    img = preprocess.decode_image(path.read_bytes(), 128)
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8 and img.max() > 100


def test_decode_modes():
    gray = np.full((20, 30), 200, np.uint8)
    assert preprocess.decode_image(_png(gray), 16).shape == (16, 16, 3)
    deep = np.full((10, 10), 65535, np.uint16)
    assert preprocess.decode_image(_png(deep), 8).max() == 255
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 0  # fully transparent red -> black background
    assert preprocess.decode_image(_png(rgba), 8).max() == 0


@pytest.mark.parametrize("data, why", [(b"", "empty"), (b"hello, not a png", "not a decodable"),
                                       (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a decodable")])
def test_decode_errors(data, why):
    with pytest.raises(preprocess.DecodeError, match=why):
        preprocess.decode_image(data, 8)


def test_identity_free_transform_when_ranges_are_zero(monkeypatch):
    for name in ("ROTATION_DEG", "ZOOM", "SHIFT", "SHEAR"):
        monkeypatch.setattr(preprocess, name, 0.0)
    monkeypatch.setattr(preprocess, "HFLIP", False)
    m = preprocess.augment_matrices(3, 32, np.random.default_rng(0))
    assert np.allclose(m, [1, 0, 0, 0, 1, 0, 0, 0])


@pytest.mark.tf
def test_augment_batch_changes_pixels_but_keeps_shape(sample_dir):
    path = next((sample_dir / "Uninfected").glob("*.png"))
    img = preprocess.decode_image(path.read_bytes(), 64)[None].astype(np.float32)
    out = preprocess.augment_batch(np.repeat(img, 4, 0), np.random.default_rng(1)).numpy()
    assert out.shape == (4, 64, 64, 3)
    assert not np.allclose(out[0], img[0])
    assert abs(out.mean() - img.mean()) < 0.25 * img.mean()  # a warp, not a wipe
