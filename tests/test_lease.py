"""The output root's lease is a compare-and-swap, on a local disk and on a real S3-protocol server
(moto on 127.0.0.1): two runs that start at once, or take over one expired lease at once, cannot
both hold it, and a run whose lease was taken over stops instead of writing beside the new holder.

moto checks a PUT's ``If-None-Match``/``If-Match`` and then stores the object in two steps, on
concurrent request threads: two conditional PUTs at the same instant can both pass (seen here,
about one run in eight). S3 itself evaluates the condition atomically. So these tests run moto
behind one lock per request (``atomic_s3``): the same server and protocol, with S3's atomicity.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from malaria_ray import storage
from malaria_ray.lease import LEASE_FILE, Lease, LeaseConflict, LeaseHeld, _store_for

REPO = pathlib.Path(__file__).resolve().parents[1]

# One contender: once imported, says so and reads the shared instant; at that instant it takes the
# lease through the CLI's own error path (a LeaseHeld is one line on stderr and exit 2). It stays
# alive until told to exit: a holder whose process is gone loses its lease to the next run.
CONTENDER = """
import sys, time
from malaria_ray import cli
from malaria_ray.lease import Lease
lease = Lease(sys.argv[1], sys.argv[2])
print("ready", flush=True)
at = float(sys.stdin.readline())
time.sleep(max(0.0, at - time.time()))
code = cli.run_guarded(lambda: lease.acquire() or 0)
print("done", flush=True)
sys.stdin.readline()
sys.exit(code)
"""


# moto's own server (moto.server.main) with every request handled under one lock.
ATOMIC_MOTO = """
import sys, threading
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import run_simple
app, lock = DomainDispatcherApplication(create_backend_app), threading.Lock()
def serialized(environ, start_response):
    with lock:
        return list(app(environ, start_response))
run_simple("127.0.0.1", int(sys.argv[1]), serialized, threaded=True, request_handler=MotoRequestHandler)
"""


@pytest.fixture(scope="module")
def atomic_s3():
    """moto on 127.0.0.1 with its requests serialized (module docstring); yields its URL."""
    from conftest import serve_on_free_port

    proc, url = serve_on_free_port(lambda port: [sys.executable, "-c", ATOMIC_MOTO, str(port)], "moto")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def _root(kind: str, tmp_path: pathlib.Path, request) -> str:
    """A fresh output root: a local folder, or a prefix in a fresh bucket of the S3 server."""
    if kind == "local":
        return str(tmp_path / "out")
    request.getfixturevalue("monkeypatch").setenv("AWS_ENDPOINT_URL", request.getfixturevalue("atomic_s3"))
    import boto3

    bucket = f"lease-{os.getpid()}-{time.monotonic_ns()}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/nightly"


def _expired(root: str, run_id: str) -> None:
    """A lease left by a run on another host that stopped renewing it (its process cannot be checked)."""
    now = time.time()
    storage.write_bytes(storage.join(root, LEASE_FILE), json.dumps(
        {"run_id": run_id, "host": "gone-host", "pid": 1, "renewed_at": now - 3600, "expires_at": now - 60}).encode())


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_write_from_a_stale_read_is_refused(kind, tmp_path, request):
    """The primitive under the lease: a write conditional on what was read fails once another
    writer moved first (create, swap and delete alike)."""
    store = _store_for(storage.join(_root(kind, tmp_path, request), LEASE_FILE))
    data, token = store.read()
    assert data is None and token is None
    mine = store.put(b"first", None)
    with pytest.raises(LeaseConflict):
        store.put(b"second", None)  # read as free, created meanwhile
    theirs = store.put(b"third", mine)
    with pytest.raises(LeaseConflict):
        store.put(b"fourth", mine)  # read as "first", replaced meanwhile
    with pytest.raises(LeaseConflict):
        store.delete(mine)
    assert store.read()[0] == b"third"
    store.delete(theirs)
    assert store.read() == (None, None)


@pytest.mark.parametrize("start", ["free", "expired"])
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_runs_started_at_the_same_instant_exactly_one_wins(kind, start, tmp_path, request):
    """Two processes take one root's lease at the same instant (a free root, or the expired lease
    of a crashed run): exactly one exits 0; the other exits 2 with one line naming the winner."""
    root = _root(kind, tmp_path, request)
    if start == "expired":
        _expired(root, "crashed-night")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = {f"night-{i}": subprocess.Popen([sys.executable, "-c", CONTENDER, root, f"night-{i}"], env=env,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True) for i in range(2)}
    for p in procs.values():
        assert p.stdout.readline() == "ready\n", p.communicate()
    at = time.time() + 0.3
    for p in procs.values():
        p.stdin.write(f"{at}\n")
        p.stdin.flush()
    for p in procs.values():
        assert p.stdout.readline() == "done\n", p.communicate()
    for p in procs.values():
        p.stdin.close()
    done = {run_id: (p.wait(timeout=60), p.stderr.read()) for run_id, p in procs.items()}
    winners = [run_id for run_id, (rc, _) in done.items() if rc == 0]
    assert len(winners) == 1, done
    held = json.loads(storage.read_bytes(storage.join(root, LEASE_FILE)))
    assert held["run_id"] == winners[0]
    for run_id, (rc, err) in done.items():
        if run_id != winners[0]:
            lines = err.strip().splitlines()
            assert rc == 2 and len(lines) == 1, (rc, err)
            assert lines[0].startswith("malaria-ray: error: another scoring run") and winners[0] in lines[0], err


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_run_whose_lapsed_lease_was_taken_over_stops(kind, tmp_path, request):
    """A run renews its own lease; one that stalled past its expiry and was taken over must not
    renew over the new holder, nor delete its lease on the way out."""
    root = _root(kind, tmp_path, request)
    uri = storage.join(root, LEASE_FILE)
    night = Lease(root, "stalled-night", seconds=0.6)
    night.acquire()
    first = json.loads(storage.read_bytes(uri))["expires_at"]
    time.sleep(0.25)
    night.renew()  # a third of its length has passed: extended
    assert json.loads(storage.read_bytes(uri))["expires_at"] > first
    time.sleep(0.7)  # it stalls past its expiry
    Lease(root, "next-night").acquire()
    with pytest.raises(LeaseHeld, match="taken over by run next-night"):
        night.renew()
    night.release()
    assert json.loads(storage.read_bytes(uri))["run_id"] == "next-night"
