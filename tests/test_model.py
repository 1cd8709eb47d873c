"""The notebook's model: parameter count, artifact contract, weight loading from a real HTTP server."""

import functools
import http.server
import threading

import numpy as np
import pytest

from malaria_ray import model as model_mod

pytestmark = pytest.mark.tf


def test_parameter_count_matches_notebook():
    m = model_mod.build_model(128)
    assert m.count_params() == 23_827_330
    assert m.input_shape == (None, 128, 128, 3) and m.output_shape == (None, 2)


def test_save_load_keeps_contract_and_outputs(tmp_path):
    m = model_mod.build_model(32, seed=0)
    saved_id = model_mod.save_model(m, str(tmp_path / "run"), h5=True)
    loaded, model_id = model_mod.load_model(str(tmp_path / "run"))
    assert saved_id == model_id and (tmp_path / "run" / "model.h5").exists()
    x = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3)).astype(np.float32)
    assert np.allclose(m.predict_on_batch(x), loaded.predict_on_batch(x), atol=1e-5)
    assert loaded.get_layer("rescale").scale == pytest.approx(1 / 255)  # scaling travels with the model
    contract = (tmp_path / "run" / "model.json").read_text()
    assert model_id in contract and '"image_size": 32' in contract
    assert model_id == model_mod.load_model(str(tmp_path / "run" / "model.keras"))[1]


def test_inspect_artifact_reads_size_and_id_without_tensorflow(tmp_path):
    import subprocess
    import sys
    import zipfile

    import keras

    model_id = model_mod.save_model(model_mod.build_model(32, seed=0), str(tmp_path / "run"))
    code = ("import json, sys; from malaria_ray.model import inspect_artifact; "
            f"print(json.dumps(inspect_artifact({str(tmp_path / 'run')!r}))); assert 'tensorflow' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == '{"image_size": 32, "model_id": "%s"}' % model_id

    inputs = keras.Input((32, 32, 3))
    nested = keras.Sequential([keras.layers.Lambda(lambda t: t * 2.0), keras.layers.GlobalAveragePooling2D()])
    keras.Model(inputs, keras.layers.Dense(2)(nested(inputs))).save(tmp_path / "lambda.keras")
    (tmp_path / "text.keras").write_text("hello")
    with zipfile.ZipFile(tmp_path / "noconfig.keras", "w") as zf:
        zf.writestr("metadata.json", "{}")
    keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)]).save(tmp_path / "dense.keras")
    for name, needle in [("lambda.keras", "Lambda layer"), ("text.keras", "not a loadable Keras model"),
                         ("noconfig.keras", "not a loadable Keras model"), ("missing.keras", "does not exist"),
                         ("dense.keras", "not a malaria-ray classifier")]:
        with pytest.raises(model_mod.ModelError, match=needle):
            model_mod.inspect_artifact(str(tmp_path / name))
    assert model_mod.inspect_artifact(str(tmp_path / "legacy.h5")) is None  # only Keras reads .h5


def test_weights_downloaded_from_local_http_server(tmp_path):
    src = model_mod.build_model(32, seed=1).get_layer("resnet50v2")
    src.save_weights(str(tmp_path / "notop.weights.h5"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/notop.weights.h5"
        got = model_mod.build_model(32, weights=url, seed=2).get_layer("resnet50v2")
        for a, b in zip(src.get_weights(), got.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
        with pytest.raises(model_mod.ModelError, match="cannot download"):
            model_mod.build_model(32, weights=url.replace("notop", "missing"))
        import hashlib

        digest = hashlib.sha256((tmp_path / "notop.weights.h5").read_bytes()).hexdigest()
        got = model_mod.build_model(32, weights=url, seed=3, weights_sha256=digest).get_layer("resnet50v2")
        np.testing.assert_array_equal(src.get_weights()[0], got.get_weights()[0])
        signed = url + "?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIAEXAMPLE"
        with pytest.raises(model_mod.ModelError, match="does not match --weights-sha256") as err:
            model_mod.build_model(32, weights=signed, weights_sha256="0" * 64)
        assert "deadbeef" not in str(err.value) and "AKIAEXAMPLE" not in str(err.value)
    finally:
        server.shutdown()


def test_imagenet_offline_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(model_mod, "IMAGENET_URL", "http://127.0.0.1:9/" + model_mod.IMAGENET_FILE)
    with pytest.raises(model_mod.ModelError) as err:
        model_mod.build_model(32, weights="imagenet")
    msg = str(err.value)
    assert model_mod.IMAGENET_FILE in msg and "--weights none" in msg


def test_not_a_model_is_refused(tmp_path):
    (tmp_path / "model.keras").write_bytes(b"not a zip")
    with pytest.raises(model_mod.ModelError, match="not a loadable Keras model"):
        model_mod.load_model(str(tmp_path))
    with pytest.raises(model_mod.ModelError, match="does not exist"):
        model_mod.load_model(str(tmp_path / "missing"))


def test_imagenet_weights_come_from_the_keras_cache(tmp_path, monkeypatch):
    """The cache holds Keras's legacy-HDF5 notop file; written here in that format from a random base."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    (tmp_path / "models").mkdir()
    src = model_mod.build_model(32, seed=5).get_layer("resnet50v2")
    with h5py.File(tmp_path / "models" / model_mod.IMAGENET_FILE, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, src)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(model_mod, "IMAGENET_URL", "http://127.0.0.1:9/unreachable")  # the cache must suffice
    got = model_mod.build_model(32, weights="imagenet", seed=1).get_layer("resnet50v2")
    for a, b in zip(src.get_weights(), got.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.tf
def test_a_model_whose_input_scaling_cannot_be_verified_is_refused(tmp_path):
    """The notebook's own artifact expects 0..1 input and has no Rescaling layer: scoring it with raw
    pixels would be silently wrong, so both the driver's inspection and the actor's load refuse it."""
    import keras

    inp = keras.Input((32, 32, 3))
    x = keras.applications.ResNet50V2(include_top=False, weights=None, input_shape=(32, 32, 3))(inp)
    out = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(x))
    notebook = keras.Model(inp, out)
    notebook.save(tmp_path / "notebook.keras")
    notebook.save(tmp_path / "notebook.h5")
    with pytest.raises(model_mod.ModelError, match="input scaling cannot be verified"):
        model_mod.inspect_artifact(str(tmp_path / "notebook.keras"))
    for name in ("notebook.keras", "notebook.h5"):
        with pytest.raises(model_mod.ModelError, match="input scaling cannot be verified"):
            model_mod.load_model(str(tmp_path / name))
    ours = model_mod.build_model(32, seed=0)
    model_mod.save_model(ours, str(tmp_path / "ours"))
    assert model_mod.inspect_artifact(str(tmp_path / "ours"))["image_size"] == 32


def test_bf16_copy_computes_in_bfloat16_with_the_same_weights(sample_dir):
    import keras

    from malaria_ray.backends import predictor
    from malaria_ray.model import bf16_copy, build_model
    from malaria_ray.preprocess import decode_image

    model = build_model(32, seed=1)
    copy = bf16_copy(model)
    assert keras.mixed_precision.global_policy().name == "float32"  # nothing global changed
    conv = next(la for la in copy.get_layer("resnet50v2").layers if isinstance(la, keras.layers.Conv2D))
    assert conv.compute_dtype == "bfloat16" and conv.kernel.dtype == "float32"
    assert copy.get_layer("probs").compute_dtype == "float32" and copy.output.dtype == "float32"
    for a, b in zip(model.get_weights(), copy.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    x = np.stack([decode_image(f.read_bytes(), 32) for f in sorted((sample_dir / "Parasitized").glob("*.png"))[:8]])
    assert np.allclose(predictor(copy)(x), predictor(model)(x), atol=0.02)


def test_a_downloaded_model_leaves_no_copy_behind(tmp_path, monkeypatch):
    """Every scoring actor loads the model from its URI; a remote artifact is copied to a temp dir
    that must be gone once the model is loaded (or refused), or a long-lived cluster fills its disk."""
    import tempfile

    model_mod.save_model(model_mod.build_model(32, seed=0), str(tmp_path / "served" / "run"))
    (tmp_path / "served" / "broken.keras").write_bytes(b"not a zip")
    model_mod.build_model(32, seed=1).get_layer("resnet50v2").save_weights(str(tmp_path / "served" / "w.weights.h5"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "served"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # this process's temp dir, as TMPDIR sets it
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        model, model_id = model_mod.load_model(f"{base}/run/model.keras")
        assert model.input_shape == (None, 32, 32, 3)
        assert model_id == model_mod.file_id(str(tmp_path / "served" / "run" / "model.keras"))
        with pytest.raises(model_mod.ModelError, match="not a loadable Keras model"):
            model_mod.load_model(f"{base}/broken.keras")
        model_mod.build_model(32, weights=f"{base}/w.weights.h5")
        with pytest.raises(model_mod.ModelError, match="does not match --weights-sha256"):
            model_mod.build_model(32, weights=f"{base}/w.weights.h5", weights_sha256="0" * 64)
    finally:
        server.shutdown()
    assert list(scratch.iterdir()) == [], "a downloaded copy was left in the temp dir"


def test_a_jax_actor_scores_without_tensorflow(score_model):
    """``score --backend jax``: a process started with the actor's environment (``actor_env``)
    loads the TensorFlow-saved model, compiles its predictor (a batch of 5 images, padded to 8,
    gives each image the probability it has in a batch of 8) and asks for GPUs without importing
    TensorFlow. Its bf16 copy, called through ``stateless_call``, is within bfloat16's round-off of
    fp32 (0.02, the bound test_bf16_copy_computes_in_bfloat16_with_the_same_weights puts on
    TensorFlow's). An actor whose Keras runs on another backend than the one asked is refused."""
    import os
    import subprocess
    import sys

    from malaria_ray.backends import actor_env

    code = f"""
import sys
import numpy as np
from malaria_ray import backends, model
backends.start("jax")
m, _ = model.load_model({str(score_model)!r})
predict = backends.predictor(m, 8)
x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
full = predict(x)
assert np.allclose(predict(x[:5]), full[:5], atol=1e-6)
assert backends.visible_gpus("jax") == 0  # this machine has none: the probe's answer, not an exception
print(sorted(name for name in ("tensorflow", "jax") if name in sys.modules))
bf16 = backends.predictor(model.bf16_copy(m), 8)(x)  # get_config imports TensorFlow where it is installed
assert np.all(np.isfinite(bf16)) and np.allclose(bf16, full, atol=0.02)
try:
    backends.start("tensorflow")
except model.ModelError as exc:
    assert "this actor's Keras runs on jax" in str(exc), exc
else:
    raise AssertionError("a jax actor accepted --backend tensorflow")
"""
    env = {**os.environ, **actor_env("jax")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[0] == "['jax']", out.stdout
