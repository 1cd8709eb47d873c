"""Shared fixtures: real NIH cells, one local Ray instance per test session.

``sample_dir`` is the in-repository fixture tests/fixtures/nih_cells (288 real NIH cells, public
domain, see its SOURCE.md): every test that needs real cells runs on a fresh clone. The larger
shared sets are optional: ``nih_sample_dir`` (MALARIA_SAMPLE_DIR, default
../shared/data/nih_malaria beside the checkout: 6,000 cells and NIH's full mapping files) and
``fields_dir`` (MALARIA_FIELDS_DIR, default ../shared/data/iml_malaria). A test that needs one is
skipped, with one line naming the variable, when it is absent, unless MALARIA_REQUIRE_SHARED=1
(``.ci/run`` sets it: CI must run the full suite). All data is read-only: tests write only under
pytest's tmp_path.
"""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CELLS = REPO / "tests" / "fixtures" / "nih_cells"
SHARED = REPO.parent / "shared" / "data"


def pytest_configure(config):
    # Dummy credentials for the moto S3 server, set before the session's Ray starts so its workers
    # inherit them as a cluster's workers inherit an instance role: scoring never forwards keys.
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)


def shared_set(variable: str, default: pathlib.Path, marker: str, what: str) -> pathlib.Path:
    """The shared data set named by ``variable``; skips the test (one line) when it is absent."""
    path = pathlib.Path(os.environ.get(variable) or default)
    if not (path / marker).exists():
        reason = f"{what} not found at {path}: set {variable} to run this test"
        if os.environ.get("MALARIA_REQUIRE_SHARED") == "1":
            pytest.fail(reason + " (MALARIA_REQUIRE_SHARED=1)")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def sample_dir() -> pathlib.Path:
    """Real NIH cells shipped with the repository: 18 identities, 144 cells per class."""
    assert (CELLS / "Parasitized").is_dir(), f"the repository's fixture {CELLS} is missing"
    return CELLS


@pytest.fixture(scope="session")
def nih_sample_dir() -> pathlib.Path:
    """The larger shared NIH sample (6,000 cells, 160 identities, NIH's full mapping files)."""
    return shared_set("MALARIA_SAMPLE_DIR", SHARED / "nih_malaria", "Parasitized", "the shared NIH sample")


@pytest.fixture(scope="session")
def fields_dir() -> pathlib.Path:
    """The shared field photographs (IML-Malaria: 300 JPEGs and annotations.json); never copied."""
    return shared_set("MALARIA_FIELDS_DIR", SHARED / "iml_malaria", "annotations.json", "the shared field images")


def write_distinct_cells(src: pathlib.Path, dest: pathlib.Path, per_class: int) -> int:
    """``per_class`` distinct real cells per class under ``dest``: the fixture's cells under their
    eight flips and quarter turns (new pixels, so new content hashes); returns the number written."""
    from PIL import Image

    n = 0
    for cls in ("Parasitized", "Uninfected"):
        (dest / cls).mkdir(parents=True, exist_ok=True)
        files = sorted((src / cls).glob("*.png"))
        assert per_class <= 8 * len(files), f"at most {8 * len(files)} distinct cells per class"
        for i in range(per_class):
            variant, path = divmod(i, len(files))
            im = Image.open(files[path]).rotate(90 * (variant % 4), expand=True)
            if variant >= 4:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            im.save(dest / cls / f"{files[path].stem}_v{variant}.png")
            n += 1
    return n


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


def serve_on_free_port(argv, what: str, wait_s: float = 10.0, path: str = ""):
    """Start the server ``argv(port)`` on a free port of 127.0.0.1 and wait (``wait_s`` at most)
    until it answers HTTP at ``path``; returns (its process, its URL)."""
    import socket
    import subprocess
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(argv(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(int(wait_s * 10)):
        try:
            urllib.request.urlopen(url + path, timeout=1)
            break
        except Exception:
            if proc.poll() is not None:
                pytest.fail(f"{what} exited at start")
            time.sleep(0.1)
    return proc, url


@pytest.fixture(scope="session")
def moto_s3():
    """A real S3-protocol server (moto standalone) on 127.0.0.1 for this session; yields its URL.

    Sets the standard AWS environment (endpoint override, dummy credentials) for the session's
    processes so fsspec/s3fs, Ray workers and pyarrow reach it the way users' tools reach S3.
    """
    import sys

    from malaria_ray import storage

    exe = pathlib.Path(sys.executable).with_name("moto_server")
    proc, url = serve_on_free_port(lambda port: [str(exe), "-H", "127.0.0.1", "-p", str(port)], "moto_server")
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    with storage.environ(env):
        yield url
    proc.terminate()
    proc.wait(timeout=10)
