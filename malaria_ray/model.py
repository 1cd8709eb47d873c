"""The notebook's ResNet50V2 classifier; save/load with the preprocessing contract.

The contract travels inside the artifact: the input shape fixes the image size and the first
layer rescales 0..255 -> 0..1, so scoring code feeds raw uint8 pixels resized by
``preprocess.decode_image`` and never re-types a constant. TensorFlow is imported inside the
functions that need it, so importing this module keeps the driver light.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from typing import Iterator

from malaria_ray import storage
from malaria_ray.schema import (
    CLASS_NAMES, CONTRACT_FILE, H5_FILE, KEY_CHANNELS, KEY_CLASSES, KEY_IMAGE_SIZE, KEY_MODEL_ID, KEY_POSITIVE_INDEX,
    KEY_RESIZE, KEY_SCALE, MODEL_FILE, POSITIVE_CLASS, RESIZE_DEFAULT,
)

SCALE = 1.0 / 255.0
IMAGENET_FILE = "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" + IMAGENET_FILE


class ModelError(RuntimeError):
    """A model or weights file that cannot be used; the message is shown to the user as is."""


def build_model(image_size: int = 128, weights: str = "none", seed: int | None = None,
                weights_sha256: str | None = None):
    """ResNet50V2(include_top=False) -> AveragePooling2D(4) -> Flatten -> Dense(128, relu)
    -> Dropout(0.5) -> Dense(2, softmax), behind a Rescaling(1/255) input layer."""
    import keras

    if seed is not None:
        keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(image_size, image_size, 3), name="pixels")
    x = keras.layers.Rescaling(SCALE, name="rescale")(inputs)
    base = keras.applications.ResNet50V2(
        include_top=False, weights=None, input_shape=(image_size, image_size, 3)
    )
    x = base(x)
    # AveragePooling2D(4) needs a 4x4 feature map (128 px); smaller inputs pool what there is.
    pool = min(4, image_size // 32)
    x = keras.layers.AveragePooling2D(pool_size=(pool, pool), name="avg_pool_head")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(128, activation="relu", name="dense_head")(x)
    x = keras.layers.Dropout(0.5, name="dropout_head")(x)
    # float32 probabilities whatever the compute precision (mixed bfloat16 keeps the softmax exact)
    outputs = keras.layers.Dense(2, activation="softmax", name="probs", dtype="float32")(x)
    model = keras.Model(inputs, outputs, name="malaria_resnet50v2")
    if weights != "none":
        load_base_weights(base, weights, weights_sha256)
    return model


def load_base_weights(base, weights: str, sha256: str | None = None) -> None:
    """``imagenet`` (Keras cache or download) or a URI of a ResNet50V2 notop weights .h5 file;
    with ``sha256``, a file whose content hash differs is refused before Keras reads it."""
    with contextlib.nullcontext(_imagenet_path()) if weights == "imagenet" else _fetched(weights) as path:
        if sha256:
            with open(path, "rb") as f:
                got = hashlib.file_digest(f, "sha256").hexdigest()
            if got != sha256.lower():
                raise ModelError(f"weights {storage.redact(weights)}: sha256 {got} does not match "
                                 f"--weights-sha256 {sha256}")
        try:
            base.load_weights(path)
        except Exception as exc:
            raise ModelError(f"weights {weights} do not fit ResNet50V2(include_top=False): {exc}") from exc


def check_init(uri: str, image_size: int) -> None:
    """``--init-from``: the artifact exists, is a safe Keras model, and was trained at ``image_size``."""
    found = inspect_artifact(uri)
    if found is not None and found[KEY_IMAGE_SIZE] != image_size:
        raise ModelError(f"--init-from {storage.redact(uri)} was trained at {found[KEY_IMAGE_SIZE]} px: fine-tune it "
                         f"with --image-size {found[KEY_IMAGE_SIZE]}")


def copy_weights(model, uri: str) -> None:
    """Every weight of the trained model at ``uri`` (a run directory or a model.keras) into
    ``model`` (fine-tuning); raises ``ModelError`` when the two do not have the same shapes (another
    --image-size, another architecture)."""
    source, _ = load_model(uri)
    if source.input_shape != model.input_shape:
        raise ModelError(f"--init-from {storage.redact(uri)}: its input is {source.input_shape[1:3]}, this run's "
                         f"{model.input_shape[1:3]}: fine-tune at the trained model's --image-size")
    try:
        model.set_weights(source.get_weights())
    except ValueError as exc:
        raise ModelError(f"--init-from {storage.redact(uri)}: not this architecture: {exc}") from exc


def _imagenet_path() -> str:
    import keras

    cache_dir = os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")), "models")
    cached = os.path.join(cache_dir, IMAGENET_FILE)
    if os.path.exists(cached):
        return cached
    try:
        return keras.utils.get_file(IMAGENET_FILE, IMAGENET_URL, cache_subdir="models")
    except Exception as exc:
        raise ModelError(
            f"ImageNet weights are not in the Keras cache ({cached}) and could not be downloaded "
            f"from {IMAGENET_URL} ({type(exc).__name__}). Copy that file into the cache, pass "
            "--weights URI of a copy, or train from scratch with --weights none."
        ) from exc


@contextlib.contextmanager
def _fetched(uri: str) -> Iterator[str]:
    """A local path for ``uri`` (local, file://, s3://, http(s)://) while the block runs. A remote
    file is copied into a temp dir that is removed on the way out: every scoring actor loads the
    model, and on a long-lived cluster a copy left per actor start fills the disk. A registered
    model's file (``models:/NAME/VERSION/model.keras``) comes from the MLflow registry that
    MLFLOW_TRACKING_URI names (``malaria_ray.tracking``), into such a temp dir too."""
    from malaria_ray import tracking

    if tracking.is_registered(uri):
        with tempfile.TemporaryDirectory(prefix="malaria-ray-fetch-") as tmp:
            yield tracking.download(uri, tmp)
        return
    if not storage.is_remote(uri):
        path = storage.local_path(uri)
        if not os.path.exists(path):
            raise ModelError(f"weights file {uri} does not exist")
        yield path
        return
    # Keep the file name: Keras picks the loader from it (.weights.h5 vs legacy .h5 vs .keras).
    name = os.path.basename(uri.split("?")[0]) or "weights.h5"
    with tempfile.TemporaryDirectory(prefix="malaria-ray-fetch-") as tmp:
        path = os.path.join(tmp, name)
        try:
            import fsspec

            # Plain HTTP servers (mirrors, artifact stores) need not support range requests: stream.
            opts = storage.s3_options() if uri.startswith("s3") else {"block_size": 0} if uri.startswith("http") else {}
            with fsspec.open(uri, "rb", **opts) as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except Exception as exc:
            raise ModelError(f"cannot download {storage.redact(uri)}: {type(exc).__name__}: "
                             f"{storage.redact(str(exc))}") from exc
        yield path


def file_id(path: str) -> str:
    """Content hash of a model artifact: the ``model_id`` stamped on every prediction row."""
    with open(path, "rb") as f:
        return _stream_id(f)


def _stream_id(f) -> str:
    """``file_id`` of an open binary file (local or fsspec), read in 1 MiB chunks."""
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()[:16]


def contract(model) -> dict:
    """The preprocessing contract written to ``model.json`` (``schema.KEY_*``); scoring reads the
    resize method from it (``resize_of``)."""
    size = int(model.input_shape[1])
    return {KEY_IMAGE_SIZE: size, KEY_SCALE: SCALE, KEY_RESIZE: RESIZE_DEFAULT, KEY_CHANNELS: "RGB",
            KEY_CLASSES: list(CLASS_NAMES), KEY_POSITIVE_INDEX: CLASS_NAMES.index(POSITIVE_CLASS)}


def save_model(model, uri: str, h5: bool = False, operating_point: dict | None = None) -> str:
    """Write ``model.keras`` (+ ``model.json`` contract, optional ``model.h5``) under ``uri``;
    returns the ``model_id`` (content hash of ``model.keras`` as written). ``operating_point``
    (``threshold``, ``target_sensitivity`` and how it was chosen) goes into ``model.json``."""
    with tempfile.TemporaryDirectory(prefix="malaria-ray-model-") as tmp:
        model.save(os.path.join(tmp, MODEL_FILE))
        model_id = file_id(os.path.join(tmp, MODEL_FILE))
        with open(os.path.join(tmp, CONTRACT_FILE), "w") as f:
            json.dump({**contract(model), **(operating_point or {}), KEY_MODEL_ID: model_id}, f, indent=2)
        if h5:
            model.save(os.path.join(tmp, H5_FILE))
        storage.upload_dir(tmp, uri)
    return model_id


def resize_of(contract: dict) -> str:
    """The resize method a model's contract names (``RESIZE_DEFAULT`` for a bare ``.keras``,
    which has no model.json: what every malaria-ray model was trained with). Raises ModelError for
    a method ``preprocess`` does not have."""
    from malaria_ray.preprocess import RESIZE_FILTERS

    resize = contract.get(KEY_RESIZE, RESIZE_DEFAULT)
    if resize not in RESIZE_FILTERS:
        raise ModelError(f"{CONTRACT_FILE} names resize method {resize!r}; known: {', '.join(RESIZE_FILTERS)}")
    return resize


def check_contract(contract: dict, image_size: int | None) -> None:
    """Refuse a ``model.json`` whose contract scoring cannot honour: other classes or another
    positive index (scoring reads column ``positive_index`` as P(Parasitized) and names the classes
    as ``schema.CLASS_NAMES``), another pixel scale or channel order than the model's own input
    layers take, or an input size that is not the artifact's. A bare ``.keras`` has no contract."""
    expected = {KEY_CLASSES: list(CLASS_NAMES), KEY_POSITIVE_INDEX: CLASS_NAMES.index(POSITIVE_CLASS),
                KEY_CHANNELS: "RGB"}
    for key, want in expected.items():
        if key in contract and contract[key] != want:
            raise ModelError(f"{CONTRACT_FILE} has {key}={contract[key]!r}; malaria-ray scores {key}={want!r}")
    if KEY_SCALE in contract and not math.isclose(float(contract[KEY_SCALE]), SCALE, rel_tol=1e-6):
        raise ModelError(f"{CONTRACT_FILE} has {KEY_SCALE}={contract[KEY_SCALE]!r}; the model scales its input by {SCALE!r}")
    if image_size is not None and KEY_IMAGE_SIZE in contract and int(contract[KEY_IMAGE_SIZE]) != image_size:
        raise ModelError(f"{CONTRACT_FILE} says {KEY_IMAGE_SIZE}={contract[KEY_IMAGE_SIZE]} but the model takes {image_size} px")


def read_contract(uri: str) -> dict:
    """``model.json`` beside the artifact (a run directory's), or {} where there is none."""
    contract_uri = storage.join(uri.rsplit("/", 1)[0] if uri.endswith((".keras", ".h5")) else uri, CONTRACT_FILE)
    try:
        return json.loads(storage.read_bytes(contract_uri)) if storage.exists(contract_uri) else {}
    except (OSError, ValueError):
        return {}


def artifact_uri(uri: str) -> str:
    """``uri`` itself for a ``.keras``/``.h5`` file, else ``model.keras`` inside that run directory."""
    return uri if uri.endswith((".keras", ".h5")) else storage.join(uri, MODEL_FILE)


def inspect_artifact(uri: str) -> dict:
    """``{"image_size", "model_id"}`` of a ``.keras`` artifact, read without TensorFlow.

    The scoring driver uses this so that it never imports TensorFlow and a bad model fails in a
    second, before any worker starts: the file is hashed as a stream (its ``model_id``) and only the
    zip's ``config.json`` is parsed (its input shape is the image size). A Lambda layer anywhere in
    the config is refused here with the reason ``safe_mode`` would give. Loading proper, with
    ``safe_mode=True``, still happens in every scoring actor (``load_model``). Raises ModelError;
    returns None for a legacy ``.h5`` file, which only Keras can read.
    """
    import zipfile

    uri = artifact_uri(uri)
    if uri.endswith(".h5"):
        return None
    fs, path = storage.filesystem(uri)
    try:
        if not fs.isfile(path):
            raise ModelError(f"model {uri} does not exist")
        with fs.open(path, "rb") as f:
            model_id = _stream_id(f)
            f.seek(0)
            with zipfile.ZipFile(f) as zf:
                config = json.loads(zf.read("config.json"))
    except ModelError:
        raise
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise ModelError(f"{uri} is not a loadable Keras model: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        raise ModelError(f"cannot read model {uri}: {type(exc).__name__}: {exc}") from exc
    if _find_class(config, "Lambda"):
        raise ModelError(f"{uri} is not a loadable Keras model: it contains a Lambda layer (arbitrary Python "
                         "code), which safe_mode refuses to load")
    layers = config.get("config", {}).get("layers", [])
    inputs = [layer for layer in layers if layer.get("class_name") == "InputLayer"]
    shapes = [layer.get("config", {}).get("batch_shape") for layer in inputs]
    shape = shapes[0] if len(shapes) == 1 else None
    if not shape or len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3:
        raise ModelError(f"{uri} is not a malaria-ray classifier (inputs {shapes})")
    rescales = [(la.get("config", {}).get("scale"), la.get("config", {}).get("offset", 0.0)) for la in layers
                if la.get("class_name") == "Rescaling" and _fed_by(la, inputs[0].get("config", {}).get("name"))]
    check_scaling(uri, rescales)
    return {KEY_IMAGE_SIZE: int(shape[1]), KEY_MODEL_ID: model_id}


def check_scaling(uri: str, rescales: list[tuple]) -> None:
    """The preprocessing contract: the input layer feeds a Rescaling(1/255) layer, so raw 0..255
    pixels are right. Anything else (the notebook's own .h5 expects 0..1 input and has no such
    layer) would be scored with the wrong scaling, silently: refused."""
    ok = [r for r in rescales if r[0] is not None and abs(float(r[0]) - SCALE) < 1e-9 and not float(r[1] or 0.0)]
    if not ok:
        raise ModelError(f"{uri}: its input scaling cannot be verified (no Rescaling(1/255) layer on its input; "
                         f"found {rescales or 'none'}): scoring would feed it the wrong pixel range. Re-save it with "
                         "malaria-ray (model.build_model puts the scaling inside the model)")


def _fed_by(layer: dict, input_name: str | None) -> bool:
    return input_name is not None and f'"keras_history": ["{input_name}"' in json.dumps(layer.get("inbound_nodes"))


def _find_class(node, name: str) -> bool:
    if isinstance(node, dict):
        return node.get("class_name") == name or any(_find_class(v, name) for v in node.values())
    if isinstance(node, list):
        return any(_find_class(v, name) for v in node)
    return False


def bf16_copy(model):
    """``model`` computing in mixed bfloat16 (GPU scoring, ``--precision bf16``): every layer but
    the output layers (the float32 softmax) gets the ``mixed_bfloat16`` policy; the weights are the
    same float32 values. Built from the model's config, so any saved Keras functional model works."""
    import keras

    config = model.get_config()
    outputs = config.get("output_layers", [])
    outputs = [outputs] if outputs and isinstance(outputs[0], str) else outputs  # one output: [name, 0, 0]
    keep = {name for name, *_ in outputs}

    def walk(node):
        if isinstance(node, dict):
            dtype = node.get("config", {}).get("dtype") if isinstance(node.get("config"), dict) else None
            if (isinstance(dtype, dict) and dtype.get("class_name") == "DTypePolicy"
                    and node.get("class_name") != "InputLayer" and node["config"].get("name") not in keep):
                dtype["config"]["name"] = "mixed_bfloat16"
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config["layers"])
    clone = keras.Model.from_config(config)
    clone.set_weights(model.get_weights())
    return clone


def load_model(uri: str):
    """(keras.Model, model_id) from a ``.keras`` file or a run directory holding ``model.keras``.

    Loads with ``safe_mode=True``: a model carrying a Lambda layer (arbitrary code) is refused.
    """
    import keras

    from malaria_ray.tracking import is_registered

    uri = artifact_uri(uri)
    if not storage.is_remote(uri) and not is_registered(uri) and not os.path.exists(storage.local_path(uri)):
        raise ModelError(f"model {uri} does not exist")
    with _fetched(uri) as path:  # Keras holds the whole model in memory once loaded: the copy can go
        try:
            model = keras.models.load_model(path, safe_mode=True, compile=False)
        except Exception as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            raise ModelError(f"{uri} is not a loadable Keras model: {type(exc).__name__}: {first_line}") from exc
        model_id = file_id(path)
    shape = model.input_shape
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3 or model.output_shape[-1] != 2:
        raise ModelError(f"{uri} is not a malaria-ray classifier (input {shape}, output {model.output_shape})")
    first = model.layers[1] if len(model.layers) > 1 else None
    check_scaling(uri, [(getattr(first, "scale", None), getattr(first, "offset", 0.0))]
                  if type(first).__name__ == "Rescaling" else [])
    return model, model_id
