"""What a scoring model actor does per Keras backend (``score --backend tensorflow|jax``): its
environment, its GPU memory setting, its compiled predictor and the GPU probe's question.

Keras 3 reads ``KERAS_BACKEND`` once, when a process first imports ``keras``. The scoring driver
never imports Keras; each model actor gets the variable in its Ray runtime env (``with_backend``),
so the actor's own process imports Keras on the asked backend, and ``start`` checks that it did.
A ``.keras`` saved by TensorFlow training loads under JAX and predicts the same (tests/test_score.py
runs both through the CLI), so scoring nodes need no TensorFlow.
"""

from __future__ import annotations

import os

import numpy as np

NAMES = {"tensorflow": "TensorFlow", "jax": "JAX"}


def actor_env(backend: str) -> dict[str, str]:
    """The variables a model actor's process must hold before it imports Keras or JAX. JAX takes
    75% of a GPU's memory when it starts, and a second actor on that GPU (``--gpus-per-actor 0.5``)
    could not; with preallocation off it takes memory as it needs it, as TensorFlow does with the
    memory growth ``start`` sets (an API call there, not a variable)."""
    env = {"KERAS_BACKEND": backend}
    if backend == "jax":
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return env


def with_backend(remote_args: dict, backend: str) -> dict:
    """Ray options ``remote_args`` with ``actor_env`` added to their runtime env's ``env_vars``
    (Ray merges a job's ``env_vars`` with these, so the actor's win over a cluster-wide
    ``KERAS_BACKEND``)."""
    runtime_env = remote_args.get("runtime_env") or {}
    env_vars = {**runtime_env.get("env_vars", {}), **actor_env(backend)}
    return {**remote_args, "runtime_env": {**runtime_env, "env_vars": env_vars}}


def start(backend: str) -> None:
    """In a model actor, before its model loads: Keras runs on ``backend``, and a TensorFlow actor
    takes GPU memory as it goes (without memory growth TF grabs the whole GPU and a second actor on
    it cannot start). Raises ModelError when the backend is missing on this node, or when Keras was
    imported in this process on another one before ``KERAS_BACKEND`` was set."""
    from malaria_ray.model import ModelError

    try:
        import keras
    except ImportError as exc:
        raise ModelError(f"--backend {backend}: {NAMES[backend]} cannot be imported on this node: {exc}") from exc
    if keras.backend.backend() != backend:
        raise ModelError(f"--backend {backend}: this actor's Keras runs on {keras.backend.backend()} "
                         f"(KERAS_BACKEND={os.environ.get('KERAS_BACKEND')!r})")
    if backend == "tensorflow":
        import tensorflow as tf

        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)


def predictor(model, batch_size: int = 1):
    """``f(uint8 images [n, s, s, 3]) -> P(Parasitized) [n]`` for inference, compiled for the backend
    Keras runs on and traced here on blank images (``batch_size`` of them where the compiled
    function is per batch size), so the first real batch runs at full speed."""
    import keras

    size = int(model.input_shape[1])
    on_jax = keras.backend.backend() == "jax"
    predict = _jax_predictor(model) if on_jax else _tf_predictor(model, size)
    predict(np.zeros((batch_size if on_jax else 1, size, size, 3), np.uint8))
    return predict


def _tf_predictor(model, size: int):
    """A ``tf.function`` with the batch dimension left open: a short last batch or one thinned by
    error rows reuses the same graph (``predict_on_batch`` traces again for every new batch size,
    ~2 s of CPU each on ResNet50V2)."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
    def probs(images):
        return model(tf.cast(images, tf.float32), training=False)[:, 0]

    return lambda images: probs(images).numpy()


def _jax_predictor(model):
    """``jax.jit`` of ``model.stateless_call`` with the weights as arguments (jitting ``model(x)``
    of the bf16 copy gave NaN and wrong values). XLA compiles one program per input shape, so each
    batch is padded to the next power of two: a short last batch or one thinned by error rows costs
    one compile per size class, not one per count, and the padding rows are dropped."""
    import jax
    import jax.numpy as jnp

    weights = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables])

    @jax.jit
    def probs(trainable, non_trainable, images):
        out, _ = model.stateless_call(trainable, non_trainable, images.astype(jnp.float32), training=False)
        return out[:, 0]

    def predict(images: np.ndarray) -> np.ndarray:
        n = len(images)
        padded = np.zeros((1 << (n - 1).bit_length(), *images.shape[1:]), images.dtype)
        padded[:n] = images
        return np.asarray(probs(*weights, padded))[:n]

    return predict


def visible_gpus(backend: str) -> int:
    """The GPUs ``backend`` can compute on in this process (the GPU probe's question)."""
    if backend == "jax":
        import jax

        try:
            return len(jax.devices("gpu"))
        except RuntimeError:  # no GPU platform: a CPU-only jaxlib, or no CUDA
            return 0
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))
