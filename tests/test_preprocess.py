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
    u = np.random.default_rng(0).random((3, 7))
    u[:, 6] = 0.75  # the draw that does not mirror
    m = preprocess._affine(u, 32, np)  # the host (numpy) transforms
    assert np.allclose(m, [1, 0, 0, 0, 1, 0, 0, 0])
    u[:, 6] = 0.25  # the draw that mirrors about the centre
    assert np.allclose(preprocess._affine(u, 32, np), [-1, 0, 31, 0, 1, 0, 0, 0])


@pytest.mark.tf
def test_augment_batch_changes_pixels_but_keeps_shape(sample_dir):
    path = next((sample_dir / "Uninfected").glob("*.png"))
    img = preprocess.decode_image(path.read_bytes(), 64)[None].astype(np.float32)
    import tensorflow as tf

    seed = tf.constant(np.random.default_rng(1).integers(0, 2**62, size=2), tf.int64)
    out = preprocess.augment_tf(tf.convert_to_tensor(np.repeat(img, 4, 0), tf.float32), seed).numpy()
    assert out.shape == (4, 64, 64, 3)
    assert not np.allclose(out[0], img[0])
    assert abs(out.mean() - img.mean()) < 0.25 * img.mean()  # a warp, not a wipe


@pytest.mark.tf
def test_in_step_augmentation_computes_the_host_reference_matrices():
    """The TensorFlow transforms (inside the compiled step) equal the numpy reference for the same
    draws, and the closed form equals the notebook-style product of rotation, shear, zoom, shift."""
    import math

    import tensorflow as tf

    u = np.random.default_rng(3).random((6, 7))
    host = preprocess._affine(u, 64, np)
    dev = preprocess._affine(tf.constant(u, tf.float32), 64, tf).numpy()
    assert np.allclose(host, dev, atol=1e-4)
    c = 63 / 2
    for row, m in zip(u, host):
        th, sh = math.radians((2 * row[0] - 1) * 20), math.radians((2 * row[5] - 1) * 0.05)
        flip = -1.0 if row[6] < 0.5 else 1.0
        rot = np.array([[math.cos(th), -math.sin(th), 0], [math.sin(th), math.cos(th), 0], [0, 0, 1]])
        shear = np.array([[1, -math.sin(sh), 0], [0, math.cos(sh), 0], [0, 0, 1]])
        zoom = np.diag([(0.95 + 0.1 * row[1]) * flip, 0.95 + 0.1 * row[2], 1.0])
        shift = np.array([[1, 0, (2 * row[3] - 1) * 3.2], [0, 1, (2 * row[4] - 1) * 3.2], [0, 0, 1]])
        centre, back = np.array([[1, 0, c], [0, 1, c], [0, 0, 1]]), np.array([[1, 0, -c], [0, 1, -c], [0, 0, 1]])
        assert np.allclose((centre @ shift @ rot @ shear @ zoom @ back).reshape(-1)[:8], m, atol=1e-9)
    img = tf.constant(np.random.default_rng(0).random((2, 32, 32, 3)), tf.float32)
    a, b, other = (preprocess.augment_tf(img, tf.constant(s, tf.int64)).numpy() for s in ([1, 2], [1, 2], [1, 3]))
    assert np.array_equal(a, b) and not np.allclose(a, other), "stateless: one seed, one warp"


def test_decoding_is_limited_to_scanner_formats_and_is_honest_about_them(sample_dir):
    """Only PNG, JPEG and TIFF are decoded; a multi-frame TIFF is refused, not read as its first
    frame; a JPEG's EXIF orientation is applied."""
    src = Image.open(next((sample_dir / "Parasitized").glob("*.png"))).convert("RGB")
    for fmt in ("BMP", "GIF", "WEBP"):
        buf = io.BytesIO()
        src.save(buf, format=fmt)
        with pytest.raises(preprocess.DecodeError, match=r"not a decodable image \(PNG/JPEG/TIFF only\)"):
            preprocess.decode_image(buf.getvalue(), 32)
    buf = io.BytesIO()
    src.save(buf, format="TIFF", save_all=True, append_images=[src.rotate(90)])
    with pytest.raises(preprocess.DecodeError, match="2 frames"):
        preprocess.decode_image(buf.getvalue(), 32)
    buf = io.BytesIO()
    src.save(buf, format="TIFF")
    assert preprocess.decode_image(buf.getvalue(), 32).shape == (32, 32, 3)
    # A tall image stored sideways with EXIF orientation 6 ("rotate 90 CW to display") decodes upright.
    tall = Image.new("RGB", (40, 80), (255, 255, 255))
    tall.paste((255, 0, 0), (0, 0, 40, 20))  # red band at the top of the upright image
    sideways = tall.transpose(Image.Transpose.ROTATE_90)  # what the camera stored: 80 x 40
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    sideways.save(buf, format="JPEG", exif=exif, quality=95)
    out = preprocess.decode_image(buf.getvalue(), 80)
    assert out[:10].mean(axis=(0, 1))[0] > 200 and out[:10].mean(axis=(0, 1))[1] < 80, "top band is red"


@pytest.mark.tf
def test_cells_policy_rotates_any_way_jitters_colour_and_leaves_the_notebook_policy_unchanged(sample_dir):
    """--augment-policy cells: the colour jitter is the documented closed form (mid draws: identity;
    black stays black; clipped), the background stays black under any rotation (no smeared edge
    pixels), one seed gives one result; the notebook policy still draws exactly what it always did."""
    import tensorflow as tf

    from malaria_ray.cli import parse_train
    from malaria_ray.config import ConfigError, TrainConfig

    rng = np.random.default_rng(5)
    x = rng.uniform(0, 255, (3, 8, 8, 3)).astype(np.float32)
    x[:, 0, 0] = 0.0
    assert np.allclose(preprocess.color_jitter_tf(tf.constant(x), tf.fill([3, 5], 0.5)).numpy(), x, atol=1e-3)
    u = rng.random((3, 5)).astype(np.float32)
    s = preprocess.COLOR_JITTER
    grey = x.mean(-1, keepdims=True)
    gain = (1 - s + 2 * s * u[:, 1:2]) * (1 - s / 2 + s * u[:, 2:5])
    want = np.clip((grey + (x - grey) * (1 - 2 * s + 4 * s * u[:, 0])[:, None, None, None]) * gain[:, None, None],
                   0, 255)
    got = preprocess.color_jitter_tf(tf.constant(x), tf.constant(u)).numpy()
    assert np.allclose(got, want, atol=1e-3) and (got[:, 0, 0] == 0).all()

    cells = np.stack([preprocess.decode_image(p.read_bytes(), 64)
                      for p in sorted((sample_dir / "Parasitized").glob("*.png"))[:16]]).astype(np.float32)
    seed, other = tf.constant([1, 2], tf.int64), tf.constant([1, 3], tf.int64)
    a, b, c = (preprocess.augment_tf(tf.constant(cells), sd, "cells").numpy() for sd in (seed, seed, other))
    assert np.array_equal(a, b) and not np.allclose(a, c)
    corners = a[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 0).all(), "any rotation: corners are filled with black, not edge pixels"
    u12 = tf.random.stateless_uniform([16, 12], seed=seed, dtype=tf.float32)
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.constant(cells), transforms=preprocess._affine(u12[:, :7], 64, tf, rotation_deg=180.0),
        output_shape=[64, 64], fill_value=tf.constant(0.0), interpolation="BILINEAR", fill_mode="CONSTANT")
    assert np.allclose(a, preprocess.color_jitter_tf(warped, u12[:, 7:]).numpy(), atol=1e-3), "warp, then jitter"
    half_turn = preprocess._affine(np.array([[1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.9]]), 64, np, rotation_deg=180.0)
    assert np.allclose(half_turn, [[-1, 0, 63, 0, -1, 63, 0, 0]], atol=1e-9), "the range reaches a half turn"
    assert abs(a.mean() - cells.mean()) < 0.1 * cells.mean()
    default = preprocess.augment_tf(tf.constant(cells), seed).numpy()
    u7 = tf.random.stateless_uniform([16, 7], seed=seed, dtype=tf.float32)
    ref = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.constant(cells), transforms=preprocess._affine(u7, 64, tf), output_shape=[64, 64],
        fill_value=tf.constant(0.0), interpolation="BILINEAR", fill_mode="NEAREST").numpy()
    assert np.array_equal(default, ref) and np.array_equal(default, preprocess.augment_tf(tf.constant(cells), seed,
                                                                                         "notebook").numpy())
    with pytest.raises(ValueError, match="augment policy"):
        preprocess.augment_tf(tf.constant(cells), seed, "strong")
    cfg, _ = parse_train(["--data", "d", "--output", "o", "--augment-policy", "cells"])
    assert cfg.augment_policy == "cells" and TrainConfig(data="d", output="o").augment_policy == "notebook"
    with pytest.raises(ConfigError, match="--augment-policy"):
        TrainConfig(data="d", output="o", augment_policy="strong")
    with pytest.raises(ConfigError, match="--no-augment"):
        parse_train(["--data", "d", "--output", "o", "--augment-policy", "cells", "--no-augment"])


def test_scoring_resizes_as_the_model_contract_says(sample_dir):
    """The resize method comes from model.json; a bare .keras (no model.json) gets the documented
    default, which is what training uses; a method preprocess does not have is refused."""
    from malaria_ray import model, schema

    assert model.resize_of({}) == schema.RESIZE_DEFAULT == "bilinear"
    assert model.resize_of({schema.KEY_RESIZE: "nearest"}) == "nearest"
    with pytest.raises(model.ModelError, match="resize"):
        model.resize_of({schema.KEY_RESIZE: "seam-carving"})
    data = next((sample_dir / "Parasitized").glob("*.png")).read_bytes()
    assert np.array_equal(preprocess.decode_image(data, 32), preprocess.decode_image(data, 32, "bilinear"))
    assert not np.array_equal(preprocess.decode_image(data, 32, "nearest"), preprocess.decode_image(data, 32))


def test_scoring_refuses_a_contract_it_cannot_honour():
    """model.json's classes, positive index, channels, scale and size are read, not only written."""
    from malaria_ray import model, schema

    good = {schema.KEY_CLASSES: list(schema.CLASS_NAMES), schema.KEY_POSITIVE_INDEX: 0, schema.KEY_CHANNELS: "RGB",
            schema.KEY_SCALE: 1 / 255, schema.KEY_IMAGE_SIZE: 64}
    model.check_contract(good, 64)
    model.check_contract({}, 64)  # a bare .keras
    for bad, needle in (({schema.KEY_CLASSES: ["Uninfected", "Parasitized"]}, "classes"),
                        ({schema.KEY_POSITIVE_INDEX: 1}, "positive_index"), ({schema.KEY_CHANNELS: "BGR"}, "channels"),
                        ({schema.KEY_SCALE: 1.0}, "scale"), ({schema.KEY_IMAGE_SIZE: 128}, "takes 64 px")):
        with pytest.raises(model.ModelError, match=needle):
            model.check_contract({**good, **bad}, 64)
