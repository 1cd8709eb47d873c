"""Output writes to S3 survive the store's transient faults (issue 23): the fault proxy itself, and the
commit protocol's writes through it (part publish by server-side copy, manifest replace, the lease's
conditional writes, the metrics rebuild).

Real S3 protocol: moto on 127.0.0.1 behind tests/faultproxy.py. No Ray and no TensorFlow: each test
takes seconds; the nights end to end, killed drivers included, are tests/test_soak.py.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from faultproxy import KINDS, FaultProxy
from malaria_ray import manifests, metrics, outputs, schema, storage
from malaria_ray.lease import LEASE_FILE, Lease, LeaseHeld
from malaria_ray.writer import PredictionWriter


@pytest.fixture
def bucket(moto_s3):
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_s3)
    name = f"faults-{time.monotonic_ns()}"
    s3.create_bucket(Bucket=name)
    return s3, name


def _client(url: str, read_timeout: float = 5.0):
    """A boto3 client that neither retries nor waits long: it shows each fault as the wire gives it."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=url, config=Config(retries={"total_max_attempts": 1},
                                                              read_timeout=read_timeout, connect_timeout=2))


def test_the_proxy_fails_requests_as_told_and_counts_them(bucket, moto_s3):
    from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError

    s3, name = bucket
    s3.put_object(Bucket=name, Key="in/a.png", Body=b"a")
    expected = {"503": ClientError, "reset": ConnectionClosedError, "stall": ReadTimeoutError}
    for kind, error in expected.items():
        proxy = FaultProxy(moto_s3, fail_key="a.png", fail_left=1, fail_kind=kind, stall_s=2.0)
        try:
            c = _client(proxy.url, read_timeout=0.5)
            with pytest.raises(error) as raised:
                c.get_object(Bucket=name, Key="in/a.png")
            assert c.get_object(Bucket=name, Key="in/a.png")["Body"].read() == b"a"  # the next try answers
        finally:
            proxy.close()
        if kind == "503":
            assert raised.value.response["Error"]["Code"] == "SlowDown"
        assert proxy.faults == {(kind, "GET"): 1} and proxy.retried == 1 and proxy.counts["GET"] == 2

    # A lost answer: the store applied the write, the client saw a reset; a copy counts as COPY.
    proxy = FaultProxy(moto_s3, fail_key="out/", fail_left=2, fail_kind="lost", fail_methods=("PUT", "COPY"))
    try:
        c = _client(proxy.url)
        with pytest.raises(ConnectionClosedError):
            c.put_object(Bucket=name, Key="out/b", Body=b"b")
        with pytest.raises(ConnectionClosedError):
            c.copy_object(Bucket=name, Key="out/c", CopySource={"Bucket": name, "Key": "out/b"})
    finally:
        proxy.close()
    assert s3.get_object(Bucket=name, Key="out/c")["Body"].read() == b"b"
    assert proxy.faults == {("lost", "PUT"): 1, ("lost", "COPY"): 1}


def test_a_fault_rate_is_a_share_of_the_eligible_requests_repeatable_by_seed(bucket, moto_s3):
    s3, name = bucket
    s3.put_object(Bucket=name, Key="k", Body=b"x")
    seen = []
    for _ in range(2):
        proxy = FaultProxy(moto_s3, rate=0.3, seed=7, kinds=("503",), methods=("GET",))
        try:
            c = _client(proxy.url)
            outcome = []
            for _ in range(60):
                try:
                    c.get_object(Bucket=name, Key="k")
                    outcome.append(True)
                except Exception:  # noqa: BLE001 - the 503 as botocore raises it
                    outcome.append(False)
                c.head_object(Bucket=name, Key="k")  # HEAD is not eligible here: never failed
        finally:
            proxy.close()
        seen.append(outcome)
        assert proxy.faults[("503", "GET")] == outcome.count(False) and proxy.counts["HEAD"] == 60
    assert seen[0] == seen[1] and 8 <= seen[0].count(False) <= 30  # ~18 of 60; one seed, one sequence


def test_a_lease_write_whose_answer_was_lost_is_still_this_runs(bucket, moto_s3, monkeypatch):
    """The store applies the conditional PUT, the answer is lost, the client's retry fails its own
    condition (412): that is this run's write, not another run's takeover. It used to stop the night
    with "lapsed and was taken over by run <itself>"."""
    _, name = bucket
    proxy = FaultProxy(moto_s3, fail_key=LEASE_FILE, fail_kind="lost", fail_methods=("PUT",))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        root = f"s3://{name}/out"
        lease = Lease(root, "run-a", seconds=60)
        proxy.fail_left = 1
        lease.acquire()  # the If-None-Match create
        assert proxy.failed == 1
        proxy.fail_left, lease._renewed = 1, 0.0  # a renewal due now, its answer lost
        lease.renew()
        assert proxy.failed == 2 and proxy.retried == 2
        rival = Lease(root, "run-b")
        with pytest.raises(LeaseHeld, match="run-a"):  # still held, by run-a
            rival.acquire()
        lease.release()
        assert not storage.exists(storage.join(root, LEASE_FILE))
        rival.acquire()  # a real takeover still stops the old holder
        lease._renewed = 0.0
        with pytest.raises(LeaseHeld, match="taken over by run run-b"):
            lease.renew()
    finally:
        proxy.close()


def test_the_commit_protocols_writes_survive_every_kind_of_fault(bucket, moto_s3, monkeypatch):
    """Lease, manifest, parts published by copy, the run's metrics and the metrics rebuild, with a
    fifth of the requests of every method failing in every way: each run commits whole."""
    _, name = bucket
    proxy = FaultProxy(moto_s3, rate=0.2, seed=3, kinds=KINDS, methods=("GET", "HEAD", "PUT", "POST", "COPY", "DELETE"),
                       stall_s=1.0)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    root, runs = f"s3://{name}/out", [f"2026010{i}T000000Z-soak{i}" for i in range(1, 4)]
    try:
        for run_id in runs:
            with_lease = Lease(root, run_id, seconds=60)
            with_lease.acquire()
            manifests.write_manifest(root, run_id, {"run_id": run_id, "finished": False})
            writer = PredictionWriter(root, run_id, part_rows=2)
            for ks in ([0, 1], [2]):  # a full part, published at once; the last at commit
                writer.write(pa.table({schema.COL_IMAGE_ID: [f"{run_id}-{k}" for k in ks],
                                       schema.COL_URI: [f"s3://in/{run_id}/{k}.png" for k in ks]}))
            writer.close()
            writer.commit()
            with_lease._renewed = 0.0
            with_lease.renew()
            acc = metrics.MetricsAccumulator(0.5)
            acc.update([None] * 3, np.full(3, 0.5), [None] * 3)
            manifests.write_run_metrics(root, run_id, {schema.COL_RUN_ID: run_id, schema.COL_MODEL_ID: "m", **acc.row()})
            manifests.write_manifest(root, run_id, {"run_id": run_id, "finished": True, "parts": len(writer.parts)})
            manifests.rebuild_metrics(root)
            with_lease.release()
    finally:
        proxy.close()
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3)  # read back past the proxy
    assert {kind for kind, _ in proxy.faults} == set(KINDS), proxy.figures()
    assert {m for _, m in proxy.faults} >= {"GET", "PUT"}, proxy.figures()
    files = outputs.committed_files(root)
    assert [run for run, _ in files] == [r for r in runs for _ in range(2)]  # two parts each: 2 rows + 1
    fs, path = storage.filesystem(outputs.predictions_uri(root))
    rows = [pq.read_table(fs.open(f"{path}/{f}", "rb")).num_rows for _, f in files]
    assert rows == [2, 1] * len(runs)
    assert manifests.finished_runs(root) == runs
    assert pq.read_table(fs.open(f"s3://{name}/out/{outputs.METRICS_FILE}", "rb")).column(schema.COL_RUN_ID).to_pylist() == runs
    assert not storage.exists(storage.join(root, LEASE_FILE))


@pytest.mark.parametrize("kind", ["503", "reset", "lost"])
def test_a_part_whose_publishing_copy_fails_once_is_published_once(bucket, moto_s3, monkeypatch, kind):
    _, name = bucket
    proxy = FaultProxy(moto_s3, fail_key="part00001", fail_left=1, fail_kind=kind, fail_methods=("COPY",))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    root = f"s3://{name}/out"
    try:
        writer = PredictionWriter(root, "20260101T000000Z-copy")
        writer.write(pa.table({schema.COL_IMAGE_ID: ["a", "b"], schema.COL_URI: ["s3://in/a", "s3://in/b"]}))
        writer.close()
        writer.commit()
    finally:
        proxy.close()
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3)
    assert proxy.faults == {(kind, "COPY"): 1} and proxy.retried == 1
    (_, part), = outputs.committed_files(root)
    fs, path = storage.filesystem(outputs.predictions_uri(root))
    assert pq.read_table(fs.open(f"{path}/{part}", "rb")).column(schema.COL_IMAGE_ID).to_pylist() == ["a", "b"]
    assert not fs.exists(f"{path}/{outputs.STAGING_DIR}/{part}")
