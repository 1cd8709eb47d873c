"""Shared fixtures: the real NIH sample, one local Ray instance per test session.

MALARIA_SAMPLE_DIR points at shared/data/nih_malaria (``.ci/run`` and the Makefile set it; it
defaults to ../shared/data/nih_malaria beside the checkout). The sample is read-only: tests write
only under pytest's tmp_path.
"""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SAMPLE = REPO.parent / "shared" / "data" / "nih_malaria"


def pytest_configure(config):
    # Dummy credentials for the moto S3 server, set before the session's Ray starts so its workers
    # inherit them as a cluster's workers inherit an instance role: scoring never forwards keys.
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)


@pytest.fixture(scope="session")
def sample_dir() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("MALARIA_SAMPLE_DIR", DEFAULT_SAMPLE))
    if not (path / "Parasitized").is_dir():
        pytest.fail(f"NIH sample not found at {path}: set MALARIA_SAMPLE_DIR to shared/data/nih_malaria")
    return path


@pytest.fixture(scope="session")
def small_corpus(sample_dir, tmp_path_factory) -> pathlib.Path:
    """A copy of 12 patients' real cells (both classes), small enough to train on in CI."""
    from malaria_ray import corpus

    listing = corpus.list_corpus(str(sample_dir))
    patients = sorted({p for p in listing.patient_ids if p and p.startswith("P")})[:8]
    controls = sorted({p for p in listing.patient_ids if p and p.startswith("C")})[:4]
    keep = set(patients + controls)
    dest = tmp_path_factory.mktemp("small_corpus")
    for uri, label, pid in zip(listing.uris, listing.labels, listing.patient_ids):
        if pid in keep:
            (dest / label).mkdir(exist_ok=True)
            shutil.copy(uri, dest / label / os.path.basename(uri))
    return dest


@pytest.fixture(scope="session")
def ray_session():
    """The one local Ray instance of this test session (2 CPUs: Train and Data share them)."""
    import ray

    ray.init(num_cpus=int(os.environ.get("MALARIA_TEST_CPUS", "2")), include_dashboard=False,
             log_to_driver=True, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def score_model(tmp_path_factory) -> pathlib.Path:
    """A randomly initialised classifier at 32 px saved with the model module (cheap to score)."""
    from malaria_ray.model import build_model, save_model

    dest = tmp_path_factory.mktemp("score_model")
    save_model(build_model(image_size=32, seed=0), str(dest))
    return dest


@pytest.fixture(scope="session")
def moto_s3():
    """A real S3-protocol server (moto standalone) on 127.0.0.1 for this session; yields its URL.

    Sets the standard AWS environment (endpoint override, dummy credentials) for the session's
    processes so fsspec/s3fs, Ray workers and pyarrow reach it the way users' tools reach S3.
    """
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = pathlib.Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except Exception:
            if proc.poll() is not None:
                pytest.fail("moto_server exited at start")
            time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)
