# The cluster image: Ray (Python 3.11, CUDA) + the pinned TensorFlow/Keras stack + this project.
# Every node runs it (head and GPU workers, KubeRay and the cluster launcher), so jobs need no
# `pip` in their runtime env and a fresh pod starts without downloading gigabytes of wheels.
#
#   make image                                         # docker build -t malaria-ray:<version> .
#   make image IMAGE=registry.example.com/malaria-ray:0.1.0
#   docker push registry.example.com/malaria-ray:0.1.0
#
# tests/test_cluster_configs.py keeps it in step with the repo: the base image's Ray is the Ray
# pinned in pyproject.toml, the pip pins are pyproject's dependencies, ENV is the env_vars of
# cluster/runtime_env.yaml, and cluster/ names this image (docs/operations.md, "The cluster image").

# Pinned by tag. A tag can be pushed again; for production pin the digest as well, so every build
# starts from the same bytes (the tag stays for readers, Docker checks the digest):
#   docker buildx imagetools inspect rayproject/ray:2.60.0-py311-gpu    # "Digest: sha256:..."
#   FROM rayproject/ray:2.60.0-py311-gpu@sha256:<that digest>
FROM rayproject/ray:2.60.0-py311-gpu

# TensorFlow reads these at import. cluster/runtime_env.yaml sets the same for every job; the image
# sets them for everything else on a node (`ray attach`, `kubectl exec`, a job submitted without it).
ENV TF_CPP_MIN_LOG_LEVEL=2 \
    TF_USE_LEGACY_KERAS=0 \
    KERAS_BACKEND=tensorflow \
    TF_FORCE_GPU_ALLOW_GROWTH=true \
    PYTHONUNBUFFERED=1

# The base image's non-root user (uid 1000, group users, home /home/ray) owns its Python; Ray runs
# as it and so does every install below. No secrets go into any layer.
USER ray

# pyproject.toml's runtime dependencies, pins exactly as there, minus Ray (the base image has it)
# and with TensorFlow's CUDA extra (pyproject's `gpu` extra), plus MLflow's client (the `mlflow`
# extra: the RayJobs name the model as models:/malaria-ray@champion). A layer of its own: a code change
# rebuilds only the small layers below, not the CUDA wheels.
RUN pip install --no-cache-dir \
      "tensorflow[and-cuda]==2.21.0" \
      "keras==3.15.1" \
      "numpy>=1.26,<3" \
      "pyarrow>=17,<27" \
      "pandas>=2.2,<4" \
      "pillow>=10.3,<14" \
      "scikit-learn>=1.5,<2" \
      "fsspec>=2024.6" \
      "s3fs>=2024.6" \
      "matplotlib>=3.8,<4" \
      "scikit-image>=0.22,<0.27" \
      "mlflow-skinny>=3.5,<4"

# The ImageNet weights `--weights imagenet` loads (malaria_ray.model.IMAGENET_URL; a test keeps them
# equal), put into the Keras cache (/home/ray/.keras/models) at build time: the build has egress, GPU
# pods often have none, and without this every Train worker downloads 94 MB when it starts.
RUN python -c "import keras; keras.utils.get_file('resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5', \
      'https://storage.googleapis.com/tensorflow/keras-applications/resnet/resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5', \
      cache_subdir='models')"

# The project itself, without dev extras: the package and its `malaria-ray` command in
# site-packages, and jobs/ at a fixed path that the RayJobs' entrypoints name. Its dependencies are
# all satisfied above, so this installs only the project. The import is a smoke test: a wheel set
# that cannot load fails the build, not the first night on the cluster.
COPY --chown=ray:users pyproject.toml README.md /home/ray/malaria-ray/
COPY --chown=ray:users malaria_ray /home/ray/malaria-ray/malaria_ray
COPY --chown=ray:users jobs /home/ray/malaria-ray/jobs
RUN pip install --no-cache-dir /home/ray/malaria-ray \
 && rm -rf /home/ray/malaria-ray/build /home/ray/malaria-ray/malaria_ray.egg-info \
 && python -c "import ray, tensorflow, keras, malaria_ray.cli; print(ray.__version__, tensorflow.__version__, keras.__version__)"

WORKDIR /home/ray
