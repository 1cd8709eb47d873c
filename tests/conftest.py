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
