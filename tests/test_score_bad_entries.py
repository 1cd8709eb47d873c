"""A night with odd entries and a flaky object store, scored end to end (real Ray, TF, S3 protocol).

The listing and read rules themselves are tested without Ray in tests/test_bad_entries.py; here
the whole night runs: it finishes, the good images are scored, every odd entry is counted once in
the manifest's ``entries``, and the next ``--skip-scored`` night reads a transient failure again
but not a permanent one.
"""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from malaria_ray import cli, schema
from faultproxy import FaultProxy
from test_bad_entries import cells, odd_night, within_test_time

pytestmark = [pytest.mark.ray, pytest.mark.tf]


def manifest(out) -> dict:
    (run,) = [p for p in (out / "runs").iterdir()]
    return json.loads((run / "manifest.json").read_text())


@pytest.mark.fresh
def test_a_night_with_odd_entries_finishes_and_counts_each(score_model, tmp_path):
    """As a user runs it: ``malaria-ray score`` in a subprocess with no Ray running."""
    from test_commands import run

    night = odd_night(tmp_path / "night", tmp_path / "outside")
    out = tmp_path / "out"
    r = run("malaria-ray", "score", "--input", str(night), "--model", str(score_model), "--output", str(out),
            "--batch-size", "8", "--max-error-fraction", "0.9", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    df = pd.read_parquet(out / "predictions")
    ok, errors = df[df[schema.COL_ERROR].isna()], df[df[schema.COL_ERROR].notna()]
    assert len(ok) == 7 and len(errors) == 5
    assert set(errors[schema.COL_ERROR_KIND]) == {schema.ERROR_PERMANENT} and ok[schema.COL_ERROR_KIND].isna().all()
    m = manifest(out)
    assert m["counts"][schema.STATUS_FOLDER_LINK] == 2 and m["counts"][schema.STATUS_NON_IMAGE] == 1
    assert m["entries"] == 7 + 5 + 2 + 1 == sum(m["counts"].values())
    assert m["error_kinds"] == {schema.ERROR_TRANSIENT: 0, schema.ERROR_PERMANENT: 5}
    assert re.search(r"^  folder links +2  \(links to folders: not followed", r.stdout, re.M)


def test_next_night_reads_a_transient_failure_again_not_a_permanent_one(ray_session, moto_s3, score_model, tmp_path,
                                                                         monkeypatch):
    """Night 1: GETs of flaky.png answer 503 (every try): a transient error row; corrupt.png does
    not decode: a permanent one. Night 2, store healthy, --skip-scored, nothing changed: flaky.png
    is read and scored, corrupt.png and steady.png are not read at all."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_s3)
    s3.create_bucket(Bucket="nightly-in")
    png = cells("Uninfected", 1)[0].read_bytes()
    for key, body in (("flaky.png", png), ("steady.png", cells("Parasitized", 1)[0].read_bytes()),
                      ("corrupt.png", png[:60])):
        s3.put_object(Bucket="nightly-in", Key=f"night/Uninfected/{key}", Body=body)
    proxy = FaultProxy(moto_s3, fail_key="flaky.png", fail_left=10**6)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # the driver's and (through runtime_env) the workers'
    out = tmp_path / "out"
    args = ["score", "--input", "s3://nightly-in/night", "--model", str(score_model), "--output", str(out),
            "--batch-size", "8", "--skip-scored", "--max-error-fraction", "0.9", "--read-attempts", "2"]
    try:
        assert within_test_time(lambda: cli.main(args), 300) == 0
        first = pd.read_parquet(out / "predictions").set_index(schema.COL_URI)
        assert proxy.failed == 2  # both tries of flaky.png
        proxy.fail_left, proxy.gets = 0, []
        assert within_test_time(lambda: cli.main(args), 300) == 0
        night2_gets = [g for g in proxy.gets if ".png" in g]
    finally:
        proxy.close()
    base = "s3://nightly-in/night/Uninfected/"
    assert first.loc[base + "flaky.png", schema.COL_ERROR_KIND] == schema.ERROR_TRANSIENT
    assert first.loc[base + "corrupt.png", schema.COL_ERROR_KIND] == schema.ERROR_PERMANENT
    assert pd.isna(first.loc[base + "steady.png", schema.COL_ERROR])
    assert len(night2_gets) == 1 and "flaky.png" in night2_gets[0], night2_gets
    df = pd.read_parquet(out / "predictions")
    flaky = df[df[schema.COL_URI] == base + "flaky.png"].sort_values(schema.COL_RUN_ID)
    assert flaky[schema.COL_ERROR].isna().tolist() == [False, True]  # an error row, then a score
    assert len(df) == 4
